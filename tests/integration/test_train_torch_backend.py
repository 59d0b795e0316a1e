"""Swarm rounds over the torch.distributed backend: real nodes and gloo groups on 127.0.0.1."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import pytest
import torch

from gossamer.comm.report import AllReduceResult
from gossamer.core.errors import DeadlineExceededError, GossamerError, PeerLostError
from gossamer.net.bridge import NodeThread
from gossamer.net.config import NodeConfig
from gossamer.net.node import Node
from gossamer.train import swarm_round_formation, swarm_torch_rounds
from gossamer.train.averaging import AverageOutcome
from gossamer.train.swarm_averager import SwarmAverager
from gossamer.train.swarm_averager_config import SwarmAveragerConfig
from loopback_nodes import start_node_threads

RUN = "torch-backend"


@contextlib.contextmanager
def averagers(
    count: int, backends: Sequence[str] = (), **settings: object
) -> Iterator[list[SwarmAverager]]:
    """``count`` averagers on nodes of their own (``backends``: each one's, where given)."""
    settings = {"round_timeout_s": 8.0, **settings}
    with contextlib.ExitStack() as stack:
        made = []
        for index, node_thread in enumerate(start_node_threads(stack, count)):
            own = {"backend": backends[index]} if index < len(backends) else {}
            config = SwarmAveragerConfig(run_id=RUN, **(settings | own))  # type: ignore[arg-type]
            averager = SwarmAverager(node_thread, config)
            stack.callback(averager.close)
            averager.join_run(0)
            stack.callback(averager.leave_run)
            made.append(averager)
        yield made


def tensors_of(index: int) -> list[torch.Tensor]:
    """Peer ``index``'s tensors: a vector and a matrix (the flat buffer spans both)."""
    generator = torch.Generator().manual_seed(index)
    return [torch.randn(1000, generator=generator), torch.randn(3, 5, generator=generator)]


def weighted_mean(indices: Sequence[int], weights: Sequence[float]) -> list[torch.Tensor]:
    parts = [tensors_of(i) for i in indices]
    scale = torch.tensor(weights, dtype=torch.float64) / sum(weights)
    means = []
    for k in range(2):
        stacked = torch.stack([p[k].double() for p in parts])
        means.append(torch.tensordot(scale, stacked, dims=1).float())
    return means


def one_round(
    made: Sequence[SwarmAverager],
    round_key: str,
    weights: Sequence[float],
    tensors: Callable[[int], list[torch.Tensor]] = tensors_of,
) -> list[AverageOutcome]:
    outcomes: list[AverageOutcome | None] = [None] * len(made)
    errors: list[BaseException] = []

    def peer(index: int) -> None:
        try:
            outcomes[index] = made[index].average(
                tensors(index), round_key=round_key, weight=weights[index]
            )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=peer, args=(i,)) for i in range(len(made))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    done = [o for o in outcomes if o is not None]
    assert len(done) == len(made), "a peer did not finish its round"
    return done


def assert_weighted_mean(
    outcomes: Sequence[AverageOutcome],
    indices: Sequence[int],
    weights: Sequence[float],
    atol: float = 1e-6,
) -> None:
    expected = weighted_mean(indices, weights)
    for outcome in outcomes:
        assert outcome.group_size == len(indices)
        for got, want in zip(outcome.tensors, expected, strict=True):
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, rtol=0, atol=atol)


@pytest.mark.timeout(120)
def test_auto_averages_over_one_gloo_group_kept_while_the_members_stay() -> None:
    weights = [1.0, 2.0, 5.0]
    with averagers(3) as made:
        for round_index in range(3):
            outcomes = one_round(made, f"outer/{round_index}", weights)
            assert_weighted_mean(outcomes, [0, 1, 2], weights)
            assert all(o.backend == "torch" for o in outcomes)
        for averager in made:
            assert averager.rounds_by_backend == {"p2p": 0, "torch": 3}
            assert averager._torch is not None
            assert averager._torch.groups_made == 1  # the same members: the group is re-used
        assert outcomes[0].bytes_sent == 2 * 2 * 1015 * 4 // 3  # the ring's share of 1015 floats


@pytest.mark.timeout(120)
def test_a_member_leaving_remakes_the_group_with_those_left() -> None:
    with averagers(3) as made:
        assert_weighted_mean(one_round(made, "outer/0", [1.0] * 3), [0, 1, 2], [1.0] * 3)
        made[2].leave_run()
        made[2].close()
        outcomes = one_round(made[:2], "outer/1", [1.0, 3.0])
        assert_weighted_mean(outcomes, [0, 1], [1.0, 3.0])
        for averager in made[:2]:
            assert averager.rounds_by_backend["torch"] == 2
            assert averager._torch is not None
            assert averager._torch.groups_made == 2
            assert set(averager._torch.members) == {made[0].peer_id, made[1].peer_id}


@pytest.mark.timeout(120)
def test_a_failed_collective_runs_the_round_again_over_p2p_then_sits_one_out() -> None:
    with averagers(3) as made:
        broken = made[2]
        assert broken._torch is not None

        def fail(tensors: Sequence[torch.Tensor], weight: float = 1.0) -> AllReduceResult:
            raise PeerLostError("this member's collective failed")

        broken._torch.average = fail  # type: ignore[method-assign]
        weights = [1.0, 2.0, 5.0]
        outcomes = one_round(made, "outer/0", weights)
        expected = weighted_mean([0, 1, 2], weights)
        for averager, outcome in zip(made, outcomes, strict=True):
            assert averager.torch_failures == 1
            assert averager.rounds_by_backend == {"p2p": 1, "torch": 0}
            assert outcome.group_size == 3
            assert outcome.backend == "p2p"
            for got, want in zip(outcome.tensors, expected, strict=True):
                torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        del broken._torch.average  # mended: the class's method again
        # After a failure every member sits one round out of torch, then makes a new group.
        assert_weighted_mean(one_round(made, "outer/1", weights), [0, 1, 2], weights, atol=1e-5)
        assert all(a.rounds_by_backend == {"p2p": 2, "torch": 0} for a in made)
        # Round 0's group may or may not have been made on a member (its rendezvous can fail
        # under load before the collective does): what counts is that round 2 makes a new one.
        before = [a._torch.groups_made if a._torch is not None else 0 for a in made]
        assert_weighted_mean(one_round(made, "outer/2", weights), [0, 1, 2], weights)
        for averager, made_before in zip(made, before, strict=True):
            assert averager.rounds_by_backend == {"p2p": 2, "torch": 1}
            assert averager._torch is not None
            assert averager._torch.groups_made == made_before + 1


@pytest.mark.timeout(120)
def test_a_member_held_in_its_collective_past_the_send_deadline_still_joins_the_p2p_rerun() -> None:
    # Member 2's collective fails at once and it runs the round again over p2p; member 0 sits
    # in its collective for longer than a message's usual deadline (gloo's timeout counts per
    # receive, so a collective can outlast the torch timeout) before it fails too. Member 2's
    # messages wait in member 0's mailbox meanwhile; it used to count member 0 failed at the
    # send deadline, just as member 0 came, and the rerun ended with 2 of the 3.
    with averagers(3, round_timeout_s=10.0) as made:
        held, broken = made[0], made[2]
        assert held._torch is not None
        assert broken._torch is not None
        send_deadline_s = held._allreduce_config.send_timeout_s

        def fail_at_once(tensors: Sequence[torch.Tensor], weight: float = 1.0) -> AllReduceResult:
            raise PeerLostError("this member's collective failed")

        def fail_late(tensors: Sequence[torch.Tensor], weight: float = 1.0) -> AllReduceResult:
            time.sleep(send_deadline_s + 0.5)
            raise PeerLostError("timed out waiting for a receive")

        broken._torch.average = fail_at_once  # type: ignore[method-assign]
        held._torch.average = fail_late  # type: ignore[method-assign]
        weights = [1.0, 2.0, 5.0]
        outcomes = one_round(made, "outer/0", weights)
        for averager, outcome in zip(made, outcomes, strict=True):
            assert averager.torch_failures == 1
            assert outcome.backend == "p2p"
            assert averager.last_failed == []
        assert_weighted_mean(outcomes, [0, 1, 2], weights, atol=1e-5)


@pytest.mark.timeout(120)
def test_p2p_backend_and_compressed_codecs_never_open_a_store() -> None:
    with averagers(2, backend="p2p") as made:
        assert_weighted_mean(one_round(made, "outer/0", [1.0, 1.0]), [0, 1], [1.0, 1.0])
        for averager in made:
            assert averager.rounds_by_backend == {"p2p": 1, "torch": 0}
            assert averager._torch is None
    with averagers(2, codec="int8") as made:  # auto: torch cannot compress
        outcomes = one_round(made, "outer/0", [1.0, 1.0])
        assert all(a.rounds_by_backend["p2p"] == 1 and a._torch is None for a in made)
        assert all(o.group_size == 2 for o in outcomes)


@pytest.mark.timeout(120)
def test_peers_set_to_torch_and_to_auto_decide_alike(monkeypatch: pytest.MonkeyPatch) -> None:
    # A peer set to torch took the others' public addresses (here: any address, as if none
    # were private) for torch while a peer on auto took them for p2p: the first ran alone
    # under another key to the round's deadline, every round, and kept its own values.
    weights = [1.0, 3.0]
    with averagers(2, backends=["torch", "auto"]) as made:
        # (once both opened their stores: the auto peer has a private address, the torch
        # peer's round entries look public)
        monkeypatch.setattr(swarm_torch_rounds, "site_local", lambda host: False)
        started = time.monotonic()
        outcomes = one_round(made, "outer/0", weights)
        assert time.monotonic() - started < 6.0  # (the round's deadline: 8 s)
        assert [o.backend for o in outcomes] == ["p2p", "p2p"]
        assert_weighted_mean(outcomes, [0, 1], weights, atol=1e-5)
    with averagers(2, backends=["torch", "torch"]) as made:
        outcomes = one_round(made, "outer/0", weights)
        assert [o.backend for o in outcomes] == ["torch", "torch"]
        assert_weighted_mean(outcomes, [0, 1], weights, atol=1e-5)


def test_torch_backend_with_a_codec_is_refused() -> None:
    with pytest.raises(ValueError, match="codec"):
        SwarmAveragerConfig(run_id=RUN, backend="torch", codec="int8")
    with pytest.raises(ValueError, match="backend"):
        SwarmAveragerConfig(run_id=RUN, backend="mpi")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("freezes_in", ["rendezvous", "collective"])
def test_a_member_frozen_in_the_torch_round_is_given_up_once_reported_gone(
    freezes_in: str,
) -> None:
    # Member 2 formed the group, then froze inside gloo (its machine stopped: no connection is
    # closed, gloo would wait for it to its timeout, 20 s here). Its node stops answering, so
    # the others' failure detectors report it gone within 2.5 s; they give the torch round up
    # and run it over p2p without it, well before gloo's timeout.
    release = threading.Event()
    with averagers(3, round_timeout_s=40.0) as made:
        frozen = made[2]
        assert frozen._torch is not None

        def freeze(*args: object, **kwargs: object) -> AllReduceResult:
            frozen.node_thread.run(lambda node: node.stop(), timeout_s=10)
            release.wait(60)
            raise PeerLostError("frozen")

        setattr(frozen._torch, "ensure_group" if freezes_in == "rendezvous" else "average", freeze)
        outcomes: dict[int, AverageOutcome] = {}
        took: dict[int, float] = {}

        def peer(index: int) -> None:
            started = time.monotonic()
            try:
                outcomes[index] = made[index].average(
                    tensors_of(index), round_key="outer/0", weight=1.0
                )
            except GossamerError:
                assert index == 2  # the frozen one, whose node stopped under it
            took[index] = time.monotonic() - started

        threads = [threading.Thread(target=peer, args=(i,), daemon=True) for i in range(3)]
        for thread in threads:
            thread.start()
        try:
            for thread in threads[:2]:
                thread.join(timeout=60)
            # (the frozen one may have given the others up and averaged alone meanwhile: its
            # node stopped, its detector reports them gone too)
            assert {0, 1} <= set(outcomes), "the survivors did not finish their round"
            for index in (0, 1):
                assert took[index] < 12.0, took  # gloo alone would have held them 20 s
                outcome = outcomes[index]
                assert outcome.backend == "p2p"
                assert outcome.failed_peers == [frozen.peer_id]
                assert made[index].torch_failures == 1
                # (the fresh averager deletes what the one given up on leaves in the store)
                torch_averager = made[index]._torch
                assert torch_averager is not None
                assert torch_averager.retired is made[index]._retired_rendezvous
            assert_weighted_mean([outcomes[0], outcomes[1]], [0, 1], [1.0, 1.0], atol=1e-5)
            # The next round is not held either: the thread given up on may still hold the
            # leader's store (its rendezvous waits for the frozen member), so it goes over p2p.
            started = time.monotonic()
            again = one_round(made[:2], "outer/1", [1.0, 3.0])
            assert time.monotonic() - started < 8.0
            assert_weighted_mean(again, [0, 1], [1.0, 3.0], atol=1e-5)
        finally:
            release.set()  # the frozen one's round ends by itself (a daemon thread)


@pytest.mark.timeout(120)
def test_a_member_whose_collective_failed_alone_leaves_the_p2p_rerun_at_once() -> None:
    # Member 2's collective fails after the others' succeeded (the last message lost): it runs
    # the round again over p2p, which the others never join. They answer its first message
    # there with ROUND_CLOSED (they averaged it by other means), so it leaves as dropped at
    # once (its caller takes their state) instead of waiting for them to a send's deadline
    # (20 s here).
    with averagers(3, round_timeout_s=40.0) as made:
        unlucky = made[2]
        assert unlucky._torch is not None
        real_average = unlucky._torch.average

        def lose_the_last_message(
            tensors: Sequence[torch.Tensor], weight: float = 1.0
        ) -> AllReduceResult:
            real_average(tensors, weight)
            raise PeerLostError("the collective's last message was lost")

        unlucky._torch.average = lose_the_last_message  # type: ignore[method-assign]
        started = time.monotonic()
        outcomes = one_round(made, "outer/0", [1.0, 1.0, 1.0])
        assert time.monotonic() - started < 10.0
        assert_weighted_mean(outcomes[:2], [0, 1, 2], [1.0] * 3, atol=1e-5)
        assert [o.backend for o in outcomes[:2]] == ["torch", "torch"]
        assert outcomes[2].excluded


@pytest.mark.timeout(120)
def test_a_rendezvous_is_given_up_once_a_member_runs_the_round_over_p2p() -> None:
    # Member 1's rendezvous fails at once (its store unreachable, say): it runs the round over
    # p2p. Member 0 waits in the rendezvous for it, which never comes; the first message of
    # member 1's p2p round tells it so, and it runs the round over p2p too instead of waiting
    # for the rendezvous' deadline (10 s here, half the round's).
    with averagers(2, round_timeout_s=20.0) as made:
        lonely = made[1]
        assert lonely._torch is not None

        def no_rendezvous(*args: object, **kwargs: object) -> None:
            raise DeadlineExceededError("torch.distributed rendezvous failed")

        lonely._torch.ensure_group = no_rendezvous  # type: ignore[method-assign]
        started = time.monotonic()
        outcomes = one_round(made, "outer/0", [1.0, 3.0])
        assert time.monotonic() - started < 5.0
        assert_weighted_mean(outcomes, [0, 1], [1.0, 3.0], atol=1e-5)
        assert [o.backend for o in outcomes] == ["p2p", "p2p"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("address", ["127.0.0.1:notaport", "127.0.0.1:70000", "localhost:1234"])
def test_a_store_address_that_is_not_one_sends_the_round_over_p2p(address: str) -> None:
    # What a buggy or hostile peer publishes as its store address: the others must neither
    # crash (a ValueError, a TypeError out of average) nor dial it; the round goes over p2p.
    with averagers(2) as made:
        for averager in made:
            averager._store_address = address
        outcomes = one_round(made, "outer/0", [1.0, 1.0])
        assert_weighted_mean(outcomes, [0, 1], [1.0, 1.0])
        assert all(a.rounds_by_backend == {"p2p": 1, "torch": 0} for a in made)


@pytest.mark.timeout(120)
def test_a_collective_that_stalls_with_every_member_alive_is_given_up_at_both_timeouts() -> None:
    # gloo's timeout counts per receive, so a collective can stall past the round while every
    # member answers its heartbeats. Before, the round waited out the whole call's deadline and
    # kept the stalled thread's averager, which later rounds then shared.
    stall_s = 4.0  # past the rendezvous' and the collective's timeouts (1 s each here)
    with averagers(2, round_timeout_s=2.0, join_window_s=1.0) as made:
        stalled = made[1]._torch
        assert stalled is not None
        plain = type(stalled).average

        def stalls_once(tensors: list[torch.Tensor], weight: float) -> AllReduceResult:
            if stalled.groups_made == 1 and not made[1]._abandoned_torch:
                time.sleep(stall_s)
                stalled.close()
                raise PeerLostError("gloo gave up after the stall")
            return plain(stalled, tensors, weight)

        stalled.average = stalls_once  # type: ignore[method-assign]
        started = time.monotonic()
        outcomes = one_round(made, "outer/0", [1.0, 1.0])
        assert time.monotonic() - started < stall_s
        assert_weighted_mean(outcomes, [0, 1], [1.0, 1.0])
        assert made[1]._torch is not stalled  # a fresh averager for the rounds after
        assert len(made[1]._abandoned_torch) == 1
        assert all(a.rounds_by_backend["p2p"] == 1 for a in made)


@pytest.mark.timeout(120)
def test_a_member_keeps_a_connection_only_to_the_newest_leaders_store() -> None:
    # Connections to the stores of earlier groups' leaders (some gone) piled up as leaders
    # changed.
    with averagers(3) as made:
        one_round(made, "outer/0", [1.0] * 3)
        (leader,) = [a for a in made if not a._leader_stores]  # it uses its own store
        leader.leave_run()
        leader.close()
        left = [a for a in made if a is not leader]
        outcomes = one_round(left, "outer/1", [1.0, 1.0])
        assert all(o.backend == "torch" for o in outcomes)
        assert all(len(a._leader_stores) <= 1 for a in left)


@pytest.mark.timeout(120)
def test_members_that_would_make_different_kinds_of_group_average_over_p2p(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # One peer with a GPU makes NCCL groups, one without makes gloo ones: they would wait in
    # one rendezvous for each other until the torch timeout. Each publishes its kind; a round
    # whose members differ goes over p2p at once.
    kinds = iter(["nccl", "gloo"])
    monkeypatch.setattr(swarm_round_formation, "_torch_kind", lambda: next(kinds))
    with averagers(2) as made:
        started = time.monotonic()
        outcomes = one_round(made, "outer/0", [1.0, 1.0])
        assert time.monotonic() - started < 4.0  # the torch timeout is 4 s here
        assert_weighted_mean(outcomes, [0, 1], [1.0, 1.0])
        assert all(a.rounds_by_backend == {"p2p": 1, "torch": 0} for a in made)


@pytest.mark.timeout(120)
def test_members_holding_other_tensors_never_make_a_torch_group() -> None:
    # Two peers under one run name with other models (a config edited on one): gloo averaged
    # their unrelated values where the counts matched (and ended both processes where they
    # did not). Each publishes its tensors' layout; such a round goes over p2p, whose round id
    # tells them apart, and each keeps its own values.
    def tensors(index: int) -> list[torch.Tensor]:
        ours = tensors_of(index)
        return ours if index == 0 else ours[::-1]  # 1,015 values either way

    with averagers(2) as made:
        for round_key in ("outer/0", "outer/1"):
            outcomes = one_round(made, round_key, [1.0, 1.0], tensors)
            for index, outcome in enumerate(outcomes):
                assert outcome.group_size == 1
                for got, want in zip(outcome.tensors, tensors(index), strict=True):
                    torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert all(a.rounds_by_backend["torch"] == 0 for a in made)
        assert all(a.torch_failures == 0 for a in made)  # (never even tried)


def test_a_peer_advertising_an_address_it_cannot_listen_on_averages_over_p2p(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A container's or a port mapping's advertised address is private but not this machine's:
    # opening the rendezvous store there took two torch timeouts, then killed the peer.
    config = NodeConfig(listen_address="127.0.0.1:0", advertise_addresses=("203.0.113.77:7000",))
    with NodeThread(config, node_factory=lambda c, i: Node(c, i)) as node_thread:
        started = time.monotonic()
        averager = SwarmAverager(node_thread, SwarmAveragerConfig(run_id=RUN, backend="torch"))
        try:
            assert time.monotonic() - started < 5.0
            assert averager._torch is None
        finally:
            averager.close()
    assert "cannot listen for torch.distributed rendezvous at 203.0.113.77" in caplog.text
