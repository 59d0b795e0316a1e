"""Identity: peer ids, signatures, the key file."""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

import pytest

from gossamer.core.errors import ConfigError, ProtocolError
from gossamer.net.identity import (
    Identity,
    digest_of_peer_id,
    held_identity,
    load_or_create_identity,
    peer_id_of_public_key,
    verify_signature,
)


def test_peer_id_is_derived_from_the_public_key_and_round_trips() -> None:
    identity = Identity.generate()
    assert identity.peer_id == peer_id_of_public_key(identity.public_key)
    assert len(identity.peer_id) == 52
    assert digest_of_peer_id(identity.peer_id) == identity.digest
    assert Identity.generate().peer_id != identity.peer_id


def test_signatures_verify_only_for_the_signer_and_the_message() -> None:
    alice, bob = Identity.generate(), Identity.generate()
    signature = alice.sign(b"hello")
    assert verify_signature(alice.public_key, signature, b"hello")
    assert not verify_signature(bob.public_key, signature, b"hello")
    assert not verify_signature(alice.public_key, signature, b"hellO")
    assert not verify_signature(alice.public_key, signature[:10], b"hello")


@pytest.mark.parametrize("bad", ["", "1" * 52, "abc", "0" * 52])
def test_malformed_peer_ids_are_protocol_errors(bad: str) -> None:
    with pytest.raises(ProtocolError):
        digest_of_peer_id(bad)


def test_key_file_is_created_0600_and_gives_the_same_id_again(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "key.pem"
    first = load_or_create_identity(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_or_create_identity(path).peer_id == first.peer_id


def test_key_file_readable_by_others_is_refused_with_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    load_or_create_identity(path)
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_or_create_identity(path)


def test_key_file_that_is_not_a_key_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    path.write_bytes(b"not a key")
    os.chmod(path, 0o600)
    with pytest.raises(
        ConfigError, match=r"not an unencrypted PEM private key.*a path that does not exist yet"
    ):
        load_or_create_identity(path)


@pytest.mark.parametrize("where", ["folder", "device"])
def test_a_key_path_that_is_not_a_regular_file_is_not_told_to_chmod(
    tmp_path: Path, where: str
) -> None:
    path = tmp_path if where == "folder" else Path(os.devnull)
    with pytest.raises(ConfigError, match="must be a regular file") as caught:
        load_or_create_identity(path)
    assert "chmod" not in str(caught.value)


def test_a_key_path_under_a_file_is_a_config_error_naming_the_file(tmp_path: Path) -> None:
    in_the_way = tmp_path / "small.txt"
    in_the_way.write_text("text")
    with pytest.raises(ConfigError, match=f"{in_the_way} is a file, not a folder"):
        load_or_create_identity(in_the_way / "k.pem")


def test_a_peer_id_spelled_otherwise_than_peers_print_it_is_refused() -> None:
    # Upper case, or a last character that differs in its unused bits, decodes to the same
    # digest: accepted as a bootstrap id, it never matched the id the peer proved.
    peer_id = Identity.generate().peer_id
    alphabet = "abcdefghijklmnopqrstuvwxyz234567"
    unused_bits_set = peer_id[:-1] + alphabet[alphabet.index(peer_id[-1]) ^ 1]
    for other in (peer_id.upper(), unused_bits_set):
        with pytest.raises(ProtocolError, match="lower case, as peers print them"):
            digest_of_peer_id(other)
    digest_of_peer_id(peer_id)


def test_a_new_key_file_made_by_two_peers_at_once_is_held_by_one_with_the_key_on_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The second peer starts while the first is making the key: it found no file, made its
    # own, and the first then renamed its key over the file the second had locked (both ran,
    # two peer ids, one lost), or took the second's fixed-name temporary file ("cannot create
    # key file ... No such file or directory").
    path = tmp_path / "new" / "peer.key"
    generate = Identity.generate
    second: list[str | BaseException] = []
    held = contextlib.ExitStack()

    def generate_while_another_starts() -> Identity:
        if not second:
            second.append("starting")
            try:
                second[0] = held.enter_context(held_identity(path, setting="--key-file")).peer_id
            except ConfigError as exc:
                second[0] = exc
        return generate()

    monkeypatch.setattr(Identity, "generate", generate_while_another_starts)
    with held, held_identity(path, setting="--key-file") as first:
        [outcome] = second
        assert isinstance(outcome, ConfigError), f"both peers hold {path}"
        assert "is in use by another running peer" in str(outcome)
        assert load_or_create_identity(path).peer_id == first.peer_id
    assert path.stat().st_mode & 0o777 == 0o600


def _hold_at_once(path: Path, barrier: threading.Barrier, outcomes: list[str]) -> None:
    barrier.wait()
    try:
        with held_identity(path, setting="--key-file") as identity:
            outcomes.append(identity.peer_id)
            barrier.wait()  # (both have tried while this one holds the file)
    except ConfigError as exc:
        outcomes.append("refused" if "in use" in str(exc) else f"error: {exc}")
        barrier.wait()


def test_two_peers_started_at_once_on_a_new_key_file_one_runs_one_is_refused(
    tmp_path: Path,
) -> None:
    # (threads, each with its own descriptor: flock is per open file description)
    for trial in range(30):
        path = tmp_path / f"trial{trial}" / "peer.key"
        barrier, outcomes = threading.Barrier(2, timeout=10), list[str]()
        threads = [
            threading.Thread(target=_hold_at_once, args=(path, barrier, outcomes)) for _ in range(2)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=20)
        assert sorted(outcomes) == sorted([load_or_create_identity(path).peer_id, "refused"])


def test_two_processes_creating_one_key_file_at_once_agree_on_its_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # (each writes a temporary file of its own; the one that comes second keeps the first's key)
    path = tmp_path / "peer.key"
    generate = Identity.generate
    other: list[str] = []

    def generate_while_another_creates() -> Identity:
        if not other:
            other.append("creating")
            other[0] = load_or_create_identity(path).peer_id
        return generate()

    monkeypatch.setattr(Identity, "generate", generate_while_another_creates)
    mine = load_or_create_identity(path).peer_id
    assert mine == other[0] == load_or_create_identity(path).peer_id
    assert sorted(p.name for p in tmp_path.iterdir()) == ["peer.key"]  # (no temporary file left)
