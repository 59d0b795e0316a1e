"""Link and process operations on a lab, against a fake runner."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from gossamer.core.errors import ConfigError
from gossamer.lab.config import LabConfig
from gossamer.lab.control import LabControl
from gossamer.lab.lifecycle import lab_up
from gossamer.lab.runner import FakeCommandRunner
from gossamer.lab.state import load_state


@pytest.fixture
def runner() -> FakeCommandRunner:
    return FakeCommandRunner()


@pytest.fixture
def lab(runner: FakeCommandRunner, tmp_path: Path) -> LabControl:
    control = lab_up(
        LabConfig(num_peers=3, rate_bps=50_000_000, num_nat=1, name="t1"),
        runner=runner,
        state_dir=tmp_path,
    )
    runner.commands.clear()
    return control


def test_commands_run_inside_the_peer_namespace(lab: LabControl) -> None:
    assert lab.command_in("p1", ["ip", "addr"]) == [
        "ip",
        "netns",
        "exec",
        "gsl-t1-p1",
        "ip",
        "addr",
    ]
    with pytest.raises(ConfigError, match="its peers are p0, p1, p2"):
        lab.command_in("p7", ["true"])
    with pytest.raises(ConfigError, match="give a command"):
        lab.command_in("p0", [])


def test_process_faults_signal_every_process_in_the_peer(
    lab: LabControl, runner: FakeCommandRunner
) -> None:
    runner.pids_by_namespace["gsl-t1-p1"] = [11, 12]
    assert lab.pause("p1") == [11, 12]
    assert lab.resume("p1") == [11, 12]
    assert lab.kill("p1") == [11, 12]
    assert runner.signals == [
        (11, signal.SIGSTOP), (12, signal.SIGSTOP),
        (11, signal.SIGCONT), (12, signal.SIGCONT),
        (11, signal.SIGKILL), (12, signal.SIGKILL),
    ]  # fmt: skip


def test_cut_and_restore_act_on_the_switch_port_and_are_recorded(
    lab: LabControl, runner: FakeCommandRunner, tmp_path: Path
) -> None:
    lab.cut("p2")
    assert runner.ran("ip", "-n", "gsl-t1-switch", "link", "set", "gsl-p2", "down")
    state = load_state("t1", tmp_path)
    assert state is not None
    assert state.cut_peers == ["p2"]
    lab.restore("p2")
    assert runner.ran("ip", "-n", "gsl-t1-switch", "link", "set", "gsl-p2", "up")
    state = load_state("t1", tmp_path)
    assert state is not None
    assert state.cut_peers == []


def test_set_rate_replaces_the_tbf_on_every_end_of_the_path(
    lab: LabControl, runner: FakeCommandRunner, tmp_path: Path
) -> None:
    lab.set_rate("p2", 10_000_000)
    changed = [argv for argv in runner.commands if argv[0] == "tc"]
    assert len(changed) == 4  # switch port, router wan, router lan, peer eth0
    kicks = [argv for argv in runner.commands if "txqueuelen" in argv]
    assert len(kicks) == 8  # each queue restarted after its tbf is replaced
    assert all("replace" in argv and "10000000bit" in argv for argv in changed)
    state = load_state("t1", tmp_path)
    assert state is not None
    assert state.rate_bps("p2") == 10_000_000
    assert state.rate_bps("p0") == 50_000_000


def test_partition_moves_one_side_to_a_second_bridge_and_heal_moves_it_back(
    lab: LabControl, runner: FakeCommandRunner
) -> None:
    lab.partition(["p0"])
    assert runner.ran("link", "add", "gsl-br1", "type", "bridge")
    assert runner.ran("link", "set", "gsl-p0", "master", "gsl-br1")
    assert not runner.ran("link", "set", "gsl-p1", "master", "gsl-br1")
    assert lab.state.partition_side == ["p0"]
    lab.heal()
    assert runner.ran("link", "set", "gsl-p0", "master", "gsl-br0")
    assert not runner.ran("link", "del", "gsl-br1")  # (left empty: a deletion took ~50 ms)
    assert lab.state.partition_side == []


def test_a_partition_recorded_by_another_command_is_kept_and_healed(
    lab: LabControl, runner: FakeCommandRunner, tmp_path: Path
) -> None:
    # Two commands on one lab (a long fault schedule, and a partition from another shell): each
    # saved its own copy of the record over the file, so the partition was lost, and a heal
    # then left the partitioned peer on no bridge, cut off for good.
    other = LabControl(lab.state, runner, state_dir=tmp_path)
    stale = LabControl(load_state("t1", tmp_path), runner, state_dir=tmp_path)  # type: ignore[arg-type]
    stale.cut("p2")
    other.partition(["p0"])
    stale.restore("p2")  # saved from a copy that knew of no partition
    recorded = load_state("t1", tmp_path)
    assert recorded is not None
    assert recorded.partition_side == ["p0"]
    assert recorded.cut_peers == []
    runner.commands.clear()
    stale.heal()
    for port in ("gsl-p0", "gsl-p1", "gsl-p2"):  # every port, whatever the record says
        assert runner.ran("link", "set", port, "master", "gsl-br0")


@pytest.mark.parametrize("side", [[], ["p0", "p1", "p2"], ["p9"]])
def test_partition_needs_some_but_not_all_known_peers(lab: LabControl, side: list[str]) -> None:
    with pytest.raises(ConfigError):
        lab.partition(side)


def test_status_records_show_rate_nat_and_link(lab: LabControl) -> None:
    lab.cut("p0")
    records = {r["name"]: r for r in lab.state.peer_records()}
    assert records["p0"]["link"] == "cut"
    assert records["p2"]["behind_nat"]
    assert records["p2"]["public_address"] == "10.213.0.12"
    assert records["p1"]["rate_bps"] == 50_000_000


def test_a_partition_and_a_heal_take_a_few_commands_whatever_the_number_of_peers(
    runner: FakeCommandRunner, tmp_path: Path
) -> None:
    # One `ip` per peer: with 64 peers a partition applied 0.23 s late and a heal 0.21 s, and
    # the faults due with them waited as long.
    lab = lab_up(LabConfig(num_peers=64, name="t2"), runner=runner, state_dir=tmp_path)
    runner.commands.clear()
    lab.partition(["p0", "p1"])
    assert len(runner.commands) <= 3
    assert runner.ran("ip", "-n", "gsl-t2-switch", "link", "set", "gsl-p63", "master", "gsl-br0")
    assert runner.ran("ip", "-n", "gsl-t2-switch", "link", "add", "gsl-br1", "type", "bridge")
    assert runner.ran("ip", "-n", "gsl-t2-switch", "link", "set", "gsl-p1", "master", "gsl-br1")
    runner.commands.clear()
    runner.batched.clear()
    lab.heal()
    assert len(runner.commands) == 1
    for index in range(64):
        assert runner.ran("ip", "-n", "gsl-t2-switch", "link", "set", f"gsl-p{index}", "master",
                          "gsl-br0")  # fmt: skip
