"""Joining a private swarm through bootstrap peers whose swarm secret this peer lacks or differs
from, over real gRPC on 127.0.0.1: a refusal for the secret is final, and said at once."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gossamer.cli.main import app
from gossamer.net.bridge import NodeThread
from gossamer.net.config import NodeConfig
from gossamer.net.handshake import SwarmSecretMismatchError
from gossamer.net.node import Node

SECRET = b"the-private-swarm-secret-0123456789"
OTHER_SECRET = b"another-swarm-secret-9876543210abc"


def _config(secret: bytes | None, *bootstrap: str) -> NodeConfig:
    return NodeConfig(listen_address="127.0.0.1:0", swarm_secret=secret, bootstrap=bootstrap)


def _run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), timeout=60))


@pytest.mark.parametrize(
    ("secret", "said"),
    [
        (None, "is private and this peer has no swarm secret"),
        (OTHER_SECRET, "swarm secret is not the one of the swarm at"),
    ],
)
def test_a_peer_refused_for_the_secret_by_every_bootstrap_peer_fails_at_start(
    secret: bytes | None, said: str
) -> None:
    # The node started all the same (a warning), and training retried for 30 s before saying
    # "no bootstrap peer answered ... leave it out to start a new swarm".
    async def scenario() -> None:
        async with Node(_config(SECRET)) as private:
            entry = f"{private.peer_id}@{private.addresses[0]}"
            started = time.monotonic()
            with pytest.raises(SwarmSecretMismatchError) as refused:
                async with Node(_config(secret, entry)):
                    pass
            assert time.monotonic() - started < 5.0
            message = str(refused.value)
            assert said in message, message
            assert entry in message, message
            assert "--swarm-secret-file" in message, message

    _run(scenario)


def test_a_peer_with_a_secret_refused_by_an_open_swarm_is_told_to_leave_it_out() -> None:
    async def scenario() -> None:
        async with Node(_config(None)) as open_peer:
            with pytest.raises(SwarmSecretMismatchError, match="leave the secret out"):
                async with Node(_config(SECRET, open_peer.addresses[0])):
                    pass

    _run(scenario)


def test_a_bootstrap_peer_refused_for_the_secret_is_not_dialed_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Another bootstrap peer let it in: it joins, says once which one refused, and does not
    # dial that one again.
    async def scenario() -> None:
        async with Node(_config(SECRET)) as private, Node(_config(None)) as open_peer:
            refusing = private.addresses[0]
            async with Node(_config(None, refusing, open_peer.addresses[0])) as joining:
                assert open_peer.peer_id in {r.peer_id for r in joining.peers()}
                assert private.counters.num_handshakes_refused == 1
                assert await joining.bootstrap([refusing, open_peer.addresses[0]]) == 1
                with pytest.raises(SwarmSecretMismatchError):
                    await joining.bootstrap([refusing])
                assert private.counters.num_handshakes_refused == 1  # never dialed again

    with caplog.at_level(logging.WARNING, logger="gossamer.net.node"):
        _run(scenario)
    refusals = [r.getMessage() for r in caplog.records if "refused this peer" in r.getMessage()]
    assert len(refusals) == 1, refusals


def _train_args(tmp_path: Path, bootstrap: str) -> list[str]:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def square(x):\n    return x * x\n\n" * 200)
    return [
        "train",
        "--model.num-layers", "1", "--model.num-heads", "2", "--model.width", "16",
        "--model.context", "16", "--data.source", "text", "--data.path", str(corpus),
        "--train.max-steps", "2", "--train.batch-size", "2", "--train.eval-batches", "1",
        "--checkpoint.directory", str(tmp_path / "ck"), "--swarm.strategy", "diloco",
        "--swarm.listen", "127.0.0.1:0", "--bootstrap", bootstrap,
    ]  # fmt: skip


@pytest.mark.parametrize("secret", [None, OTHER_SECRET])
def test_training_against_a_private_swarm_without_its_secret_fails_at_once_saying_so(
    tmp_path: Path, secret: bytes | None
) -> None:
    # It retried for 30 s, then said "no bootstrap peer answered within 30 s ... leave it out to
    # start a new swarm": advice that starts a separate swarm.
    with NodeThread(_config(SECRET)) as private:
        args = _train_args(tmp_path, private.node.addresses[0])
        if secret is not None:
            (tmp_path / "other.secret").write_bytes(secret)
            args += ["--swarm.swarm-secret-file", str(tmp_path / "other.secret")]
        started = time.monotonic()
        result = CliRunner().invoke(app, args)
        took_s = time.monotonic() - started
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert "--swarm.swarm-secret-file" in result.output, result.output
    assert "no bootstrap peer answered" not in result.output, result.output
    assert took_s < 20.0, (took_s, result.output)
    assert not list((tmp_path / "ck").glob("step-*"))
