"""A peer's network node: one server, its connections, the DHT, bulk streams, failure detection.

``Node`` is an async context manager living on one event loop. Starting it binds the server,
publishes a signed peer record and joins the swarm through the bootstrap peers; a maintenance task
it owns renews the record, refreshes the routing table and expires what is stale. Stopping it
cancels and awaits that task, closes every connection and stops the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import Counter
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from gossamer.core.clock import Clock, Pacer, SystemClock
from gossamer.core.errors import (
    GossamerError,
    PeerUnavailableError,
    ProtocolError,
)
from gossamer.core.machine import physical_memory_bytes
from gossamer.net.accepted_tunnels import AcceptedTunnels
from gossamer.net.addresses import host_of, ip_of, join_host_port, port_of, split_host_port
from gossamer.net.advertised_host import routable_host
from gossamer.net.bulk import (
    BulkHandler,
    BulkPayload,
    BulkReceiver,
    ReadOnlyBulkHandler,
    add_bulk_receiver_to_server,
    send_bulk,
)
from gossamer.net.config import NodeConfig
from gossamer.net.connections import ConnectionPool, DialTarget, PeerConnection
from gossamer.net.control_connections import DhtControlConnections, HeartbeatConnections
from gossamer.net.counters import NetCounters
from gossamer.net.dht import Dht
from gossamer.net.dht_service import DhtServicer, GrpcDhtTransport
from gossamer.net.directory import PeerDirectory
from gossamer.net.failure_detector import FailureDetector
from gossamer.net.handshake import PASS_THE_SECRET, Session, SwarmSecretMismatchError
from gossamer.net.identity import Identity, digest_of_peer_id, short_peer_id
from gossamer.net.owned_tasks import being_cancelled
from gossamer.net.peer_clocks import PeerClocks
from gossamer.net.reachability import DIAL_BACK_METHOD, ReachabilityServicer
from gossamer.net.records import PeerRecord, sign_peer_record, signing_time_after
from gossamer.net.relay import RelayServicer
from gossamer.net.relay_dialer import RelayDialer
from gossamer.net.server import NetServer
from gossamer.net.tls import TlsCertificate
from gossamer.net.tunnels import RelayReservations
from gossamer.net.upgrades import DirectUpgrades
from gossamer.proto import net_pb2, net_pb2_grpc

__all__ = ["Node", "local_capabilities"]

_log = logging.getLogger(__name__)
_BOOTSTRAP_WARNING_EVERY_S = 60.0
"""A bootstrap peer that keeps not answering is logged as a warning this often at most."""
_WORKING = (grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.IDLE)
"""States of a connection's channel in which a bootstrap uses it again rather than redial."""
R = TypeVar("R", bound=Message)


def local_capabilities() -> net_pb2.Capabilities:
    """What this machine offers: CPUs and memory (GPUs are filled in by layers that use torch)."""
    return net_pb2.Capabilities(
        num_cpus=os.cpu_count() or 1, memory_bytes=physical_memory_bytes() or 0
    )


class Node:
    """One peer's presence on the network.

    Args:
        config: listen address, bootstrap peers, swarm secret, limits and timings.
        identity: the peer's identity (a fresh one when omitted).
        clock: time source.
        capabilities: advertised in the peer record (this machine's CPUs and memory by default).
    """

    def __init__(
        self,
        config: NodeConfig,
        identity: Identity | None = None,
        *,
        clock: Clock | None = None,
        capabilities: net_pb2.Capabilities | None = None,
    ) -> None:
        self.config = config
        self.identity = identity or Identity.generate()
        self.clock = clock or SystemClock()
        self.counters = NetCounters()
        self.peer_clocks = PeerClocks()
        """Other peers' wall clocks against this one's, sampled by every ping and heartbeat."""
        self.capabilities = capabilities or local_capabilities()
        self.tls = TlsCertificate.generate()
        self.server = NetServer(
            self.identity, self.tls, config, self.clock, self.counters, self._on_session
        )
        self.directory = PeerDirectory(
            self.identity.peer_id,
            self.clock,
            self.counters,
            max_value_bytes=config.limits.max_record_value_bytes,
            max_peers=config.dht.max_peer_directory,
        )
        self.pool = ConnectionPool(
            self.identity, config, self.clock, self.counters, self._resolve, self.own_record
        )
        self.heartbeats = HeartbeatConnections(
            self.identity, config, self.clock, self.pool, self._resolve, self.own_record
        )
        self.heartbeat_pool = self.heartbeats.pool
        """Connections that carry heartbeats alone, to peers whose data connection is direct
        (see :mod:`gossamer.net.control_connections`); counted apart (the node's connection
        counts are its data connections)."""
        self.control = DhtControlConnections(
            self.identity, config, self.clock, self.pool, self.counters, self.own_record,
            reported_gone=lambda p: (s := self.detector.liveness(p)) is not None and not s.alive,
        )  # fmt: skip
        self.control_pool = self.control.pool
        """Connections that carry DHT requests alone, to peers whose direct data connection has
        a bulk upload under way (see :class:`GrpcDhtTransport`); closed once unused for
        ``CONTROL_IDLE_S``. Not counted among the node's connections; its calls are counted
        with the node's. Its breakers count only the requests on it."""
        self._transport = GrpcDhtTransport(self.pool, config.dht, self.control)
        self.dht = Dht(
            self.identity,
            config.dht,
            config.limits,
            self.clock,
            self.counters,
            self.directory,
            self._transport,
        )
        self._transport.dht = self.dht
        self.dht.own_record = self.own_record

        def removed(peer_id: str) -> None:  # (the DHT's own hook, and the pool's)
            self.dht.routing.remove(peer_id)
            self.pool.forget(peer_id)
            self.heartbeat_pool.forget(peer_id)
            self.control_pool.forget(peer_id)  # (its connection goes once idle)

        self.directory.on_removed = removed
        self.bulk = BulkReceiver(config.limits, self.counters, self.clock)
        self.detector = FailureDetector(
            self._heartbeat,
            config.heartbeat,
            self.clock,
            own_peer_id=self.identity.peer_id,
            on_unwatched=self.heartbeat_pool.drop,
        )
        self.server.add_servicer(net_pb2_grpc.add_DhtServicer_to_server, DhtServicer(self.dht))
        self.server.add_servicer(add_bulk_receiver_to_server, self.bulk)
        self.server.add_servicer(
            net_pb2_grpc.add_ReachabilityServicer_to_server,
            ReachabilityServicer(self.pool, loopback_ok=self._reached_on_loopback),
        )
        self.relay_service = RelayServicer(
            config.relay,
            self.counters,
            self.clock,
            may_relay=lambda: self.reachability != net_pb2.REACHABILITY_RELAYED,
        )
        self.server.add_servicer(net_pb2_grpc.add_RelayServicer_to_server, self.relay_service)
        self.relay_dialer = RelayDialer(
            self.pool, self.directory, self.peer_id, self.counters, self.relay_service
        )
        self.accepted_tunnels = AcceptedTunnels()
        """Tunnels this node carries into its own server, from relays and direct reservations."""
        self.reservations = RelayReservations(
            self.pool,
            self.directory,
            config,
            self.clock,
            self.peer_id,
            local_address=self._local_address,
            needs_relay=lambda: self.reachability == net_pb2.REACHABILITY_RELAYED,
            on_change=self._relays_changed,
            bootstrap_peers=lambda: list(self._bootstrap_ids),
            accepted=self.accepted_tunnels,
            heartbeat=self._heartbeat,
        )
        self.upgrades = DirectUpgrades(
            self.pool,
            self.directory,
            self.relay_dialer,
            config,
            self.clock,
            self.counters,
            local_address=self._local_address,
            is_relayed=lambda: self.reachability == net_pb2.REACHABILITY_RELAYED,
            accepted=self.accepted_tunnels,
        )
        self.reservations.on_tunnel = self.upgrades.offer
        self.relay_service.on_direct_reservation = self.upgrades.reversed_to
        self.relay_service.on_direct_reservation_ended = self.upgrades.reversal_ended
        self._reservation_task: asyncio.Task[None] | None = None
        self._relays_changed_event = asyncio.Event()
        self.addresses: tuple[str, ...] = ()
        """Where others dial this node (known after start)."""
        self.reachability = net_pb2.REACHABILITY_UNKNOWN
        """Whether others can reach this node directly (a ``ReachabilityKind``)."""
        self.relays: list[tuple[str, str]] = []
        """(relay peer id, relay address) pairs this node is reachable through."""
        self._own_record: net_pb2.SignedPeerRecord | None = None
        self._record_signed_at_s = 0.0
        self._bootstrap_ids: dict[str, str] = {}
        self._bootstrap_warnings = Pacer(_BOOTSTRAP_WARNING_EVERY_S, self.clock)
        """When a bootstrap entry's silence is logged as a warning again."""
        self._refused_for_secret: dict[str, bool] = {}
        """Bootstrap entries refused for the swarm secret (never dialed again), each with
        whether it was for being in an open swarm."""
        self._maintenance: asyncio.Task[None] | None = None
        self.extra_dial_targets: Callable[[str], list[DialTarget]] | None = (
            self.relay_dialer.targets
        )
        """Further ways to reach a peer (relay tunnels), consulted after direct addresses."""

    @property
    def peer_id(self) -> str:
        """This node's peer id."""
        return self.identity.peer_id

    @property
    def short_id(self) -> str:
        """The short form of the peer id, for logs."""
        return short_peer_id(self.identity.peer_id)

    @property
    def port(self) -> int:
        """The port the server listens on."""
        return self.server.port

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen, publish the peer record, join through the bootstrap peers, start maintenance."""
        await self.server.start()
        host = host_of(self.config.listen_address)
        announced = self.peer_id if self.config.announce else None
        self.addresses = self.config.advertise_addresses or (
            join_host_port(
                routable_host(host, self.config.bootstrap, warn_as=announced), self.server.port
            ),
        )
        self.sign_own_record()
        if self.config.bootstrap:
            await self.bootstrap(self.config.bootstrap)
        loop = asyncio.get_running_loop()
        self._maintenance = loop.create_task(
            self._maintain(), name=f"node-maintenance-{self.short_id}"
        )
        self._reservation_task = loop.create_task(
            self.reservations.run(), name=f"node-relays-{self.short_id}"
        )
        _log.info("peer %s: started at %s", self.peer_id, ", ".join(self.addresses))

    async def stop(self) -> None:
        """Stop maintenance and heartbeats, close connections, stop the server."""
        for task in (self._maintenance, self._reservation_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._maintenance = self._reservation_task = None
        await self.upgrades.close()
        await self.reservations.close()
        await self.relay_dialer.close()
        await self.detector.close()
        await self.heartbeat_pool.close()
        await self.control_pool.close()
        await self.pool.close()
        await self.server.stop(grace_s=0.5)
        _log.info("peer %s: stopped", self.short_id)

    async def __aenter__(self) -> Node:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # ---- records and directory -------------------------------------------------------------

    def sign_own_record(self) -> net_pb2.SignedPeerRecord:
        """Sign a fresh peer record for this node (after a change, or to renew it)."""
        value = net_pb2.PeerRecordValue(
            addresses=list(self.addresses),
            reachability=self.reachability,
            relays=[net_pb2.RelayHop(relay_peer_id=p, relay_address=a) for p, a in self.relays],
            capabilities=self.capabilities,
            tls_cert_der=self.tls.cert_der,
            relay_service=self.config.relay.serve,
        )
        previous = self._own_record
        signed_at_s = signing_time_after(
            previous.record.published_at_s if previous is not None else None, self.clock.wall()
        )
        self._own_record = sign_peer_record(
            self.identity, value, now_s=signed_at_s, ttl_s=self.config.dht.record_ttl_s
        )
        self._record_signed_at_s = self.clock.monotonic()
        return self._own_record

    def own_record(self) -> net_pb2.SignedPeerRecord | None:
        """This node's current signed peer record (None for a node that does not announce)."""
        return self._own_record if self.config.announce else None

    def peers(self) -> list[PeerRecord]:
        """Every peer this node knows a valid record of."""
        return self.directory.records()

    def _on_session(self, session: Session, record: net_pb2.SignedPeerRecord | None) -> None:
        self.directory.contacted(session.peer_id)
        if record is not None:  # (the caller's own; another peer's counts against its budget)
            self.dht.learn(record, contacted=session.peer_id)
        self.upgrades.session_opened(session.peer_id)

    def _resolve(self, peer_id: str) -> list[DialTarget]:
        targets: list[DialTarget] = []
        record = self.directory.get(peer_id)
        # A peer that found itself unreachable lists private addresses: dialing them would only
        # run into the connect deadline, so its relays are the way in.
        if record is not None and not (
            record.reachability == net_pb2.REACHABILITY_RELAYED and record.relays
        ):
            targets += [DialTarget(a, "direct", record.tls_cert_der) for a in record.addresses]
        if peer_id in self._bootstrap_ids:
            targets.append(DialTarget(self._bootstrap_ids[peer_id]))
        if self.extra_dial_targets is not None:
            targets += self.extra_dial_targets(peer_id)
        return targets

    # ---- discovery -------------------------------------------------------------------------

    async def bootstrap(self, entries: tuple[str, ...] | list[str]) -> int:
        """Join through known peers (HOST:PORT or PEER_ID@HOST:PORT); returns how many answered.

        An entry refused for the swarm secret is not dialed again: the secrets stay as they are.

        Raises:
            SwarmSecretMismatchError: every entry refused for the swarm secret (this peer has
                none, or another one): no retry would join.
        """
        reached = 0
        refused: list[tuple[str, SwarmSecretMismatchError]] = []
        for entry in entries:
            if entry in self._refused_for_secret:
                continue
            expected, _, address = entry.rpartition("@")
            try:
                reused = self._live_connection(expected, address)
                joined = False
                if reused is not None:
                    asked_s = self.clock.monotonic()
                    try:
                        await self._join_through(reused.peer_id, address)
                        joined = True
                    except SwarmSecretMismatchError:
                        raise
                    except GossamerError as exc:
                        if reused.last_life_s >= asked_s:
                            raise  # (busy, not dead: a bulk transfer or tunnel on it went on)
                        # (a connection silently dead, or to a peer that restarted with a new
                        # identity there: a fresh dial may well reach the entry)
                        _log.debug(
                            "peer %s: bootstrap peer %s did not answer on the connection kept "
                            "to it (%s); dialing it afresh",
                            self.short_id,
                            entry,
                            exc,
                        )
                        await self.pool.drop(reused.peer_id, reused)
                if not joined:
                    connection = await self.pool.dial(
                        DialTarget(address), expected_peer_id=expected or None
                    )
                    await self._join_through(connection.peer_id, address)
                reached += 1
                self._bootstrap_warnings.forget(entry)
            except SwarmSecretMismatchError as exc:
                self._refused_for_secret[entry] = exc.open_swarm
                refused.append((entry, exc))
            except GossamerError as exc:
                # (tried again every few seconds while the node knows nobody: a warning a
                # minute at most, not one per try)
                _log.log(
                    logging.WARNING if self._bootstrap_warnings.due(entry) else logging.DEBUG,
                    "peer %s: bootstrap peer %s did not answer: %s",
                    self.short_id,
                    entry,
                    exc,
                )
        if entries and all(entry in self._refused_for_secret for entry in entries):
            raise SwarmSecretMismatchError(self._secret_refusal(entries))
        for entry, why in refused:  # (the others may let this peer in: said once, as warnings)
            _log.warning(
                "peer %s: bootstrap peer %s refused this peer, not tried again: %s",
                self.short_id,
                entry,
                why,
            )
        if reached:
            # Joining is a lookup of our own id: it fills our buckets and puts our record (sent
            # with every request) on the peers nearest us. Stores follow at republish time.
            await self.dht.lookup(self.identity.digest)
        return reached

    async def _join_through(self, peer_id: str, address: str) -> None:
        """Ping a bootstrap peer reached at ``address`` and learn the peers nearest us from it;
        it is then the one id that address names (a peer there before it, restarted with a new
        identity, is not: its id kept being picked, with no connection, and every bootstrap
        dialed again and closed the working one to the new peer, the relay's reservation and
        tunnels with it)."""
        self._bootstrap_ids[peer_id] = address
        await self._timed_ping(peer_id, with_record=True, timeout_s=self.config.rpc_timeout_s)
        # A FindNode always returns the responder's record (a Ping answers with one only
        # if ours came with it, and a node that does not announce sends none), and the
        # peers nearest us: enough to start the lookup below from.
        for record in await self._transport.find_node(peer_id, self.identity.digest):
            self.dht.learn(record)
        for stale in [k for k, at in self._bootstrap_ids.items() if at == address]:
            if stale != peer_id:
                del self._bootstrap_ids[stale]

    def _live_connection(self, expected: str, address: str) -> PeerConnection | None:
        """The pool's working connection to a bootstrap entry's peer, if it has one.

        A node bootstraps again whenever its directory empties (its records expired while
        refreshes timed out on a thin link), and a dial replaces the peer's connection by
        closing it: with the relay as bootstrap peer, its reservation and every tunnel on it
        went too. A connection that works is used again instead (the first working one of the
        ids the address named, for a HOST:PORT entry). If it does not answer, the bootstrap
        dials afresh.
        """
        peer_ids = (
            [expected]
            if expected
            else [known for known, at in self._bootstrap_ids.items() if at == address]
        )
        for peer_id in peer_ids:
            connection = self.pool.get(peer_id)
            if connection is not None and connection.channel.get_state() in _WORKING:
                return connection
        return None

    def _all_refused(self) -> bool:
        """Whether every bootstrap entry refused for the swarm secret (none is dialed again)."""
        return all(entry in self._refused_for_secret for entry in self.config.bootstrap)

    def _secret_refusal(self, entries: tuple[str, ...] | list[str]) -> str:
        """One line saying why every one of ``entries`` refused for the swarm secret, and what
        to do."""
        where = ", ".join(entries)
        if self.config.swarm_secret is None:
            return (
                f"the swarm at {where} is private and this peer has no swarm secret: "
                f"{PASS_THE_SECRET}"
            )
        if all(self._refused_for_secret[entry] for entry in entries):
            return (
                f"the swarm at {where} is open (its peers have no swarm secret) and this peer "
                "has one: leave the secret out to join it"
            )
        return f"this peer's swarm secret is not the one of the swarm at {where}: {PASS_THE_SECRET}"

    async def _publish_own_record(self, closest: list[str] | None = None) -> None:
        if (
            self.clock.monotonic() - self._record_signed_at_s
            >= self.config.dht.republish_interval_s
        ):
            self.sign_own_record()
        record = self.own_record()
        if record is not None:
            try:
                await self.dht.store_on_closest(record.record, closest)
            except GossamerError as exc:
                _log.warning("peer %s: publishing the peer record failed: %s", self.short_id, exc)

    async def _maintain(self) -> None:
        dht = self.config.dht
        tick_s = min(dht.refresh_interval_s, dht.republish_interval_s)
        next_refresh = self.clock.monotonic() + dht.refresh_interval_s
        while True:
            await self.clock.sleep_async(tick_s)
            try:
                await self.control.close_idle()
                self.dht.expire()
                self.bulk.expire_idle()
                now = self.clock.monotonic()
                if now - self._record_signed_at_s >= dht.republish_interval_s:
                    self.sign_own_record()
                    await self._publish_own_record()
                    await self.dht.republish()
                if not self.directory and self.config.bootstrap and not self._all_refused():
                    await self.bootstrap(self.config.bootstrap)
                elif now >= next_refresh:
                    next_refresh = now + dht.refresh_interval_s
                    await self.dht.refresh()
            except GossamerError as exc:
                _log.warning("peer %s: maintenance step failed: %s", self.short_id, exc)
            except AssertionError:
                raise
            except Exception:  # a bug, not the network: logged whole; records still renewed
                _log.exception("peer %s: maintenance step failed unexpectedly", self.short_id)

    # ---- reachability and relays -----------------------------------------------------------

    def _reached_on_loopback(self) -> bool:
        """Whether this node's own addresses are loopback ones (a swarm on one machine)."""
        hosts = [host_of(a) for a in self.addresses]
        return any(
            h == "localhost" or ((ip := ip_of(h)) is not None and ip.is_loopback) for h in hosts
        )

    def _local_address(self) -> str:
        """HOST:PORT of this node's own server from this machine (where tunnels end)."""
        host = host_of(self.config.listen_address)
        if host == "0.0.0.0":
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        return join_host_port(host, self.port)

    async def _relays_changed(self) -> None:
        self.relays = sorted(self.reservations.active.items())
        self.sign_own_record()
        self._relays_changed_event.set()
        if not being_cancelled() and self.relays:
            await self._publish_own_record()

    async def find_peer(self, peer_id: str, timeout_s: float | None = None) -> PeerRecord | None:
        """This node's freshest record of ``peer_id``, looked up in the DHT (None if not found)."""
        try:
            async with asyncio.timeout(timeout_s or self.config.rpc_timeout_s):
                for record in await self.dht.get(digest_of_peer_id(peer_id)):
                    self.dht.learn(net_pb2.SignedPeerRecord(record=record))
        except (TimeoutError, GossamerError) as exc:
            _log.info("peer %s: looking up %s failed: %s", self.short_id, peer_id[:12], exc)
        return self.directory.get(peer_id)

    async def wait_for_relay(self, timeout_s: float) -> bool:
        """Wait until this node holds a relay reservation (or ``timeout_s`` passes)."""
        try:
            async with asyncio.timeout(timeout_s):
                while not self.relays:
                    self._relays_changed_event.clear()
                    await self._relays_changed_event.wait()
        except TimeoutError:
            return False
        return True

    async def check_reachability(self, num_helpers: int = 3, timeout_s: float = 5.0) -> bool:
        """Ask up to ``num_helpers`` known peers to dial back; updates the peer record.

        Returns:
            Whether most helpers that answered reached this node directly (then its addresses
            are those they reached it at). With no helper answering, the reachability stays
            unknown and False is returned.
        """
        helpers = list(self._bootstrap_ids) + [
            r.peer_id for r in self.peers() if r.reachability != net_pb2.REACHABILITY_RELAYED
        ]
        helpers = list(dict.fromkeys(helpers))[:num_helpers]
        request = net_pb2.DialBackRequest(addresses=list(self.addresses))

        async def ask(helper: str) -> net_pb2.DialBackResponse | None:
            try:
                return await self.call(
                    helper,
                    DIAL_BACK_METHOD,
                    request,
                    net_pb2.DialBackResponse,
                    timeout_s=timeout_s,
                    retry=False,
                )
            except GossamerError as exc:
                _log.info(
                    "peer %s: dial-back helper %s failed: %s",
                    self.short_id,
                    short_peer_id(helper),
                    exc,
                )
                return None

        # In parallel: a helper's dial back to a NATed address waits out its connect deadline.
        responses = await asyncio.gather(*(ask(helper) for helper in helpers))
        asked_ports = {port_of(a) for a in request.addresses}
        reported: Counter[str] = Counter()  # address -> helpers that reached this node there
        answered = reached = 0
        for response in responses:
            if response is None:
                continue
            answered += 1
            found: dict[str, None] = {}  # (in the helper's order)
            for address in response.reachable_addresses:
                try:
                    # (one others refuse would hide this node's record)
                    _, port = split_host_port(address)
                except ProtocolError:
                    _log.info("peer %s: dial-back named no address: %r", self.short_id, address)
                    continue
                if port in asked_ports:  # (else not this node's)
                    found[address] = None
            reported.update(found.keys())
            reached += bool(found)
        # Direct only where most helpers that answered reached it: one on this node's LAN (at
        # a private address nobody else can dial) or one that lies does not decide alone.
        direct = 2 * reached > answered
        if answered:
            self.reachability = (
                net_pb2.REACHABILITY_DIRECT if direct else net_pb2.REACHABILITY_RELAYED
            )
            if direct:
                # Where two or more helpers reached it, the addresses two of them name (one
                # helper, a liar or one on its LAN, adds none); if none is named twice, what
                # they named, the most named first.
                ranked = reported.most_common()
                confirmed = [a for a, count in ranked if count >= min(2, reached)]
                self.addresses = tuple((confirmed or [a for a, _ in ranked])[:4])
            self.sign_own_record()
            self.reservations.wake()
        _log.info(
            "peer %s: reachability %s (%d helpers answered, %d reached it)",
            self.short_id,
            "direct" if direct else "none",
            answered,
            reached,
        )
        return direct

    async def settle_reachability(
        self, *, check_timeout_s: float = 4.0, relay_wait_s: float = 8.0
    ) -> None:
        """Find out whether others can dial this node (:meth:`check_reachability`); if they
        cannot, wait up to ``relay_wait_s`` for a relay reservation (taken in the background),
        so that the record others read names a way in."""
        await self.check_reachability(timeout_s=check_timeout_s)
        # (no helper answered: unknown, and no relay is taken to wait for)
        if self.reachability == net_pb2.REACHABILITY_RELAYED and not self.relays:
            await self.wait_for_relay(timeout_s=relay_wait_s)

    # ---- calls -----------------------------------------------------------------------------

    def add_servicer(self, add_to_server: Callable[[Any, Any], None], servicer: Any) -> None:
        """Serve a service of another layer through this node's server (see NetServer)."""
        self.server.add_servicer(add_to_server, servicer)

    async def call(
        self,
        peer_id: str,
        method: str,
        request: Message,
        response_type: type[R],
        *,
        timeout_s: float | None = None,
        retry: bool = True,
    ) -> R:
        """A unary call to a peer by id (see ConnectionPool.call)."""
        return await self.pool.call(
            peer_id, method, request, response_type, timeout_s=timeout_s, retry=retry
        )

    async def ping(self, peer_id: str, timeout_s: float | None = None) -> None:
        """A ping that trades peer records (and samples the peer's clock)."""
        await self._timed_ping(
            peer_id, with_record=True, timeout_s=timeout_s or self.config.rpc_timeout_s
        )

    async def _heartbeat(self, peer_id: str, timeout_s: float) -> None:
        """One heartbeat (see :meth:`HeartbeatConnections.heartbeat`); samples the peer's clock."""
        sent_wall_s, sent_s = self.clock.wall(), self.clock.monotonic()
        remote_wall_s = await self.heartbeats.heartbeat(peer_id, timeout_s)
        self._note_clock(peer_id, sent_wall_s, sent_s, remote_wall_s)

    async def _timed_ping(self, peer_id: str, *, with_record: bool, timeout_s: float) -> None:
        sent_wall_s, sent_s = self.clock.wall(), self.clock.monotonic()
        remote_wall_s = await self._transport.ping(
            peer_id, with_record=with_record, timeout_s=timeout_s
        )
        self._note_clock(peer_id, sent_wall_s, sent_s, remote_wall_s)

    def _note_clock(
        self, peer_id: str, sent_wall_s: float, sent_s: float, remote_wall_s: float
    ) -> None:
        now_s = self.clock.monotonic()
        self.peer_clocks.note(
            peer_id,
            sent_wall_s=sent_wall_s,
            round_trip_s=now_s - sent_s,
            remote_wall_s=remote_wall_s,
            now_s=now_s,
        )

    def on_bulk(self, topic: str, handler: BulkHandler, *, max_bytes: int | None = None) -> None:
        """Receive bulk transfers on ``topic`` (at most ``max_bytes`` each) with ``handler``."""
        self.bulk.register(topic, handler, max_bytes=max_bytes)

    def on_bulk_read_only(
        self, topic: str, handler: ReadOnlyBulkHandler, *, max_bytes: int | None = None
    ) -> None:
        """Receive bulk transfers on ``topic`` with a ``handler`` that only reads them (see
        :meth:`BulkReceiver.register`)."""
        self.bulk.register(topic, handler, read_only=True, max_bytes=max_bytes)

    async def send_bulk(
        self,
        peer_id: str,
        topic: str,
        payload: BulkPayload,
        *,
        num_streams: int = 1,
        timeout_s: float = 60.0,
    ) -> None:
        """Stream ``payload`` to a peer's handler for ``topic``; returns once it was handled.

        Raises:
            PeerUnavailableError: the peer's circuit breaker is open: its calls failed (refused,
                reset, or out of time on a connection with no bulk upload under way; calls
                that ran out of time behind an upload are not counted, so uploads to a peer
                on a thin link do not shut out the next one).
            GossamerError: the transfer failed (see :func:`gossamer.net.bulk.send_bulk`).
        """
        if self.pool.breakers[peer_id].state == "open":
            raise PeerUnavailableError(f"peer {short_peer_id(peer_id)}: circuit open")
        await send_bulk(
            self.pool,
            peer_id,
            topic,
            payload,
            chunk_bytes=self.config.limits.bulk_chunk_bytes,
            num_streams=num_streams,
            timeout_s=timeout_s,
            counters=self.counters,
            idle_timeout_s=self.config.limits.bulk_idle_timeout_s,
        )
