"""Identity: peer ids, signatures, the key file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gossamer.core.errors import ConfigError, ProtocolError
from gossamer.net.identity import (
    Identity,
    digest_of_peer_id,
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
