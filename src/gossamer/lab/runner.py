"""The one seam through which the lab touches the system: running commands and signalling processes.

Everything the lab does to the machine (``ip``, ``tc``, ``iptables``, ``iperf3``, signals) goes
through a :class:`CommandRunner`. :class:`SubprocessRunner` is the real one;
:class:`FakeCommandRunner` records what would have run and answers from a script, so the lab's
logic is tested without root.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from gossamer.core.errors import GossamerError, MissingDependencyError

__all__ = [
    "REQUIRED_TOOLS",
    "CommandFailedError",
    "CommandResult",
    "CommandRunner",
    "FakeCommandRunner",
    "FakeProcess",
    "RunningProcess",
    "SubprocessRunner",
    "missing_tools",
    "require_tools",
]

logger = logging.getLogger(__name__)

REQUIRED_TOOLS: Mapping[str, str] = {
    "ip": "iproute2",
    "tc": "iproute2",
    "iptables": "iptables",
    "sysctl": "procps",
}
"""Tools the lab cannot work without, and the Debian package that provides each."""


class CommandFailedError(GossamerError):
    """A system command the lab ran exited with an error."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        self.argv = tuple(argv)
        self.returncode = returncode
        self.stderr = stderr
        super().__init__(f"`{' '.join(argv)}` exited with {returncode}: {stderr.strip()}")


@dataclass(frozen=True, slots=True)
class CommandResult:
    """What a finished command left behind."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str = ""
    stderr: str = ""

    @property
    def ok(self) -> bool:
        """Whether the command exited with status 0."""
        return self.returncode == 0


class RunningProcess(Protocol):
    """A process started in the background (``subprocess.Popen`` is one)."""

    @property
    def pid(self) -> int:
        """Its process id."""
        ...

    def poll(self) -> int | None:
        """Its exit status, or None while it runs."""
        ...

    def wait(self, timeout: float | None = None) -> int:
        """Wait for it to exit (``timeout`` in seconds); raises ``subprocess.TimeoutExpired``."""
        ...

    def terminate(self) -> None:
        """Send it SIGTERM."""
        ...

    def kill(self) -> None:
        """Send it SIGKILL."""
        ...


class CommandRunner(Protocol):
    """Runs commands and signals processes on behalf of the lab."""

    def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout_s: float = 30.0,
        input_text: str | None = None,
    ) -> CommandResult:
        """Run ``argv`` to completion and capture its output; ``input_text`` is its stdin (an
        ``ip -batch -`` script), none when None.

        Raises:
            CommandFailedError: ``check`` is set and the command exited non-zero.
        """
        ...

    def spawn(self, argv: Sequence[str], *, quiet: bool = False) -> RunningProcess:
        """Start ``argv`` in the background; its output is discarded when ``quiet``."""
        ...

    def send_signal(self, pid: int, signum: int) -> bool:
        """Send ``signum`` to ``pid``; False when the process no longer exists."""
        ...

    def which(self, tool: str) -> bool:
        """Whether ``tool`` is on the search path."""
        ...

    def is_root(self) -> bool:
        """Whether commands run with root's privileges."""
        ...


class SubprocessRunner:
    """The real runner: ``subprocess`` and ``os.kill``."""

    def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout_s: float = 30.0,
        input_text: str | None = None,
    ) -> CommandResult:
        logger.debug(
            "run: %s%s", " ".join(argv), "" if input_text is None else f" <<{input_text!r}"
        )
        try:
            done = subprocess.run(
                list(argv),
                input=input_text,
                capture_output=True,
                text=True,
                timeout=timeout_s,
                check=False,
            )
        except FileNotFoundError as exc:
            raise MissingDependencyError(f"`{argv[0]}` is not installed: {exc}") from exc
        except subprocess.TimeoutExpired as exc:
            raise CommandFailedError(argv, -1, f"timed out after {timeout_s} s") from exc
        result = CommandResult(tuple(argv), done.returncode, done.stdout, done.stderr)
        if check and not result.ok:
            raise CommandFailedError(argv, result.returncode, result.stderr)
        return result

    def spawn(self, argv: Sequence[str], *, quiet: bool = False) -> RunningProcess:
        logger.debug("spawn: %s", " ".join(argv))
        output = subprocess.DEVNULL if quiet else None
        return subprocess.Popen(list(argv), stdout=output, stderr=output)

    def send_signal(self, pid: int, signum: int) -> bool:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            return False
        return True

    def which(self, tool: str) -> bool:
        return shutil.which(tool) is not None

    def is_root(self) -> bool:
        return os.geteuid() == 0


@dataclass
class FakeProcess:
    """A process that was never started: it has already exited with ``exit_code``, or, made
    ``running``, runs until it is terminated or killed."""

    pid: int
    exit_code: int = 0
    returncode: int | None = None
    terminated: bool = False
    running: bool = False

    def poll(self) -> int | None:
        if self.running and not self.terminated:
            return None
        self.returncode = self.exit_code
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        self.returncode = self.exit_code
        return self.exit_code

    def terminate(self) -> None:
        self.terminated = True

    def kill(self) -> None:
        self.terminated = True


Responder = Callable[[tuple[str, ...]], CommandResult | None]


@dataclass
class FakeCommandRunner:
    """Records every command and signal; answers commands from ``responders``.

    Each responder sees the argv and may return a result; the first non-None answer wins. Commands
    nobody answers are handled in memory where the lab depends on their output (``ip netns add``,
    ``del``, ``list`` and ``pids`` keep a set of namespaces) and otherwise succeed with empty
    output. Nothing touches the system.
    """

    responders: list[Responder] = field(default_factory=list)
    """Consulted in order for every ``run``."""
    installed: set[str] = field(default_factory=lambda: {*REQUIRED_TOOLS, "iperf3"})
    """Tools ``which`` reports as present."""
    root: bool = True
    """What ``is_root`` reports."""
    commands: list[tuple[str, ...]] = field(default_factory=list)
    """Every argv passed to ``run`` or ``spawn``, in order."""
    batched: list[tuple[str, ...]] = field(default_factory=list)
    """Every command of every ``ip -batch -`` script run, as the argv it stands for."""
    signals: list[tuple[int, int]] = field(default_factory=list)
    """Every ``(pid, signum)`` sent."""
    spawned: list[FakeProcess] = field(default_factory=list)
    """Every process ``spawn`` pretended to start."""
    spawn_exit_code: int = 0
    """What every spawned fake process exits with."""
    spawn_running: bool = False
    """Whether spawned fake processes run until terminated (else they have already exited)."""
    namespaces: set[str] = field(default_factory=set)
    """The network namespaces that exist, as ``ip netns`` commands left them."""
    pids_by_namespace: dict[str, list[int]] = field(default_factory=dict)
    """What ``ip netns pids`` reports per namespace."""

    def answer(self, prefix: Sequence[str], stdout: str = "", returncode: int = 0) -> None:
        """Answer every command starting with ``prefix`` with ``stdout`` and ``returncode``."""
        wanted = tuple(prefix)

        def responder(argv: tuple[str, ...]) -> CommandResult | None:
            if argv[: len(wanted)] == wanted:
                return CommandResult(argv, returncode, stdout, "" if returncode == 0 else "failed")
            return None

        self.responders.insert(0, responder)

    def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout_s: float = 30.0,
        input_text: str | None = None,
    ) -> CommandResult:
        key = tuple(argv)
        self.commands.append(key)
        if key[:1] == ("ip",) and key[-2:] == ("-batch", "-") and input_text is not None:
            self.batched += [(*key[:-2], *line.split()) for line in input_text.splitlines()]
        result = None
        for responder in self.responders:
            result = responder(key)
            if result is not None:
                break
        if result is None:
            result = self._netns(key) if key[:2] == ("ip", "netns") else CommandResult(key, 0)
        if check and not result.ok:
            raise CommandFailedError(key, result.returncode, result.stderr)
        return result

    def _netns(self, argv: tuple[str, ...]) -> CommandResult:
        verb, name = (argv[2] if len(argv) > 2 else "list"), (argv[3] if len(argv) > 3 else "")
        if verb == "list":
            listing = "".join(f"{ns} (id: {i})\n" for i, ns in enumerate(sorted(self.namespaces)))
            return CommandResult(argv, 0, listing)
        exists = name in self.namespaces
        if verb == "add" and not exists:
            self.namespaces.add(name)
        elif verb == "del" and exists:
            self.namespaces.discard(name)
            self.pids_by_namespace.pop(name, None)
        elif verb == "pids" and exists:
            pids = self.pids_by_namespace.get(name, [])
            return CommandResult(argv, 0, "".join(f"{pid}\n" for pid in pids))
        elif verb in ("add", "del", "pids"):
            problem = "exists" if verb == "add" else "does not exist"
            return CommandResult(argv, 1, "", f"namespace {name} {problem}")
        return CommandResult(argv, 0)

    def spawn(self, argv: Sequence[str], *, quiet: bool = False) -> RunningProcess:
        self.commands.append(tuple(argv))
        process = FakeProcess(
            pid=10_000 + len(self.spawned),
            exit_code=self.spawn_exit_code,
            running=self.spawn_running,
        )
        self.spawned.append(process)
        return process

    def send_signal(self, pid: int, signum: int) -> bool:
        self.signals.append((pid, signum))
        return True

    def which(self, tool: str) -> bool:
        return tool in self.installed

    def is_root(self) -> bool:
        return self.root

    def ran(self, *fragment: str) -> bool:
        """Whether some recorded command, or command of a batch, contains ``fragment`` as a
        contiguous run of arguments."""
        size = len(fragment)
        return any(
            cmd[i : i + size] == fragment
            for cmd in (*self.commands, *self.batched)
            for i in range(len(cmd) - size + 1)
        )


def missing_tools(runner: CommandRunner, tools: Mapping[str, str] = REQUIRED_TOOLS) -> list[str]:
    """The tools of ``tools`` that ``runner`` cannot find, in the given order."""
    return [tool for tool in tools if not runner.which(tool)]


def require_tools(runner: CommandRunner, tools: Mapping[str, str] = REQUIRED_TOOLS) -> None:
    """Check that the lab can run here: root, and every tool of ``tools`` installed.

    Raises:
        MissingDependencyError: a tool is absent (the message names the Debian package to
            install) or the process is not root.
    """
    absent = missing_tools(runner, tools)
    if absent:
        packages = sorted({tools[tool] for tool in absent})
        raise MissingDependencyError(
            f"the lab needs {', '.join(absent)}; install with "
            f"`apt-get install {' '.join(packages)}` (as root)"
        )
    if not runner.is_root():
        raise MissingDependencyError(
            "the lab creates network namespaces and needs root; run it with sudo or as root"
        )
