"""Throughput measurement: how iperf3 is driven and how its report is read (fake runner)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gossamer.core.clock import FakeClock
from gossamer.core.errors import (
    ConfigError,
    DeadlineExceededError,
    MissingDependencyError,
    PeerUnavailableError,
)
from gossamer.lab.config import LabConfig
from gossamer.lab.control import LabControl
from gossamer.lab.iperf import measure_tcp_throughput
from gossamer.lab.lifecycle import lab_up
from gossamer.lab.runner import CommandResult, FakeCommandRunner

REPORT = {
    "intervals": [{"sum": {"bits_per_second": 2.0e7}}, {"sum": {"bits_per_second": 1.9e7}}],
    "end": {
        "sum_sent": {"retransmits": 3},
        "sum_received": {"bits_per_second": 1.9e7, "bytes": 4_750_000, "seconds": 2.0},
    },
}


@pytest.fixture
def runner() -> FakeCommandRunner:
    fake = FakeCommandRunner(spawn_running=True)  # (the iperf3 server runs until stopped)
    fake.answer(["ip", "netns", "exec", "gsl-t1-p1", "ss"], stdout="LISTEN 0 5 *:5201 *:*\n")
    return fake


@pytest.fixture
def lab(runner: FakeCommandRunner, tmp_path: Path) -> LabControl:
    config = LabConfig(num_peers=3, peer_rates_bps=(20_000_000, 50_000_000, 50_000_000), name="t1")
    return lab_up(config, runner=runner, state_dir=tmp_path)


def test_measure_reads_the_receivers_figure_against_the_bottleneck(
    lab: LabControl, runner: FakeCommandRunner
) -> None:
    runner.answer(["ip", "netns", "exec", "gsl-t1-p0", "iperf3"], stdout=json.dumps(REPORT))
    result = measure_tcp_throughput(lab, "p0", "p1", duration_s=2, clock=FakeClock())
    assert result.bits_per_second == 1.9e7
    assert result.bottleneck_bps == 20_000_000
    assert result.share_of_bottleneck == pytest.approx(0.95)
    assert result.retransmits == 3
    server = next(c for c in runner.commands if c[3:6] == ("gsl-t1-p1", "iperf3", "-s"))
    assert server[server.index("-B") + 1] == "10.213.0.11"
    assert runner.spawned[0].returncode == 0  # the server was waited for


def test_an_unreachable_receiver_is_a_peer_unavailable_error(
    lab: LabControl, runner: FakeCommandRunner
) -> None:
    runner.answer(
        ["ip", "netns", "exec", "gsl-t1-p0", "iperf3"],
        stdout=json.dumps({"error": "unable to connect to server: Connection timed out"}),
        returncode=1,
    )
    with pytest.raises(PeerUnavailableError, match="timed out"):
        measure_tcp_throughput(lab, "p0", "p1", clock=FakeClock())


def test_a_server_that_never_listens_hits_a_deadline(lab: LabControl) -> None:
    clock = FakeClock()
    with pytest.raises(DeadlineExceededError, match="not listening"):
        measure_tcp_throughput(lab, "p0", "p2", clock=clock)
    assert clock.monotonic() == pytest.approx(5.0, abs=0.05)


def test_bad_arguments_and_a_missing_iperf3_are_reported(lab: LabControl) -> None:
    with pytest.raises(ConfigError, match="two different peers"):
        measure_tcp_throughput(lab, "p0", "p0")
    with pytest.raises(ConfigError, match="duration_s"):
        measure_tcp_throughput(lab, "p0", "p1", duration_s=0)
    with pytest.raises(ConfigError, match="whole number"):  # iperf3 ran -t 0: until killed
        measure_tcp_throughput(lab, "p0", "p1", duration_s=0.5)
    lab.runner.installed.discard("iperf3")  # type: ignore[attr-defined]
    with pytest.raises(MissingDependencyError, match="apt-get install iperf3"):
        measure_tcp_throughput(lab, "p0", "p1")


def test_a_server_that_cannot_listen_is_not_mistaken_for_one_left_listening(
    lab: LabControl, runner: FakeCommandRunner
) -> None:
    # A server left by a killed run holds the port: the new one exits at once, and the old one
    # was measured instead.
    runner.spawn_running = False
    with pytest.raises(PeerUnavailableError, match="exited at once"):
        measure_tcp_throughput(lab, "p0", "p1", duration_s=2, clock=FakeClock())


def test_the_per_second_figures_are_the_receivers(
    lab: LabControl, runner: FakeCommandRunner
) -> None:
    # The server ran without -J, so iperf3 handed its report over as text only, and the
    # figures were silently the sender's (ahead of the receiver by what its buffers held).
    def client(argv: tuple[str, ...]) -> CommandResult | None:
        if argv[3:5] != ("gsl-t1-p0", "iperf3"):
            return None
        server = next(c for c in runner.commands if c[3:6] == ("gsl-t1-p1", "iperf3", "-s"))
        report: dict[str, object] = dict(REPORT)  # as iperf3 3.12 answers --get-server-output
        if "-J" in server:
            receiver = {"intervals": [{"sum": {"bits_per_second": 1.8e7}},
                                      {"sum": {"bits_per_second": 1.85e7}}]}  # fmt: skip
            report["server_output_json"] = receiver
        else:
            report["server_output_text"] = "[  5]   0.00-1.00   sec  2.15 MBytes  18.0 Mbits/sec"
        return CommandResult(argv, 0, json.dumps(report))

    runner.responders.insert(0, client)
    result = measure_tcp_throughput(lab, "p0", "p1", duration_s=2, clock=FakeClock())
    assert result.interval_bps == (1.8e7, 1.85e7)
