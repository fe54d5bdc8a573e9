"""The chat page served at `/` (placeholder until the page lands: a self-contained HTML document)."""
from __future__ import annotations


def page_html() -> str:
    """The page's HTML."""
    return ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>sdpo-fast serve</title></head>"
            "<body><p>sdpo-fast serve: an OpenAI-compatible chat API at /v1/chat/completions.</p></body></html>")
