"""The settings of DiLoCo's outer loop (:class:`~gossamer.train.diloco.DiLoCoStrategy`), and
the ones every peer of a run must share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gossamer.core.config import SwarmConfig

__all__ = ["DiLoCoConfig"]


@dataclass(frozen=True, kw_only=True, slots=True)
class DiLoCoConfig:
    """The outer loop of DiLoCo."""

    inner_steps: int = 50
    """Inner steps (H) between two averaging rounds."""
    outer_lr: float = 0.7
    """Outer SGD learning rate (DiLoCo paper: 0.7)."""
    outer_momentum: float = 0.9
    """Outer Nesterov momentum (DiLoCo paper: 0.9)."""
    run_id: str = "gossamer"
    """Names the rounds, so peers of different runs never average together."""
    overlap: bool = False
    """Average each round in the background during the next H inner steps, applied a round late."""
    outer_momentum_warmup: bool = True
    """Ramp the outer momentum up along Nesterov's sequence t / (t + 3) (capped at
    ``outer_momentum``) instead of using it from the first outer step."""
    train_while_forming: bool = False
    """Keep taking inner steps while a round's group forms; average once it has formed, each
    peer's pseudo-gradient weighted by the inner steps behind it."""
    train_while_averaging: bool = False
    """(with ``train_while_forming``) Keep taking inner steps while the formed round averages
    too; the steps taken meanwhile are kept and go into the next round."""

    def __post_init__(self) -> None:
        if self.inner_steps < 1:
            raise ValueError(f"diloco.inner_steps must be at least 1, got {self.inner_steps}")
        if self.outer_lr <= 0:
            raise ValueError(f"diloco.outer_lr must be positive, got {self.outer_lr}")
        if not 0.0 <= self.outer_momentum < 1.0:
            raise ValueError(f"diloco.outer_momentum must be in [0, 1), got {self.outer_momentum}")
        if self.overlap and self.train_while_forming:
            raise ValueError(
                "diloco.overlap and diloco.train_while_forming exclude each other: an "
                "overlapped round never waits for its group; choose one"
            )
        if self.train_while_averaging and not self.train_while_forming:
            raise ValueError(
                "diloco.train_while_averaging needs diloco.train_while_forming: the round "
                "averages in the background only once its group has formed in the background"
            )

    def agreed_settings(self) -> dict[str, Any]:
        """The settings every peer of a run must share, by their ``swarm.`` name: those that
        change the global weights the rounds make (when rounds are due, how their averages
        are weighed and applied). Training while the round averages changes only the local
        model's path between rounds, the run name is the rounds' key already."""
        return {
            "inner_steps": self.inner_steps,
            "outer_lr": self.outer_lr,
            "outer_momentum": self.outer_momentum,
            "outer_momentum_warmup": self.outer_momentum_warmup,
            "overlap": self.overlap,
            "train_while_forming": self.train_while_forming,
        }

    @classmethod
    def from_swarm(
        cls, swarm: SwarmConfig, *, run_id: str, inner_steps: int | None = None
    ) -> DiLoCoConfig:
        """The DiLoCo settings a run's ``[swarm]`` section asks for.

        Training while the group forms and while it averages are each effective only where
        their prerequisites hold (an overlapped round never waits for its group; averaging in
        the background needs the group formed in the background), so a config that turns one
        of them off never makes the other invalid.

        Args:
            swarm: the run's swarm settings.
            run_id: names the rounds.
            inner_steps: H, when it differs from ``swarm.inner_steps`` (the bench's flag).
        """
        forming = swarm.train_while_forming and not swarm.overlap
        return cls(
            inner_steps=swarm.inner_steps if inner_steps is None else inner_steps,
            outer_lr=swarm.outer_lr,
            outer_momentum=swarm.outer_momentum,
            outer_momentum_warmup=swarm.outer_momentum_warmup,
            run_id=run_id,
            overlap=swarm.overlap,
            train_while_forming=forming,
            train_while_averaging=swarm.train_while_averaging and forming,
        )
