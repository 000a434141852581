"""Serving over the network: the only package that imports Tornado. ``Server`` is the composition root."""
