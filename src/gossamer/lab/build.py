"""Build a planned lab with ``ip``, ``tc`` and ``iptables``, and take it down again.

Nothing here touches the root namespace: every device is created directly inside a lab namespace
(``ip -n A link add ... peer ... netns B``), every rule is added with ``ip netns exec`` into a lab
namespace, and deleting the namespaces therefore deletes every device, qdisc and rule with them.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterable

from gossamer.core.errors import GossamerError
from gossamer.lab.config import tbf_burst_bytes, tbf_limit_bytes
from gossamer.lab.plan import (
    PEER_DEVICE,
    ROUTER_LAN_DEVICE,
    ROUTER_WAN_DEVICE,
    SWITCH_BRIDGE,
    LinkEnd,
    PeerNode,
    Topology,
)
from gossamer.lab.runner import CommandFailedError, CommandRunner

__all__ = [
    "build_topology",
    "list_namespaces",
    "namespace_pids",
    "remove_namespaces",
    "tbf_command",
]

logger = logging.getLogger(__name__)

Argv = list[str]


def tbf_command(end: LinkEnd, rate_bps: int) -> Argv:
    """The tc command that shapes ``end`` to ``rate_bps`` (creating or replacing its qdisc)."""
    return [
        "tc", "-n", end.namespace, "qdisc", "replace", "dev", end.device, "root", "tbf",
        "rate", f"{rate_bps}bit",
        "burst", str(tbf_burst_bytes(rate_bps)),
        "limit", str(tbf_limit_bytes(rate_bps)),
    ]  # fmt: skip


def _sysctl(namespace: str, *settings: str) -> Argv:
    """Set kernel parameters (``key=value``) inside ``namespace``."""
    return ["ip", "netns", "exec", namespace, "sysctl", "-q", "-w", *settings]


def _namespace_commands(namespace: str) -> list[Argv]:
    return [
        ["ip", "netns", "add", namespace],
        ["ip", "-n", namespace, "link", "set", "lo", "up"],
        # No IPv6: its link-local chatter would share the capped links and blur measurements.
        _sysctl(namespace, "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1"),
    ]  # fmt: skip


def _veth_commands(a: LinkEnd, b: LinkEnd) -> list[Argv]:
    return [
        ["ip", "-n", a.namespace, "link", "add", a.device, "type", "veth",
         "peer", "name", b.device, "netns", b.namespace],
        ["ip", "-n", a.namespace, "link", "set", a.device, "up"],
        ["ip", "-n", b.namespace, "link", "set", b.device, "up"],
    ]  # fmt: skip


def _nat_router_commands(router: str, lan_prefix: str) -> list[Argv]:
    """Forwarding, masquerading and a stateful firewall that drops unsolicited inbound."""
    ipt = ["ip", "netns", "exec", router, "iptables", "-w"]
    wan, lan = ROUTER_WAN_DEVICE, ROUTER_LAN_DEVICE
    return [
        _sysctl(router, "net.ipv4.ip_forward=1"),
        [*ipt, "-t", "nat", "-A", "POSTROUTING", "-s", lan_prefix, "-o", wan, "-j", "MASQUERADE"],
        [*ipt, "-A", "FORWARD", "-i", lan, "-o", wan, "-j", "ACCEPT"],
        [*ipt, "-A", "FORWARD", "-i", wan, "-m", "conntrack",
         "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"],
        [*ipt, "-A", "FORWARD", "-i", wan, "-j", "DROP"],
        [*ipt, "-A", "INPUT", "-i", wan, "-m", "conntrack",
         "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"],
        [*ipt, "-A", "INPUT", "-i", wan, "-j", "DROP"],
    ]  # fmt: skip


def _peer_commands(topology: Topology, peer: PeerNode) -> list[Argv]:
    switch = topology.switch_namespace
    port = LinkEnd(switch, peer.switch_port)
    commands: list[Argv] = []
    if peer.router_namespace is None:
        commands += _veth_commands(port, LinkEnd(peer.namespace, PEER_DEVICE))
        commands.append(
            ["ip", "-n", peer.namespace, "addr", "add", f"{peer.address}/24", "dev", PEER_DEVICE]
        )
    else:
        router = peer.router_namespace
        lan_base = peer.address.rsplit(".", 1)[0]
        commands += _namespace_commands(router)
        commands += _veth_commands(port, LinkEnd(router, ROUTER_WAN_DEVICE))
        commands += _veth_commands(
            LinkEnd(router, ROUTER_LAN_DEVICE), LinkEnd(peer.namespace, PEER_DEVICE)
        )
        commands += [
            ["ip", "-n", router, "addr", "add", f"{peer.public_address}/24",
             "dev", ROUTER_WAN_DEVICE],
            ["ip", "-n", router, "addr", "add", f"{lan_base}.1/24", "dev", ROUTER_LAN_DEVICE],
            ["ip", "-n", peer.namespace, "addr", "add", f"{peer.address}/24", "dev", PEER_DEVICE],
            ["ip", "-n", peer.namespace, "route", "add", "default", "via", f"{lan_base}.1"],
        ]  # fmt: skip
        commands += _nat_router_commands(router, f"{lan_base}.0/24")
    commands.append(["ip", "-n", switch, "link", "set", peer.switch_port, "master", SWITCH_BRIDGE])
    commands += [tbf_command(end, peer.rate_bps) for end in peer.shaped_ends]
    return commands


def build_commands(topology: Topology) -> list[Argv]:
    """Every command that builds ``topology`` from nothing, in order."""
    switch = topology.switch_namespace
    commands = _namespace_commands(switch)
    commands += [
        ["ip", "-n", switch, "link", "add", SWITCH_BRIDGE, "type", "bridge",
         "forward_delay", "0", "stp_state", "0"],
        ["ip", "-n", switch, "link", "set", SWITCH_BRIDGE, "up"],
    ]  # fmt: skip
    for peer in topology.peers:
        commands += _namespace_commands(peer.namespace)
        if topology.tcp_congestion_control:  # per namespace: set before any socket opens
            setting = f"net.ipv4.tcp_congestion_control={topology.tcp_congestion_control}"
            commands.append(_sysctl(peer.namespace, setting))
    for peer in topology.peers:
        commands += _peer_commands(topology, peer)
    return commands


def build_topology(topology: Topology, runner: CommandRunner) -> None:
    """Create every namespace, link, qdisc and rule of ``topology``.

    On failure whatever this build made is removed before the error propagates: the namespaces
    its own ``ip netns add`` created, never one of the same name that was there first (another
    lab's, built at the same time by another process).

    Raises:
        CommandFailedError: a command failed (the message has its stderr).
    """
    logger.info("building lab %s with %d peers", topology.name, len(topology.peers))
    created: list[str] = []
    try:
        for argv in build_commands(topology):
            adding = argv[:3] == ["ip", "netns", "add"]
            if adding:  # before it runs: interrupted, it may have made the namespace all the same
                created.append(argv[3])
            try:
                runner.run(argv)
            except CommandFailedError:
                if adding:  # it failed: it made nothing (the name may be another lab's)
                    created.pop()
                raise
    except BaseException:
        remove_namespaces(runner, created)
        raise


def list_namespaces(runner: CommandRunner, prefix: str) -> list[str]:
    """The names of the existing network namespaces that start with ``prefix``."""
    listing = runner.run(["ip", "netns", "list"]).stdout
    names = (line.split()[0] for line in listing.splitlines() if line.strip())
    return sorted(name for name in names if name.startswith(prefix))


def namespace_pids(runner: CommandRunner, namespace: str) -> list[int]:
    """The processes running in ``namespace`` (none when it does not exist)."""
    result = runner.run(["ip", "netns", "pids", namespace], check=False)
    if not result.ok:
        return []
    return [int(word) for word in result.stdout.split() if word.isdigit()]


def remove_namespaces(runner: CommandRunner, namespaces: Iterable[str]) -> list[str]:
    """Kill every process in ``namespaces`` and delete them; returns the ones deleted.

    Deleting a namespace deletes its devices, qdiscs and firewall rules. Its processes are killed
    first because a live process would keep the namespace's devices alive after the name is gone.
    Namespaces that do not exist are skipped; errors are logged and the rest still removed.

    Raises:
        GossamerError: some namespace could not be deleted (after trying all of them).
    """
    existing = set(list_namespaces(runner, ""))
    removed, failed = [], []
    for namespace in namespaces:
        if namespace not in existing:
            continue
        for pid in namespace_pids(runner, namespace):
            runner.send_signal(pid, signal.SIGKILL)
        result = runner.run(["ip", "netns", "del", namespace], check=False)
        # (or removed meanwhile by another command: gone all the same)
        if result.ok or namespace not in list_namespaces(runner, namespace):
            removed.append(namespace)
        else:
            logger.error("could not delete namespace %s: %s", namespace, result.stderr.strip())
            failed.append(namespace)
    if failed:
        raise GossamerError(f"could not delete namespaces {', '.join(failed)}; see the log")
    logger.info("removed namespaces: %s", ", ".join(removed) or "none")
    return removed
