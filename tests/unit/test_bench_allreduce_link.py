"""The all-reduce bench's link counters (the real ones are checked in tests/netlab) and its
memory figure."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from gossamer.bench import allreduce as allreduce_bench
from gossamer.bench.allreduce import (
    AllReduceBenchResult,
    aes_gcm_bytes_per_s,
    run_allreduce_sweep,
    write_throughput_plot,
)
from gossamer.bench.allreduce_results import _cpu_per_peer, _memory_ratio, _utilization
from gossamer.bench.allreduce_worker import _ExtraMemory, _tbf_sent_bytes, _uplink_sent_bytes

_TC_SHOWN = """\
qdisc tbf 8c83: root refcnt 3 rate 50Mbit burst 32Kb lat 11.1ms
 Sent 1234567 bytes 890 pkt (dropped 0, overlimits 12 requeues 0)
 backlog 0b 0p requeues 0
"""


def test_link_counter_is_zero_without_an_interface_and_reads_the_root_tbf_s_bytes() -> None:
    # The interface's own counter (/proc/net/dev) counts a GSO packet's headers once, where the
    # tbf charges every segment's: it read 1-4% under what the cap was charged.
    assert _uplink_sent_bytes("") == 0
    assert _tbf_sent_bytes(_TC_SHOWN, "eth0") == 1_234_567
    noqueue = "qdisc noqueue 0: root refcnt 2 \n Sent 0 bytes 0 pkt (dropped 0) \n"
    with pytest.raises(RuntimeError, match="'eth0' has no root tbf"):
        _tbf_sent_bytes(noqueue, "eth0")  # (a counter of no tbf: the link would read idle)
    with pytest.raises(RuntimeError, match="no root tbf"):
        _tbf_sent_bytes("qdisc tbf 8001: root refcnt 2 rate 1Mbit\n", "eth0")


def test_utilization_is_bytes_over_what_each_cap_allows_in_the_round() -> None:
    # two peers, two repeats; 8 Mbit/s = 1 MB/s and 16 Mbit/s = 2 MB/s caps
    sent = [[1_000_000, 500_000], [2_000_000, 2_000_000]]
    seconds = [1.0, 2.0]
    share = _utilization(sent, seconds, [8e6, 16e6])
    # repeat 0: (1.0 + 1.0) / 2 = 1.0; repeat 1: (0.25 + 0.5) / 2 = 0.375; median of the two
    assert share == pytest.approx((1.0 + 0.375) / 2)
    assert _utilization(sent, seconds, None) is None


def test_extra_memory_counts_a_buffer_freed_inside_the_block() -> None:
    with _ExtraMemory() as memory:
        buffer = np.ones(16 << 20, dtype=np.float32)  # 64 MiB, touched
        del buffer  # freed again before the block ends: the high-water mark keeps it
    assert 60 << 20 <= memory.extra_bytes <= 96 << 20
    with _ExtraMemory() as idle:
        pass
    assert 0 <= idle.extra_bytes < 8 << 20


def test_extra_memory_counts_pages_an_earlier_block_freed_and_left_resident() -> None:
    # glibc keeps a freed chunk of this size in its heap, resident (its mmap threshold rises
    # past a freed mmapped chunk): a round run after another found its pages there and counted
    # little of what it used (int8 after none read +1.13x the tensor, alone +1.61x). In a fresh
    # interpreter, so that what earlier tests left in this one's heap cannot decide it.
    script = textwrap.dedent(
        """
        import numpy as np
        from gossamer.bench.allreduce_worker import _ExtraMemory
        size = 16 * 2**20
        def use():
            buffer = np.ones(size, dtype=np.uint8)
            del buffer
        use()
        use()  # (the threshold risen, this one came from the heap and its pages stayed)
        with _ExtraMemory() as first:
            use()
        with _ExtraMemory() as second:
            use()
        print(size, first.extra_bytes, second.extra_bytes)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    size, first, second = map(int, done.stdout.split())
    if second < 0:
        pytest.skip("this kernel does not let a process reset its peak resident size")
    assert first >= 0.9 * size
    assert second >= 0.9 * size


def test_memory_ratio_is_the_largest_worker_over_the_tensor_and_unknown_if_any_is() -> None:
    assert _memory_ratio([100, 300, 200], 100) == 3.0
    assert _memory_ratio([100, -1], 100) is None
    assert _memory_ratio([], 100) is None


def test_cpu_per_peer_is_the_median_over_repeats_of_the_workers_mean() -> None:
    # cpu[worker][repeat]: repeat means 0.2, 0.4, 1.0 -> median 0.4
    assert _cpu_per_peer([[0.1, 0.3, 0.9], [0.3, 0.5, 1.1]]) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="shorter"):
        _cpu_per_peer([[0.1, 0.2], [0.3]])  # a worker short of a repeat is a bug, not a figure


def _result(**changes: object) -> AllReduceBenchResult:
    result = AllReduceBenchResult(
        peers=4, size_bytes=100, codec="none", backend="p2p", rate_bits_per_s=None,
        seconds=1.0, gloo_seconds=1.0, speedup_vs_gloo=1.0, speedup_vs_gloo_range=[1.0, 1.0],
        algorithm_bandwidth_bytes_per_s=100,
        share_of_bound=None, gloo_share_of_bound=None, ring_bound_seconds=None,
        wire_bytes_per_peer=150, header_overhead=0.0, max_abs_error_vs_gloo=0.0, repeats=1,
        all_seconds=[1.0], all_gloo_seconds=[1.0],
        peak_extra_memory_ratio=1.31, gloo_peak_extra_memory_ratio=0.02,
    )  # fmt: skip
    return replace(result, **changes)  # type: ignore[arg-type]


def test_the_table_shows_the_memory_figure_next_to_gloos() -> None:
    result = _result()
    assert "peak memory   +1.31x the tensor per peer (gloo +0.02x)" in result.table()
    assert '"peak_extra_memory_ratio": 1.31' in result.to_json()


def test_the_table_shows_cpu_per_peer_next_to_gloos_and_leaves_it_out_when_unknown() -> None:
    result = _result(cpu_seconds_per_peer=0.314, gloo_cpu_seconds_per_peer=0.059)
    assert "CPU           0.314 s per peer per round, all threads (gloo 0.059 s)" in result.table()
    assert '"cpu_seconds_per_peer": 0.314' in result.to_json()
    assert "CPU " not in _result().table()


def test_the_table_shows_the_tls_floor_under_the_cpu_figure_and_only_with_it() -> None:
    result = _result(
        cpu_seconds_per_peer=0.705,
        gloo_cpu_seconds_per_peer=0.099,
        aes_gcm_bytes_per_s=2.6e9,
        tls_floor_cpu_seconds_per_peer=0.115,
    )
    lines = result.table().splitlines()
    cpu = next(i for i, line in enumerate(lines) if line.startswith("  CPU "))
    assert lines[cpu + 1] == (
        "  TLS floor     0.115 s of that: its bytes sent and received through AES-128-GCM at "
        "2.60 GB/s (measured here)"
    )
    assert '"tls_floor_cpu_seconds_per_peer": 0.115' in result.to_json()
    no_cpu = _result(aes_gcm_bytes_per_s=2.6e9, tls_floor_cpu_seconds_per_peer=0.115)
    assert "TLS floor" not in no_cpu.table()
    assert "" not in no_cpu.table().splitlines()


def test_aes_gcm_is_measured_as_bytes_through_the_cipher_per_second() -> None:
    rate = aes_gcm_bytes_per_s(total_bytes=1 << 20)
    assert 1e7 < rate < 1e12  # some MB/s to a TB/s: a figure, not a unit slip


def test_the_table_names_rounds_whose_averages_left_the_ring_and_only_those() -> None:
    result = _result(ring_left={"stalled": 2, "result deadline": 1})
    assert "ring left     by a worker's averages in 1 result deadline, 2 stalled" in result.table()
    assert '"stalled": 2' in result.to_json()
    assert "ring left" not in _result().table()


def test_the_plot_is_a_png_of_every_codec_and_gloo_against_peers(tmp_path: Path) -> None:
    results = [
        _result(peers=peers, codec=codec, algorithm_bandwidth_bytes_per_s=rate)
        for peers in (2, 4)
        for codec, rate in (("none", 7e6), ("int8", 25e6))
    ]
    path = tmp_path / "throughput.png"
    assert write_throughput_plot(results, path) == f"plot written to {path}"
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(data) > 10_000


def _worker_row(wire: list[int]) -> dict[str, object]:
    """A worker's result file (see ``_p2p_rounds``) for rounds in which it sent ``wire``."""
    repeats = len(wire)
    each = {"seconds": [1.0] * repeats, "cpu": [0.5] * repeats, "link": [0] * repeats}
    round_row = {**each, "wire": wire, "error": 0.0, "memory": 0, "ring_left": []}
    gloo = {"gloo": [0.2] * repeats, "gloo_cpu": [0.1] * repeats, "gloo_link": [0] * repeats}
    return {
        **gloo,
        "gloo_memory": 0,
        "codecs": {"none": round_row},
        "tcp_congestion_control": "",
        "input_absmax": 4.0,
    }


def test_wire_bytes_per_peer_is_the_peers_mean_and_the_busiest_peer_is_stated_apart(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # As measured on loopback (4 peers, 100 MB, here scaled to 4 MB): the members' own send
    # rates straddle the rule for pairwise steps, so some send round the ring and some directly,
    # and one sending directly passes on what comes round the ring too. Every member still
    # receives the ring's bytes, and the round's bytes are the ring's. The bench read the
    # busiest worker's last round as the bytes per peer: 8 MB where the ring's are 6 MB,
    # "+33% comm's frames" for a round that sent nothing twice.
    headers = 600
    sent = [  # [worker][repeat]: all in steps, then two rounds of mixed orders
        [6_000_000, 7_000_000, 5_000_000],
        [6_000_000, 6_000_000, 6_000_000],
        [6_000_000, 4_000_000, 8_000_000],
        [6_000_000, 7_000_000, 5_000_000],
    ]
    rows = [_worker_row([b + headers for b in worker]) for worker in sent]
    monkeypatch.setattr(allreduce_bench, "_run_workers", lambda placement, options: rows)
    monkeypatch.setattr(allreduce_bench, "aes_gcm_bytes_per_s", lambda: 1e10)
    (result,) = run_allreduce_sweep(
        peers=4, size_bytes=4_000_000, codecs=["none"], backend="p2p", repeats=3
    )
    assert result.wire_bytes_per_peer == 6_000_000 + headers
    assert result.header_overhead == pytest.approx(headers / 6_000_000)
    assert result.busiest_peer_wire_bytes == 7_000_000 + headers  # median of 6, 7 and 8 MB
    assert "busiest peer  7000600 in a round (+16.7%: the members shared" in result.table()
    assert '"busiest_peer_wire_bytes": 7000600' in result.to_json()


def test_the_table_leaves_the_busiest_peer_out_where_the_peers_sent_alike() -> None:
    assert "busiest peer" not in _result(busiest_peer_wire_bytes=151).table()  # (within 1%)
    assert "busiest peer" not in _result().table()
    assert "busiest peer  200 in a round (+33.3%" in _result(busiest_peer_wire_bytes=200).table()
