"""`gossamer train` as a swarm peer, in process, given inputs that must stop it before it trains."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gossamer.cli.main import app
from gossamer.net.identity import load_or_create_identity, short_peer_id
from gossamer.obs.trace import read_spans
from gossamer.train import swarm as swarm_module


def _swarm_peer_args(tmp_path: Path) -> list[str]:
    """`gossamer train` as a tiny DiLoCo swarm peer on a corpus written under ``tmp_path``."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def square(x):\n    return x * x\n\n" * 200)
    return [
        "train",
        "--model.num-layers", "1", "--model.num-heads", "2", "--model.width", "16",
        "--model.context", "16", "--data.source", "text", "--data.path", str(corpus),
        "--train.max-steps", "2", "--train.batch-size", "2", "--train.eval-batches", "1",
        "--checkpoint.directory", str(tmp_path / "ck"), "--swarm.strategy", "diloco",
    ]  # fmt: skip


def test_a_swarm_peer_whose_bootstrap_peers_never_answer_trains_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # It logged a warning, trained alone from step 0 and exited 0: a run asked to join a
    # swarm ended as a success without one.
    monkeypatch.setattr(swarm_module, "_BOOTSTRAP_WAIT_S", 1.0)
    args = [
        *_swarm_peer_args(tmp_path),
        "--swarm.listen",
        "127.0.0.1:0",
        "--bootstrap",
        "127.0.0.1:1",
    ]
    result = CliRunner().invoke(app, args)
    assert "Traceback" not in result.output
    assert result.exit_code != 0
    assert "no bootstrap peer answered" in result.output
    assert not list((tmp_path / "ck").glob("step-*"))  # nothing trained, nothing saved


def test_a_dashboard_port_in_use_is_one_line_naming_the_option() -> None:
    # It said "error: [Errno 98] Address already in use", naming neither the port nor the fix.
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = CliRunner().invoke(
            app,
            ["dashboard", "--scrape", "127.0.0.1:9", "--host", "127.0.0.1", "--port", str(port)],
        )
    assert result.exit_code == 1, result.output
    assert f"cannot serve the dashboard on 127.0.0.1:{port}" in result.output
    assert "--port" in result.output


def test_a_swarm_peer_s_spans_name_the_peer_not_the_run(tmp_path: Path) -> None:
    # Every peer of a run shares its name: their traces, exported together, fell on one
    # process's rows, overlapping.
    trace = tmp_path / "spans.jsonl"
    args = [*_swarm_peer_args(tmp_path), "--swarm.listen", "127.0.0.1:0", "--trace", str(trace)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    peer_id = load_or_create_identity(tmp_path / "ck" / "peer.key").peer_id
    spans = read_spans(trace)
    assert spans
    assert {span.peer for span in spans} == {short_peer_id(peer_id)}


def test_a_swarm_peer_s_node_errors_name_the_run_config_s_keys(tmp_path: Path) -> None:
    # They named net's keys ("net.bootstrap", "net.listen_address"), which no config has.
    common = _swarm_peer_args(tmp_path)
    result = CliRunner().invoke(
        app, [*common, "--swarm.listen", "127.0.0.1:0", "--bootstrap", "PEER_ID@127.0.0.1:7000"]
    )
    assert result.exit_code == 2, result.output
    assert "swarm.bootstrap: " in result.output
    assert "net." not in result.output
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = CliRunner().invoke(app, [*common, "--swarm.listen", f"127.0.0.1:{port}"])
    assert result.exit_code == 2, result.output
    assert "swarm.listen: " in result.output
    assert "net." not in result.output
