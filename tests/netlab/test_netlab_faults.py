"""A schedule of kill, pause, cut, rate change and partition is applied on time, and logged so."""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from netlab_support import MakeLab, probe, start_probe_server

from gossamer.lab import FaultPlayer, LabControl, measure_tcp_throughput, parse_schedule
from gossamer.lab.faults import fault_log_writer

ON_TIME_S = 0.5

SCHEDULE = """
[[fault]]
at_s = 0.5
action = "pause"
peer = "p1"

[[fault]]
at_s = 1.0
action = "kill"
peer = "p0"

[[fault]]
at_s = 1.0
action = "cut"
peer = "p2"

[[fault]]
at_s = 1.5
action = "resume"
peer = "p1"

[[fault]]
at_s = 1.5
action = "set_rate"
peer = "p2"
rate = "20mbit"

[[fault]]
at_s = 2.0
action = "restore"
peer = "p2"

[[fault]]
at_s = 2.0
action = "partition"
side = ["p1"]

[[fault]]
at_s = 2.5
action = "heal"
"""


def _process_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"


def _link(lab: LabControl, namespace: str, device: str) -> dict[str, object]:
    listing = lab.runner.run(["ip", "-n", namespace, "-j", "link", "show", device]).stdout
    record: dict[str, object] = json.loads(listing)[0]
    return record


def _flags(lab: LabControl, namespace: str, device: str) -> list[str]:
    flags = _link(lab, namespace, device)["flags"]
    assert isinstance(flags, list)
    return [str(flag) for flag in flags]


def _tbf_rate_bps(lab: LabControl, namespace: str, device: str) -> int:
    listing = lab.runner.run(["tc", "-n", namespace, "-j", "qdisc", "show", "dev", device]).stdout
    return int(json.loads(listing)[0]["options"]["rate"]) * 8


def _wait_until(condition: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_schedule_is_applied_on_time_and_its_log_says_so(
    make_lab: MakeLab, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log_path = tmp_path / "faults.jsonl"
    with make_lab(num_peers=3, rate_bps=50_000_000) as lab:
        switch = lab.topology.switch_namespace
        p2 = lab.peer("p2").namespace
        victim = lab.spawn_in("p0", ["sleep", "60"])
        sleeper = lab.spawn_in("p1", ["sleep", "60"])
        _wait_until(lambda: victim.pid in lab.pids_in("p0"), 5.0)
        _wait_until(lambda: sleeper.pid in lab.pids_in("p1"), 5.0)

        # Each effect is observed independently of the player, by polling the system.
        checks: dict[str, Callable[[], bool]] = {
            "pause": lambda: _process_state(sleeper.pid) == "T",
            "kill": lambda: victim.poll() is not None,
            "cut": lambda: "NO-CARRIER" in _flags(lab, p2, "eth0"),
            "resume": lambda: "pause" in seen and _process_state(sleeper.pid) != "T",
            "set_rate": lambda: _tbf_rate_bps(lab, p2, "eth0") == 20_000_000,
            "restore": lambda: "cut" in seen and "NO-CARRIER" not in _flags(lab, p2, "eth0"),
            "partition": lambda: _link(lab, switch, "gsl-p1").get("master") == "gsl-br1",
            "heal": lambda: (
                "partition" in seen and _link(lab, switch, "gsl-p1").get("master") == "gsl-br0"
            ),
        }
        seen: dict[str, float] = {}
        with (
            caplog.at_level(logging.INFO, logger="gossamer.lab.faults"),
            FaultPlayer(
                lab, parse_schedule(SCHEDULE), on_applied=fault_log_writer(log_path)
            ) as player,
        ):
            assert player.started_at is not None
            deadline = player.started_at + 6.0
            while len(seen) < len(checks) and time.monotonic() < deadline:
                for action, check in checks.items():
                    if action not in seen and check():
                        seen[action] = time.monotonic() - player.started_at
                time.sleep(0.01)
            applied = player.wait(timeout_s=5.0)
        sleeper.kill()
    assert victim.wait(timeout=5) == -9  # SIGKILL, not a polite exit
    sleeper.wait(timeout=5)
    planned = {f.fault.action: f.fault.at_s for f in applied}
    assert set(seen) == set(planned), f"effects never observed: {set(planned) - set(seen)}"
    for action, at_s in planned.items():
        assert at_s - 0.05 <= seen[action] <= at_s + ON_TIME_S, (action, at_s, seen[action])
    for record in applied:
        assert record.ok, record
        assert 0.0 <= record.late_s <= ON_TIME_S, record
    lines = [r.getMessage() for r in caplog.records if r.name == "gossamer.lab.faults"]
    assert len(lines) == len(applied)
    assert any(line.startswith("fault kill p0: planned at 1.000 s, applied at") for line in lines)
    logged = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert [entry["action"] for entry in logged] == [r.fault.action for r in applied]
    assert all(0.0 <= entry["late_s"] <= ON_TIME_S for entry in logged)


def test_cut_and_partition_really_stop_traffic_and_heal(make_lab: MakeLab) -> None:
    with make_lab(num_peers=3, rate_bps=50_000_000) as lab:
        servers = [start_probe_server(lab, peer) for peer in ("p0", "p1", "p2")]
        p1 = lab.address_of("p1")
        assert probe(lab, "p0", p1) is not None
        lab.cut("p1")
        assert probe(lab, "p0", p1, timeout_s=0.5) is None
        lab.restore("p1")
        _wait_until(lambda: probe(lab, "p0", p1) is not None, 5.0)
        lab.partition(["p0"])
        assert probe(lab, "p0", p1, timeout_s=0.5) is None
        assert probe(lab, "p2", p1) is not None  # the other side still works
        lab.heal()
        _wait_until(lambda: probe(lab, "p0", p1) is not None, 5.0)
    for server in servers:
        server.wait(timeout=10)


@pytest.mark.skipif(shutil.which("iperf3") is None, reason="needs iperf3: apt-get install iperf3")
def test_a_rate_change_applies_to_a_running_transfer(make_lab: MakeLab) -> None:
    schedule = parse_schedule('[[fault]]\nat_s = 2.0\naction = "set_rate"\npeer = "p0"\n'
                              'rate = "20mbit"\n')  # fmt: skip
    with make_lab(num_peers=2, rate_bps=50_000_000) as lab, FaultPlayer(lab, schedule) as player:
        result = measure_tcp_throughput(lab, "p0", "p1", duration_s=5, omit_s=0)
        player.wait(timeout_s=5.0)
    # The figures are the receiver's: no second gets more than the link carries, give or take
    # a read late across a second's edge (the sender's own, which they were, ran ahead by what
    # its socket and the queue took in: 53.9-56.8 Mbit/s in the first second of a 50 Mbit/s
    # link, the receiver's 48.0). (A sixth, a sliver at the end, may follow the five.)
    assert len(result.interval_bps) >= 5, result.interval_bps
    assert max(result.interval_bps[:5]) <= 1.03 * 50e6, result.interval_bps
    # One-second samples jitter as packets straddle their edges, and TCP takes a moment to
    # recover the packets the change dropped: judge the two seconds before the change
    # together, and the last two together.
    before = sum(result.interval_bps[0:2]) / 2
    after = sum(result.interval_bps[3:5]) / 2
    assert 0.85 * 50e6 <= before <= 1.02 * 50e6, result.interval_bps
    assert 0.85 * 20e6 <= after <= 1.02 * 20e6, result.interval_bps
