"""Bring a lab up, report on it, take it down; and the context manager that does all three.

>>> with open_lab(LabConfig(num_peers=3, rate_bps=50_000_000, num_nat=1)) as lab:  # doctest: +SKIP
...     server = lab.spawn_in("p0", ["iperf3", "-s"])
...     ...
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from gossamer.core.errors import (
    ConfigError,
    CorruptedDataError,
    DeadlineExceededError,
    GossamerError,
)
from gossamer.lab.build import build_topology, list_namespaces, remove_namespaces
from gossamer.lab.config import LAB_PREFIX, LabConfig, namespace_prefix
from gossamer.lab.control import LabControl
from gossamer.lab.plan import plan_topology
from gossamer.lab.runner import CommandRunner, SubprocessRunner, require_tools
from gossamer.lab.state import (
    DEFAULT_STATE_DIR,
    LabState,
    delete_state,
    load_state,
    pid_namespace,
    process_start_ticks,
    save_state,
    state_lock,
)

__all__ = [
    "LATENCY_NOTICE",
    "LabStatus",
    "attach_lab",
    "check_congestion_control",
    "lab_down",
    "lab_status",
    "lab_up",
    "open_lab",
    "remove_abandoned_labs",
]

logger = logging.getLogger(__name__)

LATENCY_NOTICE = (
    "latency and packet loss are NOT emulated (this kernel has no netem): links are capped in "
    "rate only; a round trip takes well under a millisecond, plus what waits in the queue of a "
    "full link (50 ms from 21mbit up, at most 200 ms down to 242kbit, 0.5 s at 100kbit)"
)
"""Said by `lab up` and the docs, so nobody mistakes the lab for a long-haul network."""


def lab_up(
    config: LabConfig,
    *,
    runner: CommandRunner | None = None,
    state_dir: Path = DEFAULT_STATE_DIR,
    owner_pid: int | None = None,
) -> LabControl:
    """Build the lab ``config`` describes and record it; returns its control.

    ``owner_pid`` names a process that makes the lab for its own run and takes it down when
    done: recorded, so that :func:`remove_abandoned_labs` removes the lab once that process is
    gone without doing so (killed outright).

    Raises:
        MissingDependencyError: not root, or ``ip``/``tc``/``iptables`` missing.
        ConfigError: a lab of that name already exists, or its congestion control cannot be
            set in a namespace on this host.
        CommandFailedError: building failed (whatever was built has been removed).
    """
    runner = runner or SubprocessRunner()
    require_tools(runner)
    if config.tcp_congestion_control:
        check_congestion_control(runner, config.tcp_congestion_control)
    # Held from the check to the end of the build: a second `up` of the same name that passed
    # the check while this one built failed on an existing namespace, and its clean-up then
    # removed this lab.
    with state_lock(config.name, state_dir):
        existing = list_namespaces(runner, config.namespace_prefix)
        if existing:
            raise ConfigError(
                f"lab {config.name!r} already exists ({', '.join(existing)}); "
                f"run `gossamer lab down --name {config.name}` first, or pick another --name"
            )
        state = LabState(
            topology=plan_topology(config),
            owner_pid=owner_pid,
            owner_start_ticks=None if owner_pid is None else process_start_ticks(owner_pid),
            owner_pid_namespace=None if owner_pid is None else pid_namespace(),
        )
        save_state(state, state_dir)  # before building, so a crash leaves a record for `down`
        try:
            build_topology(state.topology, runner)
        except BaseException:
            delete_state(config.name, state_dir)
            raise
        state.built = True
        save_state(state, state_dir)
    logger.info("lab %s is up; %s", config.name, LATENCY_NOTICE)
    return LabControl(state, runner, state_dir=state_dir)


def check_congestion_control(runner: CommandRunner, name: str) -> None:
    """Check that a namespace may use the TCP congestion control ``name`` on this host.

    The kernel must have it, and a namespace other than the host's may only pick one the host
    lists in ``net.ipv4.tcp_allowed_congestion_control``; otherwise its sysctl fails with a bare
    "Operation not permitted" halfway through building the lab. Where the host's lists cannot
    be read, nothing is checked.

    Raises:
        ConfigError: the kernel lacks it, or namespaces may not pick it (the message says how
            to allow it).
    """

    def host_list(key: str) -> list[str]:
        result = runner.run(["sysctl", "-n", key], check=False)
        return result.stdout.split() if result.ok else []

    available = host_list("net.ipv4.tcp_available_congestion_control")
    if available and name not in available:
        raise ConfigError(
            f"TCP congestion control {name!r} is not loaded in this kernel (it has "
            f"{' '.join(available)}): load it with `modprobe tcp_{name}` (as root), or pick one "
            "of those"
        )
    allowed = host_list("net.ipv4.tcp_allowed_congestion_control")
    if allowed and name not in allowed:
        wanted = " ".join([*allowed, name])
        raise ConfigError(
            f"TCP congestion control {name!r} is loaded, but this host lets network namespaces "
            f"pick only {' '.join(allowed)} (net.ipv4.tcp_allowed_congestion_control): allow it "
            f'with `sysctl -w net.ipv4.tcp_allowed_congestion_control="{wanted}"` (as root), '
            "or leave the congestion control unset to use the host's"
        )


def lab_down(
    name: str | None,
    *,
    runner: CommandRunner | None = None,
    state_dir: Path = DEFAULT_STATE_DIR,
) -> list[str]:
    """Remove lab ``name`` (every lab, when None); returns the namespaces removed.

    Everything is found by prefix as well as from the state file, so the leftovers of a crashed
    process are removed too, and nothing without the prefix is ever touched. Every lab is removed
    under its lock; with ``name`` None, a lab recorded after the removal began (an `up` in
    another shell) is left alone.

    Raises:
        DeadlineExceededError: another command held a lab's lock for minutes (every other lab
            was removed all the same).
    """
    runner = runner or SubprocessRunner()
    require_tools(runner)
    if name is not None:
        LabConfig(num_peers=1, name=name)  # a name a lab can have, or a one-line error
        with state_lock(name, state_dir):  # a build or a fault of it finishes first
            return _remove_lab(runner, name, state_dir)
    # What is here now: records, then namespaces (an `up` records its lab before it builds).
    # Read once; each lab is then judged again under its lock, as it is by then.
    recorded = {
        lab_name: _created_at(lab_name, state_dir) for lab_name in _recorded_lab_names(state_dir)
    }
    names = set(recorded) | {_lab_name_of(ns) for ns in list_namespaces(runner, LAB_PREFIX)}
    removed: list[str] = []
    busy: list[str] = []
    for lab_name in sorted(names):  # one at a time: a busy one holds no other
        try:
            with state_lock(lab_name, state_dir):
                removed += _remove_unless_made_since(runner, lab_name, recorded, state_dir)
        except DeadlineExceededError:
            busy.append(lab_name)
    _forget_unrecorded_locks(state_dir)
    if busy:
        raise DeadlineExceededError(
            f"removed {len(removed)} namespaces, but not those of {', '.join(busy)}: another "
            "`gossamer lab` command holds them (stopped with Ctrl-Z? see `jobs`); let it finish, "
            "then run `gossamer lab down --all` again"
        )
    return removed


def remove_abandoned_labs(
    *, runner: CommandRunner | None = None, state_dir: Path = DEFAULT_STATE_DIR
) -> list[str]:
    """Remove every lab whose owner (see :func:`lab_up`) has ended without taking it down: a
    benchmark's driver killed outright (SIGKILL) leaves its namespaces and record behind.
    Returns the names of the labs removed. Labs without an owner (`lab up`'s) and labs another
    command holds now are left alone.
    """
    runner = runner or SubprocessRunner()
    require_tools(runner)
    removed = []
    for name in _recorded_lab_names(state_dir):
        # (a lab held now is being built or changed by a live process: not abandoned)
        try:
            with (
                contextlib.suppress(DeadlineExceededError),
                state_lock(name, state_dir, timeout_s=0),
            ):
                state = _readable_state(name, state_dir)
                if state is not None and state.owner_gone():
                    _remove_lab(runner, name, state_dir)
                    removed.append(name)
        except GossamerError as exc:  # (best effort: one lab that will not go stops no run)
            logger.warning("could not remove abandoned lab %s: %s", name, exc)
    return removed


_UNREADABLE = -1.0
"""What :func:`_created_at` says of a record that cannot be read."""


def _created_at(name: str, state_dir: Path) -> float | None:
    """When lab ``name``'s record was made (it stays through faults' updates); None without a
    record, ``_UNREADABLE`` for one that cannot be read."""
    try:
        state = load_state(name, state_dir)
    except CorruptedDataError:
        return _UNREADABLE
    return None if state is None else state.created_at


def _remove_unless_made_since(
    runner: CommandRunner, name: str, recorded: dict[str, float | None], state_dir: Path
) -> list[str]:
    """Remove lab ``name`` for `down --all`, holding its lock, unless it was recorded since
    ``recorded`` was read: an `up` that began after `down --all` made it. (Its namespaces were
    deleted under it: its `up` said ok and the lab was gone, or its build failed with
    'Invalid "netns" value'.)"""
    now, then = _created_at(name, state_dir), recorded.get(name)
    if now not in (None, _UNREADABLE) and then != _UNREADABLE and now != then:
        logger.info("lab %s was made after `down --all` began; left alone", name)
        return []
    removed = _remove_lab(runner, name, state_dir)
    # (a stray namespace of this name that `down --name` leaves: `gsl-NAME`, without the dash)
    strays = [ns for ns in list_namespaces(runner, LAB_PREFIX) if _lab_name_of(ns) == name]
    return removed + remove_namespaces(runner, strays)


def _lab_name_of(namespace: str) -> str:
    """The name of the lab a namespace with the lab prefix belongs to (``gsl-NAME-p0``)."""
    return namespace.removeprefix(LAB_PREFIX).split("-", 1)[0]


def _remove_lab(runner: CommandRunner, name: str, state_dir: Path) -> list[str]:
    namespaces: list[str] = []
    state = _readable_state(name, state_dir)
    own = namespace_prefix(name)  # (a record's name, even one no lab can have now)
    if state is not None:  # only its own: a stale or edited record names any namespace
        namespaces += [ns for ns in state.topology.namespaces() if ns.startswith(own)]
    namespaces += [ns for ns in list_namespaces(runner, own) if ns not in namespaces]
    removed = remove_namespaces(runner, namespaces)
    delete_state(name, state_dir)
    return removed


def _readable_state(name: str, state_dir: Path) -> LabState | None:
    """Lab ``name``'s record; None when there is none or it cannot be read (logged): `down`
    and `status` then go by the namespaces' prefix, as the unreadable record's error says."""
    try:
        return load_state(name, state_dir)
    except CorruptedDataError as exc:
        logger.warning("%s", exc)
        return None


def _forget_unrecorded_locks(state_dir: Path) -> None:
    """Delete the lock files of labs that have no record (left by a removal before it deleted
    them too, one per lab ever made), but one another command holds."""
    if not state_dir.is_dir():
        return
    recorded = set(_recorded_lab_names(state_dir))
    for path in state_dir.glob(".*.lock"):
        name = path.name[1 : -len(".lock")]
        if name in recorded:
            continue
        with contextlib.suppress(DeadlineExceededError), state_lock(name, state_dir, timeout_s=0):
            if name not in _recorded_lab_names(state_dir):  # (an `up` may have ended since)
                delete_state(name, state_dir)


def _recorded_lab_names(state_dir: Path) -> list[str]:
    if not state_dir.is_dir():
        return []
    return sorted(path.stem for path in state_dir.glob("*.json"))


@dataclass(frozen=True, slots=True)
class LabStatus:
    """What is recorded about a lab and what actually exists."""

    name: str
    """The lab's name."""
    state: LabState | None
    """Its record, or None when only stray namespaces were found."""
    existing_namespaces: tuple[str, ...]
    """Its namespaces that exist now."""

    @property
    def missing_namespaces(self) -> list[str]:
        """Recorded namespaces that are gone (deleted by hand, or a reboot)."""
        if self.state is None:
            return []
        return [ns for ns in self.state.topology.namespaces() if ns not in self.existing_namespaces]

    @property
    def healthy(self) -> bool:
        """Whether the lab is fully built and every namespace still exists."""
        return self.state is not None and self.state.built and not self.missing_namespaces


def lab_status(
    *, runner: CommandRunner | None = None, state_dir: Path = DEFAULT_STATE_DIR
) -> list[LabStatus]:
    """Every lab that is recorded or has namespaces on this machine."""
    runner = runner or SubprocessRunner()
    require_tools(runner)
    existing = list_namespaces(runner, LAB_PREFIX)
    names = set(_recorded_lab_names(state_dir))
    names |= {_lab_name_of(ns) for ns in existing}
    report = []
    for lab_name in sorted(names):
        prefix = namespace_prefix(lab_name)
        report.append(
            LabStatus(
                name=lab_name,
                state=_readable_state(lab_name, state_dir),
                existing_namespaces=tuple(ns for ns in existing if ns.startswith(prefix)),
            )
        )
    return report


def attach_lab(
    name: str, *, runner: CommandRunner | None = None, state_dir: Path = DEFAULT_STATE_DIR
) -> LabControl:
    """The control of lab ``name`` built earlier, maybe by another process.

    Raises:
        MissingDependencyError: not root, or a tool the lab needs is missing.
        ConfigError: no such lab is recorded, it is not fully built, or some of its namespaces
            are gone.
    """
    runner = runner or SubprocessRunner()
    try:
        state = load_state(name, state_dir)
    except PermissionError:
        require_tools(runner)  # not root: says so (it was a traceback)
        raise
    if state is None:
        raise ConfigError(
            f"no lab {name!r} is up; start one with `gossamer lab up --name {name} --peers N`"
        )
    if not state.built:
        raise ConfigError(
            f"lab {name!r} is half-built (its build was stopped or failed part way); run "
            f"`gossamer lab down --name {name}`, then `gossamer lab up` again"
        )
    require_tools(runner)  # (as another user, a kill found no process and said ok)
    existing = set(list_namespaces(runner, namespace_prefix(name)))
    missing = [ns for ns in state.topology.namespaces() if ns not in existing]
    if missing:  # (`exec` said a bare "Cannot open network namespace")
        named = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if missing[3:] else "")
        raise ConfigError(
            f"lab {name!r} is recorded but its namespaces {named} are gone "
            "(removed by hand or by another `gossamer lab down`, or lost at a reboot); run "
            f"`gossamer lab down --name {name}`, then `gossamer lab up` again"
        )
    return LabControl(state, runner, state_dir=state_dir)


@contextmanager
def open_lab(
    config: LabConfig,
    *,
    runner: CommandRunner | None = None,
    state_dir: Path = DEFAULT_STATE_DIR,
    owner_pid: int | None = None,
) -> Iterator[LabControl]:
    """Build a lab, yield its control, and always take it down (failure, Ctrl-C included;
    ``owner_pid`` as for :func:`lab_up`, for the one case nothing here can handle: SIGKILL)."""
    runner = runner or SubprocessRunner()
    control = lab_up(config, runner=runner, state_dir=state_dir, owner_pid=owner_pid)
    try:
        yield control
    finally:
        lab_down(config.name, runner=runner, state_dir=state_dir)
