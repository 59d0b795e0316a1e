"""Up, down, status and the context manager, against a fake runner (no root, no sockets)."""

from __future__ import annotations

import re
import signal
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from gossamer.core.errors import ConfigError, DeadlineExceededError, MissingDependencyError
from gossamer.lab.build import build_topology
from gossamer.lab.config import LabConfig
from gossamer.lab.control import LabControl
from gossamer.lab.lifecycle import attach_lab, lab_down, lab_status, lab_up, open_lab
from gossamer.lab.plan import plan_topology
from gossamer.lab.runner import CommandFailedError, CommandResult, FakeCommandRunner, require_tools
from gossamer.lab.state import LabState, load_state, save_state, state_lock


def _config(name: str = "t1") -> LabConfig:
    return LabConfig(num_peers=3, rate_bps=20_000_000, num_nat=1, name=name)


def test_require_tools_names_the_debian_package_to_install() -> None:
    runner = FakeCommandRunner(installed={"ip", "tc"})
    with pytest.raises(MissingDependencyError, match=r"apt-get install iptables"):
        require_tools(runner)
    with pytest.raises(MissingDependencyError, match="root"):
        require_tools(FakeCommandRunner(root=False))


def test_up_builds_every_namespace_and_records_the_lab(tmp_path: Path) -> None:
    runner = FakeCommandRunner()
    control = lab_up(_config(), runner=runner, state_dir=tmp_path)
    assert runner.namespaces == set(control.topology.namespaces())
    state = load_state("t1", tmp_path)
    assert state is not None
    assert state.built
    assert state.topology == control.topology


def test_up_refuses_a_lab_that_already_exists(tmp_path: Path) -> None:
    runner = FakeCommandRunner(namespaces={"gsl-t1-switch"})
    with pytest.raises(ConfigError, match="lab down --name t1"):
        lab_up(_config(), runner=runner, state_dir=tmp_path)


def test_a_failed_build_removes_what_it_built_and_its_record(tmp_path: Path) -> None:
    runner = FakeCommandRunner()
    runner.answer(["ip", "netns", "exec", "gsl-t1-r2", "iptables"], returncode=1)
    with pytest.raises(CommandFailedError):
        lab_up(_config(), runner=runner, state_dir=tmp_path)
    assert runner.namespaces == set()
    assert load_state("t1", tmp_path) is None


def _congestion_runner(available: str, allowed: str) -> FakeCommandRunner:
    runner = FakeCommandRunner()
    runner.answer(["sysctl", "-n", "net.ipv4.tcp_available_congestion_control"], available)
    runner.answer(["sysctl", "-n", "net.ipv4.tcp_allowed_congestion_control"], allowed)
    return runner


def test_up_refuses_a_congestion_control_namespaces_may_not_pick_and_says_how_to_allow_it(
    tmp_path: Path,
) -> None:
    config = LabConfig(num_peers=2, name="t1", tcp_congestion_control="cubic")
    runner = _congestion_runner("reno bbr cubic\n", "reno bbr\n")
    allow = 'sysctl -w net.ipv4.tcp_allowed_congestion_control="reno bbr cubic"'
    with pytest.raises(ConfigError, match=re.escape(allow)):
        lab_up(config, runner=runner, state_dir=tmp_path)
    with pytest.raises(ConfigError, match=re.escape("modprobe tcp_cubic")):
        lab_up(config, runner=_congestion_runner("reno bbr\n", "reno bbr\n"), state_dir=tmp_path)
    assert runner.namespaces == set()  # refused before anything was built
    assert load_state("t1", tmp_path) is None


def test_up_sets_an_allowed_congestion_control_and_checks_nothing_it_cannot_read(
    tmp_path: Path,
) -> None:
    config = LabConfig(num_peers=2, name="t1", tcp_congestion_control="cubic")
    runner = _congestion_runner("reno bbr cubic", "reno bbr cubic")
    lab_up(config, runner=runner, state_dir=tmp_path)
    assert runner.ran("net.ipv4.tcp_congestion_control=cubic")
    unreadable = FakeCommandRunner()
    unreadable.answer(["sysctl"], returncode=1)
    lab_up(LabConfig(num_peers=2, name="t2", tcp_congestion_control="cubic"),
           runner=unreadable, state_dir=tmp_path)  # fmt: skip
    assert unreadable.ran("net.ipv4.tcp_congestion_control=cubic")


def test_down_kills_processes_then_removes_recorded_and_stray_namespaces_only(
    tmp_path: Path,
) -> None:
    runner = FakeCommandRunner()
    lab_up(_config(), runner=runner, state_dir=tmp_path)
    # a crashed run left a namespace the record doesn't know; other labs and others' stay
    runner.namespaces |= {"gsl-t1-p9", "gsl-t2-p0", "gsl-t10-p0", "someone-elses"}
    runner.pids_by_namespace["gsl-t1-p0"] = [4242]
    removed = lab_down("t1", runner=runner, state_dir=tmp_path)
    assert "gsl-t1-p9" in removed
    assert len(removed) == 6
    assert runner.namespaces == {"gsl-t2-p0", "gsl-t10-p0", "someone-elses"}
    assert (4242, signal.SIGKILL) in runner.signals
    assert load_state("t1", tmp_path) is None


def test_an_unreadable_record_neither_blocks_status_and_down_nor_widens_them(
    tmp_path: Path,
) -> None:
    # A torn record made `status` and `down` fail with advice to run `down`; and `down` removed
    # every namespace a record named, with the lab's prefix or not.
    runner = FakeCommandRunner()
    lab_up(_config(), runner=runner, state_dir=tmp_path)
    (tmp_path / "t1.json").write_text('{"format_version": 1, "topo')
    assert [item.name for item in lab_status(runner=runner, state_dir=tmp_path)] == ["t1"]
    assert len(lab_down("t1", runner=runner, state_dir=tmp_path)) == 5
    assert runner.namespaces == set()
    assert not (tmp_path / "t1.json").exists()
    lab_up(_config(), runner=runner, state_dir=tmp_path)
    record = (tmp_path / "t1.json").read_text().replace('"gsl-t1-p2"', '"someone-elses"')
    (tmp_path / "t1.json").write_text(record)
    runner.namespaces.add("someone-elses")
    lab_down("t1", runner=runner, state_dir=tmp_path)
    assert runner.namespaces == {"someone-elses"}


def test_a_second_up_of_one_name_waits_for_the_first_and_leaves_its_lab_alone(
    tmp_path: Path,
) -> None:
    # The second passed the "already exists" check while the first built, failed on an
    # existing namespace, and its clean-up removed the first's lab.
    runner = FakeCommandRunner()
    second: list[BaseException] = []
    started = threading.Event()

    def second_up() -> None:
        started.set()
        try:
            lab_up(_config(), runner=runner, state_dir=tmp_path)
        except BaseException as exc:
            second.append(exc)

    other = threading.Thread(target=second_up)

    def while_building(argv: tuple[str, ...]) -> CommandResult | None:
        if argv[:3] == ("ip", "netns", "add") and not other.is_alive() and not started.is_set():
            other.start()
            started.wait(5)
            time.sleep(0.2)  # the second would pass its check now, were it not for the lock
        return None

    runner.responders.append(while_building)
    lab_up(_config(), runner=runner, state_dir=tmp_path)
    other.join(timeout=10)
    assert len(second) == 1, second
    assert isinstance(second[0], ConfigError)
    assert "already exists" in str(second[0])
    assert len([ns for ns in runner.namespaces if ns.startswith("gsl-t1-")]) == 5
    state = load_state("t1", tmp_path)
    assert state is not None
    assert state.built


def test_down_without_a_name_removes_every_lab_and_nothing_else(tmp_path: Path) -> None:
    runner = FakeCommandRunner(namespaces={"gsl-old-p0", "unrelated"})
    lab_up(_config(), runner=runner, state_dir=tmp_path)
    lab_down(None, runner=runner, state_dir=tmp_path)
    assert runner.namespaces == {"unrelated"}
    assert list(tmp_path.glob("*.json")) == []


def test_open_lab_tears_down_when_the_body_fails(tmp_path: Path) -> None:
    runner = FakeCommandRunner()
    built: list[str] = []

    def body() -> None:
        with open_lab(_config(), runner=runner, state_dir=tmp_path) as lab:
            built.extend(lab.topology.namespaces())
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        body()
    assert built
    assert runner.namespaces == set()


def test_open_lab_tears_down_on_keyboard_interrupt(tmp_path: Path) -> None:
    runner = FakeCommandRunner()

    def body() -> None:
        with open_lab(_config(), runner=runner, state_dir=tmp_path):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        body()
    assert runner.namespaces == set()


def test_status_reports_recorded_labs_and_missing_namespaces(tmp_path: Path) -> None:
    runner = FakeCommandRunner(namespaces={"gsl-zz-p0"})
    lab_up(_config(), runner=runner, state_dir=tmp_path)
    runner.namespaces.discard("gsl-t1-p1")
    report = {item.name: item for item in lab_status(runner=runner, state_dir=tmp_path)}
    assert set(report) == {"t1", "zz"}
    assert report["t1"].missing_namespaces == ["gsl-t1-p1"]
    assert not report["t1"].healthy
    assert report["zz"].state is None
    assert report["zz"].existing_namespaces == ("gsl-zz-p0",)


def test_attach_finds_a_lab_built_by_another_process(tmp_path: Path) -> None:
    runner = FakeCommandRunner()
    built = lab_up(_config(), runner=runner, state_dir=tmp_path)
    attached = attach_lab("t1", runner=runner, state_dir=tmp_path)
    assert attached.topology == built.topology
    with pytest.raises(ConfigError, match="no lab 'nope' is up"):
        attach_lab("nope", runner=runner, state_dir=tmp_path)


def test_fake_runner_answers_take_precedence() -> None:
    runner = FakeCommandRunner()
    runner.answer(["ip", "netns", "list"], stdout="x\n")
    assert runner.run(["ip", "netns", "list"]) == CommandResult(("ip", "netns", "list"), 0, "x\n")


def test_a_failed_build_leaves_a_namespace_it_did_not_make_alone(tmp_path: Path) -> None:
    # Another process built p1 of the same name meanwhile: this build fails at its `add` and
    # removed every namespace of the plan, the other's included.
    topology = plan_topology(_config())
    runner = FakeCommandRunner(namespaces={"gsl-t1-p1"})
    with pytest.raises(CommandFailedError, match="gsl-t1-p1"):
        build_topology(topology, runner)
    assert runner.namespaces == {"gsl-t1-p1"}


def test_attach_says_when_a_lab_is_half_built(tmp_path: Path) -> None:
    runner = FakeCommandRunner()
    save_state(LabState(topology=plan_topology(_config())), tmp_path)  # built = False
    with pytest.raises(ConfigError, match=r"half-built.*lab down --name t1"):
        attach_lab("t1", runner=runner, state_dir=tmp_path)


def test_attach_checks_for_root_and_tools(tmp_path: Path) -> None:
    lab_up(_config(), runner=FakeCommandRunner(), state_dir=tmp_path)
    with pytest.raises(MissingDependencyError, match="root"):
        attach_lab("t1", runner=FakeCommandRunner(root=False), state_dir=tmp_path)
    # A lab that is not up says so, root or not.
    with pytest.raises(ConfigError, match="no lab 'absent' is up"):
        attach_lab("absent", runner=FakeCommandRunner(root=False), state_dir=tmp_path)


def test_a_lab_held_too_long_by_another_command_is_said_to_be_busy(tmp_path: Path) -> None:
    with (
        state_lock("t1", tmp_path),
        pytest.raises(DeadlineExceededError, match="lab 't1' is busy"),
        state_lock("t1", tmp_path, timeout_s=0.2),
    ):
        pass


def test_down_all_removes_every_lab_but_a_busy_one_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Taking every lock first, one busy lab kept every other one up.
    monkeypatch.setattr("gossamer.lab.state.LOCK_TIMEOUT_S", 0.2)
    runner = FakeCommandRunner()
    for name in ("a", "b", "c"):
        lab_up(_config(name), runner=runner, state_dir=tmp_path)
    runner.namespaces.add("gsl-zz-p0")  # a crashed lab's, with no record
    with state_lock("b", tmp_path), pytest.raises(DeadlineExceededError, match="not those of b"):
        lab_down(None, runner=runner, state_dir=tmp_path)
    assert runner.namespaces == set(plan_topology(_config("b")).namespaces())


def test_a_removed_lab_leaves_no_lock_file_and_down_all_sweeps_old_ones(tmp_path: Path) -> None:
    # One ".NAME.lock" per lab ever made stayed in /run/gossamer-lab (85 on a host that ran
    # benchmarks), and no command removed them.
    runner = FakeCommandRunner()
    lab_up(_config("a"), runner=runner, state_dir=tmp_path)
    lab_down("a", runner=runner, state_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    (tmp_path / ".old.lock").touch()  # left by an earlier version
    lab_up(_config("b"), runner=runner, state_dir=tmp_path)
    with state_lock("held", tmp_path):  # another command's, under way: left alone
        lab_down(None, runner=runner, state_dir=tmp_path)
        assert sorted(p.name for p in tmp_path.iterdir()) == [".held.lock"]


class _InterruptedAfterAdding(FakeCommandRunner):
    """Ctrl-C lands while `ip netns add NAME` runs: the namespace is made, the call raises."""

    def run(self, argv: Sequence[str], *, check: bool = True, timeout_s: float = 30.0) -> Any:
        result = super().run(argv, check=check, timeout_s=timeout_s)
        if list(argv) == ["ip", "netns", "add", "gsl-t1-p1"]:
            raise KeyboardInterrupt
        return result


def test_a_build_interrupted_during_an_add_removes_what_the_add_made(tmp_path: Path) -> None:
    runner = _InterruptedAfterAdding()
    with pytest.raises(KeyboardInterrupt):
        lab_up(_config(), runner=runner, state_dir=tmp_path)
    assert runner.namespaces == set()
    assert load_state("t1", tmp_path) is None


def test_down_all_removes_labs_beside_a_record_no_lab_can_be_named(tmp_path: Path) -> None:
    # (a record "Old-Lab.json" stopped the sweep: nothing was removed)
    runner = FakeCommandRunner()
    lab_up(_config("zz"), runner=runner, state_dir=tmp_path)
    (tmp_path / "Old-Lab.json").write_text("{}")
    lab_down(None, runner=runner, state_dir=tmp_path)
    assert runner.namespaces == set()
    assert sorted(path.name for path in tmp_path.glob("*.json")) == []


def test_down_all_leaves_alone_a_lab_another_shell_made_again_meanwhile(tmp_path: Path) -> None:
    # Lab b, listed when down --all began, is taken down and made again by another shell
    # while down --all removes lab a: the new b is not down --all's to remove.
    runner = FakeCommandRunner()
    lab_up(_config("a"), runner=runner, state_dir=tmp_path)
    lab_up(_config("b"), runner=runner, state_dir=tmp_path)
    remade: list[bool] = []

    def remake_b(argv: Sequence[str]) -> None:
        if (
            tuple(argv[:3]) == ("ip", "netns", "del")
            and argv[3].startswith("gsl-a-")
            and not remade
        ):
            remade.append(True)
            lab_down("b", runner=runner, state_dir=tmp_path)
            lab_up(_config("b"), runner=runner, state_dir=tmp_path)

    runner.responders.append(remake_b)
    lab_down(None, runner=runner, state_dir=tmp_path)
    assert remade
    assert load_state("b", tmp_path) is not None
    assert any(ns.startswith("gsl-b-") for ns in runner.namespaces)
    assert not any(ns.startswith("gsl-a-") for ns in runner.namespaces)


def test_down_all_leaves_alone_a_lab_made_after_it_began(tmp_path: Path) -> None:
    # `down --all` read the records once, then deleted every gsl-* namespace without taking a
    # lock: a `lab up --name cc` that ran meanwhile said ok, and its lab was gone.
    runner = FakeCommandRunner(namespaces={"gsl-zz-p0"})  # a crashed lab's, with no record
    lab_up(_config("a"), runner=runner, state_dir=tmp_path)
    made: list[LabControl] = []
    started = threading.Event()

    def up_meanwhile(argv: tuple[str, ...]) -> CommandResult | None:
        if argv[:3] == ("ip", "netns", "del") and not started.is_set():  # as `a` is removed
            started.set()
            made.append(lab_up(_config("cc"), runner=runner, state_dir=tmp_path))
        return None

    runner.responders.append(up_meanwhile)
    removed = lab_down(None, runner=runner, state_dir=tmp_path)
    assert made
    assert sorted(removed) == sorted([*plan_topology(_config("a")).namespaces(), "gsl-zz-p0"])
    assert runner.namespaces == set(made[0].topology.namespaces())
    state = load_state("cc", tmp_path)
    assert state is not None
    assert state.built
    assert attach_lab("cc", runner=runner, state_dir=tmp_path).topology == made[0].topology


def test_attach_to_a_lab_whose_namespaces_are_gone_says_so(tmp_path: Path) -> None:
    # `lab exec` on it said a bare "Cannot open network namespace".
    runner = FakeCommandRunner()
    lab_up(_config(), runner=runner, state_dir=tmp_path)
    runner.namespaces.discard("gsl-t1-p1")
    with pytest.raises(ConfigError, match=r"namespaces gsl-t1-p1 are gone.*lab down --name t1"):
        attach_lab("t1", runner=runner, state_dir=tmp_path)
