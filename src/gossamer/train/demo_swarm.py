"""The swarm demo: peer processes on loopback train with DiLoCo while one dies and one joins.

Three peers start as separate ``gossamer train`` processes and find each other through the first
one. Partway through, one is killed with SIGKILL; the survivors drop it at the failure detector's
deadline and go on. Then a newcomer starts, downloads the global state from the donors and trains
from the next outer step. The parent watches the peers' status files, shows a live table, and at
the end samples text from the final checkpoint and writes the summary.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from gossamer.core.config import ModelConfig
from gossamer.models import GPT
from gossamer.train.inference import load_model, sample_text

__all__ = ["SwarmDemoPlan", "SwarmDemoSummary", "plan_swarm_demo", "run_swarm_demo"]

DEMO_PROMPT = "def "
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
    max_steps = max(60, int(budget_s * 0.75 / step_s))
    inner_steps = max(10, max_steps // 12)
    max_steps -= max_steps % inner_steps
    return SwarmDemoPlan(
        num_peers=num_peers,
        max_steps=max_steps,
        inner_steps=inner_steps,
        batch_size=batch_size,
        kill_at_step=max_steps * 3 // 10,
        join_at_step=max_steps * 45 // 100,
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
    peers_joined: int
    bytes_on_wire: int
    bytes_per_token: float
    seconds_lost_to_failures: float
    time_to_productive_s: float | None
    final_weights_agree: bool
    plan: dict[str, int] = field(default_factory=dict)

    def write_json(self, path: Path) -> None:
        """Write the summary to ``path``."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")


def _peer_command(
    run_dir: Path, name: str, plan: SwarmDemoPlan, bootstrap: str | None
) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "gossamer.cli",
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
        self.killed: dict[str, float] = {}
        self.log_files: list[Any] = []

    def start(self, name: str, bootstrap: str | None) -> None:
        log = (self.run_dir / f"{name}.log").open("wb")
        self.log_files.append(log)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.processes[name] = subprocess.Popen(
            _peer_command(self.run_dir, name, self.plan, bootstrap),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )

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
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)
        for log in self.log_files:
            log.close()


def run_swarm_demo(
    *,
    budget_s: float = 150.0,
    runs_dir: Path = Path("runs"),
    view: StatusView | None = None,
    plan: SwarmDemoPlan | None = None,
    sample_tokens: int = 300,
) -> SwarmDemoSummary:
    """Run the swarm demo and return its summary.

    Raises:
        RuntimeError: a peer failed, or the swarm did not finish in twice the budget.
    """
    started = time.monotonic()
    plan = plan or plan_swarm_demo(budget_s=budget_s)
    run_dir = runs_dir / "demo-swarm" / time.strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=False)
    show = view or (lambda statuses, line: None)
    swarm = _Swarm(run_dir, plan)
    events: list[str] = []

    def refresh(line: str = "") -> None:
        show(swarm.statuses(), line or (events[-1] if events else "starting"))

    def step_of(name: str) -> int:
        return int(swarm.statuses().get(name, {}).get("step", 0) or 0)

    try:
        swarm.start("peer0", None)
        events.append("peer0 started")
        if not swarm.wait_for(
            lambda: "address" in swarm.statuses()["peer0"], 60, lambda: refresh()
        ):
            raise RuntimeError(f"peer0 did not start; see {run_dir / 'peer0.log'}")
        address = str(swarm.statuses()["peer0"]["address"])
        for index in range(1, plan.num_peers):
            swarm.start(f"peer{index}", address)
        events.append(f"{plan.num_peers} peers training with DiLoCo (H = {plan.inner_steps})")
        limit_s = budget_s * 2
        swarm.wait_for(lambda: step_of("peer0") >= plan.kill_at_step, limit_s, refresh)
        swarm.kill("peer1")
        events.append(f"peer1 killed with SIGKILL at step {step_of('peer0')}")
        swarm.wait_for(lambda: step_of("peer0") >= plan.join_at_step, limit_s, refresh)
        newcomer = f"peer{plan.num_peers}"
        swarm.start(newcomer, address)
        events.append(f"{newcomer} joined and syncs from donors")
        survivors = [n for n in swarm.processes if n not in swarm.killed]
        finished = swarm.wait_for(
            lambda: all(swarm.processes[n].poll() is not None for n in survivors),
            max(10.0, limit_s - (time.monotonic() - started)),
            refresh,
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
    return _summarize(run_dir, plan, statuses, survivors, newcomer, started, sample_tokens)


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
    tokens = sum(int(s.get("tokens_trained", 0) or 0) for s in statuses.values())
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
        peers_joined=1,
        bytes_on_wire=bytes_on_wire,
        bytes_per_token=bytes_on_wire / max(1, tokens),
        seconds_lost_to_failures=max(
            float(s.get("stall_s", 0.0) or 0.0) for s in statuses.values()
        ),
        time_to_productive_s=statuses[newcomer].get("time_to_productive_s"),
        final_weights_agree=len(final_losses) == 1,
        plan=asdict(plan),
    )
