"""Kademlia's routing table: k-buckets by XOR distance, with replacement caches."""

from __future__ import annotations

from collections import OrderedDict

__all__ = ["KEY_BITS", "RoutingTable", "bucket_index", "xor_distance"]

KEY_BITS = 256


def xor_distance(a: bytes, b: bytes) -> int:
    """Kademlia's distance between two 32-byte keys."""
    return int.from_bytes(a, "big") ^ int.from_bytes(b, "big")


def bucket_index(own: bytes, other: bytes) -> int:
    """The bucket of ``other`` as seen from ``own``: the index of the highest differing bit."""
    distance = xor_distance(own, other)
    if distance == 0:
        raise ValueError("a node does not keep itself in its routing table")
    return distance.bit_length() - 1


class RoutingTable:
    """Contacts by bucket, least recently seen first; full buckets keep a replacement cache.

    Args:
        own_digest: this node's 32-byte position.
        bucket_size: k, contacts per bucket (and replacements per bucket).
    """

    def __init__(self, own_digest: bytes, bucket_size: int) -> None:
        self.own_digest = own_digest
        self.bucket_size = bucket_size
        self._buckets: list[OrderedDict[str, bytes]] = [OrderedDict() for _ in range(KEY_BITS)]
        self._replacements: list[OrderedDict[str, bytes]] = [OrderedDict() for _ in range(KEY_BITS)]
        self._index_of: dict[str, int] = {}

    def add(self, peer_id: str, digest: bytes) -> bool:
        """Note that a peer was seen; returns whether it is in a bucket (not just a replacement)."""
        if digest == self.own_digest:
            return False
        index = bucket_index(self.own_digest, digest)
        bucket = self._buckets[index]
        if peer_id in bucket:
            bucket.move_to_end(peer_id)
            return True
        if len(bucket) < self.bucket_size:
            bucket[peer_id] = digest
            self._index_of[peer_id] = index
            self._replacements[index].pop(peer_id, None)
            return True
        replacements = self._replacements[index]
        replacements[peer_id] = digest
        replacements.move_to_end(peer_id)
        while len(replacements) > self.bucket_size:
            replacements.popitem(last=False)
        return False

    def remove(self, peer_id: str) -> None:
        """Forget a peer (it failed or its record expired); a replacement takes its place."""
        index = self._index_of.pop(peer_id, None)
        if index is None:
            for replacements in self._replacements:
                replacements.pop(peer_id, None)
            return
        del self._buckets[index][peer_id]
        replacements = self._replacements[index]
        if replacements:
            new_id, new_digest = replacements.popitem(last=True)
            self._buckets[index][new_id] = new_digest
            self._index_of[new_id] = index

    def closest(
        self, target: bytes, count: int, exclude: frozenset[str] = frozenset()
    ) -> list[str]:
        """Up to ``count`` peers in buckets, nearest to ``target`` first."""
        target_int = int.from_bytes(target, "big")
        candidates = [
            (int.from_bytes(digest, "big") ^ target_int, peer_id)
            for bucket in self._buckets
            for peer_id, digest in bucket.items()
            if peer_id not in exclude
        ]
        candidates.sort()
        return [peer_id for _, peer_id in candidates[:count]]

    def __contains__(self, peer_id: object) -> bool:
        return peer_id in self._index_of

    def __len__(self) -> int:
        return len(self._index_of)

    def peer_ids(self) -> list[str]:
        """Every peer in a bucket."""
        return list(self._index_of)

    def nonempty_bucket_indices(self) -> list[int]:
        """Buckets holding at least one peer (the ones a refresh walks)."""
        return [i for i, bucket in enumerate(self._buckets) if bucket]
