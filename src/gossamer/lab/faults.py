"""Faults on a schedule: a small TOML file of times and actions, played against a running lab.

A schedule file is a list of ``[[fault]]`` tables; ``at_s`` counts seconds from the start of play::

    [[fault]]
    at_s = 1.0
    action = "pause"        # SIGSTOP every process of the peer
    peer = "p1"

    [[fault]]
    at_s = 2.5
    action = "set_rate"     # change the link rate while traffic flows
    peer = "p0"
    rate = "10mbit"

    [[fault]]
    at_s = 4.0
    action = "partition"    # these peers on one side, everyone else on the other
    side = ["p0", "p1"]

Actions: ``kill``, ``pause``, ``resume``, ``cut``, ``restore``, ``set_rate`` (with ``rate``),
``partition`` (with ``side``) and ``heal``. Every applied action is logged with the time it was
planned for and the time it took effect, and returned as an :class:`AppliedFault`.
"""

from __future__ import annotations

import json
import logging
import threading
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast, get_args

from gossamer.core.clock import Clock, SystemClock
from gossamer.core.errors import ConfigError, DeadlineExceededError, GossamerError
from gossamer.lab.config import format_rate, parse_rate
from gossamer.lab.control import LabControl

__all__ = [
    "MAX_AT_S",
    "AppliedFault",
    "Fault",
    "FaultAction",
    "FaultPlayer",
    "check_schedule",
    "fault_log_writer",
    "faults_in_force",
    "load_schedule",
    "parse_schedule",
    "play_schedule",
    "schedule_text",
]

logger = logging.getLogger(__name__)

FaultAction = Literal["kill", "pause", "resume", "cut", "restore", "set_rate", "partition", "heal"]
_ACTIONS: tuple[str, ...] = get_args(FaultAction)
_PEER_ACTIONS = {"kill", "pause", "resume", "cut", "restore", "set_rate"}
_KEYS = {"at_s", "action", "peer", "rate", "side"}
_MAX_SLEEP_SLICE_S = 0.05

MAX_AT_S = 86_400.0
"""The latest time a fault may be scheduled for: a day after the start of play."""
_AT_S_RANGE = f"a finite number of seconds from 0 to {MAX_AT_S:.0f} (a day)"


@dataclass(frozen=True, kw_only=True, slots=True)
class Fault:
    """One scheduled action."""

    at_s: float
    """When to act, in seconds from the start of play."""
    action: FaultAction
    """What to do (see the module docstring)."""
    peer: str | None = None
    """The peer acted on; required by every action but ``partition`` and ``heal``."""
    rate_bps: int | None = None
    """The new link rate (``set_rate`` only), in bits per second."""
    side: tuple[str, ...] = ()
    """The peers split off from the rest (``partition`` only)."""

    def __post_init__(self) -> None:
        where = f"fault at {self.at_s} s"
        if self.action not in _ACTIONS:
            raise ConfigError(
                f"{where}: unknown action {self.action!r}; use one of {', '.join(_ACTIONS)}"
            )
        if not 0 <= self.at_s <= MAX_AT_S:
            raise ConfigError(f"{where}: at_s must be {_AT_S_RANGE}")
        if (self.action in _PEER_ACTIONS) != (self.peer is not None):
            needs = "needs" if self.action in _PEER_ACTIONS else "takes no"
            raise ConfigError(f'{where}: action {self.action!r} {needs} a peer (peer = "p0")')
        if (self.action == "set_rate") != (self.rate_bps is not None):
            raise ConfigError(f"{where}: only set_rate takes a rate, and it needs one")
        if (self.action == "partition") != bool(self.side):
            raise ConfigError(
                f'{where}: only partition takes a side, and it needs one (side = ["p0"])'
            )

    def describe(self) -> str:
        """A short human description, e.g. ``set_rate p0 10mbit``."""
        words: list[str] = [self.action]
        if self.peer is not None:
            words.append(self.peer)
        if self.rate_bps is not None:
            words.append(format_rate(self.rate_bps))
        if self.side:
            words.append("[" + ",".join(self.side) + "]")
        return " ".join(words)


@dataclass(frozen=True, slots=True)
class AppliedFault:
    """What happened when a fault was played."""

    fault: Fault
    """The fault as scheduled."""
    started_at_s: float
    """When acting began, in seconds from the start of play."""
    applied_at_s: float
    """When the action had taken effect (its commands had returned)."""
    ok: bool
    """Whether the action succeeded."""
    detail: str
    """The pids signalled, or the error."""

    @property
    def late_s(self) -> float:
        """How long after its planned time the fault took effect."""
        return self.applied_at_s - self.fault.at_s

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready record, as written to the fault log."""
        return {
            "action": self.fault.action,
            "peer": self.fault.peer,
            "rate_bps": self.fault.rate_bps,
            "side": list(self.fault.side),
            "planned_at_s": self.fault.at_s,
            "started_at_s": self.started_at_s,
            "applied_at_s": self.applied_at_s,
            "late_s": self.late_s,
            "ok": self.ok,
            "detail": self.detail,
        }


def _fault_from_table(index: int, table: Any) -> Fault:
    if not isinstance(table, dict):
        raise ConfigError(
            f"fault #{index + 1}: a fault is a [[fault]] table (at_s = 1.0, action = ...), "
            f"not {table!r}"
        )
    unknown = set(table) - _KEYS
    if unknown:
        raise ConfigError(
            f"fault #{index + 1}: unknown keys {sorted(unknown)}; a fault has {sorted(_KEYS)}"
        )
    if "at_s" not in table or "action" not in table:
        raise ConfigError(f"fault #{index + 1}: needs at_s (seconds) and action")
    at_s = table["at_s"]
    if isinstance(at_s, bool) or not isinstance(at_s, int | float):
        raise ConfigError(f"fault #{index + 1}: at_s must be a number of seconds, got {at_s!r}")
    if not 0 <= at_s <= MAX_AT_S:  # (before float(): a 400-digit integer overflows it)
        text = repr(at_s)
        shown = text if len(text) <= 24 else f"{text[:12]}... ({len(text)} digits)"
        raise ConfigError(
            f"fault #{index + 1}: at_s = {shown} is out of range; at_s must be {_AT_S_RANGE}"
        )
    if not isinstance(table["action"], str):
        raise ConfigError(f'fault #{index + 1}: action must be a string, e.g. "kill"')
    if not isinstance(table.get("peer", ""), str):
        raise ConfigError(f'fault #{index + 1}: peer must be a peer\'s name, e.g. "p0"')
    side = table.get("side", [])
    if not isinstance(side, list) or not all(isinstance(p, str) for p in side):
        raise ConfigError(f"fault #{index + 1}: side must be a list of peer names")
    rate = table.get("rate")
    if rate is not None and (isinstance(rate, bool) or not isinstance(rate, str | int | float)):
        raise ConfigError(f'fault #{index + 1}: rate must be a rate like "10mbit"')
    return Fault(
        at_s=float(at_s),
        action=cast(FaultAction, table["action"]),
        peer=table.get("peer"),
        rate_bps=None if rate is None else parse_rate(str(rate), key=f"fault #{index + 1} rate"),
        side=tuple(side),
    )


def parse_schedule(text: str) -> tuple[Fault, ...]:
    """Parse a schedule's TOML text into faults ordered by time.

    Raises:
        ConfigError: the text is not TOML, or a fault is malformed (the message says which).
    """
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"fault schedule is not valid TOML: {exc}") from exc
    extra = set(document) - {"fault"}
    if extra:
        raise ConfigError(f"fault schedule: unknown top-level keys {sorted(extra)}; use [[fault]]")
    tables = document.get("fault", [])
    if not isinstance(tables, list):
        raise ConfigError("fault schedule: write each fault as a [[fault]] table")
    faults = [_fault_from_table(i, table) for i, table in enumerate(tables)]
    return tuple(sorted(faults, key=lambda fault: fault.at_s))


def load_schedule(path: Path) -> tuple[Fault, ...]:
    """Read and parse the schedule file at ``path`` (see :func:`parse_schedule`)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read fault schedule {path}: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"fault schedule {path} is not UTF-8 text (a binary file?); give a TOML file "
            "of [[fault]] tables"
        ) from exc
    return parse_schedule(text)


def check_schedule(control: LabControl, faults: tuple[Fault, ...]) -> None:
    """Check every peer a schedule names exists in the lab, and every partition leaves peers on
    both sides, before anything is played.

    Raises:
        ConfigError: a fault names a peer the lab does not have, or a partition every peer.
    """
    for fault in faults:
        for name in (fault.peer, *fault.side):
            if name is not None:
                control.peer(name)
        if fault.side and len(set(fault.side)) == len(control.topology.peers):
            raise ConfigError(
                f"fault at {fault.at_s} s: partition {list(fault.side)} puts every peer on one "
                "side; leave at least one on the other"
            )


def faults_in_force(control: LabControl, applied: Sequence[AppliedFault]) -> tuple[Fault, ...]:
    """The faults that undo what ``applied`` left in force (at 0 s, in the order to play them):
    peers paused and not resumed or killed, links cut and not restored, a partition not healed,
    rates set away from the peers' built rates. What a schedule stopped part way must undo."""
    paused: dict[str, None] = {}
    cut: dict[str, None] = {}
    rates: dict[str, int] = {}
    partitioned = False
    for record in applied:
        fault, peer = record.fault, record.fault.peer
        if not record.ok:
            continue
        if fault.action == "pause" and peer is not None:
            paused[peer] = None
        elif fault.action in ("resume", "kill") and peer is not None:
            paused.pop(peer, None)
        elif fault.action == "cut" and peer is not None:
            cut[peer] = None
        elif fault.action == "restore" and peer is not None:
            cut.pop(peer, None)
        elif fault.action == "set_rate" and peer is not None and fault.rate_bps is not None:
            rates[peer] = fault.rate_bps
        elif fault.action in ("partition", "heal"):
            partitioned = fault.action == "partition"
    undo = [Fault(at_s=0.0, action="resume", peer=p) for p in paused]
    undo += [Fault(at_s=0.0, action="restore", peer=p) for p in cut]
    undo += [Fault(at_s=0.0, action="heal")] if partitioned else []
    for peer, rate in rates.items():
        built = control.peer(peer).rate_bps
        if rate != built:
            undo.append(Fault(at_s=0.0, action="set_rate", peer=peer, rate_bps=built))
    return tuple(undo)


def schedule_text(faults: Sequence[Fault]) -> str:
    """``faults`` as a schedule file's TOML (what :func:`parse_schedule` reads back)."""
    tables = []
    for fault in faults:
        lines = ["[[fault]]", f"at_s = {fault.at_s}", f'action = "{fault.action}"']
        if fault.peer is not None:
            lines.append(f'peer = "{fault.peer}"')
        if fault.rate_bps is not None:
            lines.append(f'rate = "{fault.rate_bps}bit"')
        if fault.side:
            lines.append("side = [" + ", ".join(f'"{name}"' for name in fault.side) + "]")
        tables.append("\n".join(lines))
    return "\n\n".join(tables) + "\n"


def _apply(control: LabControl, fault: Fault) -> str:
    if fault.action == "kill":
        return f"pids {control.kill(_required(fault.peer))}"
    if fault.action == "pause":
        return f"pids {control.pause(_required(fault.peer))}"
    if fault.action == "resume":
        return f"pids {control.resume(_required(fault.peer))}"
    if fault.action == "cut":
        control.cut(_required(fault.peer))
    elif fault.action == "restore":
        control.restore(_required(fault.peer))
    elif fault.action == "set_rate":
        assert fault.rate_bps is not None
        control.set_rate(_required(fault.peer), fault.rate_bps)
    elif fault.action == "partition":
        control.partition(fault.side)
    else:
        control.heal()
    return ""


def _required(peer: str | None) -> str:
    assert peer is not None, "Fault.__post_init__ guarantees a peer for peer actions"
    return peer


def play_schedule(
    control: LabControl,
    faults: tuple[Fault, ...],
    *,
    clock: Clock | None = None,
    stop: threading.Event | None = None,
    on_applied: Callable[[AppliedFault], None] | None = None,
    start_at: float | None = None,
) -> list[AppliedFault]:
    """Apply ``faults`` at their times; returns what was applied, in order.

    A fault that fails is logged and recorded with ``ok=False``; the rest still play.

    Args:
        control: the lab to act on.
        faults: the schedule, ordered by time (as :func:`parse_schedule` returns it).
        clock: time source; sleeping is done in slices so ``stop`` is noticed quickly.
        stop: when set, play ends before the next fault.
        on_applied: called with each record as soon as it is made (to stream a log).
        start_at: the ``clock.monotonic()`` reading that ``at_s`` counts from; now when None.
    """
    clock = clock or SystemClock()
    check_schedule(control, faults)
    start = clock.monotonic() if start_at is None else start_at
    applied: list[AppliedFault] = []
    for fault in faults:
        while (remaining := start + fault.at_s - clock.monotonic()) > 0:
            if stop is not None and stop.is_set():
                return applied
            clock.sleep(min(remaining, _MAX_SLEEP_SLICE_S))
        if stop is not None and stop.is_set():
            return applied
        started = clock.monotonic() - start
        try:
            detail, ok = _apply(control, fault), True
        except GossamerError as exc:
            detail, ok = str(exc), False
        record = AppliedFault(fault, started, clock.monotonic() - start, ok, detail)
        log = logger.info if ok else logger.error
        log(
            "fault %s: planned at %.3f s, applied at %.3f s (%+.3f s)%s%s",
            fault.describe(), fault.at_s, record.applied_at_s, record.late_s,
            "" if ok else " FAILED: ", "" if ok else detail,
        )  # fmt: skip
        applied.append(record)
        if on_applied is not None:
            on_applied(record)
    return applied


def fault_log_writer(path: Path) -> Callable[[AppliedFault], None]:
    """An ``on_applied`` callback that appends each record to ``path`` as a JSON line.

    The file is opened here first: one that cannot be written is refused before any fault is
    played (before, the first record's write ended the schedule with that fault in force, its
    restore never played). A write that fails later is logged; the schedule goes on.

    Raises:
        ConfigError: ``path`` cannot be opened for appending.
    """
    try:
        path.open("a").close()
    except OSError as exc:
        raise ConfigError(f"cannot write the fault log {path}: {exc.strerror or exc}") from exc

    def write(record: AppliedFault) -> None:
        try:
            with path.open("a") as handle:
                handle.write(json.dumps(record.to_json()) + "\n")
        except OSError as exc:
            logger.error("fault log %s: %s (the schedule goes on)", path, exc)

    return write


class FaultPlayer:
    """Plays a schedule in a background thread; a context manager that stops and joins it.

    >>> with FaultPlayer(lab, load_schedule(Path("faults.toml"))) as player:  # doctest: +SKIP
    ...     run_the_workload()
    ...     applied = player.wait(timeout_s=30)


    Args:
        control: the lab to act on.
        faults: the schedule.
        clock: time source (the system clock when None).
        on_applied: as for :func:`play_schedule`.
    """

    def __init__(
        self,
        control: LabControl,
        faults: tuple[Fault, ...],
        *,
        clock: Clock | None = None,
        on_applied: Callable[[AppliedFault], None] | None = None,
    ) -> None:
        check_schedule(control, faults)
        self._clock = clock or SystemClock()
        self._stop = threading.Event()
        self._applied: list[AppliedFault] = []
        self._error: BaseException | None = None
        self.started_at: float | None = None
        """The clock's monotonic reading that the schedule's ``at_s`` count from."""

        def play() -> None:
            try:
                self._applied = play_schedule(
                    control,
                    faults,
                    clock=self._clock,
                    stop=self._stop,
                    on_applied=on_applied,
                    start_at=self.started_at,
                )
            except BaseException as exc:  # handed to wait(), never lost
                self._error = exc

        self._thread = threading.Thread(target=play, name="gossamer-lab-faults", daemon=True)

    def __enter__(self) -> FaultPlayer:
        self.started_at = self._clock.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10.0)

    def wait(self, timeout_s: float) -> list[AppliedFault]:
        """Wait for the whole schedule to play; returns what was applied.

        Raises:
            DeadlineExceededError: play did not finish within ``timeout_s``.
            GossamerError: play failed.
        """
        self._thread.join(timeout=timeout_s)
        if self._thread.is_alive():
            raise DeadlineExceededError(f"fault schedule still playing after {timeout_s} s")
        if self._error is not None:
            raise GossamerError(f"fault schedule failed: {self._error}") from self._error
        return list(self._applied)
