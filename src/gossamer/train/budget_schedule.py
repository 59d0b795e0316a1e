"""The learning-rate schedule of a :class:`~gossamer.train.loop.Trainer`: its length is
``train.max_steps``, or, with a time budget (``train.max_seconds``), fitted to the measured step
rate so that the learning rate decays fully by the end of the budget."""

from __future__ import annotations

import logging

from gossamer.core.config import RunConfig
from gossamer.obs.trace import SpanRecorder
from gossamer.train.checkpointing import RunState
from gossamer.train.optim import ScheduleRefit, learning_rate_at, warmup_steps

__all__ = ["BudgetFittedSchedule"]

logger = logging.getLogger(__name__)

_SCHEDULE_CALIBRATION_STEPS = 20
"""Steps measured before a time budget fixes the schedule's length."""
_SCHEDULE_BUDGET_SHARE = 0.93
"""Share of the budget planned for steps; evaluation and checkpoints take the rest."""
_SCHEDULE_REFIT_WINDOW_SHARE = 0.1
"""Share of the budget the step rate is measured over before the schedule may be fitted again."""
_SCHEDULE_REFIT_TOLERANCE = 0.1
"""How far (a share) the step rate may move from the one the schedule's end assumes before the
end follows it."""


class BudgetFittedSchedule:
    """The learning-rate schedule, fitted to the time budget: the base of
    :class:`~gossamer.train.loop.Trainer`, which sets the attributes below."""

    config: RunConfig
    run_state: RunState
    spans: SpanRecorder
    _rate_since: tuple[int, float] | None
    _spent_before: float

    @property
    def schedule_steps(self) -> int:
        """Length of the learning-rate schedule: ``train.max_steps``, or fitted to the budget."""
        fitted = self.run_state.schedule_steps
        max_steps = self.config.train.max_steps
        return max_steps if fitted is None else min(fitted, max_steps)

    def _fit_schedule_to_budget(self, step: int, start_step: int, elapsed_s: float) -> None:
        """With a time budget, fit the schedule's length to the measured step rate.

        The learning rate then decays fully by the end of the budget instead of being cut off
        mid-schedule. The length is first fixed after a few steps, then fitted again to what is
        left of the budget wherever the step rate over the last tenth of it or more moves more
        than a tenth from the rate the length assumes (a swarm peer's first steps may run alone
        and fast, its rounds with others slow it later). The fits, their rate and the budget
        spent are saved in checkpoints, so a resumed run follows them, and fits again to the
        run's budget, not to a session's own.
        """
        budget_s = self.config.train.max_seconds
        if not budget_s:
            return
        run = self.run_state
        if run.schedule_steps is not None:
            self._refit_schedule(step, elapsed_s, budget_s)
            return
        if step - start_step < _SCHEDULE_CALIBRATION_STEPS:
            return
        steps_per_s = (step - start_step) / elapsed_s
        run.schedule_steps = self._reachable_steps(
            step, steps_per_s, self._spent_before + elapsed_s, budget_s
        )
        run.schedule_fitted_at = step
        run.schedule_rate = steps_per_s
        self._rate_since = (step, elapsed_s)
        logger.info(
            "peer %s step %d: learning-rate schedule fitted to the time budget: %d steps",
            self.spans.peer,
            step,
            self.schedule_steps,
        )

    def _reachable_steps(
        self, step: int, steps_per_s: float, elapsed_s: float, budget_s: float
    ) -> int:
        # The share is of the whole budget, so that fits at a steady rate agree.
        left_s = budget_s * _SCHEDULE_BUDGET_SHARE - elapsed_s
        reachable = step + int(steps_per_s * max(0.0, left_s))
        # At least one step more than taken, never more than max_steps (a fit on the last step
        # must not make the run one step longer).
        return min(self.config.train.max_steps, max(step + 1, reachable))

    def _refit_schedule(self, step: int, elapsed_s: float, budget_s: float) -> None:
        run = self.run_state
        if self._rate_since is None:  # (a resumed session measures from its start)
            self._rate_since = (step, elapsed_s)
            return
        since_step, since_s = self._rate_since
        window_s = elapsed_s - since_s
        if (
            step - since_step < _SCHEDULE_CALIBRATION_STEPS
            or window_s < budget_s * _SCHEDULE_REFIT_WINDOW_SHARE
        ):
            return
        self._rate_since = (step, elapsed_s)
        end = self.schedule_steps
        if step >= end or step < warmup_steps(self.config.optim, self.config.train.max_steps):
            return  # (the warm-up keeps its length)
        rate = (step - since_step) / window_s
        assumed = run.schedule_rate
        if assumed is None:  # (a checkpoint from before the rate was kept: from here on)
            run.schedule_rate = rate
            return
        if abs(rate / assumed - 1.0) <= _SCHEDULE_REFIT_TOLERANCE:
            # (the rate the end assumes: no refit. Fitted again regardless, a resumed session,
            # with a budget of its own, stretched the schedule its checkpoint holds by half)
            return
        run.schedule_rate = rate
        reachable = self._reachable_steps(step, rate, self._spent_before + elapsed_s, budget_s)
        if abs(reachable - end) < 2:
            return
        last = run.schedule_refit
        run.schedule_refit = ScheduleRefit(
            at_step=step,
            position=last.position_at(step, end) if last is not None else float(step),
            first_steps=last.first_steps if last is not None else end,
        )
        run.schedule_steps = reachable
        logger.info(
            "peer %s step %d: learning-rate schedule fitted again to the step rate of the last "
            "%.0f s: %d steps (was %d)",
            self.spans.peer,
            step,
            window_s,
            reachable,
            end,
        )

    def _learning_rate_at(self, step: int) -> float:
        """The learning rate of step ``step`` under this session's config and schedule."""
        return learning_rate_at(
            step,
            config=self.config.optim,
            max_steps=self.schedule_steps,
            planned_steps=self.config.train.max_steps,  # (the fitted length comes part way)
            fitted_at=self.run_state.schedule_fitted_at,
            refit=self.run_state.schedule_refit,
        )
