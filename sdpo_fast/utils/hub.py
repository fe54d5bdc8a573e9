"""The Hugging Face Hub endpoint, and whether it can be reached, asked before anything tries to download."""
from __future__ import annotations

import os
import socket
import urllib.parse


def hub_endpoint() -> tuple[str, int]:
    """(host, port) of HF_ENDPOINT (default https://huggingface.co)."""
    url = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    return url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)


def hub_unreachable() -> str | None:
    """None when a TCP connection to the Hub opens within 5 s, else the error's class name."""
    try:
        socket.create_connection(hub_endpoint(), timeout=5).close()
    except OSError as exc:
        return exc.__class__.__name__
    return None
