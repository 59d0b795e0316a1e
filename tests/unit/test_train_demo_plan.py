"""The swarm demo's plan: sized to the budget, and honest about how long it takes."""

from __future__ import annotations

from gossamer.train.demo_swarm import plan_swarm_demo


def test_a_budget_too_short_for_the_fewest_steps_gets_a_plan_that_says_it_takes_longer() -> None:
    tiny = plan_swarm_demo(budget_s=0.01)
    assert tiny.max_steps == 60  # the fewest a demo runs
    assert tiny.max_steps % tiny.inner_steps == 0
    # the demo waits twice max(budget, expected): a slow machine is not failed by the plan
    assert tiny.expected_s > 0.01


def test_a_long_budget_fills_it_with_steps() -> None:
    short, long = plan_swarm_demo(budget_s=5.0), plan_swarm_demo(budget_s=5000.0)
    assert long.max_steps > short.max_steps
    assert long.expected_s <= 5000.0  # a quarter of the budget is kept for the rest
    assert long.kill_at_step == long.join_at_step == long.max_steps // 5
