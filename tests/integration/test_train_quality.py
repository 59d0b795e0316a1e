"""DiLoCo against synchronous data parallel on one token budget: the benchmark, made small.

`gossamer bench diloco` compares the methods at full size (README, Benchmarks). Here 3 peers
(threads averaging through comm's codecs; 4 took 68-75 s against 42 s for 3 on a busy machine,
and ended as near sync) train a 1-layer, 32-wide GPT for 500 inner steps each with every
method, from the same weights on the same data. DiLoCo keeps its defaults (H = 50, outer Nesterov
SGD at 0.7 and 0.9, momentum warmed up), so it takes 10 outer steps, except that it stops at each
boundary (``swarm.train_while_forming`` false): trained while its group forms, a peer's steps
depend on the threads' timing, and DiLoCo's loss moved from run to run by more than the 8-bit
codec's effect (the int8 gap read -0.42..+0.50% in four runs, 1.38% once under a busy suite);
stopping, every run ends on the same weights.

Measured with 3 peers (2026-12-07, 2 busy cores): sync 2.180, DiLoCo 2.266 (+3.9%), DiLoCo with
the 8-bit codec +0.013% vs DiLoCo, 50x fewer bytes. With 4 peers (2026-12-06, validation batches
of 16 sequences): sync 2.151, DiLoCo 2.233 (+3.8%), DiLoCo with the 8-bit codec +0.0015% vs
DiLoCo; 50x fewer bytes (2026-12-03, trained while forming, 64 validation sequences: sync 2.170,
DiLoCo 2.243, int8 +0.01%); 300 steps instead of 500 left DiLoCo 5.5% above sync, too near the
6% bound. The bounds leave room for averages rounded in a different order; a DiLoCo that replays
its first pseudo-gradients at full momentum (+12.6% here) or whose outer step goes the wrong way
fails them. That the peers really average is not something the loss shows at this size (peers
that skip the average and apply their own pseudo-gradients end 1.5% *below* sync: the outer
momentum alone speeds up a model this small), so tests/unit/test_train_strategies.py checks it on
the weights.
"""

from __future__ import annotations

import pytest

from gossamer.bench.diloco import run_diloco_bench
from gossamer.core.config_loader import load_run_config

_TINY_GPT = [
    ("model.num_layers", "1"),
    ("model.num_heads", "2"),
    ("model.width", "32"),
    ("model.context", "32"),
    ("train.batch_size", "8"),
    ("train.num_threads", "1"),
    ("swarm.train_while_forming", "false"),
]


@pytest.mark.timeout(240)
def test_diloco_ends_near_sync_with_fifty_times_fewer_bytes_and_int8_costs_nothing() -> None:
    result = run_diloco_bench(
        config=load_run_config(None, _TINY_GPT),
        peers=3,
        inner_steps=50,
        steps=500,
        with_overlap=False,
    )
    fields = result.to_json()
    sync, diloco = result.methods["sync"], result.methods["diloco"]
    assert diloco.val_loss < 3.0, fields  # learned: the untrained model starts above 5
    assert fields["loss_gap_diloco_vs_sync_percent"] < 6.0, fields
    assert fields["loss_gap_int8_vs_diloco_percent"] < 1.0, fields
    assert fields["bytes_ratio_sync_over_diloco"] == 50.0, fields
    # Three quarters of the values are in tensors of one block or more (4096): sent in 8 bits.
    assert result.methods["diloco_int8"].bytes_per_peer < diloco.bytes_per_peer / 2, fields
    assert sync.bytes_per_peer > 0
