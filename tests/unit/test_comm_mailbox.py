"""The comm mailbox's early arrivals: messages of a round that has not opened here yet."""

from __future__ import annotations

import asyncio
import random

import pytest
from comm_fakes import IdleJumpClock

from gossamer.comm import net_transport
from gossamer.comm.net_transport import COMM_TOPIC, NetCommTransport
from gossamer.comm.transport import (
    CHUNK_ELEMENTS_LIMIT,
    MAX_MESSAGE_BYTES,
    CommMailbox,
    Frame,
    FrameKind,
    Message,
    pack_frame,
    refused_for_room,
    sender_host,
    unpack_frame,
)
from gossamer.core.errors import NotInRoundError, PeerUnavailableError, ProtocolError
from gossamer.net.node import Node

ROUND = b"\x01" * 16


class _Silent:
    """A transport that sends nothing (the mailbox only receives here)."""

    peer_id = "me"

    def set_receiver(self, receiver: object) -> None:
        self.receiver = receiver

    async def send(self, peer_id: str, message: Message, *, timeout_s: float) -> None:
        return None


class _Round:
    def __init__(self) -> None:
        self.chunks: list[int] = []

    async def handle(self, sender: str, frame: Frame, body: object) -> None:
        self.chunks.append(frame.chunk)


def _message(round_id: bytes, chunk: int = 0) -> memoryview:
    return memoryview(pack_frame(Frame(FrameKind.CONTRIBUTION, round_id, 0, chunk, 0, 1.0)))


def _sized(round_id: bytes, nbytes: int, chunk: int = 0) -> memoryview:
    """A message of ``round_id`` of ``nbytes`` bytes, its header included."""
    header = pack_frame(Frame(FrameKind.CONTRIBUTION, round_id, 0, chunk, 0, 1.0))
    return memoryview(header + bytes(nbytes - len(header)))


async def _waits_then_is_handled(
    mailbox: CommMailbox, clock: IdleJumpClock, round_id: bytes, chunk: int, sender: str = "peer"
) -> None:
    """A message of ``round_id`` comes before its round opens here; it is handled once the
    round opens."""
    waiting = asyncio.create_task(mailbox.deliver(sender, _message(round_id, chunk)))
    await clock.sleep_async(0.1)
    handler = _Round()
    mailbox.open_round(round_id, handler)  # type: ignore[arg-type]
    await waiting
    assert handler.chunks == [chunk]


def test_an_early_message_is_handled_once_its_round_opens_or_refused_at_the_timeout() -> None:
    clock = IdleJumpClock()

    async def main() -> None:
        mailbox = CommMailbox(_Silent(), clock, early_arrival_timeout_s=5.0)
        waiting = asyncio.create_task(mailbox.deliver("peer", _message(ROUND, 1)))
        await clock.sleep_async(1.0)
        handler = _Round()
        mailbox.open_round(ROUND, handler)  # type: ignore[arg-type]
        await waiting
        assert handler.chunks == [1]
        with pytest.raises(ProtocolError, match="did not open"):
            await mailbox.deliver("peer", _message(b"\x02" * 16))
        assert not mailbox.awaits_round_of_key(b"\x02" * 4)

    asyncio.run(clock.run(main()))


def test_messages_whose_senders_gave_up_leave_nothing_waiting() -> None:
    # A sender whose deadline passes cancels its call while its message waits here. Before,
    # each left its round's entry behind for good: 4 of them (the table's size here) and
    # every early message was refused.
    clock = IdleJumpClock()

    async def main() -> None:
        mailbox = CommMailbox(_Silent(), clock, early_arrival_timeout_s=30.0, max_waiting_rounds=4)
        for i in range(4):
            call = asyncio.create_task(mailbox.deliver("peer", _message(bytes([i + 2]) * 16)))
            await clock.sleep_async(0.1)
            call.cancel()
            await asyncio.gather(call, return_exceptions=True)
        assert not mailbox.awaits_round_of_key(bytes([2]) * 4)
        await _waits_then_is_handled(mailbox, clock, ROUND, 3)

    asyncio.run(clock.run(main()))


def test_a_message_that_timed_out_leaves_a_later_one_of_its_round_waiting() -> None:
    # Two messages of one round wait; the first times out, the round opens before the
    # second's own timeout. Before, the first took the round's entry with it, so the second
    # was never woken and was refused although its round had opened.
    clock = IdleJumpClock()

    async def main() -> None:
        mailbox = CommMailbox(_Silent(), clock, early_arrival_timeout_s=1.0)
        first = asyncio.create_task(mailbox.deliver("peer", _message(ROUND, 1)))
        await clock.sleep_async(0.6)
        second = asyncio.create_task(mailbox.deliver("peer", _message(ROUND, 2)))
        await clock.sleep_async(0.6)
        with pytest.raises(ProtocolError, match="did not open"):
            await first
        handler = _Round()
        mailbox.open_round(ROUND, handler)  # type: ignore[arg-type]
        await second
        assert handler.chunks == [2]

    asyncio.run(clock.run(main()))


@pytest.mark.parametrize("limit", ["messages", "bytes", "rounds"])
def test_only_so_many_messages_and_bytes_wait_for_unopened_rounds(limit: str) -> None:
    # Each waiting message holds its payload: the rounds they wait for were bounded, the
    # messages of one round (and the bytes they hold) were not. The room stays bounded; a
    # sender that holds less than the heaviest holder takes room from it (its oldest message
    # goes), and one that holds as much as anyone is refused for lack of room, which its
    # sender retries (before, a few identities that filled the room had every member's early
    # message refused as malformed, and its sender dropped this healthy peer).
    clock = IdleJumpClock()
    caps = {  # (one message for each of 16 senders, each for its own round in "rounds")
        "messages": {"max_waiting_messages": 16},
        "bytes": {"max_waiting_bytes": 16 * len(_message(ROUND))},
        "rounds": {"max_waiting_rounds": 16},
    }
    rounds = [bytes([i + 2]) * 16 if limit == "rounds" else ROUND for i in range(18)]

    async def main() -> None:
        mailbox = CommMailbox(_Silent(), clock, **caps[limit])  # type: ignore[arg-type]
        waiting = []
        for i in range(16):
            message = _message(rounds[i], i)
            waiting.append(asyncio.create_task(mailbox.deliver(f"peer{i}", message)))
            await clock.sleep_async(0.1)  # (peer0's message is the oldest)
        # peer1 holds as much as anyone: refused, for lack of room, not as malformed.
        with pytest.raises(PeerUnavailableError, match="no room") as refused:
            await mailbox.deliver("peer1", _message(rounds[17], 16))
        assert refused_for_room(refused.value)
        # peer16 holds nothing: peer0's message, the oldest of those holding the most, goes.
        newcomer = asyncio.create_task(mailbox.deliver("peer16", _message(rounds[16], 17)))
        await asyncio.sleep(0)
        with pytest.raises(PeerUnavailableError) as dropped:
            await waiting[0]
        assert refused_for_room(dropped.value)
        assert mailbox.early_room.num_messages == 16  # (the room's bound holds)
        assert mailbox.early_room.num_rounds == (16 if limit == "rounds" else 1)
        handlers = {}
        for round_id in dict.fromkeys(rounds[1:17]):
            handlers[round_id] = _Round()
            mailbox.open_round(round_id, handlers[round_id])  # type: ignore[arg-type]
        await asyncio.gather(*waiting[1:], newcomer)
        handled = sorted(chunk for handler in handlers.values() for chunk in handler.chunks)
        assert handled == [*range(1, 16), 17]
        await mailbox.deliver("peer0", _message(rounds[1], 18))  # the room was given back
        assert not mailbox.early_room.num_messages
        assert not mailbox.early_room.nbytes

    asyncio.run(clock.run(main()))


def test_a_sender_holding_less_never_loses_its_message_to_one_holding_more() -> None:
    # Eight identities fill the room (two messages each, their share) before a member's early
    # message comes, and send again whatever is refused: they take room only from each other,
    # never from the member, which holds less than any of them.
    clock = IdleJumpClock()

    def stranger(i: int) -> tuple[str, memoryview]:
        return f"stranger{i % 8}", _message(bytes([0xE0 + i % 8]) * 16, i)

    async def main() -> None:
        mailbox = CommMailbox(_Silent(), clock, max_waiting_messages=16)
        flood = [asyncio.create_task(mailbox.deliver(*stranger(i))) for i in range(16)]
        await clock.sleep_async(0.1)
        member = asyncio.create_task(mailbox.deliver("member", _message(ROUND, 1)))
        await clock.sleep_async(0.1)
        for _ in range(20):  # the strangers send again, round after round
            flood += [asyncio.create_task(mailbox.deliver(*stranger(i))) for i in range(16)]
            await clock.sleep_async(0.1)
            assert not member.done()
        assert mailbox.early_room.num_messages == 16
        handler = _Round()
        mailbox.open_round(ROUND, handler)  # type: ignore[arg-type]
        await member
        assert handler.chunks == [1]
        for task in flood:
            task.cancel()
        results = await asyncio.gather(*flood, return_exceptions=True)
        assert any(refused_for_room(r) for r in results)
        assert all(
            isinstance(r, asyncio.CancelledError)
            or refused_for_room(r)
            or (isinstance(r, ProtocolError) and "its share" in str(r))
            for r in results
        ), results

    asyncio.run(clock.run(main()))


def test_a_key_settled_without_a_round_refuses_its_rounds_waiting_and_new() -> None:
    # The tag is the round id's first 4 bytes (the round key's hash): a peer that averaged
    # alone refuses the round of a peer that counted it, at once and for a waiting message too.
    clock = IdleJumpClock()
    other_key = b"\x07" * 16

    async def main() -> None:
        mailbox = CommMailbox(_Silent(), clock, early_arrival_timeout_s=30.0)
        waiting = asyncio.create_task(mailbox.deliver("peer", _message(ROUND, 1)))
        await clock.sleep_async(0.1)
        started = clock.monotonic()
        mailbox.settle_key(ROUND[:4])
        with pytest.raises(NotInRoundError, match="runs no round of that key"):
            await waiting
        assert clock.monotonic() - started < 1.0  # not at the early-arrival timeout
        with pytest.raises(NotInRoundError, match="runs no round of that key"):
            await mailbox.deliver("peer", _message(b"\x01" * 4 + b"\x09" * 12))
        # Another key's early message still waits for its round.
        await _waits_then_is_handled(mailbox, clock, other_key, 2)
        # Forming a round of the key again (a peer that went on alone came back to it):
        # its messages wait for the round as any early message does.
        mailbox.unsettle_key(ROUND[:4])
        await _waits_then_is_handled(mailbox, clock, ROUND, 3)

    asyncio.run(clock.run(main()))


@pytest.mark.parametrize(
    "kind",
    [k for k in FrameKind if k not in (FrameKind.CONTRIBUTION, FrameKind.RESULT)],
)
def test_a_frame_of_a_kind_without_payload_that_carries_one_is_refused(kind: FrameKind) -> None:
    # (a step's question waits up to half a send timeout for its answer: with a payload it held
    # that payload all the while, counted nowhere)
    header = pack_frame(Frame(kind, ROUND, 0, 0, 0, 0.0))
    frame, body = unpack_frame(memoryview(header))
    assert frame.kind is kind
    assert len(body) == 0
    with pytest.raises(ProtocolError, match="has none"):
        unpack_frame(memoryview(header + b"\0" * 4096))


def test_comm_takes_messages_no_larger_than_a_chunk_can_be() -> None:
    class _Node:
        def on_bulk_read_only(self, topic: str, handler: object, *, max_bytes: int) -> None:
            self.registered = (topic, max_bytes)

    node = _Node()
    NetCommTransport(node)  # type: ignore[arg-type]
    assert node.registered == (COMM_TOPIC, MAX_MESSAGE_BYTES)
    assert CHUNK_ELEMENTS_LIMIT * 4 < MAX_MESSAGE_BYTES < 1 << 30


async def _flood_leaves_room(
    mailbox: CommMailbox, clock: IdleJumpClock, sent: list[memoryview], *, kept: int
) -> None:
    """One sender sends ``sent`` for unopened rounds: all but ``kept`` are refused as past its
    share, and a member's early message still waits for its round and is handled."""
    flood = [asyncio.create_task(mailbox.deliver("stranger", m)) for m in sent]
    await asyncio.sleep(0)
    refused = [t for t in flood if t.done() and isinstance(t.exception(), ProtocolError)]
    assert len(refused) == len(sent) - kept
    assert "its share" in str(refused[0].exception())
    await _waits_then_is_handled(mailbox, clock, ROUND, 1, sender="member")
    for task in flood:
        task.cancel()
    await asyncio.gather(*flood, return_exceptions=True)


def test_one_sender_cannot_fill_the_table_of_rounds_messages_wait_for() -> None:
    # A peer in none of this one's groups sent a header-only message for each of 64 made-up
    # rounds: each waited for its round to open, the table filled, and a member's early
    # message of the real round was refused, so the member took this peer for failed.
    clock = IdleJumpClock()

    async def main() -> None:
        mailbox = CommMailbox(_Silent(), clock, early_arrival_timeout_s=30.0)
        sent = [_message(bytes([i]) + b"\xee" * 15) for i in range(64)]
        await _flood_leaves_room(mailbox, clock, sent, kept=8)  # an eighth of the table

    asyncio.run(clock.run(main()))


@pytest.mark.parametrize("flood_of", ["messages", "bytes"])
def test_one_sender_cannot_fill_the_messages_or_bytes_waiting_for_rounds(flood_of: str) -> None:
    # One sender's 1,024 words for one made-up round (or a few of the largest messages) held
    # every place a message may wait in: every member's early message was refused for 30 s,
    # and its sender took this peer for failed.
    clock = IdleJumpClock()

    async def main() -> None:
        mailbox = CommMailbox(
            _Silent(), clock, early_arrival_timeout_s=30.0, max_waiting_bytes=64 << 10
        )
        if flood_of == "messages":
            sent = [_message(b"\xee" * 16, chunk) for chunk in range(1024)]
        else:  # (8 KiB each: a sender's share of 64 KiB, a quarter, is one message)
            sent = [memoryview(bytes(_message(b"\xee" * 16, i)) + b"\0" * 8192) for i in range(8)]
        await _flood_leaves_room(mailbox, clock, sent, kept=128 if flood_of == "messages" else 1)

    asyncio.run(clock.run(main()))


def test_forming_a_key_again_forgets_the_rounds_of_it_that_ended() -> None:
    # A peer whose round of a key ended (a torch round's presence, or a p2p round it was
    # dropped from) forms the key again, in another group: the others' messages of the new
    # round were refused at once (the closed round still named the key), and they took this
    # peer for failed.
    clock = IdleJumpClock()
    again = b"\x01" * 4 + b"\x05" * 12  # the same key's tag, another round

    async def main() -> None:
        mailbox = CommMailbox(_Silent(), clock, early_arrival_timeout_s=30.0)
        mailbox.open_round(ROUND, _Round())  # type: ignore[arg-type]
        mailbox.close_round(ROUND)
        with pytest.raises(NotInRoundError, match="under the same key"):
            await mailbox.deliver("peer", _message(again, 1))
        mailbox.unsettle_key(ROUND[:4])
        await _waits_then_is_handled(mailbox, clock, again, 2)

    asyncio.run(clock.run(main()))


class _Records(_Silent):
    """A transport that records what it sends."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    async def send(self, peer_id: str, message: Message, *, timeout_s: float) -> None:
        assert isinstance(message, bytes)
        self.sent.append((peer_id, message))


def test_a_round_left_before_its_end_tells_the_others_and_refuses_its_messages() -> None:
    # A round whose caller cancelled it: the members still in it are told, and a later
    # message of it is refused (its sender stops waiting for this peer), where a round that
    # ended drops its stragglers without a word. Opening the round again takes them again.
    clock = IdleJumpClock()

    async def main() -> None:
        transport = _Records()
        mailbox = CommMailbox(transport, clock)
        mailbox.open_round(ROUND, _Round())  # type: ignore[arg-type]
        mailbox.leave_round(ROUND, b"notice", ["peer-a", "peer-b"], refuse=True)
        await clock.sleep_async(0.1)
        assert sorted(transport.sent) == [("peer-a", b"notice"), ("peer-b", b"notice")]
        with pytest.raises(NotInRoundError, match="left round"):
            await mailbox.deliver("peer-a", _message(ROUND))
        ended = b"\x05" * 16
        mailbox.open_round(ended, _Round())  # type: ignore[arg-type]
        mailbox.close_round(ended)
        await mailbox.deliver("peer-a", _message(ended))  # dropped
        handler = _Round()
        mailbox.open_round(ROUND, handler)  # type: ignore[arg-type]
        await mailbox.deliver("peer-a", _message(ROUND, 4))
        assert handler.chunks == [4]
        # Left with nothing owed (every member holds its averages): its stragglers are dropped.
        mailbox.leave_round(ROUND, b"notice", ["peer-a"], refuse=False)
        await mailbox.deliver("peer-a", _message(ROUND, 5))
        await mailbox.aclose()

    asyncio.run(clock.run(main()))


def test_identities_of_one_host_fill_a_room_with_space_and_give_way_to_other_hosts() -> None:
    # Identities are free in an open swarm: 16 of them from one host, one message each for
    # rounds of their own, take all 16 places of the table (a host caps nothing while there is
    # room: the senders of one address, behind a NAT or a proxy, are counted as by identity).
    # In the full room a member of another host, and senders of this machine (no host), take
    # places from that host, the heaviest, never from each other; a newcomer of the host takes
    # the place of the host's oldest and not the member's, which holds less than its host.
    clock = IdleJumpClock()
    flood_host = "203.0.113.9"

    async def main() -> None:
        mailbox = CommMailbox(_Silent(), clock, max_waiting_rounds=16)

        def from_flood(i: int) -> asyncio.Task[None]:
            message = _message(bytes([0xE0, i]) + b"\0" * 14)
            return asyncio.create_task(mailbox.deliver(f"id{i}", message, flood_host))

        flood = []
        for i in range(16):
            flood.append(from_flood(i))
            await clock.sleep_async(0.1)
        assert mailbox.early_room.num_rounds == 16
        assert not any(task.done() for task in flood)
        member = asyncio.create_task(mailbox.deliver("member", _message(ROUND, 1), "192.0.2.1"))
        local = [
            asyncio.create_task(mailbox.deliver(f"local{i}", _message(bytes([0xD0, i]) * 8)))
            for i in range(13)
        ]
        await clock.sleep_async(0.1)
        for dropped in flood[:14]:  # (the oldest first)
            with pytest.raises(PeerUnavailableError) as refused:
                await dropped
            assert refused_for_room(refused.value)
        for i in range(16, 24):  # the host sends again: its own give way, not the member
            flood.append(from_flood(i))
            await clock.sleep_async(0.1)
            assert sum(not task.done() for task in flood) == 2
        assert mailbox.early_room.num_rounds == 16
        assert not member.done()
        assert not any(task.done() for task in local)
        handler = _Round()
        mailbox.open_round(ROUND, handler)  # type: ignore[arg-type]
        await member
        assert handler.chunks == [1]
        for task in [*flood, *local]:
            task.cancel()
        await asyncio.gather(*flood, *local, return_exceptions=True)
        assert not mailbox.early_room.num_messages
        assert not mailbox.early_room.holdings_by_sender()
        assert not mailbox.early_room.holdings_by_path()

    asyncio.run(clock.run(main()))


def test_members_behind_one_address_are_not_refused_while_the_room_has_space() -> None:
    # 15 members behind one NAT (or every sender, where a proxy rewrites source addresses)
    # send their three messages in flight each (3 KiB a member) for a round that opens here
    # later. The room (64 KiB) holds all 45 KiB; counted as one host with a hard cap of a
    # quarter of the bytes (16 KiB), 29 of them were refused and sent again and again.
    clock = IdleJumpClock()

    async def main() -> None:
        mailbox = CommMailbox(_Silent(), clock, max_waiting_bytes=64 << 10)
        waiting = [
            asyncio.create_task(
                mailbox.deliver(f"member{i}", _sized(ROUND, 1 << 10, chunk), "198.51.100.1")
            )
            for i in range(15)
            for chunk in range(3)
        ]
        await clock.sleep_async(0.1)
        assert [t for t in waiting if t.done()] == []
        handler = _Round()
        mailbox.open_round(ROUND, handler)  # type: ignore[arg-type]
        await asyncio.gather(*waiting)
        assert len(handler.chunks) == 45

    asyncio.run(clock.run(main()))


def test_a_full_room_drops_a_round_only_where_that_frees_its_place() -> None:
    # The table of 16 rounds is full: a host's members a and b wait in rounds R1 and R2, c in
    # R1, and 14 other hosts hold a round each. c sends for R3: its host holds the most, and
    # within it a and b hold more than c. Dropping a's and b's messages of R1 freed no place
    # (c's own message holds R1) and c was refused after all; R2, held by a and b alone, goes.
    clock = IdleJumpClock()
    r1, r2, r3 = (bytes([n]) * 16 for n in (0x11, 0x12, 0x13))
    host = "198.51.100.1"

    async def main() -> None:
        mailbox = CommMailbox(_Silent(), clock, max_waiting_rounds=16)
        sends = [("a", r1), ("b", r1), ("c", r1), ("a", r2), ("b", r2)]
        held = {
            (who, rid): asyncio.create_task(mailbox.deliver(who, _message(rid), host))
            for who, rid in sends
        }
        others = [
            asyncio.create_task(
                mailbox.deliver(f"other{i}", _message(bytes([0xD0, i]) * 8), f"192.0.2.{i}")
            )
            for i in range(14)
        ]
        await clock.sleep_async(0.1)
        assert mailbox.early_room.num_rounds == 16
        newcomer = asyncio.create_task(mailbox.deliver("c", _message(r3), host))
        await clock.sleep_async(0.1)
        for dropped in (held["a", r2], held["b", r2]):
            with pytest.raises(PeerUnavailableError) as refused:
                await dropped
            assert refused_for_room(refused.value)
        assert not newcomer.done()
        assert not any(held[who, r1].done() for who in "abc")
        assert not any(task.done() for task in others)
        tasks = [newcomer, *held.values(), *others]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(clock.run(main()))


def test_a_message_that_cannot_be_given_room_drops_nothing() -> None:
    # The room (64 KiB) lacks 8 KiB for a newcomer's 10 KiB message. Only one host holds more
    # than the newcomer's (6 KiB against 4: two of its messages could go), the 13 others hold
    # as much. Two messages were dropped, for nothing: the newcomer was refused after all.
    clock = IdleJumpClock()

    async def main() -> None:
        mailbox = CommMailbox(_Silent(), clock, max_waiting_bytes=64 << 10)
        rounds = iter(bytes([0xC0, i]) * 8 for i in range(64))
        kib = 1 << 10
        tasks = [asyncio.create_task(mailbox.deliver("y", _sized(next(rounds), 4 * kib), "y"))]
        heavier = [
            asyncio.create_task(mailbox.deliver("x", _sized(next(rounds), kib), "x"))
            for _ in range(6)
        ]
        tasks += [
            asyncio.create_task(mailbox.deliver(f"z{i}", _sized(next(rounds), 4 * kib), f"z{i}"))
            for i in range(13)
        ]
        await clock.sleep_async(0.1)
        assert mailbox.early_room.nbytes == 62 * kib
        with pytest.raises(PeerUnavailableError) as refused:
            await mailbox.deliver("y", _sized(next(rounds), 10 * kib), "y")
        assert refused_for_room(refused.value)
        assert not any(task.done() for task in [*heavier, *tasks])
        assert mailbox.early_room.nbytes == 62 * kib
        for task in [*heavier, *tasks]:
            task.cancel()
        await asyncio.gather(*heavier, *tasks, return_exceptions=True)

    asyncio.run(clock.run(main()))


def test_identities_from_many_64s_of_one_48_give_way_to_a_member_of_another() -> None:
    # A machine with a routed /56 (or /48) sends from a /64 of its own for each identity:
    # counted by /64 alone, 16 of them were 16 hosts, each holding as much as the member, and
    # the member's message was dropped for the next of them. Their /48 holds them together.
    clock = IdleJumpClock()

    async def main() -> None:
        mailbox = CommMailbox(_Silent(), clock, max_waiting_rounds=16)

        def from_flood(i: int) -> asyncio.Task[None]:
            message = _message(bytes([0xE0, i]) + b"\0" * 14)
            host = sender_host(f"2001:db8:aa:1{i:02x}::1")
            return asyncio.create_task(mailbox.deliver(f"id{i}", message, host))

        flood = [from_flood(i) for i in range(15)]
        member = asyncio.create_task(
            mailbox.deliver("member", _message(ROUND, 1), sender_host("2001:db8:bb::7"))
        )
        await clock.sleep_async(0.1)
        for i in range(15, 40):  # each sends again whatever is dropped
            flood.append(from_flood(i))
            await clock.sleep_async(0.1)
        assert not member.done()
        handler = _Round()
        mailbox.open_round(ROUND, handler)  # type: ignore[arg-type]
        await member
        assert handler.chunks == [1]
        for task in flood:
            task.cancel()
        await asyncio.gather(*flood, return_exceptions=True)

    asyncio.run(clock.run(main()))


def test_a_sender_is_counted_by_its_ipv4_address_or_its_ipv6_64() -> None:
    assert sender_host("198.51.100.7") == "198.51.100.7"
    assert (
        sender_host("2001:db8:1:2:aaaa::1")
        == sender_host("2001:db8:1:2::9")
        == ("2001:db8:1:2::/64")
    )
    assert sender_host("::ffff:198.51.100.7") == "198.51.100.7"


@pytest.mark.parametrize(
    ("seen", "listening", "advertised", "host"),
    [
        ("198.51.100.7", "0.0.0.0:0", "192.0.2.2:7000", "198.51.100.7"),
        ("2001:db8:1:2::5", "[::]:7000", "[2001:db8:9::1]:7000", "2001:db8:1:2::/64"),
        ("127.0.0.1", "0.0.0.0:0", "192.0.2.2:7000", None),  # this machine (a local swarm,
        ("::1", "[::]:7000", "[2001:db8:9::1]:7000", None),  # or a relay's tunnel)
        ("192.0.2.4", "192.0.2.4:7000", "192.0.2.4:7000", None),  # tunnels end where it listens
        # ... also on a bracketed IPv6 address (before, every relayed sender was one host):
        ("fd00::2", "[fd00::2]:7000", "127.0.0.1:9", None),
        ("::ffff:192.0.2.4", "[::ffff:192.0.2.4]:7000", "127.0.0.1:9", None),
        # A swarm on one machine listening on 0.0.0.0 dials its advertised address:
        ("192.0.2.2", "0.0.0.0:0", "192.0.2.2:7000", None),
        ("2001:db8:9::1", "[::]:7000", "[2001:db8:9::1]:7000", None),
        ("", "0.0.0.0:0", "192.0.2.2:7000", None),  # not an IP (a unix socket)
    ],
)
def test_a_message_over_net_comes_with_its_senders_host_unless_it_came_from_this_machine(
    seen: str,
    listening: str,
    advertised: str,
    host: str | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class _Config:
        listen_address = listening

    class _Node:
        config = _Config()
        port = 7000
        addresses = (advertised,)
        _local_address = Node._local_address  # (where its tunnels connect to its server)

        def on_bulk_read_only(self, topic: str, handler: object, *, max_bytes: int) -> None:
            self.handler = handler

    got: list[str | None] = []

    async def receive(sender: str, message: memoryview, sender_at: str | None) -> None:
        got.append(sender_at)

    monkeypatch.setattr(net_transport, "current_remote_host", lambda: seen)
    transport = NetCommTransport(_Node())  # type: ignore[arg-type]
    transport.set_receiver(receive)
    asyncio.run(transport._on_bulk("peer", COMM_TOPIC, bytearray(_message(ROUND))))
    assert got == [host]


def test_the_waiting_room_keeps_its_bounds_and_its_tables_under_random_traffic() -> None:
    # Senders of a few networks and hosts (and of this machine, with no host), some from two
    # hosts, send messages of random sizes for random rounds, which open, close and time out,
    # and some senders give up. After every step the room keeps its bounds and each sender's
    # share, its tables agree with the messages that wait, and nothing is left at the end.
    clock = IdleJumpClock()
    rng = random.Random(7)
    limits = {"rounds": 16, "messages": 64, "bytes": 1 << 20}
    hosts = [None, "10.0.0.1", "10.0.0.2", "2001:db8::/64", "2001:db8:0:1::/64", "2001:db9::/64"]
    rounds = [bytes([0xA0, i]) * 8 for i in range(40)]

    def check(mailbox: CommMailbox) -> None:
        room = mailbox.early_room
        held = room.waiting()
        assert len({m.round_id for m in held}) == room.num_rounds <= limits["rounds"]
        assert len(held) == room.num_messages <= limits["messages"]
        assert sum(m.nbytes for m in held) == room.nbytes <= limits["bytes"]
        by_key: dict[object, list[object]] = {}
        for m in sorted(held, key=lambda m: m.seq):
            by_key.setdefault(("sender", m.sender), []).append(m)
            for depth in (1, 2, 3):
                by_key.setdefault(m.path[:depth], []).append(m)
        by_sender = room.holdings_by_sender()
        tables = {("sender", s): h for s, h in by_sender.items()}
        tables.update(room.holdings_by_path())
        assert tables.keys() == by_key.keys()
        for key, holding in tables.items():
            assert holding.messages == by_key[key]
            assert holding.nbytes == sum(m.nbytes for m in holding.messages)
            assert sum(holding.rounds.values()) == len(holding.messages)
        for holding in by_sender.values():
            for what in ("rounds", "messages", "bytes"):
                assert holding.amount(what) <= room.share(what)

    async def main() -> None:
        mailbox = CommMailbox(
            _Silent(),
            clock,
            early_arrival_timeout_s=0.3,
            max_waiting_rounds=limits["rounds"],
            max_waiting_messages=limits["messages"],
            max_waiting_bytes=limits["bytes"],
        )
        tasks: list[asyncio.Task[None]] = []
        for _ in range(1500):
            draw = rng.random()
            if draw < 0.7:
                s = rng.randrange(60)
                host = hosts[s % len(hosts)] if rng.random() < 0.95 else rng.choice(hosts)
                size = rng.choice((64, 1000, 30_000, 200_000))
                message = _sized(rng.choice(rounds), size)
                tasks.append(asyncio.create_task(mailbox.deliver(f"s{s}", message, host)))
            elif draw < 0.8:
                round_id = rng.choice(rounds)
                if round_id not in mailbox._rounds:
                    mailbox.open_round(round_id, _Round())  # type: ignore[arg-type]
            elif draw < 0.9:
                mailbox.close_round(rng.choice(rounds))
            elif draw < 0.95 and tasks:
                rng.choice(tasks).cancel()
            else:
                await clock.sleep_async(rng.random() * 0.05)
            await asyncio.sleep(0)
            check(mailbox)
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        assert any(refused_for_room(o) for o in outcomes if isinstance(o, BaseException))
        for outcome in outcomes:
            assert (
                outcome is None
                or isinstance(outcome, asyncio.CancelledError | ProtocolError)
                or refused_for_room(outcome)
            ), outcome
        check(mailbox)
        assert not mailbox.early_room.num_messages
        assert not mailbox.early_room.num_rounds
        assert not mailbox.early_room.holdings_by_sender()
        assert not mailbox.early_room.holdings_by_path()

    asyncio.run(clock.run(main()))
