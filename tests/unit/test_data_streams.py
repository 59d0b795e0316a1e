"""Per-peer token streams and validation batches: determinism, sharding, save and restore."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gossamer.core.errors import DataError
from gossamer.data import TokenSource, TokenStream, validation_batches

# Distinct token ids, so a window's first token says where it starts.
POSITIONS = TokenSource(np.arange(5000, dtype=np.uint32), "test positions")


def _stream(**overrides: int) -> TokenStream:
    settings_ = {"seq_len": 16, "batch_size": 4, "seed": 0} | overrides
    return TokenStream(POSITIONS, **settings_)


def _take(stream: TokenStream, num_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [stream.next_batch() for _ in range(num_batches)]


def _assert_same_batches(
    first: list[tuple[torch.Tensor, torch.Tensor]], second: list[tuple[torch.Tensor, torch.Tensor]]
) -> None:
    assert len(first) == len(second)
    for (inputs_a, targets_a), (inputs_b, targets_b) in zip(first, second, strict=True):
        assert torch.equal(inputs_a, inputs_b)
        assert torch.equal(targets_a, targets_b)


def test_batches_have_shifted_targets() -> None:
    inputs, targets = _stream().next_batch()
    assert inputs.shape == targets.shape == (4, 16)
    assert inputs.dtype == targets.dtype == torch.int64
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    assert torch.equal(targets[:, -1], inputs[:, -1] + 1)  # consecutive positions


def test_byte_sources_give_int64_batches() -> None:
    source = TokenSource(np.frombuffer(b"hello world, " * 10, dtype=np.uint8), "bytes")
    inputs, _ = TokenStream(source, seq_len=8, batch_size=2, seed=0).next_batch()
    assert inputs.dtype == torch.int64
    assert bytes(inputs[0].tolist()) in b"hello world, " * 10


def test_same_seed_and_peer_give_the_same_stream() -> None:
    _assert_same_batches(_take(_stream(seed=3), 20), _take(_stream(seed=3), 20))
    first, other = _stream(seed=3).next_batch(), _stream(seed=4).next_batch()
    assert not torch.equal(first[0], other[0])


def test_peers_get_disjoint_shards_that_cover_an_epoch() -> None:
    num_peers = 3
    streams = [_stream(peer_index=p, num_peers=num_peers, batch_size=1) for p in range(num_peers)]
    starts_by_peer: list[set[int]] = [set() for _ in range(num_peers)]
    for peer, stream in enumerate(streams):
        while stream.epoch == 0:
            inputs, _ = stream.next_batch()
            if stream.epoch == 0:
                starts_by_peer[peer].add(int(inputs[0, 0]))
    for a in range(num_peers):
        for b in range(a + 1, num_peers):
            assert not starts_by_peer[a] & starts_by_peer[b]
    all_starts = sorted(set().union(*starts_by_peer))
    # One epoch: windows spaced seq_len apart from one offset, all of them used.
    assert np.all(np.diff(all_starts) == 16)
    assert all_starts[0] < 16
    assert all_starts[-1] + 17 > len(POSITIONS) - 16


def test_epochs_reshuffle() -> None:
    stream = _stream(batch_size=1)
    first_epoch = []
    while stream.epoch == 0:
        first_epoch.append(int(stream.next_batch()[0][0, 0]))
    second_epoch = [int(stream.next_batch()[0][0, 0]) for _ in range(len(first_epoch) - 2)]
    assert first_epoch[: len(second_epoch)] != second_epoch


def test_the_stream_does_not_touch_global_random_state() -> None:
    torch.manual_seed(0)
    np.random.seed(0)
    expected_torch, expected_numpy = torch.rand(1), np.random.rand()
    torch.manual_seed(0)
    np.random.seed(0)
    _take(_stream(), 5)
    assert torch.equal(torch.rand(1), expected_torch)
    assert np.random.rand() == expected_numpy


@settings(max_examples=25, deadline=None)
@given(
    num_before=st.integers(0, 400),
    num_after=st.integers(1, 20),
    batch_size=st.integers(1, 40),
    peer_index=st.integers(0, 2),
)
def test_a_restored_stream_continues_exactly(
    num_before: int, num_after: int, batch_size: int, peer_index: int
) -> None:
    original = _stream(batch_size=batch_size, peer_index=peer_index, num_peers=3, seed=11)
    _take(original, num_before)
    state = json.loads(json.dumps(original.state_dict()))
    restored = _stream(batch_size=batch_size, peer_index=peer_index, num_peers=3, seed=11)
    restored.load_state_dict(state)
    _assert_same_batches(_take(original, num_after), _take(restored, num_after))


def test_state_values_are_ints() -> None:
    state = _stream().state_dict()
    assert all(type(value) is int for value in state.values())


@pytest.mark.parametrize(
    ("key", "other"),
    [("seed", {"seed": 1}), ("num_peers", {"num_peers": 2}), ("seq_len", {"seq_len": 8})],
)
def test_a_state_from_another_stream_is_refused(key: str, other: dict[str, int]) -> None:
    state = _stream().state_dict()
    with pytest.raises(ValueError, match=f"saved with {key}="):
        _stream(**other).load_state_dict(state)


def test_a_malformed_state_is_refused() -> None:
    with pytest.raises(ValueError, match="lacks"):
        _stream().load_state_dict({"epoch": 0})


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="peer_index"):
        _stream(peer_index=2, num_peers=2)
    with pytest.raises(ValueError, match="batch_size"):
        _stream(batch_size=0)


def test_a_source_shorter_than_one_sequence_is_a_clear_error() -> None:
    short = TokenSource(np.zeros(16, dtype=np.uint8), "validation split of tiny.txt")
    with pytest.raises(DataError, match=r"tiny\.txt holds 16 tokens, fewer than one sequence"):
        TokenStream(short, seq_len=16, batch_size=1, seed=0)
    with pytest.raises(DataError, match=r"tiny\.txt"):
        validation_batches(short, seq_len=16, batch_size=1, num_batches=1)
    TokenStream(TokenSource(np.zeros(17, dtype=np.uint8), "x"), seq_len=16, batch_size=3, seed=0)
    # The advice for each split (a training split too short was told to raise the validation
    # fraction, which shortens it further).
    with pytest.raises(DataError, match=r"raise data\.validation_fraction"):
        TokenStream(short, seq_len=16, batch_size=1, seed=0)
    train = TokenSource(np.zeros(16, dtype=np.uint8), "training split of tiny.txt")
    with pytest.raises(DataError, match=r"lower data\.validation_fraction"):
        TokenStream(train, seq_len=16, batch_size=1, seed=0)


def test_a_source_with_fewer_sequences_than_peers_is_a_clear_error() -> None:
    with pytest.raises(DataError, match="fewer than the 4 peers"):
        TokenStream(
            TokenSource(np.zeros(40, dtype=np.uint8), "x"),
            seq_len=16,
            batch_size=1,
            seed=0,
            num_peers=4,
        )


def test_validation_batches_are_fixed_and_spread_over_the_source() -> None:
    batches = validation_batches(POSITIONS, seq_len=16, batch_size=4, num_batches=3)
    _assert_same_batches(
        batches, validation_batches(POSITIONS, seq_len=16, batch_size=4, num_batches=3)
    )
    assert len(batches) == 12  # 3 of 16 sequences, cut into batches of at most 4
    starts = torch.cat([inputs[:, 0] for inputs, _ in batches])
    assert int(starts[0]) == 0
    assert int(starts[-1]) == len(POSITIONS) - 17
    assert torch.all(starts.diff() > 0)
    for inputs, targets in batches:
        assert inputs.shape == targets.shape == (4, 16)
        assert torch.equal(inputs + 1, targets)


def test_token_ids_outside_the_vocabulary_are_a_clear_error() -> None:
    with pytest.raises(DataError, match="outside the model's vocabulary of 256"):
        _stream(vocab_size=256).next_batch()
    with pytest.raises(DataError, match=r"model\.vocab_size"):
        validation_batches(POSITIONS, seq_len=16, batch_size=2, num_batches=1, vocab_size=256)
    small = TokenSource(np.arange(100, dtype=np.uint16) % 7, "small ids")
    TokenStream(small, seq_len=8, batch_size=4, seed=0, vocab_size=7).next_batch()
