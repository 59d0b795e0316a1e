"""The loop benchmarks run both sides on the same model and data; a ratio and its spread."""

from __future__ import annotations

from pathlib import Path

import pytest

from gossamer.bench.allreduce_results import _memory_ratio, _most_memory
from gossamer.bench.loop import LoopBenchResult, pair_spread, run_loop_bench
from gossamer.bench.obs_overhead import ObsOverheadResult, run_obs_overhead_bench
from gossamer.core.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from gossamer.core.errors import ConfigError


def test_loop_bench_measures_both_sides(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("for i in range(10):\n    print(i)\n" * 400)
    config = RunConfig(
        model=ModelConfig(num_layers=1, num_heads=2, width=32, context=32),
        data=DataConfig(source="text", path=str(corpus)),
    )
    result = run_loop_bench(config=config, steps=3, warmup_steps=1, repeats=2)
    assert len(result.gossamer_tokens_per_s) == 2
    assert len(result.plain_tokens_per_s) == 2
    assert all(v > 0 for v in result.gossamer_tokens_per_s + result.plain_tokens_per_s)
    fields = result.to_json()
    assert fields["ratio"] == result.ratio > 0
    assert fields["tokens_per_step"] == 16 * 32


def test_obs_overhead_bench_measures_both_settings(tmp_path: Path) -> None:
    from gossamer.bench.obs_overhead import run_obs_overhead_bench

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("while x:\n    x -= 1\n" * 400)
    config = RunConfig(
        model=ModelConfig(num_layers=1, num_heads=2, width=32, context=32),
        data=DataConfig(source="text", path=str(corpus)),
    )
    result = run_obs_overhead_bench(config=config, steps=3, warmup_steps=1, repeats=2)
    assert len(result.off_tokens_per_s) == len(result.full_tokens_per_s) == 2
    assert all(v > 0 for v in result.off_tokens_per_s + result.full_tokens_per_s)
    assert result.to_json()["overhead_percent"] == result.overhead_percent


def test_diloco_bench_compares_methods_on_the_same_budget(tmp_path: Path) -> None:
    from gossamer.bench.diloco import run_diloco_bench
    from gossamer.core.config import TrainConfig

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def g(y):\n    return y * 2\n" * 400)
    config = RunConfig(
        model=ModelConfig(num_layers=1, num_heads=4, width=256, context=32),  # int8-sized
        data=DataConfig(source="text", path=str(corpus)),
        train=TrainConfig(batch_size=4, eval_batches=2),
    )
    result = run_diloco_bench(config=config, peers=2, inner_steps=4, steps=8)
    fields = result.to_json()
    assert set(result.methods) == {"sync", "diloco", "diloco_overlap", "diloco_int8"}
    # Sync averages every step, DiLoCo every 4 steps: 4x fewer rounds of the same tensors.
    assert fields["bytes_ratio_sync_over_diloco"] == 4.0
    assert (fields["outer_lr"], fields["outer_momentum"]) == (0.7, 0.9)  # what it ran with
    assert fields["bytes_diloco_int8"] < fields["bytes_diloco"]
    # Overlapped rounds send the same rounds, only later.
    assert (
        result.methods["diloco_overlap"].bytes_per_peer == result.methods["diloco"].bytes_per_peer
    )
    for key in ("loss_sync", "loss_diloco", "loss_diloco_overlap", "loss_diloco_int8"):
        assert 0 < fields[key] < 6


def test_diloco_bench_takes_the_outer_optimizer_from_the_run_config() -> None:
    from gossamer.bench.diloco import bench_diloco_config
    from gossamer.core.config import SwarmConfig

    default = bench_diloco_config(RunConfig(), inner_steps=50)
    assert (default.inner_steps, default.outer_lr, default.outer_momentum) == (50, 0.7, 0.9)
    assert default.outer_momentum_warmup
    plain = RunConfig(
        swarm=SwarmConfig(outer_lr=1.0, outer_momentum=0.0, outer_momentum_warmup=False)
    )
    chosen = bench_diloco_config(plain, inner_steps=20)
    assert (chosen.inner_steps, chosen.outer_lr, chosen.outer_momentum) == (20, 1.0, 0.0)
    assert not chosen.outer_momentum_warmup
    # The bench's `diloco` method is the blocking one even where the run config overlaps.
    overlapped = bench_diloco_config(RunConfig(swarm=SwarmConfig(overlap=True)), inner_steps=50)
    assert not overlapped.overlap
    assert overlapped.train_while_forming


def test_settings_the_loop_measurement_cannot_honour_are_refused() -> None:
    # With accumulation the plain loop still took one micro-batch a step: Gossamer read 4x
    # slower than it was. Without a warm-up step the first mark was missing (KeyError).
    accumulating = RunConfig(train=TrainConfig(grad_accum_steps=4))
    with pytest.raises(ConfigError, match="grad-accum-steps"):
        run_loop_bench(config=accumulating, steps=2, warmup_steps=1, repeats=1)
    with pytest.raises(ConfigError, match="warmup-steps"):
        run_loop_bench(steps=2, warmup_steps=0, repeats=1)
    with pytest.raises(ConfigError, match="warmup-steps"):
        run_obs_overhead_bench(steps=2, warmup_steps=0, repeats=1)


def test_a_round_that_could_not_read_its_memory_never_reads_as_none_added() -> None:
    assert _most_memory(0, 5) == 5
    assert _most_memory(7, 5) == 7
    assert _most_memory(0, -1) == -1  # it read 0.00x before: "no extra memory at all"
    assert _most_memory(-1, 9) == -1
    assert _memory_ratio([_most_memory(0, -1), 100], 100) is None


# Per-repeat figures seen under shared load (`gossamer bench loop --steps 60 --repeats 5`): the
# pairs' ratios ran 0.109..20.6 and the bench said "173% faster" with no word on the spread.
_BUSY_GOSSAMER = [3041.0, 26312.0, 26351.0, 26604.0, 27454.0]
_BUSY_PLAIN = [28003.0, 4428.0, 1282.0, 27371.0, 10043.0]


def _loop_result(gossamer: list[float], plain: list[float]) -> LoopBenchResult:
    return LoopBenchResult(
        gossamer_tokens_per_s=gossamer,
        plain_tokens_per_s=plain,
        steps=60,
        tokens_per_step=2048,
        threads=2,
    )


def test_the_loop_result_carries_the_pairs_spread_and_flags_a_busy_machine() -> None:
    fields = _loop_result(_BUSY_GOSSAMER, _BUSY_PLAIN).to_json()
    assert fields["pair_ratio_min"] == pytest.approx(3041 / 28003)
    assert fields["pair_ratio_max"] == pytest.approx(26351 / 1282)
    assert len(fields["pair_ratios"]) == 5
    assert fields["noisy"] is True
    quiet = _loop_result([26000.0, 26500.0, 25900.0], [27000.0, 26800.0, 26100.0]).to_json()
    assert 0.96 < quiet["pair_ratio_min"] <= quiet["ratio"] <= quiet["pair_ratio_max"] < 1.0
    assert quiet["noisy"] is False


def test_the_obs_result_carries_the_pairs_spread_and_flags_a_busy_machine() -> None:
    busy = ObsOverheadResult(
        off_tokens_per_s=[27000.0, 5000.0, 26000.0],
        full_tokens_per_s=[26500.0, 26000.0, 26100.0],
        steps=60,
        threads=2,
    )
    fields = busy.to_json()
    assert (fields["pair_ratio_min"], fields["pair_ratio_max"]) == pytest.approx(
        (26500 / 27000, 5.2)
    )
    assert fields["noisy"] is True
    one_pair = ObsOverheadResult(
        off_tokens_per_s=[27000.0], full_tokens_per_s=[26500.0], steps=60, threads=2
    )
    assert one_pair.to_json()["noisy"] is False  # a single pair has no spread to speak of


def test_a_spread_of_exactly_twice_is_not_flagged_and_above_it_is() -> None:
    assert not pair_spread([0.5, 1.0]).noisy
    assert pair_spread([0.5, 1.0001]).noisy
    with pytest.raises(ValueError, match="positive"):
        pair_spread([])
