"""Network reachability: downloads fail within seconds, with one line, when there is no network."""

from __future__ import annotations

import socket
from urllib.parse import urlparse

from tl_cli.core.errors import TLError


def probe(url: str, timeout: float = 3.0) -> str | None:
    """Return None if the host of `url` accepts a TCP connection quickly, else the reason."""
    host = urlparse(url).hostname or url
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return None
    except OSError as e:
        return f"{host} unreachable ({e.strerror or e})"


def offline_weights_error(what: str, cache_file: str, reason: str) -> TLError:
    return TLError(
        f"cannot download pretrained weights for {what}: {reason}. Put the file at {cache_file} "
        f"(or run once with network), or pass backbone.weights_path=FILE, or backbone.weights=none "
        f"for random init"
    )
