"""`gossamer bench diloco --rate R`: time to a target validation loss over thin links (lab, root).

N peers, each a real process in its own lab namespace behind a link capped at ``R`` (``tc tbf``
on both ends, see docs/lab.md), train the same model from the same initial weights on the same
data, with the same optimizer, learning-rate schedule and step budget, once per method:

- ``diloco``: ``gossamer train --swarm.strategy diloco`` (H inner AdamW steps, training on
  while the round's group forms, then the pseudo-gradients averaged over TLS gRPC and an outer
  Nesterov step); ``--swarm.train-while-forming false`` makes each peer stop at its H-th step
  until the round is done;
- ``diloco_overlap``: the same with ``--swarm.overlap`` (each round averages in the background
  during the next H inner steps and is applied a round late);
- ``sync``: Gossamer's synchronous data parallel (gradients averaged over the swarm averager
  every step);
- ``ddp``: the reference, plain PyTorch ``DistributedDataParallel`` on gloo (gradients
  all-reduced every step, in fp32);
- ``ddp_fp16``: the same with PyTorch's own ``fp16_compress_hook`` (gradients sent in 16 bits),
  what a PyTorch user would turn on over a thin link (the swarm's rounds go in 8 bits).

Every method's clock starts when all its peers are set up and joined (a go signal); it stops for
a method when every peer has measured a validation loss at or below the target, and the peers are
then stopped. ``seconds_to_target`` leaves out the benchmark's own evaluations (they are timed
as spans and subtracted). A method that has not reached the target within ``cap_s`` is stopped
and reported as not reached (``null``), with the loss it got to. ``utilization`` is each peer's
compute time over its wall time to that point (evaluations left out); DDP overlaps its all-reduce
with backward, so its compute cannot be told apart from its communication and it has none.

Every method is evaluated the same way: each peer's model as it trains, every ``eval_every``
steps. For DiLoCo that is the global weights right after an outer step and the local model
between them; with overlap, the eager estimate at a boundary and the model moved by the real
average once the round has landed.
Latency is not emulated (docs/lab.md): the links are thin, not far.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from gossamer.bench import SMALL_GPT
from gossamer.core.errors import ConfigError

__all__ = [
    "THIN_LINK_DEFAULTS",
    "ThinLinkMethodResult",
    "ThinLinkResult",
    "check_thin_link_inputs",
    "run_thin_link_bench",
]

THIN_LINK_DEFAULTS: tuple[tuple[str, str], ...] = (
    *SMALL_GPT,
    ("train.eval_batches", "4"),
    ("train.log_every", "50"),
    ("swarm.codec", "int8"),
)
"""The small GPT (:data:`~gossamer.bench.SMALL_GPT`), evaluated on 4 batches (each peer checks the
target every few steps), and the swarm's rounds (DiLoCo's and sync's) in 8 bits, as on any thin
link; DDP is plain fp32 gloo. Config flags win (``--swarm.codec none`` for fp32 rounds, which
``auto`` then runs over torch.distributed)."""

_METHODS = ("diloco", "diloco_overlap", "sync", "ddp", "ddp_fp16")
_READY_TIMEOUT_S = 120.0
_POLL_S = 0.2


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class ThinLinkMethodResult:
    """One method's run over the capped links."""

    name: str
    """``diloco``, ``diloco_overlap``, ``sync``, ``ddp`` or ``ddp_fp16``."""
    seconds_to_target: float | None
    """Seconds from go until every peer measured the target loss (None: not within the cap)."""
    steps_to_target: int | None
    """The step at which the last peer measured it."""
    best_val_loss: float | None
    """Lowest validation loss any peer measured."""
    last_step: int
    """Furthest step any peer evaluated at."""
    wall_s: float
    """Seconds the method ran before it was stopped."""
    utilization: dict[str, float | None]
    """Per peer: compute seconds over wall seconds up to the target (or the stop)."""
    group_sizes: list[int | None]
    """Per peer: peers in its last averaging round, where the worker can see it (sync, ddp)."""
    phases_s: dict[str, dict[str, float]]
    """Per peer: seconds per span (compute, communication, evaluation) up to the target."""
    error: str | None = None
    """A peer's failure, with the end of its log; None if all ran."""


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class ThinLinkResult:
    """Every method's outcome on the same links, and the settings they shared."""

    peers: int
    rate_bits_per_s: int
    target_loss: float
    inner_steps: int
    max_steps: int
    cap_s: float
    settings: dict[str, str]
    methods: dict[str, ThinLinkMethodResult]

    def speedup_over(self, reference: str, method: str = "diloco") -> float | None:
        """``reference``'s seconds to target over ``method``'s (None if either did not reach it;
        a lower bound, ``cap_s`` over ``method``'s, if only the reference did not)."""
        if method not in self.methods or reference not in self.methods:
            return None
        mine = self.methods[method].seconds_to_target
        other = self.methods[reference]
        if mine is None or (other.seconds_to_target is None and other.error is not None):
            return None
        theirs = other.seconds_to_target
        return (theirs if theirs is not None else self.cap_s) / mine

    def speedup_is_lower_bound(self, reference: str, method: str = "diloco") -> bool:
        """Whether :meth:`speedup_over` is a lower bound: ``reference`` ran out of time (its
        figure is the cap's) while ``method`` reached the target."""
        if self.speedup_over(reference, method) is None:
            return False
        return self.methods[reference].seconds_to_target is None

    def to_json(self) -> dict[str, Any]:
        """The thin-link fields of ``--json``."""
        diloco = self.methods.get("diloco")
        return {
            "seconds_to_target": {n: m.seconds_to_target for n, m in self.methods.items()},
            "utilization": dict(diloco.utilization) if diloco else {},
            "utilization_by_method": {
                n: dict(m.utilization) for n, m in self.methods.items() if m.utilization
            },
            "thin_link": {
                "peers": self.peers,
                "rate_bits_per_s": self.rate_bits_per_s,
                "target_loss": self.target_loss,
                "inner_steps": self.inner_steps,
                "max_steps": self.max_steps,
                "cap_s": self.cap_s,
                "settings": self.settings,
                "speedup_diloco_over_ddp": self.speedup_over("ddp"),
                "speedup_diloco_over_sync": self.speedup_over("sync"),
                "speedup_diloco_overlap_over_ddp": self.speedup_over("ddp", "diloco_overlap"),
                "speedup_diloco_over_ddp_fp16": self.speedup_over("ddp_fp16"),
                "speedup_diloco_overlap_over_ddp_fp16": self.speedup_over(
                    "ddp_fp16", "diloco_overlap"
                ),
                "speedup_is_lower_bound": {
                    f"{method}_over_{reference}": self.speedup_is_lower_bound(reference, method)
                    for method, reference in (
                        ("diloco", "ddp"),
                        ("diloco", "sync"),
                        ("diloco_overlap", "ddp"),
                        ("diloco", "ddp_fp16"),
                        ("diloco_overlap", "ddp_fp16"),
                    )
                },
                "methods": {n: dataclasses.asdict(m) for n, m in self.methods.items()},
            },
        }


@dataclasses.dataclass(frozen=True, slots=True)
class _Peer:
    host: str
    ifname: str
    wrap: list[str]


@contextlib.contextmanager
def _lab_peers(peers: int, rate_bits_per_s: int) -> Iterator[list[_Peer]]:
    from gossamer.lab import LabConfig, open_lab  # root only

    config = LabConfig(num_peers=peers, rate_bps=rate_bits_per_s, name=f"dl{secrets.token_hex(3)}")
    with open_lab(config) as lab:
        yield [
            _Peer(
                p.address,
                next(e.device for e in p.shaped_ends if e.namespace == p.namespace),
                ["ip", "netns", "exec", p.namespace],
            )
            for p in lab.topology.peers
        ]


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):  # a line being written right now
            rows.append(json.loads(line))
    return rows


def _first_at_target(rows: list[dict[str, Any]], target: float) -> dict[str, Any] | None:
    return next((r for r in rows if r["val_loss"] <= target), None)


def _stop(processes: Sequence[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.kill()
    for process in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=10)


def _run_method(
    method: str,
    peers: list[_Peer],
    overrides: list[tuple[str, str]],
    *,
    target: float,
    cap_s: float,
    folder: Path,
) -> ThinLinkMethodResult:
    world = len(peers)
    processes: list[subprocess.Popen[bytes]] = []
    logs = [folder / f"{method}-{rank}.log" for rank in range(world)]
    evals = [folder / f"evals-{method}-{rank}.jsonl" for rank in range(world)]
    error: str | None = None

    def failure() -> str | None:
        for rank, process in enumerate(processes):
            if process.poll() not in (None, 0):
                tail = logs[rank].read_text(errors="replace")[-2500:]
                return f"peer {rank} exited with {process.returncode}:\n{tail}"
        return None

    try:
        for rank, peer in enumerate(peers):
            spec = {"method": method, "rank": rank, "world": world, "folder": str(folder),
                    "host": peer.host, "ifname": peer.ifname, "overrides": overrides}  # fmt: skip
            argv = [*peer.wrap, sys.executable, "-m", "gossamer.bench.diloco_thin_link_worker",
                    json.dumps(spec)]  # fmt: skip
            with logs[rank].open("wb") as sink:
                processes.append(
                    subprocess.Popen(
                        argv, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
                    )
                )
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while not all((folder / f"ready-{method}-{r}").exists() for r in range(world)):
            error = failure()
            if error is None and time.monotonic() > deadline:
                error = f"peers not ready within {_READY_TIMEOUT_S:.0f} s"
            if error is not None:
                return _failed(method, error)
            time.sleep(_POLL_S)
        go = time.time()
        staged = folder / f".go-{method}"
        staged.write_text(repr(go))
        staged.rename(folder / f"go-{method}")
        while time.time() - go < cap_s:
            if all(_first_at_target(_read_rows(p), target) for p in evals):
                break
            error = failure()
            if error is not None or all(p.poll() is not None for p in processes):
                break
            time.sleep(_POLL_S)
        wall_s = time.time() - go
    finally:
        _stop(processes)
    return _summarize(method, [_read_rows(p) for p in evals], go, wall_s, target, error)


def _failed(method: str, error: str) -> ThinLinkMethodResult:
    return ThinLinkMethodResult(
        name=method,
        seconds_to_target=None,
        steps_to_target=None,
        best_val_loss=None,
        last_step=0,
        wall_s=0.0,
        utilization={},
        group_sizes=[],
        phases_s={},
        error=error,
    )


def _utilization(method: str, row: dict[str, Any] | None, go: float) -> float | None:
    if row is None or method.startswith("ddp"):
        return None
    phases = row["phases_s"]
    wall = row["unix_s"] - go - phases.get("evaluation", 0.0)
    return float(phases.get("compute", 0.0)) / wall if wall > 0 else None


def _summarize(
    method: str,
    rows: list[list[dict[str, Any]]],
    go: float,
    wall_s: float,
    target: float,
    error: str | None,
) -> ThinLinkMethodResult:
    hits = [_first_at_target(r, target) for r in rows]
    reached = all(hit is not None for hit in hits)
    seconds: float | None = None
    steps: int | None = None
    if reached:
        seconds = max(h["unix_s"] - go - h["phases_s"].get("evaluation", 0.0) for h in hits if h)
        steps = max(int(h["step"]) for h in hits if h)
    losses = [float(row["val_loss"]) for peer in rows for row in peer]
    ends = [
        hit if hit is not None else (peer[-1] if peer else None)
        for hit, peer in zip(hits, rows, strict=True)
    ]
    return ThinLinkMethodResult(
        name=method,
        seconds_to_target=seconds,
        steps_to_target=steps,
        best_val_loss=min(losses) if losses else None,
        last_step=max((int(row["step"]) for peer in rows for row in peer), default=0),
        wall_s=wall_s,
        utilization={f"p{rank}": _utilization(method, end, go) for rank, end in enumerate(ends)},
        group_sizes=[peer[-1].get("group_size") if peer else None for peer in rows],
        phases_s={f"p{rank}": end["phases_s"] for rank, end in enumerate(ends) if end},
        error=error,
    )


def check_thin_link_inputs(
    *,
    peers: int,
    target_loss: float,
    inner_steps: int,
    max_steps: int,
    cap_s: float,
    methods: Sequence[str] = _METHODS,
) -> None:
    """Refuse what the thin-link part cannot run, and check this machine can make its lab:
    `gossamer bench diloco` calls it before its quality part (an hour or more) runs, so a wrong
    flag costs nothing.

    Raises:
        ConfigError: an input it cannot run with (the message names the flag).
        MissingDependencyError: not root, or a tool the lab needs is missing.
    """
    if peers < 2:
        raise ConfigError("--peers must be at least 2 for the thin-link comparison (--rate)")
    unknown = set(methods) - set(_METHODS)
    if unknown:
        raise ConfigError(f"unknown methods {sorted(unknown)}; use {', '.join(_METHODS)}")
    if not (target_loss > 0 and cap_s > 0):
        raise ConfigError("--target-loss and --time-cap-s must be positive")
    if max_steps < inner_steps:
        raise ConfigError(
            f"--thin-link-steps {max_steps} is shorter than one outer step (--inner-steps "
            f"{inner_steps}); give at least {inner_steps}"
        )
    from gossamer.lab.runner import SubprocessRunner, require_tools

    require_tools(SubprocessRunner())


def run_thin_link_bench(
    *,
    rate_bits_per_s: int,
    peers: int = 4,
    target_loss: float = 2.5,
    inner_steps: int = 50,
    max_steps: int = 400,
    cap_s: float = 180.0,
    eval_every: int = 10,
    overrides: Sequence[tuple[str, str]] = (),
    methods: Sequence[str] = _METHODS,
) -> ThinLinkResult:
    """Run each method over the same capped links and time it to the target loss (root).

    Args:
        rate_bits_per_s: every peer's link rate.
        peers: peer processes, one per lab namespace.
        target_loss: the validation loss every method trains to.
        inner_steps: DiLoCo's H.
        max_steps: the step budget every method's learning-rate schedule spans.
        cap_s: longest one method may run; one that has not reached the target by then is
            reported as not reached.
        eval_every: evaluation interval of every method, in steps.
        overrides: config flags (``("model.width", "64")``) on top of :data:`THIN_LINK_DEFAULTS`,
            for every method alike.
        methods: which of ``diloco``, ``diloco_overlap``, ``sync``, ``ddp``, ``ddp_fp16`` to
            run, in this order.
    """
    check_thin_link_inputs(
        peers=peers, target_loss=target_loss, inner_steps=inner_steps, max_steps=max_steps,
        cap_s=cap_s, methods=methods,
    )  # fmt: skip
    shared = [
        *THIN_LINK_DEFAULTS,
        *overrides,
        ("train.max_steps", str(max_steps)),
        ("train.max_seconds", "0"),
        ("swarm.inner_steps", str(inner_steps)),
        ("checkpoint.every_steps", "0"),
        ("checkpoint.resume", "false"),
    ]
    settings = dict(shared)
    results: dict[str, ThinLinkMethodResult] = {}
    with (
        _lab_peers(peers, rate_bits_per_s) as placed,
        tempfile.TemporaryDirectory(prefix="gossamer-thin-link-") as tmp,
    ):
        for method in methods:
            run_name = f"thin-{method}-{secrets.token_hex(3)}"
            method_overrides = [*shared, ("train.eval_every", str(eval_every)), ("name", run_name)]
            results[method] = _run_method(
                method, placed, method_overrides, target=target_loss, cap_s=cap_s, folder=Path(tmp)
            )
    settings["train.eval_every"] = str(eval_every)
    return ThinLinkResult(
        peers=peers,
        rate_bits_per_s=rate_bits_per_s,
        target_loss=target_loss,
        inner_steps=inner_steps,
        max_steps=max_steps,
        cap_s=cap_s,
        settings=settings,
        methods=results,
    )
