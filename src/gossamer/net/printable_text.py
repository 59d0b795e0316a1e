"""Text from the network (a peer's refusal, an error's details) made safe for errors and logs."""

from __future__ import annotations

__all__ = ["printable_reason"]

_MAX_REASON_CHARS = 240
"""Characters of a relay's refusal kept for the dialer's error and log (the rest is cut)."""


def printable_reason(text: str, max_chars: int = _MAX_REASON_CHARS) -> str:
    """``text`` from the network made safe for an error or a log line: at most ``max_chars``
    characters of it (a note says how many were cut), and every character that is not
    printable (newlines, escapes, bidirectional overrides) written as its escape sequence."""
    cut = len(text) - max_chars
    text = text[:max_chars]
    if not text.isprintable():
        text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)
    return f"{text}... ({cut} more characters)" if cut > 0 else text
