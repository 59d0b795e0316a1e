"""Drive a built lab: run processes in peers, signal them, and change links while they run.

:class:`LabControl` is what the context manager yields and what faults act through. Process faults
act on every process in a peer's namespace, so they work from another command (`gossamer lab
faults`) as well as from the Python process that started the peers. Link faults act on the switch:
a cut takes the peer's switch port down (the cable is pulled; the peer keeps its address and
routes), a partition moves one side's ports to a second bridge, a rate change replaces the tbf on
every end of the peer's path.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable, Sequence
from pathlib import Path

from gossamer.core.errors import ConfigError
from gossamer.lab.build import namespace_pids, tbf_command
from gossamer.lab.config import format_rate
from gossamer.lab.plan import PARTITION_BRIDGE, SWITCH_BRIDGE, PeerNode, Topology
from gossamer.lab.runner import CommandResult, CommandRunner, RunningProcess
from gossamer.lab.state import LabState, update_state

__all__ = ["LabControl"]

logger = logging.getLogger(__name__)

_DEFAULT_TXQUEUELEN = 1000  # a veth's own default
_KICK_TXQUEUELEN = 1001


class LabControl:
    """Operations on a built lab.

    Args:
        state: the lab's recorded state; link changes are written back to it.
        runner: how commands run.
        state_dir: where to persist ``state`` after a change; None keeps it in memory only.
    """

    def __init__(
        self, state: LabState, runner: CommandRunner, *, state_dir: Path | None = None
    ) -> None:
        self.state = state
        self.runner = runner
        self._state_dir = state_dir

    @property
    def topology(self) -> Topology:
        """The lab's names and addresses."""
        return self.state.topology

    def peer(self, name: str) -> PeerNode:
        """The peer called ``name`` (raises ConfigError listing the names when unknown)."""
        return self.topology.peer(name)

    def address_of(self, name: str) -> str:
        """The address other peers dial to reach ``name`` (its router's, behind NAT)."""
        return self.peer(name).public_address

    # Processes -----------------------------------------------------------------------------

    def command_in(self, name: str, argv: Sequence[str]) -> list[str]:
        """``argv`` wrapped to run inside peer ``name``'s namespace."""
        if not argv:
            raise ConfigError("give a command to run in the peer, e.g. `-- ip addr`")
        return ["ip", "netns", "exec", self.peer(name).namespace, *argv]

    def run_in(
        self, name: str, argv: Sequence[str], *, check: bool = True, timeout_s: float = 30.0
    ) -> CommandResult:
        """Run ``argv`` inside peer ``name`` to completion and capture its output."""
        return self.runner.run(self.command_in(name, argv), check=check, timeout_s=timeout_s)

    def spawn_in(self, name: str, argv: Sequence[str], *, quiet: bool = False) -> RunningProcess:
        """Start ``argv`` inside peer ``name`` in the background; the caller owns the process."""
        return self.runner.spawn(self.command_in(name, argv), quiet=quiet)

    def pids_in(self, name: str) -> list[int]:
        """The processes running in peer ``name``'s namespace."""
        return namespace_pids(self.runner, self.peer(name).namespace)

    def signal_peer(self, name: str, signum: int) -> list[int]:
        """Send ``signum`` to every process of peer ``name``; returns the pids signalled."""
        signalled = [pid for pid in self.pids_in(name) if self.runner.send_signal(pid, signum)]
        logger.info(
            "peer %s: sent %s to %d processes %s",
            name, signal.Signals(signum).name, len(signalled), signalled,
        )  # fmt: skip
        return signalled

    def kill(self, name: str) -> list[int]:
        """SIGKILL every process of peer ``name``."""
        return self.signal_peer(name, signal.SIGKILL)

    def pause(self, name: str) -> list[int]:
        """SIGSTOP every process of peer ``name``."""
        return self.signal_peer(name, signal.SIGSTOP)

    def resume(self, name: str) -> list[int]:
        """SIGCONT every process of peer ``name``."""
        return self.signal_peer(name, signal.SIGCONT)

    # Links ---------------------------------------------------------------------------------

    def _set_port(self, peer: PeerNode, *args: str) -> None:
        self.runner.run(["ip", "-n", self.topology.switch_namespace, "link", "set",
                         peer.switch_port, *args])  # fmt: skip

    def _on_switch(self, commands: Sequence[Sequence[str]]) -> None:
        """Run ``ip`` ``commands`` in the switch's namespace as one ``ip -batch``, in order; it
        stops at the first that fails. One process, not one per peer: with 64 peers a heal
        took 0.2 s, and faults due with it waited that long."""
        script = "".join(" ".join(command) + "\n" for command in commands)
        self.runner.run(["ip", "-n", self.topology.switch_namespace, "-batch", "-"],
                        input_text=script)  # fmt: skip

    def cut(self, name: str) -> None:
        """Cut peer ``name``'s access link: its switch port goes down, nothing passes."""
        peer = self.peer(name)
        self._set_port(peer, "down")

        def record(state: LabState) -> None:
            if name not in state.cut_peers:
                state.cut_peers.append(name)

        self._update(record)
        logger.info("peer %s: link cut", name)

    def restore(self, name: str) -> None:
        """Restore peer ``name``'s access link after :meth:`cut`."""
        peer = self.peer(name)
        self._set_port(peer, "up")

        def record(state: LabState) -> None:
            if name in state.cut_peers:
                state.cut_peers.remove(name)

        self._update(record)
        logger.info("peer %s: link restored", name)

    def set_rate(self, name: str, rate_bps: int) -> None:
        """Change peer ``name``'s link rate on every shaped end, while traffic flows.

        Packets queued at that moment may be dropped (TCP resends them).
        """
        peer = self.peer(name)
        for end in peer.shaped_ends:
            self.runner.run(tbf_command(end, rate_bps))
            # Replacing a tbf under load can leave a veth's queue stalled for good (seen on
            # 6.18: backlog stuck, TCP in RTO backoff). Changing the queue length deactivates and
            # reactivates the device's queues, which restarts it; measured 0 stalls in 20 tries.
            for queue_length in (_KICK_TXQUEUELEN, _DEFAULT_TXQUEUELEN):
                self.runner.run(["ip", "-n", end.namespace, "link", "set", end.device,
                                 "txqueuelen", str(queue_length)])  # fmt: skip
        self._update(lambda state: state.rates_bps.__setitem__(name, rate_bps))
        logger.info("peer %s: link rate set to %s", name, format_rate(rate_bps))

    def partition(self, side: Sequence[str]) -> None:
        """Split the lab in two: the peers of ``side`` reach each other and nobody else.

        Raises:
            ConfigError: ``side`` is empty, names an unknown peer, or names every peer.
        """
        chosen = [self.peer(name) for name in side]
        if not chosen or len(set(side)) == len(self.topology.peers):
            raise ConfigError(
                "a partition needs one side with some but not all peers, e.g. side = ['p0']"
            )
        self._heal_ports()  # (a partition left by another command or a killed one included)
        # Made by the first partition and kept (deleting a bridge takes the kernel ~50 ms):
        # it fails once there; where it could not be made, the batch's first line fails.
        self.runner.run(["ip", "-n", self.topology.switch_namespace, "link", "add",
                         PARTITION_BRIDGE, "type", "bridge", "forward_delay", "0",
                         "stp_state", "0"], check=False)  # fmt: skip
        self._on_switch([
            ["link", "set", PARTITION_BRIDGE, "up"],
            *(["link", "set", peer.switch_port, "master", PARTITION_BRIDGE] for peer in chosen),
        ])  # fmt: skip
        side = [peer.name for peer in chosen]
        self._update(lambda state: setattr(state, "partition_side", side))
        logger.info("partition: %s | the rest", ", ".join(side))

    def heal(self) -> None:
        """Undo :meth:`partition`: every peer's port back on the one switch bridge.

        Every port, not only those the record names: a record that lost a partition (written
        over by another command, or a command killed mid-partition) left a healed peer on no
        bridge at all, cut off for good while `lab status` showed it up.
        """
        self._heal_ports()
        self._update(lambda state: setattr(state, "partition_side", []))
        logger.info("partition healed")

    def _heal_ports(self) -> None:
        """Every peer's port on the switch bridge (the partition's bridge is left empty)."""
        self._on_switch(
            [["link", "set", peer.switch_port, "master", SWITCH_BRIDGE]
             for peer in self.topology.peers]
        )  # fmt: skip

    def _update(self, change: Callable[[LabState], None]) -> None:
        """Record a change of the links in the lab's state, on top of what other commands
        recorded meanwhile."""
        self.state = update_state(self.state, change, self._state_dir)
