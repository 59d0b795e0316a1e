"""What a lab looks like now, kept in a small JSON file so separate commands can share it.

`gossamer lab up` writes the file before it builds anything (so a crash mid-build still leaves a
record) and again once built; faults that change links update it; `gossamer lab down` deletes it.
The file is a convenience, not the truth: `down` also sweeps namespaces by the lab's prefix, so a
lost or stale file never leaves anything behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gossamer.core.errors import CorruptedDataError, DeadlineExceededError
from gossamer.lab.plan import Topology

__all__ = [
    "DEFAULT_STATE_DIR",
    "LOCK_TIMEOUT_S",
    "LabState",
    "delete_state",
    "load_state",
    "pid_namespace",
    "process_ended",
    "process_start_ticks",
    "save_state",
    "state_lock",
    "update_state",
]

DEFAULT_STATE_DIR = Path("/run/gossamer-lab")
"""Where labs are recorded; /run is cleared at boot, as are the namespaces themselves."""

_FORMAT_VERSION = 1
_LOCK_POLL_S = 0.05
LOCK_TIMEOUT_S = 120.0
"""How long a command waits for a lab another command holds (a build takes seconds)."""


@dataclass(slots=True)
class LabState:
    """A lab's topology plus what faults have changed since it was built."""

    topology: Topology
    """Names and addresses as planned and built."""
    built: bool = False
    """False while `up` is still building (or crashed building)."""
    created_at: float = field(default_factory=time.time)
    """Wall-clock time of `up` (seconds since the epoch)."""
    rates_bps: dict[str, int] = field(default_factory=dict)
    """Each peer's current link rate, where a fault changed it."""
    cut_peers: list[str] = field(default_factory=list)
    """Peers whose access link is cut now."""
    partition_side: list[str] = field(default_factory=list)
    """Peers split off from the rest by a partition in force; empty when healed."""
    owner_pid: int | None = None
    """The process that made the lab for its own run and takes it down when done (the
    all-reduce bench's driver); None for a lab of `lab up`, which stays until `lab down`."""
    owner_start_ticks: int | None = None
    """When that process started (``/proc/PID/stat``'s start time), so that a process given its
    pid later is not taken for it."""
    owner_pid_namespace: int | None = None
    """The PID namespace ``owner_pid`` means a process in (see :func:`pid_namespace`): a
    bench in a container names its own processes' pids."""

    def owner_gone(self) -> bool:
        """Whether the lab's owner has ended without taking it down (killed outright): a lab
        nobody else uses. False for a lab without an owner (`lab up`'s), and for one whose owner
        is in another PID namespace (a container's: its pid names no process here)."""
        return self.owner_pid is not None and process_ended(
            self.owner_pid, self.owner_start_ticks, self.owner_pid_namespace
        )

    def rate_bps(self, peer: str) -> int:
        """The current link rate of ``peer``."""
        return self.rates_bps.get(peer, self.topology.peer(peer).rate_bps)

    def peer_records(self) -> list[dict[str, Any]]:
        """One record per peer for `lab status --json`: identity, addresses and link state."""
        records = []
        for peer in self.topology.peers:
            records.append(
                {
                    "name": peer.name,
                    "namespace": peer.namespace,
                    "address": peer.address,
                    "public_address": peer.public_address,
                    "rate_bps": self.rate_bps(peer.name),
                    "behind_nat": peer.behind_nat,
                    "router_namespace": peer.router_namespace,
                    "link": "cut" if peer.name in self.cut_peers else "up",
                    "partitioned": peer.name in self.partition_side,
                }
            )
        return records

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of everything in this state."""
        return {
            "format_version": _FORMAT_VERSION,
            "topology": self.topology.to_json(),
            "built": self.built,
            "created_at": self.created_at,
            "rates_bps": self.rates_bps,
            "cut_peers": self.cut_peers,
            "partition_side": self.partition_side,
            "owner_pid": self.owner_pid,
            "owner_start_ticks": self.owner_start_ticks,
            "owner_pid_namespace": self.owner_pid_namespace,
        }

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> LabState:
        """Rebuild a state from :meth:`to_json`'s output."""
        return cls(
            topology=Topology.from_json(record["topology"]),
            built=bool(record["built"]),
            created_at=float(record["created_at"]),
            rates_bps={str(k): int(v) for k, v in record["rates_bps"].items()},
            cut_peers=[str(p) for p in record["cut_peers"]],
            partition_side=[str(p) for p in record["partition_side"]],
            # (records written before labs had owners have neither)
            owner_pid=_optional_int(record.get("owner_pid")),
            owner_start_ticks=_optional_int(record.get("owner_start_ticks")),
            owner_pid_namespace=_optional_int(record.get("owner_pid_namespace")),
        )


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def process_ended(pid: int, start_ticks: int | None, namespace: int | None = None) -> bool:
    """Whether the process ``pid`` that started at ``start_ticks`` (see
    :func:`process_start_ticks`; None: not known) has ended: no process has that pid now, or
    the one that has it started at another time (the pid was given again). False where the pid
    is of another PID ``namespace`` than this process's (see :func:`pid_namespace`; None: not
    known, taken as this one's): it cannot be told from here, and a container's live bench,
    sharing the folder or the lab's records, lost them to a bench on the host."""
    if namespace is not None and namespace != pid_namespace():
        return False
    started = process_start_ticks(pid)
    return started is None or (start_ticks is not None and started != start_ticks)


def pid_namespace() -> int | None:
    """This process's PID namespace (the inode of ``/proc/self/ns/pid``); None where it cannot
    be read."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def process_start_ticks(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot (``/proc/PID/stat``); None when
    no such process runs (a zombie, ended but not yet reaped, counts as ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # (the command name, in parentheses, may hold spaces and parentheses: fields follow the last)
    fields = stat.rpartition(")")[2].split()
    if not fields or fields[0] in ("Z", "X"):  # (its state; the start time is the 20th after it)
        return None
    return int(fields[19])


def _state_path(state_dir: Path, name: str) -> Path:
    return state_dir / f"{name}.json"


def save_state(state: LabState, state_dir: Path = DEFAULT_STATE_DIR) -> Path:
    """Write ``state`` atomically (temporary file, fsync, rename); returns its path."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = _state_path(state_dir, state.topology.name)
    fd, temporary = tempfile.mkstemp(dir=state_dir, prefix=f".{state.topology.name}.")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(state.to_json(), handle, indent=2)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def load_state(name: str, state_dir: Path = DEFAULT_STATE_DIR) -> LabState | None:
    """The recorded state of lab ``name``, or None when there is no record.

    Raises:
        CorruptedDataError: the record exists but cannot be read (delete it, or run `lab down`).
    """
    path = _state_path(state_dir, name)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        record = json.loads(text)
        if record.get("format_version") != _FORMAT_VERSION:
            raise ValueError(f"unknown format version {record.get('format_version')!r}")
        return LabState.from_json(record)
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptedDataError(
            f"lab state file {path} is unreadable ({exc}); `gossamer lab down --name {name}` "
            "removes the lab by its namespace prefix and deletes the file"
        ) from exc


@contextlib.contextmanager
def state_lock(
    name: str, state_dir: Path = DEFAULT_STATE_DIR, *, timeout_s: float | None = None
) -> Iterator[None]:
    """Hold the lock of lab ``name``'s record: commands that change it one after another read
    what the others wrote (each saved its own copy over the whole file: a second shell's
    partition was lost, and a heal then stranded the partitioned peer on no bridge).

    Raises:
        DeadlineExceededError: another process held it for ``timeout_s`` (a build takes
            seconds).
    """
    timeout_s = LOCK_TIMEOUT_S if timeout_s is None else timeout_s
    state_dir.mkdir(parents=True, exist_ok=True)
    path = _lock_path(state_dir, name)
    deadline = time.monotonic() + timeout_s
    while True:
        with open(path, "a") as handle:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise DeadlineExceededError(
                        f"lab {name!r} is busy: another `gossamer lab` command has held it for "
                        f"{timeout_s:.0f} s (stopped with Ctrl-Z? see `jobs`); let it finish, "
                        "or stop it and run the command again"
                    ) from None
                time.sleep(_LOCK_POLL_S)  # (flock has no timeout of its own)
                continue
            try:
                # The lab's removal deletes its lock file while holding it (they piled up, one
                # per lab ever made): a lock taken on the file it deleted is no lock; again.
                if not _same_file(handle.fileno(), path):
                    continue
                yield
                return
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _lock_path(state_dir: Path, name: str) -> Path:
    return state_dir / f".{name}.lock"


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = path.stat()
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def update_state(
    state: LabState, change: Callable[[LabState], None], state_dir: Path | None
) -> LabState:
    """Apply ``change`` to the recorded state of ``state``'s lab as it is on disk now (to
    ``state`` itself where there is no record or no ``state_dir``), save it, and return it."""
    if state_dir is None:
        change(state)
        return state
    name = state.topology.name
    with state_lock(name, state_dir):
        try:
            current = load_state(name, state_dir) or state
        except CorruptedDataError:
            current = state  # rewritten whole from what this command knows
        change(current)
        save_state(current, state_dir)
    return current


def delete_state(name: str, state_dir: Path = DEFAULT_STATE_DIR) -> None:
    """Forget lab ``name`` (no error when it was never recorded), its lock file too: call it
    holding :func:`state_lock` of ``name``."""
    _state_path(state_dir, name).unlink(missing_ok=True)
    _lock_path(state_dir, name).unlink(missing_ok=True)
