"""The torch.distributed backend and the p2p path with real processes on loopback."""

from __future__ import annotations

import pytest

from gossamer.bench.allreduce import run_allreduce_bench
from gossamer.comm.torch_backend import choose_backend


def test_auto_picks_torch_only_when_everyone_is_reachable() -> None:
    assert choose_backend("auto", ["10.0.0.1", "10.0.0.2"]) == "torch"
    assert choose_backend("auto", ["10.0.0.1", ""]) == "p2p"
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
