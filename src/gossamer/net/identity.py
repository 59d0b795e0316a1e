"""Who a peer is: its Ed25519 key, the peer id derived from it, signatures, and the key file.

A peer id is the lowercase base32 (no padding) of the SHA-256 of the raw 32-byte public key, so
anyone holding a public key can check the id it claims. The same 32-byte digest is the peer's
position in the DHT's key space.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import functools
import hashlib
import logging
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from gossamer.core.errors import AuthenticationError, ConfigError, ProtocolError

__all__ = [
    "PUBLIC_KEY_BYTES",
    "SIGNATURE_BYTES",
    "Identity",
    "digest_of_peer_id",
    "held_identity",
    "load_or_create_identity",
    "peer_id_of_public_key",
    "short_peer_id",
    "verify_signature",
]

_log = logging.getLogger(__name__)

PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
PEER_ID_CHARS = 52  # base32 of 32 bytes, unpadded


@functools.lru_cache(maxsize=65536)
def peer_id_of_public_key(public_key: bytes) -> str:
    """The peer id that belongs to a raw Ed25519 public key.

    Raises:
        ProtocolError: the key is not 32 bytes.
    """
    if len(public_key) != PUBLIC_KEY_BYTES:
        raise ProtocolError(f"an Ed25519 public key is 32 bytes, got {len(public_key)}")
    digest = hashlib.sha256(public_key).digest()
    return base64.b32encode(digest).decode("ascii").rstrip("=").lower()


@functools.lru_cache(maxsize=65536)
def digest_of_peer_id(peer_id: str) -> bytes:
    """The 32-byte DHT position of a peer id (the inverse of the base32 encoding).

    Raises:
        ProtocolError: the string is not a well-formed peer id.
    """
    if len(peer_id) != PEER_ID_CHARS:
        raise ProtocolError(f"a peer id has {PEER_ID_CHARS} characters, got {len(peer_id)}")
    try:
        digest = base64.b32decode(peer_id.upper() + "====", casefold=False)
    except (ValueError, TypeError) as exc:
        raise ProtocolError(f"not a peer id: {peer_id[:60]!r}") from exc
    # The one spelling peer_id_of_public_key gives (lower case, the last character's unused
    # bits zero): another, which decodes to the same digest, passed every check and then never
    # matched the id a peer proved ("expected peer X but the server is X").
    if len(digest) != 32 or base64.b32encode(digest).decode("ascii").rstrip("=").lower() != peer_id:
        raise ProtocolError(
            f"not a peer id: {peer_id[:60]!r} (peer ids are lower case, as peers print them)"
        )
    return digest


def short_peer_id(peer_id: str) -> str:
    """The first characters of a peer id, for logs and tables."""
    return peer_id[:12]


def verify_signature(public_key: bytes, signature: bytes, message: bytes) -> bool:
    """Whether ``signature`` is a valid Ed25519 signature of ``message`` by ``public_key``."""
    if len(public_key) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


class Identity:
    """A peer's Ed25519 key pair and the peer id derived from it.

    Args:
        private_key: the key; a fresh one when omitted.
    """

    def __init__(self, private_key: Ed25519PrivateKey | None = None) -> None:
        self._private_key = private_key or Ed25519PrivateKey.generate()
        self.public_key: bytes = self._private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        """The raw 32-byte public key."""
        self.peer_id: str = peer_id_of_public_key(self.public_key)
        """The peer id (base32 of SHA-256 of the public key)."""
        self.digest: bytes = hashlib.sha256(self.public_key).digest()
        """The 32-byte DHT position."""

    @classmethod
    def generate(cls) -> Identity:
        """A new random identity."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> Identity:
        """An identity from a raw 32-byte Ed25519 private key."""
        if len(raw) != 32:
            raise AuthenticationError(f"an Ed25519 private key is 32 bytes, got {len(raw)}")
        return cls(Ed25519PrivateKey.from_private_bytes(raw))

    def sign(self, message: bytes) -> bytes:
        """Sign ``message`` with the identity key."""
        return self._private_key.sign(message)

    def private_pem(self) -> bytes:
        """The private key as unencrypted PKCS#8 PEM (for the key file)."""
        return self._private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def __repr__(self) -> str:
        return f"Identity({short_peer_id(self.peer_id)})"


@contextlib.contextmanager
def held_identity(path: Path, *, setting: str, hint: str = "") -> Iterator[Identity]:
    """The identity in ``path``, created (mode 0600) on first use, the file locked against
    every other process for the block (an advisory ``flock``, released when the process exits,
    a kill included). Two processes given one key file are one peer id: two training peers read
    the very same batches (a peer's data order is seeded by its id), and two nodes publish
    records for one id that replace each other's.

    The file is opened (made where it is missing) and locked before anything is read or
    written, and a new key is written into that same locked file: two peers started at once
    with one new key file got either a bogus "cannot create" error or, where one replaced the
    file the other had locked, two peer ids both "holding" the file, one of them lost.

    Args:
        path: the key file.
        setting: how the user named the file (``swarm.key_file``, ``--key-file``), for messages.
        hint: what else the user can do, added to the refusal's advice.

    Raises:
        ConfigError: another process holds the file; or it cannot be read or made, or holds
            no valid key (see :func:`load_or_create_identity`).
    """
    path = Path(os.path.expanduser(path))
    if path.exists() and not path.is_file():
        raise _not_a_regular_file(path)
    fd = _open_for_holding(path, setting)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                # A file system without locks (some NFS and FUSE mounts): it ran there before.
                _log.warning("%s: %s cannot be locked (%s); not guarded", setting, path, exc)
            else:
                advice = f"give each peer its own key file{', ' + hint if hint else ''}"
                raise ConfigError(
                    f"{setting}: {path} is in use by another running peer: two peers with one "
                    f"key file are one peer id; {advice}"
                ) from None
        identity = _identity_of_locked_file(fd, path)
    except BaseException:
        os.close(fd)
        raise
    try:
        yield identity
    finally:
        os.close(fd)


def _open_for_holding(path: Path, setting: str) -> int:
    """A descriptor of ``path``, the file made (empty, mode 0600) where it is missing; read-only
    where the user may read but not write it (a key file made read-only on purpose)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except PermissionError as exc:
        if path.exists():
            try:
                return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as again:
                raise ConfigError(
                    f"{setting}: cannot read {path} ({again.strerror or again}); give a key "
                    "file this user can read"
                ) from again
        raise _cannot_create(path, exc) from exc
    except OSError as exc:  # a file where a folder should be, a read-only file system
        raise _cannot_create(path, exc) from exc


def _identity_of_locked_file(fd: int, path: Path) -> Identity:
    """The key in the open (and locked) file ``fd``; an empty file is a new one, given a new
    key written in place (not renamed over it: that would replace the file the lock is on)."""
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):  # (replaced by something else since it was checked)
        raise _not_a_regular_file(path)
    _check_mode(path, info.st_mode)
    if info.st_size > 0:
        try:
            chunks = []
            while chunk := os.read(fd, 65536):
                chunks.append(chunk)
        except OSError as exc:
            raise ConfigError(f"cannot read key file {path}: {exc.strerror or exc}") from exc
        return _identity_of_pem(path, b"".join(chunks))
    identity = Identity.generate()
    try:
        _write_key(fd, identity)
    except OSError as exc:  # opened read-only (no write permission), a full disk
        raise _cannot_create(path, exc) from exc
    _log.info("created identity key %s for peer %s", path, identity.peer_id)
    return identity


def _write_key(fd: int, identity: Identity) -> None:
    """Write ``identity``'s private key (PEM) to the open file ``fd``, whole, and sync it."""
    data = identity.private_pem()
    while data:
        data = data[os.write(fd, data) :]
    os.fsync(fd)


def load_or_create_identity(path: Path) -> Identity:
    """Load the identity key from ``path``, creating it (mode 0600) on first use.

    A new key is written to a temporary file of its own beside ``path`` and then linked into
    place, so two processes creating one key file at once agree on one key.

    Args:
        path: a PEM file holding an Ed25519 private key.

    Returns:
        The identity; the same peer id every time the same file is used.

    Raises:
        ConfigError: the file exists but is not a regular file, not an Ed25519 private key, or
            is readable by others; or it cannot be read or created.
    """
    path = Path(os.path.expanduser(path))
    if path.exists():
        return _load_identity(path)
    identity = Identity.generate()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # A name of its own (a fixed one was shared by two creators: one renamed the other's
        # temporary file away before the other could).
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            try:
                _write_key(fd, identity)
            finally:
                os.close(fd)
            try:
                os.link(tmp, path)  # (never over a key another creator put there first)
            except FileExistsError:
                return _load_identity(path)
            except OSError:  # a file system without hard links
                os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    except OSError as exc:  # a file where a folder should be, no permission, a full disk
        raise _cannot_create(path, exc) from exc
    _log.info("created identity key %s for peer %s", path, identity.peer_id)
    return identity


def _load_identity(path: Path) -> Identity:
    if not path.is_file():
        raise _not_a_regular_file(path)
    _check_mode(path, path.stat().st_mode)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read key file {path}: {exc.strerror or exc}") from exc
    return _identity_of_pem(path, data)


def _not_a_regular_file(path: Path) -> ConfigError:
    return ConfigError(
        f"key file {path} is not a regular file (a folder or a device?); the key file "
        "must be a regular file: give a path to a PEM file, or a new path to create one"
    )


def _check_mode(path: Path, st_mode: int) -> None:
    mode = st_mode & 0o777
    if mode & 0o077:
        raise ConfigError(
            f"key file {path} has mode {mode:o}; others can read it. "
            f"Run `chmod 600 {path}` (the key is this peer's identity)."
        )


def _identity_of_pem(path: Path, data: bytes) -> Identity:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:  # (cryptography's reason, less its FAQ link)
        why = str(exc).split(" See https://")[0] or type(exc).__name__
        raise ConfigError(
            f"key file {path} is not an unencrypted PEM private key ({why}): pass the "
            f"file `gossamer peer id` created, or a path that does not exist yet for a new "
            f"identity"
        ) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(
            f"key file {path} holds a {type(key).__name__}, not an Ed25519 key: pass the "
            f"file `gossamer peer id` created, or a path that does not exist yet for a new "
            f"identity"
        )
    return Identity(key)


def _cannot_create(path: Path, exc: OSError) -> ConfigError:
    in_the_way = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    reason = f"{in_the_way} is a file, not a folder" if in_the_way else exc.strerror or exc
    return ConfigError(f"cannot create key file {path}: {reason}; give a path in a writable folder")
