"""A link capped at R carries a plain TCP transfer at 85-100% of R, in each direction, per peer."""

from __future__ import annotations

import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest
from netlab_support import MakeLab

from gossamer.lab import measure_tcp_throughput

pytestmark = pytest.mark.skipif(
    shutil.which("iperf3") is None, reason="throughput tests need iperf3: apt-get install iperf3"
)

MBIT = 1_000_000


def test_two_peers_with_different_caps_each_get_their_own(make_lab: MakeLab) -> None:
    rates = (20 * MBIT, 50 * MBIT, 100 * MBIT)
    with make_lab(num_peers=3, peer_rates_bps=rates) as lab, ThreadPoolExecutor(2) as pool:
        # p0 and p1 upload to p2 at the same time; each is held by its own cap, not the other's
        slow = pool.submit(measure_tcp_throughput, lab, "p0", "p2", duration_s=2, port=5201)
        fast = pool.submit(measure_tcp_throughput, lab, "p1", "p2", duration_s=2, port=5202)
        results = [slow.result(timeout=30), fast.result(timeout=30)]
    assert [r.bottleneck_bps for r in results] == [20 * MBIT, 50 * MBIT]
    for result in results:
        assert 0.85 <= result.share_of_bottleneck <= 1.0, result


def test_a_cap_holds_downstream_and_behind_nat(make_lab: MakeLab) -> None:
    with make_lab(num_peers=3, peer_rates_bps=(20 * MBIT, 100 * MBIT, 50 * MBIT), num_nat=1) as lab:
        download = measure_tcp_throughput(lab, "p1", "p0", duration_s=2)  # p0's switch-side tbf
        natted = measure_tcp_throughput(lab, "p2", "p1", duration_s=2)  # through p2's router
    assert download.bottleneck_bps == 20 * MBIT
    assert natted.bottleneck_bps == 50 * MBIT
    for result in (download, natted):
        assert 0.85 <= result.share_of_bottleneck <= 1.0, result


def test_a_lab_sets_the_congestion_control_its_peers_use(make_lab: MakeLab) -> None:
    with make_lab(num_peers=2, num_nat=1, tcp_congestion_control="reno") as lab:
        for peer in lab.topology.peers:
            used = subprocess.run(
                ["ip", "netns", "exec", peer.namespace, "sysctl", "-n",
                 "net.ipv4.tcp_congestion_control"],
                capture_output=True, text=True, check=True, timeout=10,
            ).stdout.strip()  # fmt: skip
            assert used == "reno", peer.name
