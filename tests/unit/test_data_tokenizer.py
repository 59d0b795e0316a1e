"""The byte-level tokenizer."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gossamer.data import VOCAB_SIZE, decode, encode, encode_bytes


@given(st.text())
def test_text_round_trips(text: str) -> None:
    tokens = encode(text)
    assert all(0 <= token < VOCAB_SIZE for token in tokens)
    assert decode(tokens) == text


def test_tokens_are_utf8_bytes() -> None:
    assert VOCAB_SIZE == 256
    assert encode("aé") == [0x61, 0xC3, 0xA9]
    assert encode_bytes(b"\x00\xff") == [0, 255]


def test_invalid_utf8_decodes_with_replacement_characters() -> None:
    assert decode([0x61, 0xC3]) == "a\ufffd"


def test_out_of_range_ids_are_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"0\.\.255"):
        decode([256])
