"""Rates, token-bucket sizing and the lab config's checks."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gossamer.core.errors import ConfigError
from gossamer.lab.config import (
    LabConfig,
    format_rate,
    parse_rate,
    parse_rates,
    tbf_burst_bytes,
    tbf_limit_bytes,
)


@pytest.mark.parametrize(
    ("text", "bps"),
    [
        ("100mbit", 100_000_000),
        ("1gbit", 1_000_000_000),
        ("500kbit", 500_000),
        ("2.5mbit", 2_500_000),
        (" 20Mbit ", 20_000_000),
        ("1000000bit", 1_000_000),
    ],
)
def test_parse_rate_reads_tc_bit_units(text: str, bps: int) -> None:
    assert parse_rate(text) == bps


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("100mbps", "bytes per second"),
        ("100", "unknown unit"),
        ("fast", "not a rate"),
        ("100tbit", "unknown unit"),
        ("10kbit", "outside"),
        ("20gbit", "outside"),
    ],
)
def test_parse_rate_refuses_what_it_cannot_shape_with_a_reason(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        parse_rate(text, key="--rate")


def test_parse_rates_splits_on_commas() -> None:
    assert parse_rates("10mbit,100mbit") == (10_000_000, 100_000_000)
    with pytest.raises(ConfigError, match="at least one rate"):
        parse_rates(" , ")
    with pytest.raises(ConfigError, match="empty rate"):  # it was two peers' rates, not three
        parse_rates("1mbit,,2mbit")


@given(st.integers(min_value=100_000, max_value=10_000_000_000))
def test_format_then_parse_is_close_to_identity(bps: int) -> None:
    assert parse_rate(format_rate(bps)) == pytest.approx(bps, rel=1e-5)


def test_token_bucket_holds_at_least_a_tso_burst_and_scales_with_rate() -> None:
    assert tbf_burst_bytes(1_000_000) == 16 * 1024
    assert tbf_burst_bytes(1_000_000_000) == 625_000  # 5 ms at 1 Gbit/s
    assert tbf_limit_bytes(10_000_000) == 128 * 1024
    assert tbf_limit_bytes(100_000_000) == 625_000  # 50 ms at 100 Mbit/s


def test_a_queue_holds_at_most_200_ms_of_traffic_but_a_few_frames_at_least() -> None:
    # 128 KiB at any rate was 1.05 s of queueing at 1 Mbit/s (10.5 s at 100 kbit/s): a round
    # trip of ~1 s from a peer while it uploaded, and TCP at 71-83% of the cap.
    assert tbf_limit_bytes(1_000_000) == 25_000  # 200 ms
    assert tbf_limit_bytes(5_000_000) == 125_000  # 200 ms
    assert tbf_limit_bytes(100_000) == 4 * 1514  # 484 ms, but room for 4 full frames


@given(st.integers(min_value=100_000, max_value=10_000_000_000))
def test_a_queue_is_short_in_time_and_as_before_where_it_was_short(rate_bps: int) -> None:
    limit = tbf_limit_bytes(rate_bps)
    assert limit <= rate_bps / 8 * 0.2 + 1 or limit == 4 * 1514  # (+1: rounding)
    before = max(128 * 1024, round(rate_bps / 8 * 0.050))  # (the 100 Mbit/s benchmarks' links)
    if before * 8 / rate_bps <= 0.2:
        assert limit == before


def test_lab_config_per_peer_rates_and_nat_placement() -> None:
    config = LabConfig(num_peers=3, peer_rates_bps=(1_000_000, 2_000_000, 3_000_000), num_nat=1)
    assert [config.peer_rate_bps(i) for i in range(3)] == [1_000_000, 2_000_000, 3_000_000]
    assert [config.is_behind_nat(i) for i in range(3)] == [False, False, True]
    assert config.namespace_prefix == "gsl-lab-"


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"num_peers": 0}, "num_peers"),
        ({"num_peers": 65}, "num_peers"),
        ({"num_peers": 2, "peer_rates_bps": (1_000_000,)}, "one rate per peer"),
        ({"num_peers": 2, "num_nat": 3}, "num_nat"),
        ({"num_peers": 2, "rate_bps": 5}, "rate_bps"),
        ({"num_peers": 2, "name": "Has-Dash"}, "lab.name"),
        ({"num_peers": 2, "name": "waytoolongname"}, "lab.name"),
        ({"num_peers": 2, "name": "ab\n"}, "lab.name"),
        ({"num_peers": 2, "tcp_congestion_control": "bbr\n"}, "tcp_congestion_control"),
    ],
)
def test_lab_config_rejects_bad_values(kwargs: dict[str, object], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        LabConfig(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["Cubic", "bbr; reboot", "x" * 17, "tcp-bbr"])
def test_a_congestion_control_must_be_a_plain_name(name: str) -> None:
    with pytest.raises(ConfigError, match="tcp_congestion_control"):
        LabConfig(num_peers=2, tcp_congestion_control=name)
    assert LabConfig(num_peers=2, tcp_congestion_control="bbr").tcp_congestion_control == "bbr"
