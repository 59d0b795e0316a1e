"""The shape of a lab, decided before anything is built: names, addresses and which ends are shaped.

A lab is a star. One *switch* namespace holds a Linux bridge; every peer hangs off it through a
veth pair, its *access link*. A public peer's end of the access link is its own ``eth0``. A peer
behind NAT has a router namespace of its own: the router's ``wan`` end sits on the access link
(with the address the rest of the lab sees), its ``lan`` end faces the peer's ``eth0`` on a private
/24, and iptables masquerades outbound traffic and drops unsolicited inbound. One router per NATed
peer is the realistic case for a swarm (every home GPU sits behind its own NAT), and it is the case
relays and hole punching exist for.

Addresses come from 10.213.0.0/16 and exist only inside the lab's namespaces:

* the switch segment is 10.213.0.0/24; peer *i* (or its router) is 10.213.0.(10+i);
* the LAN behind router *i* is 10.213.(100+i).0/24: router .1, peer .2.

Every veth end on a peer's path is shaped with tbf at the peer's rate, so a link is capped in both
directions and a rate change applies to all of them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from gossamer.core.errors import ConfigError
from gossamer.lab.config import LabConfig

__all__ = ["SUBNET", "LinkEnd", "PeerNode", "Topology", "plan_topology"]

SUBNET = "10.213.0.0/16"
"""The only addresses the lab uses, and only inside its own namespaces."""

SWITCH_BRIDGE = "gsl-br0"
"""The bridge every access link joins."""
PARTITION_BRIDGE = "gsl-br1"
"""The second bridge that holds one side of a partition while it lasts."""
PEER_DEVICE = "eth0"
ROUTER_WAN_DEVICE = "wan"
ROUTER_LAN_DEVICE = "lan"


@dataclass(frozen=True, slots=True)
class LinkEnd:
    """One shaped end of a veth pair: the namespace it lives in and its device name."""

    namespace: str
    device: str


@dataclass(frozen=True, slots=True)
class PeerNode:
    """One peer of the lab and everything that was built for it."""

    name: str
    """What users call it: ``p0``, ``p1``, ..."""
    namespace: str
    """The network namespace its processes run in."""
    address: str
    """Its own IPv4 address (inside its namespace)."""
    public_address: str
    """The address the rest of the lab sees: its own, or its NAT router's."""
    rate_bps: int
    """Its access link rate (bits per second) as built."""
    behind_nat: bool
    """Whether it sits behind a NAT router."""
    router_namespace: str | None
    """Its NAT router's namespace, when behind NAT."""
    switch_port: str
    """The access link's device on the switch (cut and partition act on it)."""
    shaped_ends: tuple[LinkEnd, ...]
    """Every veth end shaped at ``rate_bps``."""

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (also the ``lab status --json`` record of this peer)."""
        record = asdict(self)
        record["shaped_ends"] = [asdict(end) for end in self.shaped_ends]
        return record

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> PeerNode:
        """Rebuild a peer from :meth:`to_json`'s output."""
        fields = dict(record)
        fields["shaped_ends"] = tuple(LinkEnd(**end) for end in record["shaped_ends"])
        return cls(**fields)


@dataclass(frozen=True, slots=True)
class Topology:
    """A whole lab: its name, its switch namespace and its peers."""

    name: str
    """The lab's name (see :attr:`LabConfig.name`)."""
    switch_namespace: str
    """The namespace holding the bridge."""
    peers: tuple[PeerNode, ...]
    """The peers, in order."""
    tcp_congestion_control: str = ""
    """TCP congestion control set in every peer's namespace; empty: the host's default."""

    @property
    def namespace_prefix(self) -> str:
        """The prefix of every namespace of this lab."""
        return self.switch_namespace.removesuffix("switch")

    def namespaces(self) -> list[str]:
        """Every namespace of this lab: the switch first, then peers and routers."""
        names = [self.switch_namespace]
        for peer in self.peers:
            names.append(peer.namespace)
            if peer.router_namespace:
                names.append(peer.router_namespace)
        return names

    def peer(self, name: str) -> PeerNode:
        """The peer called ``name``.

        Raises:
            ConfigError: no peer has that name (the message lists the names there are).
        """
        for peer in self.peers:
            if peer.name == name:
                return peer
        known = ", ".join(p.name for p in self.peers)
        raise ConfigError(f"no peer {name!r} in lab {self.name!r}; its peers are {known}")

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict, as stored in the lab's state file."""
        return {
            "name": self.name,
            "switch_namespace": self.switch_namespace,
            "peers": [peer.to_json() for peer in self.peers],
            "tcp_congestion_control": self.tcp_congestion_control,
        }

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> Topology:
        """Rebuild a topology from :meth:`to_json`'s output."""
        return cls(
            name=record["name"],
            switch_namespace=record["switch_namespace"],
            peers=tuple(PeerNode.from_json(peer) for peer in record["peers"]),
            tcp_congestion_control=record.get("tcp_congestion_control", ""),
        )


def plan_topology(config: LabConfig) -> Topology:
    """Decide every name and address of the lab described by ``config``; builds nothing."""
    prefix = config.namespace_prefix
    switch = f"{prefix}switch"
    peers = []
    for index in range(config.num_peers):
        name = f"p{index}"
        namespace = f"{prefix}{name}"
        port = f"gsl-{name}"
        public_address = f"10.213.0.{10 + index}"
        ends: tuple[LinkEnd, ...]
        if config.is_behind_nat(index):
            router = f"{prefix}r{index}"
            address = f"10.213.{100 + index}.2"
            ends = (
                LinkEnd(switch, port),
                LinkEnd(router, ROUTER_WAN_DEVICE),
                LinkEnd(router, ROUTER_LAN_DEVICE),
                LinkEnd(namespace, PEER_DEVICE),
            )
        else:
            router = None
            address = public_address
            ends = (LinkEnd(switch, port), LinkEnd(namespace, PEER_DEVICE))
        peers.append(
            PeerNode(
                name=name,
                namespace=namespace,
                address=address,
                public_address=public_address,
                rate_bps=config.peer_rate_bps(index),
                behind_nat=router is not None,
                router_namespace=router,
                switch_port=port,
                shaped_ends=ends,
            )
        )
    return Topology(
        name=config.name,
        switch_namespace=switch,
        peers=tuple(peers),
        tcp_congestion_control=config.tcp_congestion_control,
    )
