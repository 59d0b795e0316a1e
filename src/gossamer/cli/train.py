"""`gossamer train`, `eval`, `sample`, `demo` and `config`: one-peer training from the shell."""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.live import Live
from rich.table import Table

from gossamer.cli.errors import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    exit_on_gossamer_errors,
    keys_named_by_flags,
    pause_on_stop_signals,
)
from gossamer.cli.flags import command_flags, load_flagged_config
from gossamer.cli.output import stdout_console
from gossamer.cli.preflight import (
    MAX_PORT,
    check_fits_in_memory,
    check_output_file,
    check_output_folder,
    expand_home,
    non_negative_finite_float,
    positive_seconds,
    serve_metrics_or_explain,
)
from gossamer.cli.progress import RichProgressListener
from gossamer.core.config import RunConfig
from gossamer.core.config_loader import (
    config_to_dict,
    describe_fields,
)
from gossamer.core.errors import ConfigError, DataError, GossamerError
from gossamer.core.runtime import freeze_startup_heap
from gossamer.core.stop import StopRequest
from gossamer.data import load_corpus, validation_batches
from gossamer.data.corpus import check_data_path
from gossamer.obs.metrics import PeerMetrics
from gossamer.obs.trace import SpanRecorder
from gossamer.store.lease import IN_USE_NAME, directory_lease
from gossamer.train import Trainer, TrainResult
from gossamer.train.demo import run_demo
from gossamer.train.demo_swarm import run_swarm_demo
from gossamer.train.inference import LoadedModel, load_model, mean_validation_loss, sample_text
from gossamer.train.swarm import run_swarm_peer

_OVERRIDES = {"allow_extra_args": True, "ignore_unknown_options": True}
_SWARM_NODE_KEYS = {"net.listen_address": "swarm.listen", "net.bootstrap": "swarm.bootstrap"}
"""The run config's keys for the node settings a swarm peer's errors name."""

config_app = typer.Typer(help="Inspect configs: every key, and the resolved config of a run.")

ConfigFile = Annotated[
    Path | None,
    typer.Option(
        "--config", "-c", help="A TOML config file.", show_default=False, callback=expand_home
    ),
]


def _load(ctx: typer.Context, config: Path | None) -> RunConfig:
    return load_flagged_config(config, command_flags(ctx))


def _to_toml(data: dict[str, Any], prefix: str = "") -> str:
    scalars = [(k, v) for k, v in data.items() if not isinstance(v, dict)]
    tables = [(k, v) for k, v in data.items() if isinstance(v, dict)]
    lines = [f"[{prefix}]"] if prefix and scalars else []
    for key, value in scalars:
        if isinstance(value, str) and not value.isascii() and _not_utf_8(value):
            raise ConfigError(
                f"{prefix + '.' if prefix else ''}{key}: {value!r} holds bytes that are not UTF-8, "
                "which TOML cannot hold: `config show` cannot print it (a run takes it)"
            )
    lines += [f"{k} = {json.dumps(v)}" for k, v in scalars if v is not None]
    out = "\n".join(lines)
    for key, value in tables:
        out += ("\n\n" if out else "") + _to_toml(value, f"{prefix}.{key}" if prefix else key)
    return out


def _not_utf_8(text: str) -> bool:
    """Whether ``text`` holds bytes Python decoded with ``surrogateescape`` (a file name)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


@contextlib.contextmanager
def _removed_if_it_never_listens(
    config: RunConfig, listening: Callable[[], bool]
) -> Iterator[None]:
    """Hold the run's checkpoint folder for the block; where the block fails before the peer
    listens (a port in use), remove what this process made there: its new key file, and the
    folder with its lease file where the folder is new and holds nothing else.

    What is this process's is decided while it holds the folder: decided before, a second run
    given the same new folder, failing on the first's lease, removed the first's key, lease
    file and folder as it trained. A failure on the lease itself removes nothing.

    Raises:
        ConfigError: another process holds the folder.
    """
    directory = Path(config.checkpoint.directory)
    folder_is_new = not directory.exists()
    remove_folder = False
    try:
        with directory_lease(directory):  # (the peer's own lease shares this one)
            key = Path(os.path.expanduser(config.swarm.key_file or directory / "peer.key"))
            key_is_new = not key.exists()
            try:
                yield
            except BaseException:
                if not listening():
                    if key_is_new:
                        _remove_unless_held(key)
                    if folder_is_new and _holds_only_its_lease(directory):
                        with contextlib.suppress(OSError):  # (removed under the lease)
                            (directory / IN_USE_NAME).unlink()
                        remove_folder = True
                raise
    finally:
        if remove_folder:
            with contextlib.suppress(OSError):  # (not empty: another process is in it now)
                directory.rmdir()


def _remove_unless_held(key: Path) -> None:
    """Remove the key file ``key`` unless another process holds it (a ``swarm.key_file``
    outside the folder, made and held by another peer meanwhile)."""
    with contextlib.suppress(OSError):
        fd = os.open(key, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # (OSError where it is held)
            key.unlink()
        finally:
            os.close(fd)


def _holds_only_its_lease(directory: Path) -> bool:
    """Whether the lease file is all ``directory`` holds."""
    try:
        return {entry.name for entry in directory.iterdir()} <= {IN_USE_NAME}
    except OSError:
        return False


def register(app: typer.Typer) -> None:
    """Add the training commands to the root command."""
    app.command(context_settings=_OVERRIDES)(train)
    app.command(name="eval", context_settings=_OVERRIDES)(evaluate)
    app.command()(sample)
    app.command()(demo)
    app.add_typer(config_app, name="config")


def train(
    ctx: typer.Context,
    config: ConfigFile = None,
    summary_json: Annotated[
        Path | None,
        typer.Option(help="Also write the run's summary as JSON here.", callback=expand_home),
    ] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            help="Serve Prometheus /metrics on this port (0: any free one).", min=0, max=MAX_PORT
        ),
    ] = None,
    metrics_host: Annotated[str, typer.Option(help="Address for /metrics.")] = "127.0.0.1",
    trace: Annotated[
        Path | None,
        typer.Option(
            help="Append spans to this JSON-lines file (see `gossamer trace export`).",
            callback=expand_home,
        ),
    ] = None,
    bootstrap: Annotated[
        list[str] | None,
        typer.Option(help="A peer of the swarm to join, [PEER_ID@]HOST:PORT (repeatable)."),
    ] = None,
) -> None:
    """Train on this peer. Any config key is a flag: --train.max-steps 100 --model.width 256.

    Resumes from the newest valid checkpoint in checkpoint.directory unless
    --checkpoint.resume false. `gossamer config keys` lists every key.
    """
    with exit_on_gossamer_errors(), contextlib.ExitStack() as stack:
        overrides = command_flags(ctx)
        named_by: dict[str, str] = {}
        if bootstrap:  # with --swarm.bootstrap too: every peer named by either (one was lost)
            given = [value for key, value in overrides if key == "swarm.bootstrap"]
            overrides = [(key, value) for key, value in overrides if key != "swarm.bootstrap"]
            overrides.append(("swarm.bootstrap", ",".join([*given, *bootstrap])))
            named_by["swarm.bootstrap"] = (
                "flags --swarm.bootstrap and --bootstrap" if given else "flag --bootstrap"
            )
        run_config = load_flagged_config(config, overrides, named_by=named_by)
        _check_swarm_keys_are_used(run_config)
        check_fits_in_memory(run_config)
        _check_train_paths(run_config, summary_json, trace)
        metrics = PeerMetrics() if metrics_port is not None else None
        metrics_url: str | None = None
        if metrics is not None and metrics_port is not None:
            server = serve_metrics_or_explain(
                metrics.registry, host=metrics_host, port=metrics_port
            )
            stack.callback(server.close)
            metrics_url = server.url
            stdout_console().print(f"metrics at {metrics_url}")
        spans = SpanRecorder(peer=run_config.name, path=trace)
        stack.callback(spans.close)
        listener = stack.enter_context(RichProgressListener())
        stop = StopRequest()
        stack.enter_context(
            pause_on_stop_signals(
                stop,
                lambda name: listener.console.print(
                    f"{name}: stopping after this step, with a checkpoint (again to stop at once)"
                ),
            )
        )
        freeze_startup_heap()  # a long-running peer: start-up's objects out of every collection
        if run_config.swarm.strategy == "local":
            trainer = stack.enter_context(
                Trainer(run_config, listener=listener, spans=spans, metrics=metrics, stop=stop)
            )
            result = trainer.run()
        else:
            # (net's keys named: "net.listen_address" for a port in use, "net.bootstrap" for a
            # malformed peer id, which are not keys of this command's config)
            listening = False

            def on_address(address: str) -> None:
                nonlocal listening
                listening = True
                # (plain: rich wrapped the line where stdout is no terminal, and scripts
                # looking for it found half an address)
                typer.echo(f"peer address: {address}")

            # (a port in use left a new key behind, and its folder)
            with (
                _removed_if_it_never_listens(run_config, lambda: listening),
                keys_named_by_flags(_SWARM_NODE_KEYS),
            ):
                result = run_swarm_peer(
                    run_config,
                    listener=listener,
                    spans=spans,
                    metrics=metrics,
                    metrics_url=metrics_url,
                    on_address=on_address,
                    stop=stop,
                ).result
    written = _print_summary(result, summary_json)
    if result.interrupted:
        with contextlib.suppress(OSError):
            sys.stderr.write(
                f"interrupted at step {result.steps_done}; checkpoint "
                f"{result.checkpoint_path}; run the same command to resume\n"
            )
        raise typer.Exit(EXIT_INTERRUPTED)
    if not written:
        raise typer.Exit(EXIT_FAILED)


def _check_swarm_keys_are_used(run_config: RunConfig) -> None:
    """Refuse ``swarm.*`` settings that a run training alone would ignore (a status file never
    written, a listen address never bound, a codec never used), as ``swarm.bootstrap`` is.

    (Checked here, not in :class:`SwarmConfig`: a benchmark sets DiLoCo's outer optimizer
    through ``swarm.*`` keys and runs its strategies itself.)

    Raises:
        ConfigError: the strategy is ``local`` and a ``swarm.*`` key is set.
    """
    keys = run_config.swarm.keys_changed()
    if run_config.swarm.strategy != "local" or not keys:
        return
    one = len(keys) == 1
    raise ConfigError(
        f"{', '.join(keys)} {'is' if one else 'are'} set but swarm.strategy is 'local' (training "
        "alone), which uses no swarm.* setting: set swarm.strategy to 'sync' or 'diloco' to "
        f"train with a swarm, or leave {'it' if one else 'them'} out"
    )


def _check_train_paths(
    run_config: RunConfig, summary_json: Path | None, trace: Path | None
) -> None:
    """Refuse paths the run could not write before it trains, not after."""
    if summary_json is not None:
        check_output_file(summary_json, "--summary-json")
    if trace is not None:
        check_output_file(trace, "--trace")
    check_output_folder(Path(run_config.checkpoint.directory), "checkpoint.directory")
    if run_config.swarm.status_file:
        check_output_file(Path(run_config.swarm.status_file), "swarm.status_file")
    # (a swarm peer found it missing only after its node had started and written its key)
    check_data_path(run_config.data)


def _load_checkpoint(checkpoint: Path) -> LoadedModel:
    if checkpoint.exists() and not checkpoint.is_dir():
        raise ConfigError(
            f"--checkpoint: {checkpoint} is a file; pass a checkpoint folder (step-NNNNNNNNN) "
            "or the run's checkpoint.directory"
        )
    return load_model(checkpoint)


def _write_summary(path: Path, write: Callable[[Path], object]) -> bool:
    """Write a finished run's summary to ``path`` with ``write``; False, said in one line,
    where it cannot be (the disk filled up, the folder went away while the run trained: the
    run's work is kept, and a traceback hid it)."""
    try:
        write(path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            sys.stderr.write(
                f"error: --summary-json: cannot write {path} ({exc.strerror or exc}); the run "
                "itself finished, with its checkpoint\n"
            )
        return False
    return True


def _print_summary(result: TrainResult, summary_json: Path | None) -> bool:
    """Print the run's summary line, and write it to ``summary_json`` if given.

    Returns:
        False where the summary file could not be written (said on stderr).
    """
    measured = math.isfinite(result.val_loss_after)  # (an interrupted run measures none)
    summary = {
        "steps": result.steps_done,
        "start_step": result.start_step,
        "tokens_trained": result.tokens_trained,
        "tokens_per_s": round(result.tokens_per_s, 1),
        "seconds": round(result.wall_seconds, 2),
        "val_loss_before": result.val_loss_before,
        "val_loss_after": result.val_loss_after if measured else None,
        "checkpoint_path": str(result.checkpoint_path),
        "resumed_from": str(result.resumed_from) if result.resumed_from else None,
        "stopped_by_time_budget": result.stopped_by_time_budget,
        "interrupted": result.interrupted,
    }
    written = True
    if summary_json is not None:  # (first: the terminal may be gone, a SIGHUP's cause)
        text = json.dumps(summary, indent=2) + "\n"
        written = _write_summary(summary_json, lambda path: path.write_text(text))
    after = f"{result.val_loss_after:.4f}" if measured else "(not measured at the stop)"
    with contextlib.suppress(OSError):
        stdout_console().print(
            f"validation loss {result.val_loss_before:.4f} -> {after}; "
            f"{result.tokens_per_s:,.0f} tokens/s; checkpoint {result.checkpoint_path}"
        )
    return written


_EVAL_KEYS = frozenset({"train.batch_size", "train.eval_batches"})
"""The keys other than ``data.*`` an evaluation reads from its flags."""


def evaluate(
    ctx: typer.Context,
    checkpoint: Annotated[
        Path,
        typer.Option(help="A checkpoint folder, or a run's directory.", callback=expand_home),
    ],
    batches: Annotated[
        int | None,
        typer.Option(
            help="Validation batches of 16 sequences to average over (default: the "
            "checkpoint's train.eval_batches, as training measured it).",
            min=1,
        ),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Validation loss of a checkpoint, on the data it was trained on (or --data.* flags)."""
    with exit_on_gossamer_errors():
        overrides = command_flags(ctx)
        for key, _ in overrides:
            if key.startswith("model."):
                raise ConfigError(
                    f"eval: --{key} cannot be changed: the model's shape is the checkpoint's; "
                    "drop the flag (--data.* and --train.batch_size may be changed)"
                )
            if not key.startswith("data.") and key not in _EVAL_KEYS:
                # (taken and ignored before: `--train.max_steps 5` seemed to do something)
                raise ConfigError(
                    f"eval: --{key} does not change an evaluation; drop the flag (--data.*, "
                    "--train.batch_size and --train.eval_batches may be changed)"
                )
        loaded = _load_checkpoint(checkpoint)
        base = config_to_dict(loaded.config)
        data_keys = {key for key, _ in overrides if key.startswith("data.")}
        if "data.source" in data_keys and "data.path" not in data_keys:
            base["data"].pop("path", None)  # (another source: the checkpoint's path is not its)
        run_config = load_flagged_config(None, overrides, base=base)
        changed = [  # (dropout is not the shape, and eval uses none)
            name
            for name in ("num_layers", "num_heads", "width", "context", "vocab_size", "tie_weights")
            if getattr(run_config.model, name) != getattr(loaded.config.model, name)
        ]
        if changed:  # (flags are refused above; the environment is read in the loader)
            names = ", ".join(f"GOSSAMER_MODEL__{name.upper()}" for name in changed)
            raise ConfigError(
                f"eval: the environment changes the model ({names}) but the model's shape is "
                "the checkpoint's; unset it"
            )
        check_fits_in_memory(
            run_config, training=False, eval_batches=batches or run_config.train.eval_batches
        )
        try:
            corpus = load_corpus(run_config.data)
        except DataError as exc:
            path = run_config.data.path
            if (
                data_keys
                or not path
                or path != loaded.config.data.path  # (set in the environment)
                or Path(os.path.expanduser(path)).exists()  # (there, and wrong otherwise)
            ):
                raise
            raise DataError(
                f"data.path {run_config.data.path!r}, from the checkpoint's config (a path "
                "relative to where it trained), is not found from here; pass --data.path"
            ) from exc
        if not data_keys and loaded.data_sha256 not in (None, corpus.manifest.get("train_sha256")):
            sys.stderr.write(
                f"warning: the data at data.path {run_config.data.path!r} is not what "
                f"{loaded.path} trained on (its tokens' sha256 differs): its validation split may "
                "hold text the model trained on, and the loss not compare with training's\n"
            )
        loss = mean_validation_loss(
            loaded.model,
            validation_batches(
                corpus.validation,
                seq_len=run_config.model.context,
                batch_size=run_config.train.batch_size,
                num_batches=batches or run_config.train.eval_batches,
                vocab_size=run_config.model.vocab_size,
            ),
        )
    bits = loss / math.log(2)
    if json_output:
        result = {"checkpoint": str(loaded.path), "step": loaded.step, "val_loss": loss}
        typer.echo(json.dumps(result | {"bits_per_token": bits}))
    else:
        stdout_console().print(
            f"step {loaded.step}: validation loss {loss:.4f} ({bits:.3f} bits per token)"
        )


def sample(
    checkpoint: Annotated[
        Path,
        typer.Option(help="A checkpoint folder, or a run's directory.", callback=expand_home),
    ],
    prompt: Annotated[str, typer.Option(help="Text to continue.")] = "def ",
    tokens: Annotated[int, typer.Option(help="Bytes to generate.", min=0)] = 300,
    temperature: Annotated[
        float,
        typer.Option(
            help="Sampling temperature; 0 takes the likeliest byte every time.",
            callback=non_negative_finite_float,
        ),
    ] = 0.8,
    top_k: Annotated[
        int, typer.Option(help="Sample among the k likeliest; 0 for all.", min=0)
    ] = 40,
    seed: Annotated[int, typer.Option(help="Seed of the sampler.", min=0, max=2**63 - 1)] = 0,
) -> None:
    """Generate text from a checkpoint of the built-in model."""
    with exit_on_gossamer_errors():
        loaded = _load_checkpoint(checkpoint)
        if loaded.config.data.source == "tokens":
            raise ConfigError(
                f"sample: {loaded.path} was trained on token ids (data.source = 'tokens'); "
                "`gossamer sample` reads and writes text, with the byte-level models trained on "
                "data.source 'stdlib' or 'text'"
            )
        if loaded.config.model.vocab_size != 256:  # (text, with another model.vocab_size)
            raise ConfigError(
                f"sample: {loaded.path} has model.vocab_size = {loaded.config.model.vocab_size}; "
                "`gossamer sample` writes bytes, the 256 ids of a byte-level model (train one "
                "on text with model.vocab_size = 256)"
            )
        text = sample_text(
            loaded.model,
            prompt,
            num_tokens=tokens,
            temperature=temperature,
            top_k=top_k or None,
            seed=seed,
        )
    # (bytes of the prompt that are not UTF-8 go out as they came in)
    sys.stdout.buffer.write((prompt + text + "\n").encode("utf-8", "surrogateescape"))
    sys.stdout.buffer.flush()


def demo(
    summary_json: Annotated[
        Path | None,
        typer.Option(help="Also write the summary as JSON here.", callback=expand_home),
    ] = None,
    budget_s: Annotated[
        float,
        typer.Option(
            "--seconds", help="Training time budget in seconds.", callback=positive_seconds
        ),
    ] = 150.0,
    single: Annotated[
        bool, typer.Option("--single", help="One peer alone instead of a swarm.")
    ] = False,
    max_steps: Annotated[
        int, typer.Option(help="With --single: length of the learning-rate schedule.", min=1)
    ] = 1200,
    runs_dir: Annotated[
        Path, typer.Option(help="Where demo runs are kept.", callback=expand_home)
    ] = Path("runs"),
) -> None:
    """A local swarm trains the built-in GPT: one peer is killed, a newcomer syncs and joins.

    Three peer processes on loopback train with DiLoCo on the embedded corpus; partway one is
    killed with SIGKILL and a new one downloads the state from the donors. With --single, one
    peer trains alone.
    """
    if summary_json is not None:
        with exit_on_gossamer_errors():
            check_output_file(summary_json, "--summary-json")
    if single:
        _demo_single(summary_json, budget_s, max_steps, runs_dir)
        return
    progress = _ProgressLines()
    console = stdout_console()
    with exit_on_gossamer_errors(), Live(console=console, refresh_per_second=4) as live:

        def view(statuses: dict[str, dict[str, Any]], line: str) -> None:
            live.update(_swarm_table(statuses, line))
            if not console.is_terminal:  # (the live table shows only at the end there)
                text = progress.due(statuses, line, time.monotonic())
                if text is not None:
                    live.console.print(text, markup=False, highlight=False, soft_wrap=True)

        def announce(url: str) -> None:
            live.console.print(f"dashboard at {url} (open it while the demo runs)")

        try:
            summary = run_swarm_demo(
                budget_s=budget_s, runs_dir=runs_dir, view=view, on_dashboard=announce
            )
        except RuntimeError as exc:
            raise GossamerError(str(exc)) from exc
    if not console.is_terminal:  # (off a terminal the live table's last line has no end)
        console.line()
    table = Table(title="Gossamer demo: a swarm of peers on this machine", show_header=False)
    table.add_row(
        "validation loss", f"{summary.val_loss_before:.4f} -> {summary.val_loss_after:.4f}"
    )
    table.add_row(
        "peers",
        f"{summary.peers} ({summary.peers_killed} killed after {summary.killed_peer_rounds} "
        f"round{'' if summary.killed_peer_rounds == 1 else 's'} with the others, "
        f"{summary.peers_joined} joined)",
    )
    table.add_row("survivors' weights agree", "yes" if summary.final_weights_agree else "NO")
    table.add_row("tokens trained", f"{summary.tokens_trained:,}")
    table.add_row("tokens/s (swarm)", f"{summary.tokens_per_s:,.0f}")
    table.add_row(
        "bytes on the wire", f"{summary.bytes_on_wire:,} ({summary.bytes_per_token:.2f} per token)"
    )
    swarm_goodput = summary.goodput.get("swarm", {})
    table.add_row(
        "goodput (swarm)",
        f"{float(swarm_goodput.get('tokens_per_s', 0.0)):,.0f} kept tokens/s, "
        f"{100 * float(swarm_goodput.get('ratio', 0.0)):.0f}% of the peers' compute rate",
    )
    for name, peer in summary.goodput.get("peers", {}).items():
        table.add_row(
            f"  goodput {name}",
            f"{float(peer['tokens_per_s']):,.0f} tokens/s, {100 * float(peer['ratio']):.0f}%",
        )
    table.add_row("seconds lost to failures", f"{summary.seconds_lost_to_failures:.1f}")
    table.add_row("longest pause of a survivor", f"{summary.longest_pause_s:.1f} s")
    ttp = summary.time_to_productive_s
    table.add_row("newcomer productive after", "-" if ttp is None else f"{ttp:.1f} s")
    table.add_row("seconds", f"{summary.seconds:.1f}")
    table.add_row("checkpoint", summary.checkpoint_path)
    console.print(table)
    console.print(f"[bold]sample[/] (prompt {summary.sample_prompt!r}):")
    console.print(summary.sample_prompt + summary.sample, markup=False, highlight=False)
    if summary_json is not None:
        if not _write_summary(summary_json, summary.write_json):
            raise typer.Exit(EXIT_FAILED)
        console.print(f"summary written to {summary_json}")


PROGRESS_EVERY_S = 10.0
"""How often the demo prints a progress line where its output is no terminal (a pipe, a log
file): the live table is drawn there only at the end, and the demo said nothing for minutes."""


class _ProgressLines:
    """The demo's progress as plain lines: one when the swarm's state line changes (a peer
    killed, one joined), else one every :data:`PROGRESS_EVERY_S` seconds."""

    def __init__(self) -> None:
        self._last_line: str | None = None
        self._last_s = -math.inf

    def due(self, statuses: dict[str, dict[str, Any]], line: str, now_s: float) -> str | None:
        """The line to print now, or None."""
        if line == self._last_line and now_s - self._last_s < PROGRESS_EVERY_S:
            return None
        self._last_line, self._last_s = line, now_s
        peers = "; ".join(
            f"{name} {status.get('state', '?')} step {status.get('step', 0)}/"
            f"{status.get('max_steps', '?')}"
            + ("" if status.get("loss") is None else f" loss {float(status['loss']):.3f}")
            for name, status in statuses.items()
        )
        return f"swarm: {line}" + (f": {peers}" if peers else "")


def _swarm_table(statuses: dict[str, dict[str, Any]], line: str) -> Table:
    table = Table(title=f"swarm: {line}")
    for column in ("peer", "status", "step", "loss", "tokens/s", "bytes sent", "group"):
        table.add_column(column, justify="left" if column in ("peer", "status") else "right")
    for name, status in statuses.items():
        loss = status.get("loss")
        table.add_row(
            name,
            str(status.get("state", "?")),
            f"{status.get('step', 0)}/{status.get('max_steps', '?')}",
            "-" if loss is None else f"{float(loss):.3f}",
            f"{float(status.get('tokens_per_s', 0) or 0):,.0f}",
            f"{int(status.get('bytes_sent', 0) or 0):,}",
            str(status.get("group_size", 0)),
        )
    return table


def _demo_single(
    summary_json: Path | None, budget_s: float, max_steps: int, runs_dir: Path
) -> None:
    with exit_on_gossamer_errors(), RichProgressListener() as listener:
        summary = run_demo(
            budget_s=budget_s, max_steps=max_steps, runs_dir=runs_dir, listener=listener
        )
    table = Table(title="Gossamer demo: one peer", show_header=False)
    table.add_row(
        "validation loss", f"{summary.val_loss_before:.4f} -> {summary.val_loss_after:.4f}"
    )
    table.add_row("steps", str(summary.steps))
    table.add_row("tokens trained", f"{summary.tokens_trained:,}")
    table.add_row("tokens/s", f"{summary.tokens_per_s:,.0f}")
    table.add_row("seconds", f"{summary.seconds:.1f}")
    table.add_row("parameters", f"{summary.num_parameters:,}")
    table.add_row("checkpoint", summary.checkpoint_path)
    console = stdout_console()
    console.print(table)
    console.print(f"[bold]sample[/] (prompt {summary.sample_prompt!r}):")
    console.print(summary.sample_prompt + summary.sample, markup=False, highlight=False)
    if summary_json is not None:
        if not _write_summary(summary_json, summary.write_json):
            raise typer.Exit(EXIT_FAILED)
        console.print(f"summary written to {summary_json}")


@config_app.command("keys")
def config_keys() -> None:
    """List every config key with its type, default and meaning."""
    table = Table("key", "type", "default", "meaning")
    for info in describe_fields(RunConfig):
        table.add_row(info.key, info.type_name, repr(info.default), info.doc)
    stdout_console().print(table)


@config_app.command("show", context_settings=_OVERRIDES)
def config_show(ctx: typer.Context, config: ConfigFile = None) -> None:
    """Print the resolved config (file, environment and flags applied) as TOML."""
    with exit_on_gossamer_errors():
        resolved = _load(ctx, config)
        text = _to_toml(config_to_dict(resolved))
    tomllib.loads(text)  # what we print must load back
    typer.echo(text)
