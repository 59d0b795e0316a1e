"""A Bloom filter of the peers whose records a node holds, sent with its refresh lookups.

A lookup's answers carry gossip (records the responder knows). Drawn at random, gossip leaves a
coupon collector's tail: the last few records a node lacks take many refreshes to turn up. With
the requester's filter, a responder sends the records the requester lacks first, so one refresh
that reaches a peer holding a record delivers it. False positives (about 1% at the sizes built
here) would hide the same records from every answer if the positions were fixed; each filter has
a random salt, so a record one lookup's filter hides, the next one's shows.

The filter is the requester's claim about itself and steers nothing but which records it is sent;
a malformed or lying filter costs the liar its own gossip.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable

from gossamer.core.errors import ProtocolError

__all__ = ["MAX_FILTER_BYTES", "NUM_HASHES", "PeerFilter"]

NUM_HASHES = 7
"""Bit positions per peer: 7 is the best count for the 10 bits per peer built below."""
BITS_PER_PEER = 10
SALT_BYTES = 8
MAX_FILTER_BYTES = SALT_BYTES + 8192
"""The largest filter sent or accepted: a salt and 65,536 bits, 1% false positives up to about
6,500 peers, more beyond (a peer wrongly taken as known is only sent later, at random)."""


def _positions(salt: bytes, digest: bytes, num_bits: int) -> list[int]:
    hashed = hashlib.blake2b(digest, digest_size=4 * NUM_HASHES, salt=salt).digest()
    return [int.from_bytes(hashed[4 * i : 4 * i + 4], "big") % num_bits for i in range(NUM_HASHES)]


class PeerFilter:
    """Peer digests (32 bytes) in a Bloom filter; no false negatives.

    Args:
        data: the salt (8 bytes), then the bits (bit ``p`` is bit ``p % 8`` of byte ``p // 8``).
    """

    __slots__ = ("_bits", "_salt")

    def __init__(self, data: bytes) -> None:
        self._salt = bytes(data[:SALT_BYTES])
        self._bits = bytes(data[SALT_BYTES:])

    @classmethod
    def build(cls, digests: Iterable[bytes], salt: bytes | None = None) -> PeerFilter:
        """The filter of ``digests``, at 10 bits per digest (capped at :data:`MAX_FILTER_BYTES`).

        ``salt``: 8 bytes that place the bits (random by default).
        """
        salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
        if len(salt) != SALT_BYTES:
            raise ValueError(f"a peer filter's salt has {SALT_BYTES} bytes, not {len(salt)}")
        digests = list(digests)
        num_bytes = min(
            MAX_FILTER_BYTES - SALT_BYTES, max(8, (BITS_PER_PEER * len(digests) + 7) // 8)
        )
        bits = bytearray(num_bytes)
        for digest in digests:
            for position in _positions(salt, digest, 8 * num_bytes):
                bits[position >> 3] |= 1 << (position & 7)
        return cls(salt + bytes(bits))

    @classmethod
    def parse(cls, data: bytes) -> PeerFilter | None:
        """A filter from the network (None for an empty one: the sender sent none).

        Raises:
            ProtocolError: larger than :data:`MAX_FILTER_BYTES`, or no bits after the salt.
        """
        if not data:
            return None
        if len(data) <= SALT_BYTES:
            raise ProtocolError(
                f"known-peer filter has {len(data)} bytes: a salt of {SALT_BYTES} and no bits"
            )
        if len(data) > MAX_FILTER_BYTES:
            raise ProtocolError(
                f"known-peer filter has {len(data)} bytes, more than the {MAX_FILTER_BYTES} "
                "accepted"
            )
        return cls(data)

    def to_bytes(self) -> bytes:
        """The filter as sent."""
        return self._salt + self._bits

    def might_hold(self, digest: bytes) -> bool:
        """False if the digest was certainly not put in; True if it probably was."""
        if len(digest) != 32:
            return False
        bits = self._bits
        positions = _positions(self._salt, digest, 8 * len(bits))
        return all(bits[p >> 3] >> (p & 7) & 1 for p in positions)
