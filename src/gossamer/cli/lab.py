"""`gossamer lab`: build and drive a rehearsal swarm on this machine."""

from __future__ import annotations

import json
import logging
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from gossamer.cli.errors import one_red_line, stop_signals_as_ctrl_c
from gossamer.cli.preflight import expand_home, positive_seconds
from gossamer.lab import (
    LATENCY_NOTICE,
    LabConfig,
    attach_lab,
    format_rate,
    lab_down,
    lab_status,
    lab_up,
    load_schedule,
    measure_tcp_throughput,
    parse_rate,
    parse_rates,
    play_schedule,
)
from gossamer.lab.control import LabControl
from gossamer.lab.faults import (
    AppliedFault,
    check_schedule,
    fault_log_writer,
    faults_in_force,
    schedule_text,
)
from gossamer.lab.state import DEFAULT_STATE_DIR, LabState

app = typer.Typer(
    help="Rehearse a swarm on one machine: namespaces, capped links, NAT, faults.",
    no_args_is_help=True,
)

NameOption = Annotated[
    str, typer.Option("--name", help="The lab's name (a-z, 0-9); namespaces are gsl-NAME-*.")
]
StateDirOption = Annotated[
    Path,
    typer.Option("--state-dir", help="Where labs are recorded.", hidden=True, callback=expand_home),
]


def _name_flag(name: str) -> str:
    """`` --name NAME`` for the commands a message suggests, empty for the default lab."""
    return "" if name == "lab" else f" --name {name}"


@app.callback()
def _configure_logging() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def _print_peers(state: LabState) -> None:
    typer.echo(f"{'peer':<6}{'namespace':<22}{'address':<16}{'public':<16}{'rate':<10}nat  link")
    for record in state.peer_records():
        typer.echo(
            f"{record['name']:<6}{record['namespace']:<22}{record['address']:<16}"
            f"{record['public_address']:<16}{format_rate(record['rate_bps']):<10}"
            f"{'yes' if record['behind_nat'] else 'no':<5}{record['link']}"
            + (" (partitioned)" if record["partitioned"] else "")
        )


@app.command()
def up(
    peers: Annotated[int, typer.Option("--peers", help="How many peers (1-64).")],
    rate: Annotated[str, typer.Option("--rate", help="Every peer's link rate.")] = "100mbit",
    rates: Annotated[
        str | None, typer.Option("--rates", help="One rate per peer: 10mbit,100mbit,...")
    ] = None,
    nat: Annotated[
        int, typer.Option("--nat", help="How many peers (the last) sit behind NAT.")
    ] = 0,
    name: NameOption = "lab",
    state_dir: StateDirOption = DEFAULT_STATE_DIR,
) -> None:
    """Build a lab: a namespace per peer, a bridge, tbf-capped links, NAT for the last K peers."""
    with one_red_line(), stop_signals_as_ctrl_c():  # (SIGTERM left a half-built lab)
        config = LabConfig(
            num_peers=peers,
            rate_bps=parse_rate(rate, key="--rate"),
            peer_rates_bps=parse_rates(rates, key="--rates") if rates else (),
            num_nat=nat,
            name=name,
        )
        control = lab_up(config, state_dir=state_dir)
        _print_peers(control.state)
        typer.secho(f"note: {LATENCY_NOTICE}", fg=typer.colors.YELLOW)
        named = _name_flag(name)
        typer.echo(
            f"run `gossamer lab exec{named} p0 -- CMD` to use it; "
            f"`gossamer lab down{named}` to remove it"
        )


@app.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document on stdout.")] = False,
    state_dir: StateDirOption = DEFAULT_STATE_DIR,
) -> None:
    """Show every lab on this machine: its peers, addresses, rates, NAT and link state."""
    with one_red_line():
        report = lab_status(state_dir=state_dir)
    if as_json:
        labs = [
            {
                "name": item.name,
                "healthy": item.healthy,
                "namespaces": list(item.existing_namespaces),
                "missing_namespaces": item.missing_namespaces,
                "peers": item.state.peer_records() if item.state else [],
                "latency_emulated": False,
            }
            for item in report
        ]
        typer.echo(json.dumps({"labs": labs}, indent=2))
        return
    if not report:
        typer.echo("no lab is up")
    for item in report:
        health = (
            "up"
            if item.healthy
            else f"BROKEN: run `gossamer lab down --name {item.name}` to clean up"
        )
        typer.echo(f"lab {item.name}: {health}")
        if item.state is not None:
            _print_peers(item.state)
        if item.missing_namespaces:
            typer.echo(f"missing namespaces: {', '.join(item.missing_namespaces)}")


@app.command()
def down(
    name: NameOption = "lab",
    every_lab: Annotated[
        bool,
        typer.Option(
            "--all", help="Every lab on this machine (benchmarks' and other users' included)."
        ),
    ] = False,
    state_dir: StateDirOption = DEFAULT_STATE_DIR,
) -> None:
    """Remove a lab: its processes, namespaces, links, qdiscs and rules; nothing else."""
    with one_red_line():
        removed = lab_down(None if every_lab else name, state_dir=state_dir)
    typer.echo(
        f"removed {len(removed)} namespaces" + (f": {', '.join(removed)}" if removed else "")
    )


@app.command("exec", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def exec_in_peer(
    peer: Annotated[str, typer.Argument(help="The peer, e.g. p0.")],
    command: Annotated[list[str], typer.Argument(help="The command, after --.")],
    name: NameOption = "lab",
    state_dir: StateDirOption = DEFAULT_STATE_DIR,
) -> None:
    """Run a command inside a peer's namespace: `gossamer lab exec p0 -- ip addr`."""
    with one_red_line():
        process = attach_lab(name, state_dir=state_dir).spawn_in(peer, command)
    with stop_signals_as_ctrl_c():  # (SIGTERM or SIGHUP left the command running)
        try:
            code = process.wait()
        except KeyboardInterrupt:  # (a second signal is ignored while the command stops)
            process.terminate()
            try:
                code = process.wait(timeout=10.0)
            except subprocess.TimeoutExpired:  # it ignores SIGTERM
                process.kill()
                code = process.wait(timeout=10.0)
    raise typer.Exit(code if code >= 0 else 128 - code)  # (killed by signal N: 128 + N)


@app.command()
def iperf(
    sender: Annotated[str, typer.Argument(help="The sending peer.")],
    receiver: Annotated[str, typer.Argument(help="The receiving peer.")],
    duration_s: Annotated[
        float,
        typer.Option("--duration-s", help="Seconds measured.", callback=positive_seconds),
    ] = 5.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    name: NameOption = "lab",
    state_dir: StateDirOption = DEFAULT_STATE_DIR,
) -> None:
    """Measure TCP throughput from one peer to another with iperf3."""
    with one_red_line():
        control = attach_lab(name, state_dir=state_dir)
        result = measure_tcp_throughput(control, sender, receiver, duration_s=duration_s)
    if as_json:
        typer.echo(json.dumps(result.to_json(), indent=2))
        return
    typer.echo(
        f"{sender} -> {receiver}: {result.bits_per_second / 1e6:.2f} Mbit/s over "
        f"{result.duration_s:.1f} s = {100 * result.share_of_bottleneck:.1f}% of the "
        f"{format_rate(result.bottleneck_bps)} bottleneck (TCP payload; headers take ~4.4%)"
    )


def _echo_applied(log_path: Path | None) -> Callable[[AppliedFault], None]:
    write = fault_log_writer(log_path) if log_path else None

    def echo(record: AppliedFault) -> None:
        outcome = "ok" if record.ok else f"FAILED: {record.detail}"
        typer.echo(
            f"{record.applied_at_s:8.3f} s  {record.fault.describe():<28} "
            f"planned {record.fault.at_s:.3f} s ({record.late_s:+.3f} s)  {outcome}"
        )
        if write is not None:
            write(record)

    return echo


def _say_what_is_in_force(control: LabControl, applied: list[AppliedFault], name: str) -> None:
    """After a schedule stopped part way: what it left in force, and the schedule that undoes it."""
    undo = faults_in_force(control, applied)
    if not undo:
        typer.echo("stopped; nothing the schedule did is left in force", err=True)
        return
    typer.secho(
        "stopped with faults in force; to undo them, save this as undo.toml and run "
        f"`gossamer lab faults{_name_flag(name)} undo.toml`:",
        fg=typer.colors.YELLOW,
        err=True,
    )
    typer.echo(schedule_text(undo), err=True, nl=False)


@app.command()
def faults(
    schedule: Annotated[
        Path, typer.Argument(help=r"A TOML file of \[\[fault]] tables.", callback=expand_home)
    ],
    log: Annotated[
        Path | None,
        typer.Option(
            "--log",
            help="Append each applied fault here as JSON lines.",
            callback=expand_home,
        ),
    ] = None,
    name: NameOption = "lab",
    state_dir: StateDirOption = DEFAULT_STATE_DIR,
) -> None:
    """Play a fault schedule against a running lab, printing each action with its time."""
    with one_red_line():
        faults_to_play = load_schedule(schedule)  # a bad file is refused before the lab is needed
        control = attach_lab(name, state_dir=state_dir)
        check_schedule(control, faults_to_play)
        echo = _echo_applied(log)
        applied: list[AppliedFault] = []

        def record(fault: AppliedFault) -> None:
            applied.append(fault)
            echo(fault)

        with stop_signals_as_ctrl_c():
            try:
                play_schedule(control, faults_to_play, on_applied=record)
            except KeyboardInterrupt:  # (a second signal is ignored while this is said)
                _say_what_is_in_force(control, applied, name)
                raise typer.Exit(130) from None
    failed = [record for record in applied if not record.ok]
    if failed:
        raise typer.Exit(1)
