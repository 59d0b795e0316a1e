"""The bounds on what callers with no session can make the server read: the limits that set them
and the count of handshake requests being read."""

from __future__ import annotations

import pytest

from gossamer.core.errors import ConfigError
from gossamer.net.config import LimitsConfig
from gossamer.net.server import _HandshakeReads


def test_a_read_past_a_cap_takes_the_place_of_the_oldest_under_it() -> None:
    # Refusing the newcomer let a caller with no secret and four addresses keep every place
    # taken with stalled requests: no honest peer could join.
    reads = _HandshakeReads(max_reads=3, max_reads_per_host=2)
    first = reads.begin("10.0.0.1")
    second = reads.begin("10.0.0.1")
    third = reads.begin("10.0.0.1")  # its host's share is taken: its host's oldest gives way
    assert first.evicted.is_set()
    assert not second.evicted.is_set()
    assert reads.num_reading == 2
    other = reads.begin("10.0.0.2")
    honest = reads.begin("10.0.0.3")  # all are taken: the oldest of all gives way
    assert second.evicted.is_set()
    assert not any(r.evicted.is_set() for r in (third, other, honest))
    assert reads.num_reading == 3
    assert reads.num_evicted == 2
    for read in (first, second, third, other, honest):
        reads.end(read)  # (ending one that gave way already changes nothing)
    assert reads.num_reading == 0
    assert not reads._by_host  # (hosts no longer reading are not kept)


def test_the_defaults_bound_what_callers_with_no_session_make_a_node_hold() -> None:
    limits = LimitsConfig()
    assert limits.max_handshake_reads * limits.max_message_bytes <= 256 << 20
    assert limits.max_handshake_reads_per_host < limits.max_handshake_reads
    assert limits.handshake_read_timeout_s <= 2.0
    assert limits.max_handshake_message_bytes <= 16 * 1024


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"handshake_read_timeout_s": 0.0}, "limits.handshake_read_timeout_s"),
        ({"max_handshake_reads": 0}, "limits.max_handshake_reads"),
        ({"max_handshake_reads_per_host": 65}, "limits.max_handshake_reads_per_host"),
        ({"max_handshake_message_bytes": 4096}, "limits.max_handshake_message_bytes"),
        ({"idle_connection_timeout_s": 0.1}, "limits.idle_connection_timeout_s"),
        ({"transport_handshake_timeout_s": -1.0}, "limits.transport_handshake_timeout_s"),
    ],
)
def test_impossible_handshake_limits_name_their_key(overrides: dict[str, float], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        LimitsConfig(**overrides)  # type: ignore[arg-type]
