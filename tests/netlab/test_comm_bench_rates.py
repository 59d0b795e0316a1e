"""The all-reduce benchmark in the lab: 4 peer processes behind 50 Mbit/s tbf links (root).

Gossamer's p2p path (TLS gRPC) and plain gloo move the same 20 MB tensor over the same links in
the same run. At this size start-up and the last chunk's tail weigh more than at 100 MB, so the
check is against gloo's own share of the ring bound, plus a floor; the 100 MB figures are in
docs/comm.md.
"""

from __future__ import annotations

import pytest

from gossamer.bench.allreduce import run_allreduce_sweep


@pytest.mark.timeout(150)
def test_p2p_matches_gloo_share_of_bound_and_int8_beats_gloo() -> None:
    plain, int8 = run_allreduce_sweep(
        peers=4,
        size_bytes=20_000_000,
        codecs=["none", "int8"],
        backend="p2p",
        rate_bits_per_s=50e6,
        repeats=1,
    )
    assert plain.share_of_bound is not None
    assert plain.gloo_share_of_bound is not None
    # The target is gloo's share (docs/comm.md: not met yet, 78% vs 90% at 100 MB); this
    # guards against regressions with room for the shared cores' noise.
    assert plain.share_of_bound >= 0.8 * plain.gloo_share_of_bound, plain.table()
    assert plain.share_of_bound >= 0.65, plain.table()
    assert plain.max_abs_error_vs_gloo < 1e-5
    # on healthy links no owner's averages leave the ring (none gains no holder for the stall
    # allowance, AllReduceConfig.ring_stall_s), and nothing is sent twice
    assert plain.ring_left == {}, plain.table()
    assert plain.header_overhead < 0.005, plain.table()
    # the links' own counters: a counter on the wrong interface reads about nothing, and no
    # tbf passes more than its cap
    gloo_busy, busy = plain.gloo_uplink_utilization, plain.uplink_utilization
    assert gloo_busy is not None
    assert busy is not None
    assert 0.5 <= gloo_busy <= 1.05, plain.table()  # gloo's one 20 MB repeat: 0.79-0.96
    assert 0.5 <= busy <= 1.05, plain.table()
    assert int8.speedup_vs_gloo >= 2.5, int8.table()
    assert int8.max_abs_error_vs_gloo < 0.1
    # honest rounds stay inside the tolerance the command fails a run past
    assert plain.error_problem() is None, plain.table()
    assert int8.error_problem() is None, int8.table()
    assert int8.share_of_bound is None  # (the bound counts fp32 bytes)
