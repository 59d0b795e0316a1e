"""A relay's words on their way into the dialer's errors and logs: bounded and escaped."""

from __future__ import annotations

from gossamer.net.printable_text import printable_reason


def test_a_plain_reason_is_kept_as_it_is() -> None:
    reason = "peer abcdefabcdef holds no reservation here"
    assert printable_reason(reason) == reason


def test_control_characters_and_overrides_are_written_as_escapes() -> None:
    text = printable_reason("a\nb\x1b[2J\u202ec\x00")
    assert text == "a\\nb\\x1b[2J\\u202ec\\x00"
    assert text.isprintable()


def test_a_long_reason_is_cut_and_says_how_much_was_cut() -> None:
    text = printable_reason("x" * 10_000, max_chars=100)
    assert text == "x" * 100 + "... (9900 more characters)"
