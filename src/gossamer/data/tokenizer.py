"""Byte-level tokenizer: a token is one byte of the UTF-8 encoding, so the vocabulary is 256.

No training, no merges, no unknown tokens: any text or file round-trips exactly, and the embedded
corpus needs nothing beyond the bytes on disk.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["VOCAB_SIZE", "decode", "encode", "encode_bytes"]

VOCAB_SIZE = 256
"""Number of distinct tokens: one per byte value."""


def encode_bytes(data: bytes | bytearray | memoryview) -> list[int]:
    """Token ids of raw bytes (each byte is its own id)."""
    return list(bytes(data))


def encode(text: str) -> list[int]:
    """Token ids of ``text``'s UTF-8 encoding; bytes that are not UTF-8, in a string Python
    decoded with ``surrogateescape`` (command-line arguments, file names), are those bytes."""
    return list(text.encode("utf-8", "surrogateescape"))


def decode(tokens: Sequence[int]) -> str:
    """Text from token ids, decoding UTF-8 with replacement characters for invalid sequences.

    A model's sample may cut a multi-byte character or produce invalid bytes; those show as
    U+FFFD rather than failing.

    Raises:
        ValueError: A token id is outside ``0..255``.
    """
    try:
        data = bytes(tokens)
    except ValueError as exc:
        raise ValueError(
            f"byte-level token ids must be in 0..{VOCAB_SIZE - 1}; got {list(tokens)[:16]}..."
        ) from exc
    return data.decode("utf-8", errors="replace")
