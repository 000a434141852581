"""What ``--storage`` names: ``sqlite``, or a PostgreSQL URL, and that URL as logs may show it.

Apart from :mod:`wsecho.backends.postgres` so that the settings can check and show a URL
without importing psycopg (an optional dependency: ``pip install 'wsecho[postgres]'``).
"""

from __future__ import annotations

import urllib.parse

#: The URL schemes ``--storage`` takes for PostgreSQL (libpq's two).
SCHEMES = ("postgresql", "postgres")


def is_postgres_url(value: str) -> bool:
    scheme, sep, _ = value.partition("://")
    return bool(sep) and scheme.lower() in SCHEMES


def redact(url: str) -> str:
    """``url`` without its password (in the authority or a ``password=`` parameter): for logs and errors."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user = userinfo.partition(":")[0]
        netloc = f"{user}@{hostport}" if user else hostport
    # The other parameters stay as they were written (percent-encoding and all).
    params = [p for p in parts.query.split("&") if p]
    kept = "&".join(p for p in params if urllib.parse.unquote(p.partition("=")[0]).lower() != "password")
    # (Not urlunsplit: it drops the empty authority of postgresql:///db?host=/run/postgresql.)
    return f"{parts.scheme}://{netloc}{parts.path}" + (f"?{kept}" if kept else "")
