"""The all-reduce bench's link counters (the real ones are checked in tests/netlab)."""

from __future__ import annotations

import pytest

from gossamer.bench.allreduce import _link_tx_bytes, _utilization


def test_link_counter_is_zero_without_an_interface_and_names_a_missing_one() -> None:
    assert _link_tx_bytes("") == 0
    with pytest.raises(RuntimeError, match="no-such-if0"):
        _link_tx_bytes("no-such-if0")


def test_utilization_is_bytes_over_what_each_cap_allows_in_the_round() -> None:
    # two peers, two repeats; 8 Mbit/s = 1 MB/s and 16 Mbit/s = 2 MB/s caps
    sent = [[1_000_000, 500_000], [2_000_000, 2_000_000]]
    seconds = [1.0, 2.0]
    share = _utilization(sent, seconds, [8e6, 16e6])
    # repeat 0: (1.0 + 1.0) / 2 = 1.0; repeat 1: (0.25 + 0.5) / 2 = 0.375; median of the two
    assert share == pytest.approx((1.0 + 0.375) / 2)
    assert _utilization(sent, seconds, None) is None
