"""The torch.distributed backend and the p2p path with real processes on loopback."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch._C._distributed_c10d import HashStore, PrefixStore

from gossamer.bench.allreduce import run_allreduce_bench
from gossamer.comm.report import AllReduceReport, PartOutcome
from gossamer.comm.torch_backend import (
    RetiredRendezvous,
    TorchGroupAverager,
    choose_backend,
    open_leader_store,
    open_member_store,
)
from gossamer.core.errors import DeadlineExceededError, PeerLostError


def test_auto_picks_torch_only_when_everyone_is_reachable() -> None:
    assert choose_backend("auto", ["10.0.0.1", "10.0.0.2"]) == "torch"
    assert choose_backend("auto", ["127.0.0.1", "127.0.0.1"]) == "torch"
    assert choose_backend("auto", ["10.0.0.1", ""]) == "p2p"
    # Public addresses: gloo's plain TCP across the internet (it picked torch for them).
    assert choose_backend("auto", ["8.8.8.8", "1.1.1.1"]) == "p2p"
    assert choose_backend("auto", ["10.0.0.1", "host.example"]) == "p2p"  # (names: not read)
    assert choose_backend("auto", ["127.0.0.1", "10.0.0.2"]) == "p2p"  # (not one machine)
    assert choose_backend("torch", ["8.8.8.8"]) == "torch"  # (asked for: as asked)
    assert choose_backend("p2p", ["10.0.0.1"]) == "p2p"
    with pytest.raises(ValueError, match="backend"):
        choose_backend("mpi", [])


@pytest.mark.parametrize(
    ("backend", "codec", "atol"), [("torch", "none", 1e-6), ("p2p", "int8", 0.05)]
)
def test_processes_average_like_gloo(backend: str, codec: str, atol: float) -> None:
    result = run_allreduce_bench(peers=2, size_bytes=400_000, codec=codec, backend=backend)
    assert result.backend == backend
    assert result.max_abs_error_vs_gloo < atol
    assert result.seconds > 0
    assert result.gloo_seconds > 0
    assert (result.cpu_seconds_per_peer or 0.0) > 0
    assert (result.gloo_cpu_seconds_per_peer or 0.0) > 0


def test_a_round_adds_at_most_three_times_the_tensor_to_a_peers_memory() -> None:
    """The issue's bound on extra peak memory, read from each worker's high-water mark."""
    result = run_allreduce_bench(peers=2, size_bytes=40_000_000, codec="none", backend="p2p")
    assert result.peak_extra_memory_ratio is not None
    assert result.gloo_peak_extra_memory_ratio is not None
    assert result.peak_extra_memory_ratio <= 3.0


def _two_members(work: Callable[[TorchGroupAverager, int], object], name: str) -> list[object]:
    """``work(averager, rank)`` on two members of one gloo group on 127.0.0.1, in threads."""
    store = HashStore()
    averagers = [TorchGroupAverager(timeout_s=10.0) for _ in range(2)]
    out: list[object] = [None, None]

    def member(rank: int) -> None:
        try:
            averagers[rank].ensure_group(name, ["a", "b"], rank, store, "127.0.0.1")
            out[rank] = work(averagers[rank], rank)
        except BaseException as exc:
            out[rank] = exc

    threads = [threading.Thread(target=member, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    for averager in averagers:
        averager.close()
    return out


@pytest.mark.timeout(120)
def test_with_no_weight_anywhere_each_member_keeps_its_values_in_place_too() -> None:
    # As average() and the p2p path do; average_ averaged uniformly instead.
    def in_place(averager: TorchGroupAverager, rank: int) -> list[float]:
        values = torch.tensor([1.0, 2.0]) * (rank + 1)
        averager.average_([values], weight=0.0)
        return values.tolist()

    def copied(averager: TorchGroupAverager, rank: int) -> list[float]:
        values = torch.tensor([1.0, 2.0]) * (rank + 1)
        return averager.average([values], weight=0.0).tensors[0].tolist()

    assert _two_members(in_place, "zero/in-place") == [[1.0, 2.0], [2.0, 4.0]]
    assert _two_members(copied, "zero/copied") == [[1.0, 2.0], [2.0, 4.0]]
    weighted = _two_members(lambda a, r: a.average([torch.tensor([float(r)])], 1.0), "w")
    assert all(result.tensors[0].tolist() == [0.5] for result in weighted)  # type: ignore[attr-defined]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_weight_0_member_s_nan_or_inf_spoils_no_average(bad: float) -> None:
    # The way to withhold values (weight 0, as the swarm does with non-finite ones): each
    # member multiplied its values by its weight, and 0 x NaN (or inf) is NaN, so the
    # all-reduce made every member's average NaN there, as on the p2p path before.
    def values(rank: int) -> torch.Tensor:
        held = torch.full((4,), float(rank + 1))
        if rank == 1:
            held[0] = bad
        return held

    def in_place(averager: TorchGroupAverager, rank: int) -> list[float]:
        held = values(rank)
        averager.average_([held], weight=1.0 if rank == 0 else 0.0)
        return held.tolist()

    def copied(averager: TorchGroupAverager, rank: int) -> list[float]:
        result = averager.average([values(rank)], weight=1.0 if rank == 0 else 0.0)
        return result.tensors[0].tolist()

    for work, name in ((in_place, "in-place"), (copied, "copied")):
        got = _two_members(work, f"weight-0/{bad}/{name}")
        assert got == [[1.0] * 4, [1.0] * 4], (name, got)


@pytest.mark.timeout(120)
def test_large_weights_times_large_values_average_finite_on_the_torch_path_too() -> None:
    # average() summed values times weights and divided after: 1e30 with weight 1e12 on both
    # members (each within range) summed to inf. Scaled by weight / total first, as average_
    # does, the sum is the average.
    def work(averager: TorchGroupAverager, rank: int) -> list[float]:
        return averager.average([torch.full((3,), 1e30)], 1e12).tensors[0].tolist()

    want = torch.full((3,), 1e30).tolist()
    assert _two_members(work, "large-weights") == [want, want]


@pytest.mark.timeout(120)
def test_members_holding_tensors_of_other_shapes_are_refused_before_anything_is_averaged() -> None:
    # Two models with as many values in other shapes: gloo averaged unrelated values without a
    # word. Each member refuses, naming what differs; its inputs are left as they were.
    def refused(averager: TorchGroupAverager, rank: int) -> object:
        values = torch.arange(6.0).reshape((2, 3) if rank == 0 else (3, 2))
        try:
            averager.average([values], 1.0)
        except PeerLostError as exc:
            return str(exc), values.flatten().tolist(), averager.group_hash
        return "averaged"

    for message, values, held in _two_members(refused, "other-shapes"):  # type: ignore[misc]
        assert "do not average the same tensors" in message
        assert "tensors of the same shapes in the same order" in message
        assert values == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
        assert held is None  # closed: the caller makes another group (or goes over p2p)


@pytest.mark.timeout(120)
def test_members_holding_one_model_in_other_dtypes_still_average() -> None:
    # Every value is averaged in float32 (as on the p2p path, whose round id leaves dtypes
    # out): a member in bfloat16 beside one in float32 averages the same model.
    def mean(averager: TorchGroupAverager, rank: int) -> object:
        dtype = (torch.float32, torch.bfloat16)[rank]
        result = averager.average([torch.full((2, 2), float(rank + 1), dtype=dtype)], 1.0)
        return result.tensors[0].dtype, result.tensors[0].float().flatten().tolist()

    assert _two_members(mean, "dtypes") == [
        (torch.float32, [1.5] * 4),
        (torch.bfloat16, [1.5] * 4),
    ]


@pytest.mark.timeout(120)
def test_members_holding_different_numbers_of_values_end_no_process() -> None:
    # gloo's size check threw a C++ exception on its own thread: SIGABRT, both processes gone
    # with no checkpoint. In a child process, so that the old failure could not end this one.
    script = textwrap.dedent(
        """
        import threading, torch
        from torch._C._distributed_c10d import HashStore
        from gossamer.comm.torch_backend import TorchGroupAverager
        store, out = HashStore(), {}
        def member(rank):
            averager = TorchGroupAverager(timeout_s=10.0)
            try:
                averager.ensure_group("sizes", ["a", "b"], rank, store, "127.0.0.1")
                averager.average_([torch.ones(4 * (rank + 1))])
                out[rank] = "averaged"
            except Exception as exc:
                out[rank] = type(exc).__name__ + ": " + str(exc)
            finally:
                averager.close()
        threads = [threading.Thread(target=member, args=(r,)) for r in range(2)]
        [t.start() for t in threads]
        [t.join(60) for t in threads]
        print(out[0]); print(out[1])
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=100, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert len(lines) == 2
    assert all(line.startswith("PeerLostError: the members do not average") for line in lines)
    assert "holds 8 values" in lines[0]
    assert "holds 4 values" in lines[1]


@pytest.mark.timeout(120)
def test_the_contributors_are_the_members_with_a_weight_as_on_the_p2p_path() -> None:
    # Every member was named a contributor, and a round with no weight anywhere said averaged
    # with bytes sent, where nothing was averaged and nothing sent.
    def reports(weights: tuple[float, float], in_place: bool = False) -> list[AllReduceReport]:
        def work(averager: TorchGroupAverager, rank: int) -> AllReduceReport:
            if in_place:
                return averager.average_([torch.ones(3)], weights[rank])
            return averager.average([torch.ones(3)], weights[rank]).report

        made = _two_members(work, f"weights/{weights}/{in_place}")
        assert all(isinstance(r, AllReduceReport) for r in made), made
        return made  # type: ignore[return-value]

    for in_place in (False, True):
        for report in reports((1.0, 0.0), in_place):
            assert report.parts[0].contributors == ["a"]
            assert report.parts[0].outcome is PartOutcome.AVERAGED
        for report in reports((0.0, 0.0), in_place):
            assert report.parts[0].contributors == []
            assert report.parts[0].outcome is PartOutcome.KEPT_LOCAL
            assert report.bytes_sent == report.bytes_received == 0


def test_a_weight_out_of_range_is_refused_before_the_collective_on_the_torch_path_too() -> None:
    # 1e39 rode in float32: a RuntimeError on that member alone, while the others waited in
    # the collective to its timeout. The p2p path refuses it before anything moves.
    averager = TorchGroupAverager(timeout_s=10.0)
    try:
        averager.ensure_group("out-of-range", ["a"], 0, HashStore(), "127.0.0.1")
        for weight in (1e39, 1e13, -1.0, float("nan")):
            with pytest.raises(ValueError, match="weight must be 0 or within"):
                averager.average([torch.tensor([1.0])], weight=weight)
        assert averager.average([torch.tensor([1.0])], weight=1e12).tensors[0].tolist() == [1.0]
    finally:
        averager.close()


def _listening_hosts(port: int) -> set[str]:
    """The local addresses (hex, as the kernel lists them) listening on TCP ``port``."""
    hosts = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            host, _, hex_port = local.rpartition(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                hosts.add(host)
    return hosts


def test_the_rendezvous_store_listens_on_its_address_only() -> None:
    # Left to itself a TCPStore listened on every interface: anyone reaching any address of
    # the leader's machine could write the rendezvous keys.
    store = open_leader_store("127.0.0.1", 2, timeout_s=5.0)
    assert _listening_hosts(store.port) == {"0100007F"}  # 127.0.0.1, nothing else
    member = open_member_store("127.0.0.1", store.port, 2, timeout_s=5.0)
    member.set("k", b"v")
    assert store.get("k") == b"v"


def test_a_rendezvous_address_not_on_this_machine_fails_at_once() -> None:
    host = "203.0.113.77"  # TEST-NET-3: no machine's own address, unless this one's is
    with socket.socket() as probe:
        try:
            probe.bind((host, 0))
        except OSError:
            pass
        else:
            pytest.skip(f"{host} is an address of this machine")
    started = time.monotonic()
    with pytest.raises(OSError, match="assign"):  # EADDRNOTAVAIL: cannot assign address
        open_leader_store(host, 2, timeout_s=5.0)
    assert time.monotonic() - started < 1.0  # it waited two torch timeouts, then crashed


def test_the_leader_store_keeps_no_keys_of_groups_made() -> None:
    # Each group left its members' addresses in the leader's store, which lives as long as the
    # peer: a swarm with churn grew it without end. (A failed rendezvous keeps its keys: a
    # straggler still reading them fails at once against the closed group instead of waiting.)
    leader = open_leader_store("127.0.0.1", 1, timeout_s=10.0)
    stores = [leader] + [open_member_store("127.0.0.1", leader.port, 1, 10.0) for _ in range(2)]
    averagers = [TorchGroupAverager(timeout_s=10.0) for _ in range(3)]
    counts = []
    try:
        for index in range(8):
            size = 2 + index % 2  # the membership changes every round: a new group each time
            names = ["a", "b", "c"][:size]

            def member(rank: int, index: int = index, names: list[str] = names) -> None:
                averager = averagers[rank]
                averager.ensure_group(f"r/{index}", names, rank, stores[rank], "127.0.0.1")
                averager.average([torch.full((100,), float(rank))], 1.0)

            threads = [threading.Thread(target=member, args=(r,)) for r in range(size)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=60)
            counts.append(leader.num_keys())
    finally:
        for averager in averagers:
            averager.close()
    assert max(counts) == counts[0], counts


def test_the_keys_of_a_failed_rendezvous_go_once_its_members_timed_out() -> None:
    # They stayed for as long as the peer ran: a swarm whose rounds kept failing left a set
    # for every group tried.
    now = [0.0]
    retired = RetiredRendezvous(clock=lambda: now[0])
    leader = open_leader_store("127.0.0.1", 1, timeout_s=10.0)
    given_up = TorchGroupAverager(timeout_s=0.5, retired=retired)
    before = leader.num_keys()
    for index in range(3):  # nobody else comes: each rendezvous fails at its timeout
        with pytest.raises(DeadlineExceededError):
            given_up.ensure_group(f"r/{index}", ["a", "b"], 0, leader, "127.0.0.1")
    assert leader.num_keys() == before + 3  # kept while a member may still be in them
    now[0] = 10.0
    # The swarm gives a round up by taking a fresh averager: it deletes them.
    TorchGroupAverager(timeout_s=0.5, retired=retired).close()
    assert leader.num_keys() == before
    assert len(retired) == 0


def test_a_member_address_gloo_cannot_read_fails_the_rendezvous_not_the_leader() -> None:
    # The store is plain TCP; 16 bytes of garbage as a member's address made gloo raise
    # std::bad_alloc (MemoryError) out of the round and the peer's training.
    leader = open_leader_store("127.0.0.1", 1, timeout_s=5.0)
    member = open_member_store("127.0.0.1", leader.port, 1, 5.0)
    PrefixStore("gossamer/g", member).set("0/1", b"\x01" * 16)
    averager = TorchGroupAverager(timeout_s=3.0)
    with pytest.raises(DeadlineExceededError, match="rendezvous failed"):
        averager.ensure_group("g", ["a", "b"], 0, leader, "127.0.0.1")
