"""Applications that ship with wsecho; ``echo`` is the one ``python -m wsecho`` serves."""
