"""The swarm demo: peer processes on loopback train with DiLoCo while one dies and one joins.

Three peers start as separate ``gossamer train`` processes and find each other through the first
one. Partway through, one is killed with SIGKILL; the survivors drop it at the failure detector's
deadline and go on. Then a newcomer starts, downloads the global state from the donors and trains
from the next outer step. The parent watches the peers' status files, shows a live table, and at
the end samples text from the final checkpoint and writes the summary.

Every peer serves its Prometheus metrics on a free port (its status file says where), and the
parent serves the dashboard, scraping them, on a free loopback port for the demo's duration.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from gossamer.core.config import ModelConfig
from gossamer.models import GPT
from gossamer.train.inference import load_model, sample_text

__all__ = [
    "SwarmDemoPlan",
    "SwarmDemoSummary",
    "plan_swarm_demo",
    "run_swarm_demo",
    "swarm_goodput",
]

DEMO_PROMPT = "def "
_MIN_STEPS = 60
"""The fewest inner steps a demo runs: enough for the kill, the newcomer and a clear drop in
validation loss, however short the budget."""
StatusView = Callable[[dict[str, dict[str, Any]], str], None]
"""Shows the peers' statuses (by name) and a line about what the demo is doing."""


@dataclass(frozen=True, kw_only=True, slots=True)
class SwarmDemoPlan:
    """How big the demo's run is, sized to this machine."""

    num_peers: int
    """Peers started at the beginning."""
    max_steps: int
    """Inner steps every peer's schedule spans."""
    inner_steps: int
    """DiLoCo's H."""
    batch_size: int
    """Sequences per step."""
    kill_at_step: int
    """Peer 0's step at which peer 1 is killed."""
    join_at_step: int
    """Peer 0's step at which the newcomer starts."""
    expected_s: float = 0.0
    """How long the run is expected to take here, start-up and rounds included (longer than
    the budget where the budget is too short for the fewest steps the demo runs)."""


def plan_swarm_demo(*, budget_s: float, num_peers: int = 3, batch_size: int = 8) -> SwarmDemoPlan:
    """Size the run so the peers finish within ``budget_s`` on this machine.

    Measures the built-in model's training speed here for a few steps, assumes the peers share
    the machine's cores, and keeps about a quarter of the budget for start-up, averaging rounds,
    evaluation and the newcomer's sync.
    """
    config = ModelConfig()
    torch.manual_seed(0)
    model = GPT(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, 256, (batch_size, config.context + 1))
    timings = []
    for _ in range(4):
        started = time.perf_counter()
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1))
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        optimizer.zero_grad()
        timings.append(time.perf_counter() - started)
    step_s = sorted(timings)[len(timings) // 2] * num_peers
    max_steps = max(_MIN_STEPS, int(budget_s * 0.75 / step_s))
    inner_steps = max(10, max_steps // 12)
    max_steps -= max_steps % inner_steps
    return SwarmDemoPlan(
        num_peers=num_peers,
        max_steps=max_steps,
        inner_steps=inner_steps,
        batch_size=batch_size,
        # The newcomer starts right after the kill: its start-up (seconds of imports and set-up
        # on a busy machine) overlaps the survivors' steps, and most of the run is left to join.
        kill_at_step=max_steps // 5,
        join_at_step=max_steps // 5,
        expected_s=max_steps * step_s / 0.75,
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class SwarmDemoSummary:
    """What the swarm demo did, printed and written as JSON."""

    val_loss_before: float
    val_loss_after: float
    tokens_trained: int
    tokens_per_s: float
    seconds: float
    checkpoint_path: str
    sample_prompt: str
    sample: str
    peers: int
    peers_killed: int
    killed_peer_rounds: int
    """Rounds the killed peer had averaged with the others when it was killed."""
    peers_joined: int
    bytes_on_wire: int
    bytes_per_token: float
    seconds_lost_to_failures: float
    longest_pause_s: float
    """The longest time a survivor went without finishing a training step (after its first)."""
    time_to_productive_s: float | None
    final_weights_agree: bool
    goodput: dict[str, Any] = field(default_factory=dict)
    """``swarm``: kept tokens per wall second of the demo and their share of the peers' compute
    capacity; ``peers``: the same per peer (see :func:`swarm_goodput`)."""
    dashboard_url: str | None = None
    """Where the dashboard was served while the demo ran."""
    plan: dict[str, int] = field(default_factory=dict)

    def write_json(self, path: Path) -> None:
        """Write the summary to ``path``."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")


def _peer_arguments(
    run_dir: Path, name: str, plan: SwarmDemoPlan, bootstrap: str | None
) -> list[str]:
    command = [
        "--verbose",
        "train",
        "--name",
        "demo-swarm",
        "--swarm.strategy",
        "diloco",
        "--swarm.inner-steps",
        str(plan.inner_steps),
        "--swarm.join-window-s",
        "20",
        "--swarm.status-file",
        str(run_dir / f"{name}.json"),
        "--train.max-steps",
        str(plan.max_steps),
        "--train.batch-size",
        str(plan.batch_size),
        "--train.eval-every",
        "0",
        "--train.eval-batches",
        "4",
        "--train.num-threads",
        "1",
        "--optim.warmup-steps",
        "10",
        "--checkpoint.directory",
        str(run_dir / name),
        "--checkpoint.every-steps",
        str(plan.inner_steps * 4),
        "--metrics-port",
        "0",
    ]
    if bootstrap:
        command += ["--bootstrap", bootstrap]
    return command


def _read_status(path: Path) -> dict[str, Any] | None:
    try:
        status: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return status


class _Swarm:
    """The demo's peer processes and their status files."""

    def __init__(self, run_dir: Path, plan: SwarmDemoPlan) -> None:
        self.run_dir = run_dir
        self.plan = plan
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.waiting: dict[str, subprocess.Popen[bytes]] = {}
        """Prepared peers whose turn has not come."""
        self.killed: dict[str, float] = {}
        self.log_files: list[Any] = []

    def prepare(self, name: str) -> None:
        """Start the process of a peer whose turn comes later: it imports what training needs
        meanwhile and waits for its arguments (see :mod:`gossamer.cli.demo_peer`)."""
        log = (self.run_dir / f"{name}.log").open("wb")
        self.log_files.append(log)
        self.waiting[name] = subprocess.Popen(
            [sys.executable, "-m", "gossamer.cli.demo_peer"],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.PIPE,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )

    def start(self, name: str, bootstrap: str | None) -> None:
        """Start a peer: a prepared one is given its arguments, another is started now."""
        if name not in self.waiting:
            self.prepare(name)
        process = self.waiting.pop(name)
        assert process.stdin is not None
        arguments = _peer_arguments(self.run_dir, name, self.plan, bootstrap)
        try:
            process.stdin.write(json.dumps(arguments).encode() + b"\n")
            process.stdin.close()
        except BrokenPipeError:  # (it died waiting: its log says why; the demo sees it exited)
            pass
        self.processes[name] = process

    def statuses(self) -> dict[str, dict[str, Any]]:
        found = {}
        for name, process in self.processes.items():
            status = _read_status(self.run_dir / f"{name}.json") or {"state": "starting"}
            if name in self.killed:
                status = dict(status, state="killed")
            elif process.poll() is not None and status.get("state") not in ("done", "failed"):
                status = dict(status, state=f"exited {process.returncode}")
            found[name] = status
        return found

    def wait_for(
        self, condition: Callable[[], bool], timeout_s: float, view: Callable[[], None]
    ) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            view()
            if condition():
                return True
            time.sleep(0.25)
        return False

    def kill(self, name: str) -> None:
        self.processes[name].send_signal(signal.SIGKILL)
        self.processes[name].wait(timeout=10)
        self.killed[name] = time.monotonic()

    def stop_all(self) -> None:
        for process in [*self.processes.values(), *self.waiting.values()]:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)
        for log in self.log_files:
            log.close()


class _Dashboard:
    """The demo's dashboard: scrapes the peers' metrics URLs as they appear in their statuses."""

    def __init__(self) -> None:
        self.url: str | None = None
        self._source: Any = None
        self._server: Any = None

    def start(self, first_metrics_url: str) -> str:
        # Imported here: the web stack is needed only while a demo runs.
        from gossamer.obs.dashboard.app import DashboardConfig, DashboardService, create_app
        from gossamer.obs.dashboard.scrape import ScrapeConfig, ScrapeSwarmSource
        from gossamer.obs.dashboard.server import DashboardServer

        # Peers share the cores with training: a slow answer is not yet a dead peer.
        self._source = ScrapeSwarmSource(
            ScrapeConfig(urls=(first_metrics_url,), timeout_s=2.0, gone_after_s=5.0)
        )
        service = DashboardService(
            self._source, DashboardConfig(poll_interval_s=1.0, title="Gossamer demo swarm")
        )
        self._server = DashboardServer(create_app(service), host="127.0.0.1", port=0).start()
        self.url = str(self._server.url)
        return self.url

    def follow(self, statuses: dict[str, dict[str, Any]]) -> None:
        """Scrape every peer that reports a metrics URL."""
        if self._source is None:
            return
        for status in statuses.values():
            url = status.get("metrics_url")
            if isinstance(url, str):
                self._source.add_url(url)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None


@contextmanager
def _dashboard_running() -> Iterator[_Dashboard]:
    dashboard = _Dashboard()
    try:
        yield dashboard
    finally:
        dashboard.close()


def run_swarm_demo(
    *,
    budget_s: float = 150.0,
    runs_dir: Path = Path("runs"),
    view: StatusView | None = None,
    plan: SwarmDemoPlan | None = None,
    sample_tokens: int = 300,
    dashboard: bool = True,
    on_dashboard: Callable[[str], None] | None = None,
) -> SwarmDemoSummary:
    """Run the swarm demo and return its summary.

    Args:
        budget_s: training time budget the run is sized to.
        runs_dir: where the demo's run folder is made.
        view: shows the peers' statuses while the demo runs.
        plan: the run's size; measured on this machine if None.
        sample_tokens: bytes of text sampled from the final checkpoint.
        dashboard: serve the dashboard on a free loopback port while the demo runs.
        on_dashboard: called with the dashboard's URL as soon as it serves.

    Raises:
        RuntimeError: a peer failed, or the swarm did not finish in twice the budget (or
            twice the time the plan expects, where that is longer).
    """
    started = time.monotonic()
    plan = plan or plan_swarm_demo(budget_s=budget_s)
    run_dir = runs_dir / "demo-swarm" / time.strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=False)
    show = view or (lambda statuses, line: None)
    swarm = _Swarm(run_dir, plan)
    events: list[str] = []
    with _dashboard_running() as board:

        def refresh(line: str = "") -> None:
            statuses = swarm.statuses()
            if dashboard:
                first = statuses.get("peer0", {}).get("metrics_url")
                if board.url is None and isinstance(first, str):
                    url = board.start(first)
                    if on_dashboard is not None:
                        on_dashboard(url)
                board.follow(statuses)
            show(statuses, line or (events[-1] if events else "starting"))

        return _run(run_dir, plan, swarm, events, refresh, started, budget_s, sample_tokens, board)


def _run(
    run_dir: Path,
    plan: SwarmDemoPlan,
    swarm: _Swarm,
    events: list[str],
    refresh: Callable[..., None],
    started: float,
    budget_s: float,
    sample_tokens: int,
    board: _Dashboard,
) -> SwarmDemoSummary:

    def step_of(name: str) -> int:
        return int(swarm.statuses().get(name, {}).get("step", 0) or 0)

    def rounds_of(name: str) -> int:
        return _rounds_averaged(swarm.statuses().get(name, {}))

    try:
        swarm.start("peer0", None)
        events.append("peer0 started")
        # The later peers import while peer0 starts: their turns then start them at once.
        newcomer = f"peer{plan.num_peers}"
        for name in [*(f"peer{i}" for i in range(1, plan.num_peers)), newcomer]:
            swarm.prepare(name)
        if not swarm.wait_for(
            lambda: "address" in swarm.statuses()["peer0"], 60, lambda: refresh()
        ):
            raise RuntimeError(f"peer0 did not start; see {run_dir / 'peer0.log'}")
        address = str(swarm.statuses()["peer0"]["address"])
        for index in range(1, plan.num_peers):
            swarm.start(f"peer{index}", address)
        events.append(f"{plan.num_peers} peers training with DiLoCo (H = {plan.inner_steps})")
        # A budget too short for the fewest steps the demo runs (a slow machine) gets a plan
        # that takes longer: it is given twice that.
        limit_s = 2 * max(budget_s, plan.expected_s)
        # The peer killed must be one the others average with: on a machine whose file cache
        # is cold its imports can outlast the first peer's steps to the kill, and killing it
        # then showed nothing.
        peer1 = swarm.processes["peer1"]
        if (
            not swarm.wait_for(
                lambda: (
                    peer1.poll() is not None
                    or (step_of("peer0") >= plan.kill_at_step and rounds_of("peer1") > 0)
                ),
                limit_s,
                refresh,
            )
            or peer1.poll() is not None
        ):
            raise RuntimeError(f"peer1 never averaged with the others; see {run_dir / 'peer1.log'}")
        swarm.kill("peer1")
        events.append(
            f"peer1 killed with SIGKILL at step {step_of('peer0')}, "
            f"after {rounds_of('peer1')} round(s) with the others"
        )
        swarm.wait_for(lambda: step_of("peer0") >= plan.join_at_step, limit_s, refresh)
        swarm.start(newcomer, address)
        events.append(f"{newcomer} joined and syncs from donors")
        survivors = [n for n in swarm.processes if n not in swarm.killed]
        synced = False

        def survivors_finished() -> bool:
            # (the newcomer's line changes once it trains: it kept saying "syncs from donors"
            # to the end of the run)
            nonlocal synced
            status = swarm.statuses().get(newcomer, {})
            if not synced and status.get("state") in ("training", "done"):
                synced = True
                if status.get("time_to_productive_s") is None:  # (set only when it took one)
                    events.append(f"{newcomer} took no state from donors and trains from its own")
                elif status.get("state") == "done":
                    events.append(f"{newcomer} took the swarm's state and finished")
                else:
                    events.append(
                        f"{newcomer} took the swarm's state and trains from step "
                        f"{int(status.get('step', 0) or 0)}"
                    )
            return all(swarm.processes[n].poll() is not None for n in survivors)

        finished = swarm.wait_for(
            survivors_finished, max(10.0, limit_s - (time.monotonic() - started)), refresh
        )
        refresh("finished" if finished else "out of time")
        if not finished:
            raise RuntimeError(f"the swarm did not finish in {limit_s:.0f} s; see {run_dir}")
        statuses = swarm.statuses()
    finally:
        swarm.stop_all()
    failed = [n for n in survivors if statuses[n].get("state") != "done"]
    if failed:
        raise RuntimeError(f"peers {failed} failed; see their logs in {run_dir}")
    summary = _summarize(run_dir, plan, statuses, survivors, newcomer, started, sample_tokens)
    return replace(summary, dashboard_url=board.url)


def _rounds_averaged(status: dict[str, Any]) -> int:
    """Rounds a peer's status says it averaged with others, over every backend."""
    return sum(int(n or 0) for n in (status.get("rounds_by_backend") or {}).values())


def _summarize(
    run_dir: Path,
    plan: SwarmDemoPlan,
    statuses: dict[str, dict[str, Any]],
    survivors: list[str],
    newcomer: str,
    started: float,
    sample_tokens: int,
) -> SwarmDemoSummary:
    first = statuses["peer0"]
    checkpoint = str(first["checkpoint"])
    loaded = load_model(checkpoint)
    sample = sample_text(loaded.model, DEMO_PROMPT, num_tokens=sample_tokens, seed=0)
    # Tokens every peer process computed (a killed peer's too, from its last status).
    tokens = sum(
        int((s.get("goodput") or {}).get("tokens_processed", s.get("tokens_trained", 0)) or 0)
        for s in statuses.values()
    )
    tokens_per_step = plan.batch_size * ModelConfig().context
    lost = {
        name: tokens_per_step
        * max(0, int(s.get("step", 0) or 0) - int(s.get("outer_step", 0)) * plan.inner_steps)
        for name, s in statuses.items()
        if name not in survivors
    }
    bytes_on_wire = sum(int(s.get("bytes_sent", 0) or 0) for s in statuses.values())
    seconds = time.monotonic() - started
    final_losses = {round(float(statuses[n]["val_loss"]), 6) for n in survivors}
    return SwarmDemoSummary(
        val_loss_before=float(first["val_loss_first"]),
        val_loss_after=float(first["val_loss"]),
        tokens_trained=tokens,
        tokens_per_s=tokens / seconds,
        seconds=seconds,
        checkpoint_path=checkpoint,
        sample_prompt=DEMO_PROMPT,
        sample=sample,
        peers=plan.num_peers + 1,
        peers_killed=1,
        killed_peer_rounds=sum(
            _rounds_averaged(s)
            for name, s in statuses.items()
            if name not in survivors and name != newcomer
        ),
        peers_joined=1,
        bytes_on_wire=bytes_on_wire,
        bytes_per_token=bytes_on_wire / max(1, tokens),
        seconds_lost_to_failures=max(
            float(s.get("stall_s", 0.0) or 0.0) for s in statuses.values()
        ),
        longest_pause_s=max(
            float(statuses[n].get("longest_pause_s", 0.0) or 0.0) for n in survivors
        ),
        time_to_productive_s=statuses[newcomer].get("time_to_productive_s"),
        final_weights_agree=len(final_losses) == 1,
        goodput=swarm_goodput(statuses, seconds, lost_tokens=lost),
        plan=asdict(plan),
    )


def swarm_goodput(
    statuses: dict[str, dict[str, Any]],
    wall_s: float,
    *,
    lost_tokens: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Goodput per peer (from its status file) and over the swarm.

    A peer's goodput is its kept tokens per wall second; its ratio divides that by its own
    compute-only rate (tokens per second of compute, no communication). Over the swarm, the
    tokens per second are all kept tokens over the demo's wall time, and the ratio is all kept
    tokens over what the peers could have computed while they ran (each peer's wall time times
    its compute-only rate): a peer that joined late or was killed counts for the time it ran.
    A killed peer's last status is up to one write interval old, and the steps it took after its
    last round went into no average: the caller passes them as ``lost_tokens``.

    Args:
        statuses: the peers' status files, by name.
        wall_s: the swarm's wall time.
        lost_tokens: tokens a peer counted as kept that were lost after all (killed mid-round).
    """
    lost_tokens = lost_tokens or {}
    peers: dict[str, dict[str, float]] = {}
    kept_total = 0.0
    capacity = 0.0
    for name, status in statuses.items():
        goodput = status.get("goodput")
        if not isinstance(goodput, dict):
            continue
        kept = max(0.0, float(goodput.get("tokens_kept", 0) or 0) - lost_tokens.get(name, 0))
        peer_wall = float(goodput.get("wall_s", 0) or 0)
        rate = float(goodput.get("compute_tokens_per_s", 0) or 0)
        peers[name] = {
            "tokens_kept": kept,
            "tokens_processed": float(goodput.get("tokens_processed", 0) or 0),
            "wall_s": peer_wall,
            "tokens_per_s": kept / peer_wall if peer_wall > 0 else 0.0,
            "compute_tokens_per_s": rate,
            "ratio": kept / (peer_wall * rate) if peer_wall > 0 and rate > 0 else 0.0,
        }
        kept_total += kept
        capacity += peer_wall * rate
    return {
        "swarm": {
            "tokens_kept": kept_total,
            "tokens_per_s": kept_total / wall_s if wall_s > 0 else 0.0,
            "ratio": kept_total / capacity if capacity > 0 else 0.0,
        },
        "peers": peers,
    }
