"""A swarm peer holds its key file while it runs: a second peer given the same one is refused.

Two peers given one ``--swarm.key-file`` were one peer id, so one data stream (a peer's stream
is seeded by its peer id): they trained on the very same batches and both exited 0. No node is
started here: the node is replaced by a fake that records who reached it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import TracebackType

import pytest

from gossamer.core.config import CheckpointConfig, RunConfig, SwarmConfig
from gossamer.core.errors import ConfigError
from gossamer.net.identity import Identity, load_or_create_identity
from gossamer.train import swarm as swarm_module
from gossamer.train.swarm import run_swarm_peer


class _NodeReached(Exception):
    """Raised by the fake node: the peer got as far as starting its node."""


class FakeNodeThread:
    """Stands in for the peer's node: records the peer id it was started with, then either
    runs ``inside`` (what happens while this peer runs) or ends the peer."""

    started: list[str]
    inside: list[RunConfig]
    outcomes: list[BaseException]

    def __init__(self, _config: object, identity: Identity) -> None:
        self.peer_id = identity.peer_id
        FakeNodeThread.started.append(identity.peer_id)

    def __enter__(self) -> FakeNodeThread:
        while FakeNodeThread.inside:  # a second peer starts while this one runs
            try:
                run_swarm_peer(FakeNodeThread.inside.pop())
            except BaseException as exc:
                FakeNodeThread.outcomes.append(exc)
        raise _NodeReached(self.peer_id)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        return None


@pytest.fixture
def fake_node(monkeypatch: pytest.MonkeyPatch) -> type[FakeNodeThread]:
    FakeNodeThread.started, FakeNodeThread.inside, FakeNodeThread.outcomes = [], [], []
    monkeypatch.setattr(swarm_module, "NodeThread", FakeNodeThread)
    return FakeNodeThread


def _peer(tmp_path: Path, name: str, key_file: Path) -> RunConfig:
    return RunConfig(
        checkpoint=CheckpointConfig(directory=str(tmp_path / name)),
        swarm=SwarmConfig(strategy="diloco", key_file=str(key_file)),
    )


def test_a_second_peer_with_the_same_key_file_is_refused(
    tmp_path: Path, fake_node: type[FakeNodeThread]
) -> None:
    key_file = tmp_path / "keys" / "shared.key"
    fake_node.inside.append(_peer(tmp_path, "peer2", key_file))
    with pytest.raises(_NodeReached):
        run_swarm_peer(_peer(tmp_path, "peer1", key_file))
    peer_id = load_or_create_identity(key_file).peer_id
    assert fake_node.started == [peer_id]  # the second peer never started a node
    [refusal] = fake_node.outcomes
    assert isinstance(refusal, ConfigError)
    message = str(refusal)
    assert f"swarm.key_file: {key_file} is in use by another running peer" in message
    assert "give each peer its own key file" in message


def test_the_key_file_is_free_again_once_its_peer_has_stopped(
    tmp_path: Path, fake_node: type[FakeNodeThread]
) -> None:
    key_file = tmp_path / "shared.key"
    first = _peer(tmp_path, "peer1", key_file)
    with pytest.raises(_NodeReached):
        run_swarm_peer(first)
    with pytest.raises(_NodeReached):  # the same peer again (a restart), or another in its place
        run_swarm_peer(dataclasses.replace(first, name="again"))
    assert len(fake_node.started) == 2
    assert len(set(fake_node.started)) == 1


def test_peers_with_their_own_key_files_run_side_by_side(
    tmp_path: Path, fake_node: type[FakeNodeThread]
) -> None:
    fake_node.inside.append(_peer(tmp_path, "peer2", tmp_path / "peer2.key"))
    with pytest.raises(_NodeReached):
        run_swarm_peer(_peer(tmp_path, "peer1", tmp_path / "peer1.key"))
    assert [type(outcome) for outcome in fake_node.outcomes] == [_NodeReached]
    assert len(set(fake_node.started)) == 2
