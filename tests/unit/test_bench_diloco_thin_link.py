"""The thin-link benchmark's arithmetic: time to target, utilization, speedups and JSON fields.

The lab and the peer processes are exercised by tests/netlab/test_train_thin_link.py; here the
evaluation logs the workers write are made up, so every figure can be checked by hand.
"""

from __future__ import annotations

from typing import Any

import pytest

from gossamer.bench.diloco_thin_link import (
    ThinLinkResult,
    _summarize,
    run_thin_link_bench,
)

GO = 1000.0


def _row(at: float, step: int, loss: float, compute: float, evaluation: float) -> dict[str, Any]:
    phases = {"compute": compute, "evaluation": evaluation, "communication": 0.5}
    return {"unix_s": GO + at, "step": step, "val_loss": loss, "phases_s": phases}


def test_time_to_target_is_the_last_peer_to_reach_it_without_evaluations() -> None:
    rows = [
        [_row(1, 0, 5.0, 0.0, 0.5), _row(10, 50, 2.6, 8.0, 1.0), _row(20, 100, 2.4, 17.0, 1.5)],
        [_row(1, 0, 5.0, 0.0, 0.5), _row(11, 50, 2.45, 9.0, 1.0)],
    ]
    result = _summarize("diloco", rows, GO, wall_s=21.0, target=2.5, error=None)
    assert result.seconds_to_target == pytest.approx(20 - 1.5)  # peer 0 at step 100
    assert result.steps_to_target == 100
    assert result.best_val_loss == pytest.approx(2.4)
    assert result.last_step == 100
    assert result.utilization["p0"] == pytest.approx(17.0 / (20 - 1.5))
    assert result.utilization["p1"] == pytest.approx(9.0 / (11 - 1.0))
    assert result.phases_s["p1"]["compute"] == 9.0


def test_a_method_short_of_the_target_reports_none_and_its_progress() -> None:
    rows = [[_row(1, 0, 5.0, 0.0, 0.5), _row(30, 40, 2.7, 1.0, 1.0)], []]
    result = _summarize("ddp", rows, GO, wall_s=30.0, target=2.5, error=None)
    assert result.seconds_to_target is None
    assert result.steps_to_target is None
    assert result.best_val_loss == pytest.approx(2.7)
    assert result.utilization == {"p0": None, "p1": None}  # DDP's compute includes its all-reduce


def _result(
    diloco: float | None, ddp: float | None, ddp_error: str | None = None
) -> ThinLinkResult:
    def method(name: str, seconds: float | None, error: str | None = None) -> Any:
        rows = [[_row(seconds or 5.0, 50, 2.0 if seconds else 3.0, 4.0, 0.0)]]
        return _summarize(name, rows, GO, wall_s=60.0, target=2.5, error=error)

    return ThinLinkResult(
        peers=1,
        rate_bits_per_s=20_000_000,
        target_loss=2.5,
        inner_steps=50,
        max_steps=400,
        cap_s=60.0,
        settings={"model.width": "64"},
        methods={"diloco": method("diloco", diloco), "ddp": method("ddp", ddp, ddp_error)},
    )


def test_speedup_and_json_fields() -> None:
    result = _result(diloco=4.0, ddp=20.0)
    assert result.speedup_over("ddp") == pytest.approx(5.0)
    assert result.speedup_over("sync") is None  # not run
    fields = result.to_json()
    assert fields["seconds_to_target"] == {"diloco": 4.0, "ddp": 20.0}
    assert fields["utilization"] == {"p0": pytest.approx(1.0)}
    assert fields["thin_link"]["target_loss"] == 2.5
    assert fields["thin_link"]["settings"] == {"model.width": "64"}
    assert fields["thin_link"]["speedup_is_lower_bound"] == {
        "diloco_over_ddp": False,
        "diloco_over_sync": False,
        "diloco_overlap_over_ddp": False,
        "diloco_over_ddp_fp16": False,
        "diloco_overlap_over_ddp_fp16": False,
    }
    assert fields["thin_link"]["speedup_diloco_over_ddp_fp16"] is None  # not run


def test_speedup_over_a_reference_that_ran_out_of_time_is_a_lower_bound() -> None:
    assert _result(diloco=4.0, ddp=None).speedup_over("ddp") == pytest.approx(60.0 / 4.0)
    assert _result(diloco=4.0, ddp=None).speedup_is_lower_bound("ddp")
    fields = _result(diloco=4.0, ddp=None).to_json()["thin_link"]
    assert fields["speedup_is_lower_bound"]["diloco_over_ddp"] is True
    assert not _result(diloco=4.0, ddp=20.0).speedup_is_lower_bound("ddp")
    assert not _result(diloco=4.0, ddp=None, ddp_error="peer 1 exited").speedup_is_lower_bound(
        "ddp"
    )
    assert _result(diloco=4.0, ddp=None, ddp_error="peer 1 exited").speedup_over("ddp") is None
    assert _result(diloco=None, ddp=20.0).speedup_over("ddp") is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"peers": 1}, "at least 2"),
        ({"methods": ["diloco", "fsdp"]}, "unknown methods"),
        ({"max_steps": 10, "inner_steps": 50}, "shorter than one outer step"),
    ],
)
def test_bad_arguments_are_refused_before_any_lab_is_built(
    kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        run_thin_link_bench(rate_bits_per_s=20_000_000, **kwargs)
