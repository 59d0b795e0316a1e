"""`gossamer peer`, `gossamer peers` and `gossamer doctor`: run and inspect peers."""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from prometheus_client import CollectorRegistry

from gossamer.cli.errors import EXIT_INTERRUPTED, NODE_FLAGS, keys_named_by_flags, one_red_line
from gossamer.cli.output import stdout_console
from gossamer.cli.preflight import (
    MAX_PORT,
    check_output_file,
    expand_home,
    positive_seconds,
    read_swarm_secret,
    serve_metrics_or_explain,
)
from gossamer.core.config_loader import (
    MAX_CONFIG_FILE_BYTES,
    FileTooLargeError,
    NotARegularFileError,
    read_regular_file,
)
from gossamer.core.errors import ConfigError, GossamerError, PeerUnavailableError
from gossamer.core.runtime import freeze_startup_heap
from gossamer.net.addresses import host_of, ip_of, port_of
from gossamer.net.advertised_host import local_interface_addresses
from gossamer.net.bridge import NodeThread
from gossamer.net.config import (
    DhtConfig,
    HeartbeatConfig,
    LimitsConfig,
    NodeConfig,
    RelayConfig,
)
from gossamer.net.connections import DialTarget
from gossamer.net.identity import held_identity, load_or_create_identity
from gossamer.net.metrics import register_net_metrics
from gossamer.net.node import Node
from gossamer.net.status import node_status, write_status_file
from gossamer.obs.metrics import register_peer_info
from gossamer.proto import net_pb2

DEFAULT_KEY_FILE = Path("~/.gossamer/key.pem")

peer_app = typer.Typer(help="Run this machine's peer.", no_args_is_help=True)

ListenOption = Annotated[
    str, typer.Option("--listen", help="HOST:PORT to listen on (port 0 picks a free one).")
]
BootstrapOption = Annotated[
    list[str] | None,
    typer.Option("--bootstrap", help="A known peer, HOST:PORT or PEER_ID@HOST:PORT (repeatable)."),
]
SecretOption = Annotated[
    Path | None,
    typer.Option(
        "--swarm-secret-file",
        help="File with the private swarm's secret (>= 16 bytes).",
        callback=expand_home,
    ),
]
KeyOption = Annotated[
    Path,
    typer.Option(
        "--key-file",
        help="This peer's identity key (created on first run, 0600).",
        callback=expand_home,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _quiet_unless_verbose() -> None:
    """Log errors only (a one-shot command's answer is its output), unless --verbose asked for
    progress lines. (``basicConfig`` here did nothing: the root command configured logging
    first, and a bootstrap peer's warning came before the command's one-line error.)"""
    root = logging.getLogger()
    if root.level > logging.INFO:
        root.setLevel(logging.ERROR)


def _config(
    listen: str,
    bootstrap: list[str] | None,
    secret_file: Path | None,
    *,
    advertise: list[str] | None = None,
    record_ttl_s: float = 60.0,
    heartbeat_timeout_s: float = 2.5,
    refresh_interval_s: float = 5.0,
    relay_enabled: bool = True,
    relay_bytes_per_s: float = RelayConfig().bytes_per_s_per_peer,
) -> NodeConfig:
    with keys_named_by_flags(NODE_FLAGS):
        return NodeConfig(
            listen_address=listen,
            advertise_addresses=tuple(advertise or ()),
            bootstrap=tuple(bootstrap or ()),
            swarm_secret=read_swarm_secret(secret_file),
            dht=DhtConfig(
                record_ttl_s=record_ttl_s,
                # (renewed before other nodes drop it too: a TTL over their limit's asked for
                # an interval past it, refused under a key no flag sets)
                republish_interval_s=min(record_ttl_s, LimitsConfig().max_stored_ttl_s) / 3,
                refresh_interval_s=refresh_interval_s,
            ),
            heartbeat=HeartbeatConfig(
                interval_s=min(0.5, heartbeat_timeout_s / 3), timeout_s=heartbeat_timeout_s
            ),
            relay=RelayConfig(serve=relay_enabled, bytes_per_s_per_peer=relay_bytes_per_s),
        )


def _human_bytes(num: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if num < 1024 or unit == "TiB":
            return f"{num:.0f} {unit}" if unit == "B" else f"{num:.1f} {unit}"
        num /= 1024
    return f"{num}"


def _print_peers(rows: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
        return
    from rich.table import Table

    table = Table(title=f"{len(rows)} peers")
    for column in (
        "peer id",
        "address",
        "reachability",
        "CPU / GPU",
        "memory",
        "bandwidth",
        "last seen",
    ):
        table.add_column(column)
    for row in sorted(rows, key=lambda r: r["peer_id"]):
        caps = row["capabilities"]
        via = ", ".join(r["peer_id"][:12] for r in row["relays"])
        bandwidth = caps["measured_bandwidth_bytes_per_s"]
        table.add_row(
            row["peer_id"][:16],
            ", ".join(row["addresses"]) or "-",
            row["reachability"] + (f" via {via}" if via else ""),
            f"{caps['num_cpus']} CPU / {caps['num_gpus']} GPU",
            _human_bytes(caps["memory_bytes"]),
            f"{_human_bytes(bandwidth)}/s" if bandwidth else "-",
            f"{row['last_seen_s_ago']:.0f} s ago",
        )
    stdout_console().print(table)


@peer_app.command("start")
def peer_start(
    listen: ListenOption = "0.0.0.0:0",
    bootstrap: BootstrapOption = None,
    swarm_secret_file: SecretOption = None,
    key_file: KeyOption = DEFAULT_KEY_FILE,
    advertise: Annotated[
        list[str] | None, typer.Option("--advertise", help="HOST:PORT others should dial.")
    ] = None,
    status_file: Annotated[
        Path | None,
        typer.Option(
            "--status-file", help="Write this peer's view here as JSON.", callback=expand_home
        ),
    ] = None,
    record_ttl_s: Annotated[
        float,
        typer.Option(
            "--record-ttl-s",
            help="Lifetime of this peer's signed records.",
            callback=positive_seconds,
        ),
    ] = 60.0,
    refresh_interval_s: Annotated[
        float,
        typer.Option(
            "--refresh-interval-s",
            help="Seconds between DHT refreshes.",
            callback=positive_seconds,
        ),
    ] = 5.0,
    check_reachability: Annotated[
        bool, typer.Option(help="Ask peers to dial back at start.")
    ] = True,
    relay_enabled: Annotated[
        bool,
        typer.Option(
            "--relay-enabled/--no-relay-enabled",
            help="Relay for peers behind NAT when this peer is reachable.",
        ),
    ] = True,
    relay_bytes_per_s: Annotated[
        float,
        typer.Option("--relay-bytes-per-s", help="Relayed bandwidth cap per relayed peer."),
    ] = RelayConfig().bytes_per_s_per_peer,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            "--metrics-port",
            help="Serve Prometheus /metrics on this port (0: any free one).",
            min=0,
            max=MAX_PORT,
        ),
    ] = None,
    metrics_host: Annotated[
        str, typer.Option("--metrics-host", help="Address for /metrics.")
    ] = "127.0.0.1",
) -> None:
    """Run a long-lived peer until interrupted (Ctrl-C or SIGTERM)."""
    logging.getLogger().setLevel(logging.INFO)  # a long-lived peer logs its progress
    with one_red_line():
        if status_file is not None:
            check_output_file(status_file, "--status-file")  # before the peer is up, not after
        config = _config(  # before the identity: wrong input leaves no key file behind
            listen,
            bootstrap,
            swarm_secret_file,
            advertise=advertise,
            record_ttl_s=record_ttl_s,
            refresh_interval_s=refresh_interval_s,
            relay_enabled=relay_enabled,
            relay_bytes_per_s=relay_bytes_per_s,
        )
        freeze_startup_heap()  # a long-lived process: start-up's objects out of every collection
        stop = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
        key_path = Path(os.path.expanduser(key_file))
        new_key = not key_path.exists()
        with contextlib.ExitStack() as stack:
            # (held while it runs: two peers with one key file are one peer id)
            identity = stack.enter_context(held_identity(key_file, setting="--key-file"))
            thread = NodeThread(config, identity)
            try:
                with keys_named_by_flags(NODE_FLAGS):  # (a --listen port in use)
                    stack.enter_context(thread)
                if metrics_port is not None:
                    _serve_peer_metrics(stack, thread, metrics_host, metrics_port)
            except BaseException:
                if new_key:  # (removed while still held: a port in use left a new key behind)
                    with contextlib.suppress(OSError):
                        key_path.unlink()
                raise
            node = thread.node
            if check_reachability and config.bootstrap:
                thread.run(_reach, timeout_s=20.0)
            typer.echo(f"peer {node.peer_id} listening on {', '.join(node.addresses)}", err=False)
            next_check = time.monotonic() + 5.0
            while not stop.is_set():
                if check_reachability and time.monotonic() >= next_check:
                    # A first peer has nobody to ask at start: ask once others have joined.
                    next_check = time.monotonic() + 5.0
                    thread.run(_recheck_unknown, timeout_s=20.0)
                if status_file is not None:
                    status = thread.run(_status, timeout_s=5.0)
                    write_status_file(status_file, status)
                stop.wait(1.0)
        typer.echo(f"peer {identity.peer_id} stopped")
    raise typer.Exit(EXIT_INTERRUPTED)  # (only a signal stops it; exit 0 said it had finished)


def _serve_peer_metrics(
    stack: contextlib.ExitStack, thread: NodeThread, host: str, port: int
) -> None:
    """Serve the node's metrics until ``stack`` closes (before the node stops)."""
    registry = CollectorRegistry(auto_describe=True)  # (no training series: it trains nothing)
    register_peer_info(registry, thread.node.peer_id)
    collector = register_net_metrics(registry, thread)
    stack.callback(collector.close)
    server = serve_metrics_or_explain(registry, host=host, port=port)
    stack.callback(server.close)
    typer.echo(f"metrics at {server.url}")


async def _status(node: Node) -> dict[str, Any]:
    return node_status(node)


async def _reach(node: Node) -> None:
    """Find out whether others can dial this peer; if not, wait a little for a relay."""
    await node.settle_reachability()


async def _recheck_unknown(node: Node) -> None:
    if node.reachability == net_pb2.REACHABILITY_UNKNOWN and node.peers():
        await _reach(node)


@peer_app.command("id")
def peer_id(key_file: KeyOption = DEFAULT_KEY_FILE) -> None:
    """Print this peer's id (creating its key on first use)."""
    with one_red_line():
        typer.echo(load_or_create_identity(Path(os.path.expanduser(key_file))).peer_id)


def _transient_view(config: NodeConfig, wait_s: float, reachability: bool) -> dict[str, Any]:
    """Join with a throwaway identity, look around for ``wait_s``, and report what was seen."""
    config = dataclasses.replace(config, announce=False)

    async def look(node: Node) -> dict[str, Any]:
        if not node.peers():
            await _check_bootstrap_answers(node, config.bootstrap)
        if reachability:
            # Helpers wait 2 s on a dial back that NAT drops; asking them takes up to ~4 s.
            reachable = await node.check_reachability(timeout_s=4.0)
            if not reachable and node.reachability == net_pb2.REACHABILITY_RELAYED:
                await node.wait_for_relay(timeout_s=3.0)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            await node.dht.refresh()
        return node_status(node)

    with NodeThread(config) as thread:
        return thread.run(look, timeout_s=wait_s + 15.0)


async def _check_bootstrap_answers(node: Node, entries: tuple[str, ...]) -> None:
    """Raise, saying why, when none of the bootstrap peers answers (or is the pinned peer).

    Raises:
        PeerUnavailableError: no bootstrap peer could be dialed and authenticated.
    """
    reasons: list[str] = []
    for entry in entries:
        expected, _, address = entry.rpartition("@")
        try:
            await node.pool.dial(
                DialTarget(address), expected_peer_id=expected or None, timeout_s=5.0, keep=False
            )
        except GossamerError as exc:
            reasons.append(f"{entry}: {exc}")
        else:
            return
    if any("swarm secret" in reason for reason in reasons):
        hint = (
            "the swarm there is private: pass its secret with --swarm-secret-file (the file its "
            "peers were started with)"
        )
    else:
        hint = (
            "check --bootstrap: the address, that a peer runs there, and the peer id before @ "
            "if you pinned one"
        )
    raise PeerUnavailableError("no bootstrap peer answered (" + "; ".join(reasons) + "); " + hint)


def peers(
    bootstrap: BootstrapOption = None,
    swarm_secret_file: SecretOption = None,
    as_json: JsonOption = False,
    wait_s: Annotated[
        float,
        typer.Option("--wait-s", help="Seconds to look around.", callback=positive_seconds),
    ] = 2.0,
) -> None:
    """List the swarm's peers: id, address, reachability, capabilities, last seen."""
    _quiet_unless_verbose()
    with one_red_line():
        if not bootstrap:
            raise ConfigError("--bootstrap: name at least one peer of the swarm")
        config = _config("0.0.0.0:0", bootstrap, swarm_secret_file)
        status = _transient_view(config, wait_s, reachability=False)
        _print_peers(status["peers"], as_json)


def doctor(
    bootstrap: BootstrapOption = None,
    swarm_secret_file: SecretOption = None,
    listen: ListenOption = "0.0.0.0:0",
    status_file: Annotated[
        Path | None,
        typer.Option(
            "--status-file",
            help="A running peer's status file to diagnose.",
            callback=expand_home,
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Say whether this peer can be reached by others, whether it uses a relay, what to change."""
    _quiet_unless_verbose()
    with one_red_line():
        this_machine_only = False
        if status_file is not None:
            status = _read_status_file(status_file)
            if "reachability" not in status:  # a training peer's (`train --swarm.status-file`)
                _print_training_status(status, as_json)
                return
        elif bootstrap:
            config = _config(listen, bootstrap, swarm_secret_file)
            status = _transient_view(config, 1.0, reachability=True)
            this_machine_only = _only_this_machine(bootstrap)
            if port_of(listen) == 0:  # (a port picked for this run alone)
                status = {**status, "port": 0}
        else:
            raise ConfigError("doctor needs --bootstrap (peers to ask) or --status-file")
        verdict = _verdict(status, asked_this_machine_only=this_machine_only)
        if as_json:
            typer.echo(json.dumps({**verdict, "peer_id": status["peer_id"]}, indent=1))
        else:
            typer.echo(f"peer {status['peer_id']}")
            reachable = verdict["reachable"]
            typer.echo(f"reachable directly: {'unknown' if reachable is None else reachable}")
            typer.echo(f"relayed: {verdict['relayed']}")
            typer.echo(f"known peers: {len(status['peers'])}")
            typer.echo(verdict["advice"])


_STATUS_FIELDS: dict[str, type] = {
    "peer_id": str,
    "reachability": str,
    "addresses": list,
    "relays": list,
    "peers": list,
}


def _read_status_file(path: Path) -> dict[str, Any]:
    """A peer's status file (``peer start --status-file``), its fields checked.

    Raises:
        ConfigError: the file is missing, unreadable, not JSON, or not a peer's status.
    """
    option = f"--status-file {path}"
    hint = "give the file a running `gossamer peer start --status-file` writes"
    try:
        text = read_regular_file(path, max_bytes=MAX_CONFIG_FILE_BYTES).decode("utf-8")
    except NotARegularFileError as exc:  # (a fifo blocked the command for ever)
        raise ConfigError(f"{option}: not a regular file ({exc}); {hint}") from exc
    except FileNotFoundError as exc:
        raise ConfigError(f"{option}: no such file; {hint}") from exc
    except FileTooLargeError as exc:
        raise ConfigError(f"{option}: {exc}, far more than a peer's status; {hint}") from exc
    except IsADirectoryError as exc:
        raise ConfigError(f"{option}: a folder, not a regular file; {hint}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"{option}: cannot read it: {reason or exc}") from exc
    try:
        status = json.loads(text)
    except (ValueError, RecursionError) as exc:  # (nested too deep; an integer too long)
        reason = (
            str(exc)
            if isinstance(exc, json.JSONDecodeError)
            else "nested too deeply"
            if isinstance(exc, RecursionError)
            else "a number too long"
        )
        raise ConfigError(
            f"{option}: not JSON ({reason}); give the file `gossamer peer start --status-file` "
            "writes"
        ) from exc
    if not isinstance(status, dict):
        raise ConfigError(f"{option}: not a peer's status (a JSON object is expected)")
    if _is_training_status(status):
        _check_training_fields(status, option)
        return status
    for key, kind in _STATUS_FIELDS.items():
        if not isinstance(status.get(key), kind):
            raise ConfigError(
                f"{option}: not a peer's status: {key!r} is missing or not a {kind.__name__}; "
                "give the file `gossamer peer start --status-file` writes"
            )
    if not all(isinstance(address, str) for address in status["addresses"]):
        raise ConfigError(f"{option}: not a peer's status: an address is not a string")
    for relay in status["relays"]:
        if not (
            isinstance(relay, dict)
            and isinstance(relay.get("peer_id"), str)
            and isinstance(relay.get("address"), str)
        ):
            raise ConfigError(f"{option}: not a peer's status: a relay is not {{peer_id, address}}")
    return status


_TRAINING_FIELDS: dict[str, type] = {"peer_id": str, "state": str, "step": int}
"""What marks a training peer's status file (``train --swarm.status-file``): it holds the run's
progress, not the node's reachability (``peer start --status-file``'s)."""


def _is_training_status(status: dict[str, Any]) -> bool:
    """Whether ``status`` is a training peer's status file rather than a standing peer's."""
    return "reachability" not in status and all(
        isinstance(status.get(key), kind) for key, kind in _TRAINING_FIELDS.items()
    )


_TRAINING_SHOWN: dict[str, tuple[type, ...]] = {
    "max_steps": (int,),
    "outer_step": (int,),
    "group_size": (int,),
    "loss": (int, float),
    "address": (str,),
}
"""The types of the training status fields doctor shows besides those of ``_TRAINING_FIELDS``
(each may be missing or null)."""


def _check_training_fields(status: dict[str, Any], option: str) -> None:
    """Refuse a training peer's status whose shown fields have the wrong types (doctor printed
    ``step 3/{'a': [1]}``).

    Raises:
        ConfigError: a field is neither null nor of its type.
    """
    for key, kinds in _TRAINING_SHOWN.items():
        value = status.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, kinds)):
            raise ConfigError(
                f"{option}: not a training peer's status: {key!r} is not "
                f"{' or '.join(kind.__name__ for kind in kinds)}; give the file "
                "`gossamer train --swarm.status-file` writes"
            )


def _print_training_status(status: dict[str, Any], as_json: bool) -> None:
    """What doctor can say from a training peer's status file: the run's state and its swarm
    round, and how to learn its reachability (the file does not hold it; doctor refused it as
    "not a peer's status" although the README's swarm line writes it)."""
    address = status.get("address")
    ask = (
        f"gossamer doctor --bootstrap {address}"
        if isinstance(address, str)
        else "gossamer doctor --bootstrap PEER_ID@HOST:PORT"
    )
    advice = (
        "a training peer's status (gossamer train --swarm.status-file) holds its progress, not "
        f"whether others reach it: for that, ask the swarm from another machine: {ask}"
    )
    fields = {
        key: status.get(key)
        for key in ("state", "step", "max_steps", "outer_step", "group_size", "loss", "address")
    }
    if as_json:
        typer.echo(json.dumps({"peer_id": status["peer_id"], **fields, "advice": advice}, indent=1))
        return
    typer.echo(f"peer {status['peer_id']} (training)")
    steps = f"{fields['step']}/{fields['max_steps']}" if fields["max_steps"] else fields["step"]
    typer.echo(f"state: {fields['state']}, step {steps}")
    if fields["outer_step"] is not None:
        typer.echo(f"outer step: {fields['outer_step']}, group size: {fields['group_size']}")
    if address is not None:
        typer.echo(f"address: {address}")
    typer.echo(advice)


def _only_this_machine(bootstrap: list[str]) -> bool:
    """Whether every ``--bootstrap`` entry is on this machine (loopback, or one of its interface
    addresses): a peer does not dial back a caller that reached it over loopback (its ports
    there are the peer's machine's), and a dial back from this machine says nothing of other
    machines, so doctor's reachability from here tells nothing."""
    own: set[ipaddress.IPv4Address | ipaddress.IPv6Address] | None = None

    def on_this_machine(entry: str) -> bool:
        nonlocal own
        host = host_of(entry)
        if host == "localhost":
            return True
        address = ip_of(host)
        if address is None:  # (a name: where it leads is not looked up)
            return False
        if address.is_loopback or address.is_unspecified:
            return True
        if own is None:
            own = {ip for a in local_interface_addresses() if (ip := ip_of(a)) is not None}
        return address in own

    return bool(bootstrap) and all(on_this_machine(entry) for entry in bootstrap)


_FIXED_PORT_ADVICE = (
    "run the peer on a fixed port (gossamer peer start --listen 0.0.0.0:7100, or gossamer train "
    "--swarm.listen 0.0.0.0:7100), forward that TCP port on your router, and start `peer start` "
    "with --advertise PUBLIC_IP:7100"
)


def _verdict(status: dict[str, Any], *, asked_this_machine_only: bool = False) -> dict[str, Any]:
    """Whether others reach the peer of ``status``, and what to change.

    Args:
        status: the peer's view (``node_status``'s, or a status file's).
        asked_this_machine_only: the peers asked are all on this machine, so no dial back (or
            none, over loopback) could prove anything: reachability is then reported as unknown.
    """
    reachability = status["reachability"]
    relays = status.get("relays", [])
    port = status.get("port", 0)
    # (doctor's own port is random unless --listen fixed it: forwarding it helps nobody)
    forward = f"open TCP port {port} (forward it on your router)" if port else _FIXED_PORT_ADVICE
    if asked_this_machine_only:  # (a dial back from this machine came through: "direct")
        reachability = "unknown"
        advice = (
            "cannot tell from here: the only peers asked are on this machine, whose dial back "
            "says nothing of other machines (and over loopback a peer does not dial back). Ask "
            "a peer on another machine: gossamer doctor --bootstrap PEER_ID@OTHER_HOST:PORT"
        )
    elif reachability == "direct":
        advice = f"fine: others reach this peer directly at {', '.join(status['addresses'])}"
    elif relays:
        via = ", ".join(f"{r['peer_id'][:12]} ({r['address']})" for r in relays)
        advice = f"fine: relayed through {via}. For direct connections, {forward}"
        if port:
            advice += " and pass --advertise PUBLIC_IP:PORT to `gossamer peer start`"
    elif reachability == "relayed":
        advice = (
            f"not reachable and no relay yet: {forward}; or make sure some reachable peer "
            "relays (it does unless it opted out)"
        )
    else:
        advice = "unknown: no peer answered a dial-back request; check --bootstrap"
    return {
        "reachable": None if reachability == "unknown" else reachability == "direct",
        "relayed": bool(relays),
        "reachability": reachability,
        "relays": relays,
        "advice": advice,
    }


def register(app: typer.Typer) -> None:
    """Add the peer commands to the root command."""
    app.add_typer(peer_app, name="peer")
    app.command("peers")(peers)
    app.command("doctor")(doctor)
