"""The checkpoint store: exact round trips, atomic saves, corruption detection, pruning."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import threading
import tracemalloc
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from gossamer.core.clock import FakeClock
from gossamer.core.errors import CheckpointCorruptedError, IncompatibleCheckpointError
from gossamer.core.hashing import sha256_bytes
from gossamer.store import (
    CheckpointState,
    CheckpointStore,
    CheckpointWriteError,
    checkpoint_folders,
    checkpoint_loading,
    checkpoint_reader,
    durable_files,
)
from gossamer.store import checkpoint_manifest as manifest_module
from gossamer.store.checkpoint_manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES


def _state(step: int, *, fill: float | None = None) -> CheckpointState:
    """A small checkpoint whose tensors all hold ``fill`` (default: the step)."""
    value = float(step if fill is None else fill)
    return CheckpointState(
        step=step,
        tensors={
            "model": {"w": torch.full((4, 3), value), "b": torch.full((3,), value)},
            "optimizer": {"m": torch.full((5,), value, dtype=torch.float64)},
        },
        meta={"step": step, "fill": value},
    )


def _fill(state: CheckpointState) -> float:
    return float(state.tensors["model"]["w"][0, 0])


def _assert_same(loaded: CheckpointState, expected: CheckpointState) -> None:
    assert loaded.step == expected.step
    assert list(loaded.tensors) == list(expected.tensors)
    for group, tensors in expected.tensors.items():
        assert list(loaded.tensors[group]) == list(tensors), group
        for name, tensor in tensors.items():
            got = loaded.tensors[group][name]
            assert got.dtype == tensor.dtype, (group, name)
            assert got.shape == tensor.shape, (group, name)
            # Bit-exact: compare raw bytes, so NaNs and -0.0 count too.
            want_bytes = tensor.contiguous().view(-1).view(torch.uint8)
            assert torch.equal(got.contiguous().view(-1).view(torch.uint8), want_bytes)
    assert loaded.meta == expected.meta


def test_round_trip_is_bit_exact_for_every_kind_of_tensor(tmp_path: Path) -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tied = torch.randn(3, 5)
    state = CheckpointState(
        step=7,
        tensors={
            "model": {
                "fp32": torch.randn(8, 16),
                "bf16": torch.randn(5, 7).to(torch.bfloat16),
                "fp16": torch.randn(9).to(torch.float16),
                "int64": torch.randint(-(2**62), 2**62, (11,)),
                "int8": torch.randint(-128, 127, (6,), dtype=torch.int8),
                "uint8": torch.randint(0, 255, (3, 3), dtype=torch.uint8),
                "bool": torch.tensor([True, False, True]),
                "scalar": torch.tensor(3.25),
                "int_scalar": torch.tensor(-9, dtype=torch.int32),
                "empty": torch.zeros(0, 4),
                "special": torch.tensor([float("nan"), float("inf"), -0.0, 1e-45]),
                "transposed": base.t(),  # not contiguous
                "slice": base[1:3],  # a view into a bigger storage
                "tied_a": tied,  # two names, one storage (weight tying)
                "tied_b": tied,
            },
            "empty_group": {},
            "rng": {"torch_cpu": torch.get_rng_state()},
        },
        meta={"config": {"lr": 3e-4, "layers": 2, "name": "tiny", "flags": [True, None]}},
    )
    store = CheckpointStore(tmp_path)
    path = store.save(state)
    assert path == tmp_path / "step-000000007"
    assert sorted(p.name for p in path.iterdir()) == [
        "empty_group.safetensors",
        "manifest.json",
        "model.safetensors",
        "rng.safetensors",
    ]
    _assert_same(store.load(path), state)
    _assert_same(store.load(path / MANIFEST_NAME), state)
    latest = store.load_latest()
    assert latest is not None
    _assert_same(latest, state)


def test_manifest_records_version_step_time_meta_and_every_file(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, clock=FakeClock(wall_start_s=1_234_567.5))
    path = store.save(_state(3))
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    assert manifest["format_version"] == 1
    assert manifest["step"] == 3
    assert manifest["created_unix_s"] == 1_234_567.5
    assert manifest["meta"] == {"step": 3, "fill": 3.0}
    files = {entry["name"]: entry for entry in manifest["files"]}
    assert set(files) == {"model.safetensors", "optimizer.safetensors"}
    for name, entry in files.items():
        data = (path / name).read_bytes()
        assert entry["bytes"] == len(data)
        assert len(entry["sha256"]) == 64


@pytest.mark.parametrize(
    ("tensors", "meta", "message"),
    [
        ({"model": {"x": 3}}, {}, "not a torch.Tensor"),
        ({"bad/name": {}}, {}, "cannot name a file"),
        ({".hidden": {}}, {}, "cannot name a file"),
        ({"model": {"__metadata__": torch.zeros(1)}}, {}, "bad tensor name"),
        ({}, {"x": object()}, "JSON"),
    ],
)
def test_bad_state_is_refused_with_an_actionable_message(
    tmp_path: Path, tensors: dict[str, dict[str, object]], meta: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        CheckpointStore(tmp_path).save(CheckpointState(step=1, tensors=tensors, meta=meta))  # type: ignore[arg-type]
    assert not any(p.name.startswith("step-") for p in tmp_path.iterdir())


@pytest.mark.parametrize("step", [-1, True, 1.0])
def test_bad_step_is_refused(step: object) -> None:
    with pytest.raises(ValueError, match="step"):
        CheckpointState(step=step, tensors={}, meta={})  # type: ignore[arg-type]


def test_keep_last_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointStore(tmp_path, keep_last=0)


def test_load_latest_of_an_empty_or_missing_directory_is_none(tmp_path: Path) -> None:
    assert CheckpointStore(tmp_path / "nowhere").load_latest() is None
    assert CheckpointStore(tmp_path).load_latest() is None
    with pytest.raises(FileNotFoundError):
        CheckpointStore(tmp_path).load(tmp_path / "step-000000001")


# ---- corruption ---------------------------------------------------------------------------------


def _truncate(path: Path) -> None:
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])


def _flip_tensor_bit(path: Path) -> None:
    target = path / "model.safetensors"
    data = bytearray(target.read_bytes())
    data[-3] ^= 0x10  # in the tensor bytes, past the header
    target.write_bytes(bytes(data))


def _flip_manifest_bit(path: Path) -> None:
    target = path / MANIFEST_NAME
    text = target.read_bytes()
    at = text.index(b'"step": ') + len(b'"step": ')  # the step's digit: 2 -> 3 is one bit
    data = bytearray(text)
    data[at] ^= 0x01
    target.write_bytes(bytes(data))


def _delete_file(path: Path) -> None:
    (path / "optimizer.safetensors").unlink()


def _garbage_manifest(path: Path) -> None:
    (path / MANIFEST_NAME).write_bytes(b"\x00\xffnot json at all")


def _delete_manifest(path: Path) -> None:
    (path / MANIFEST_NAME).unlink()


def _damage_version(path: Path) -> None:
    # One digit of the format version changed: it names a version this Gossamer does not know,
    # but the self-hash says the manifest is damaged, not newer.
    raw = (path / MANIFEST_NAME).read_bytes()
    damaged = raw.replace(b'"format_version": 1', b'"format_version": 3', 1)
    assert damaged != raw
    (path / MANIFEST_NAME).write_bytes(damaged)


def _damage_version_key(path: Path) -> None:
    raw = (path / MANIFEST_NAME).read_bytes()
    (path / MANIFEST_NAME).write_bytes(raw.replace(b'"format_version"', b'"format_versiom"', 1))


def _future_version(path: Path) -> None:
    # A well-formed manifest of a newer format: self-hash recomputed, so it is intact.
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    manifest.pop("manifest_sha256")
    manifest["format_version"] = 99
    manifest["manifest_sha256"] = sha256_bytes(manifest_module._canonical(manifest).encode())
    (path / MANIFEST_NAME).write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("damage", "error", "names"),
    [
        (_truncate, CheckpointCorruptedError, r"model\.safetensors: truncated"),
        (_flip_tensor_bit, CheckpointCorruptedError, r"model\.safetensors: hash mismatch"),
        (_flip_manifest_bit, CheckpointCorruptedError, r"manifest\.json: hash mismatch"),
        (_damage_version, CheckpointCorruptedError, r"hash mismatch.*format version 3"),
        (_damage_version_key, CheckpointCorruptedError, r"hash mismatch.*format version None"),
        (_delete_file, CheckpointCorruptedError, r"optimizer\.safetensors: missing"),
        (_garbage_manifest, CheckpointCorruptedError, r"manifest\.json: not valid JSON"),
        (_delete_manifest, CheckpointCorruptedError, r"manifest\.json: missing"),
    ],
)
def test_damage_is_named_and_load_latest_falls_back(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    damage: object,
    error: type[Exception],
    names: str,
) -> None:
    store = CheckpointStore(tmp_path)
    store.save(_state(1))
    damaged = store.save(_state(2))
    damage(damaged)  # type: ignore[operator]

    with pytest.raises(error, match=names):
        store.load(damaged)

    with caplog.at_level(logging.WARNING, logger="gossamer.store"):
        latest = store.load_latest()
    assert latest is not None
    _assert_same(latest, _state(1))
    assert [path for path, _ in store.skipped] == [damaged]
    assert store.skipped[0][1].startswith(str(damaged))
    assert "step-000000002" in caplog.text

    listing = {info.step: info for info in store.list()}
    assert listing[1].valid
    assert not listing[2].valid
    assert listing[2].reason is not None


def test_every_bit_flip_in_a_manifest_is_caught_or_harmless(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    expected = _state(5)
    path = store.save(expected)
    manifest_path = path / MANIFEST_NAME
    original = manifest_path.read_bytes()
    rng = random.Random(0)
    num_caught = 0
    for bit in rng.sample(range(len(original) * 8), 300):
        data = bytearray(original)
        data[bit // 8] ^= 1 << (bit % 8)
        manifest_path.write_bytes(bytes(data))
        try:
            loaded = store.load(path)
        except (CheckpointCorruptedError, IncompatibleCheckpointError):
            num_caught += 1
            continue
        # A flip JSON reads the same way ('1e-05' vs '1E-05') changes nothing that matters.
        _assert_same(loaded, expected)
    assert num_caught >= 290


def test_a_folder_renamed_to_another_step_is_caught(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    path = store.save(_state(4))
    path.rename(tmp_path / "step-000000009")
    with pytest.raises(CheckpointCorruptedError, match="says step 4"):
        store.load(tmp_path / "step-000000009")


def test_extra_bytes_are_a_size_mismatch(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    path = store.save(_state(1))
    with (path / "model.safetensors").open("ab") as f:
        f.write(b"\x00")
    with pytest.raises(CheckpointCorruptedError, match="size mismatch"):
        store.load(path)


def test_when_every_checkpoint_is_damaged_load_latest_says_so(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    _truncate(store.save(_state(1)))
    _flip_tensor_bit(store.save(_state(2)))
    with pytest.raises(CheckpointCorruptedError, match="no valid checkpoint") as excinfo:
        store.load_latest()
    assert "step-000000001" in str(excinfo.value)
    assert "step-000000002" in str(excinfo.value)
    assert len(store.skipped) == 2


# ---- pruning ------------------------------------------------------------------------------------


def _steps(directory: Path) -> list[int]:
    return sorted(int(p.name.removeprefix("step-")) for p in directory.glob("step-*"))


def test_keep_last_keeps_the_newest_valid_checkpoints(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep_last=3)
    for step in range(1, 7):
        store.save(_state(step))
    assert _steps(tmp_path) == [4, 5, 6]
    assert [info.step for info in store.list()] == [4, 5, 6]


def test_pruning_never_counts_damaged_ones_and_keeps_the_valid(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep_last=2)
    store.save(_state(1))
    store.save(_state(2))
    _flip_tensor_bit(tmp_path / "step-000000002")  # after the store verified it
    store.save(_state(3))
    # 2 is damaged, so 1 is still one of the two newest valid ones.
    assert _steps(tmp_path) == [1, 2, 3]
    store.save(_state(4))
    assert _steps(tmp_path) == [3, 4]


def test_keep_last_one_never_deletes_the_only_valid_checkpoint(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep_last=1)
    store.save(_state(1))
    store.save(_state(2))
    assert _steps(tmp_path) == [2]
    # Saving an older step (a run rolled back) keeps what was just saved.
    store.save(_state(1, fill=11))
    assert _steps(tmp_path) == [1]
    latest = store.load_latest()
    assert latest is not None
    assert _fill(latest) == 11


def test_pruning_leaves_checkpoints_of_unknown_format_alone(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep_last=1)
    _future_version(store.save(_state(1)))
    store.save(_state(2))
    store.save(_state(3))
    assert _steps(tmp_path) == [1, 3]


def test_meta_with_keys_that_are_not_strings_saves_a_checkpoint_that_loads(tmp_path: Path) -> None:
    """The self-hash was of the meta as given: int keys sort as numbers there (2 before 10) and
    as strings once read back ("10" before "2"), so the checkpoint was refused as damaged, and
    pruning had deleted the good ones before it."""
    store = CheckpointStore(tmp_path, keep_last=1)
    store.save(_state(1))
    state = _state(2)
    store.save(
        CheckpointState(step=2, tensors=state.tensors, meta={"per_peer": {i: i for i in range(11)}})
    )
    latest = store.load_latest()
    assert latest is not None
    assert latest.step == 2
    assert latest.meta == {"per_peer": {str(i): i for i in range(11)}}


def test_pruning_leaves_folders_that_are_not_checkpoints_alone(tmp_path: Path) -> None:
    """A folder named like a step but holding no manifest was deleted as damaged: it is no
    torn checkpoint either (a checkpoint's folder takes its name once whole)."""
    store = CheckpointStore(tmp_path, keep_last=1)
    store.save(_state(1))
    mine = tmp_path / "step-000000002"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's")
    store.save(_state(3))
    store.save(_state(4))
    assert (mine / "notes.txt").read_text() == "the user's"


def test_a_checkpoint_that_cannot_be_deleted_fails_no_save(tmp_path: Path) -> None:
    """A symlinked checkpoint (rmtree refuses links), or a file that cannot be unlinked, failed
    the save that had just succeeded, and every later one before it wrote anything."""
    archive = tmp_path / "archive"
    CheckpointStore(archive, keep_last=1).save(_state(1))
    runs = tmp_path / "run"
    runs.mkdir()
    (runs / "step-000000001").symlink_to(archive / "step-000000001")
    store = CheckpointStore(runs, keep_last=1)
    store.save(_state(2))
    assert _steps(runs) == [2]
    assert (archive / "step-000000001" / MANIFEST_NAME).exists()  # the link went, not its files
    stuck = runs / "step-000000003"
    store.save(_state(3))
    original = shutil.rmtree

    def refuse(path: object, *args: object, **kwargs: object) -> None:
        raise PermissionError(1, "Operation not permitted", str(path))

    shutil.rmtree = refuse  # type: ignore[assignment]
    try:
        store.save(_state(4))  # pruning 3 fails: 4 is saved all the same
        store.save(_state(5))  # and so is the next
    finally:
        shutil.rmtree = original
    assert not stuck.exists()  # renamed out of the way before its files went
    latest = store.load_latest()
    assert latest is not None
    assert latest.step == 5


def test_a_checkpoint_that_cannot_be_read_is_passed_over_and_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An I/O error (EIO, ESTALE) reading the newest checkpoint ended load_latest and the next
    save's pruning instead of passing it over."""
    store = CheckpointStore(tmp_path, keep_last=2)
    store.save(_state(1))
    store.save(_state(2))
    broken = tmp_path / "step-000000002"
    real_open = durable_files.open_for_reading

    def failing_open(name: str, *, folder_fd: int) -> object:
        if broken.exists() and os.path.samestat(os.fstat(folder_fd), os.stat(broken)):
            raise OSError(5, "Input/output error", name)
        return real_open(name, folder_fd=folder_fd)

    monkeypatch.setattr(durable_files, "open_for_reading", failing_open)
    latest = CheckpointStore(tmp_path, keep_last=1).load_latest()
    assert latest is not None
    assert latest.step == 1
    store = CheckpointStore(tmp_path, keep_last=1)
    store.save(_state(3))
    assert _steps(tmp_path) == [2, 3]  # kept: unreadable is no proof of damage


# ---- atomicity ----------------------------------------------------------------------------------


def test_saving_the_same_step_replaces_it_whole(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.save(_state(5, fill=1))
    path = store.save(_state(5, fill=2))
    assert _fill(store.load(path)) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "step-000000005"]


def test_replacing_without_atomic_exchange_also_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(durable_files, "exchange_dirs", lambda first, second: False)
    store = CheckpointStore(tmp_path)
    store.save(_state(5, fill=1))
    path = store.save(_state(5, fill=2))
    assert _fill(store.load(path)) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "step-000000005"]


class _InjectedFaultError(OSError):
    pass


def _fail(*args: object) -> None:
    raise _InjectedFaultError("injected fault")


@pytest.mark.parametrize(
    ("seam", "same_step"),
    [
        ("write_file_durably", False),
        ("write_file_durably", True),
        ("fsync_dir", False),
        ("fsync_dir", True),
        ("rename", False),
        ("exchange_dirs", True),
    ],
)
def test_a_failed_save_loses_nothing_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seam: str, same_step: bool
) -> None:
    store = CheckpointStore(tmp_path)
    store.save(_state(1))
    store.save(_state(2))
    before = sorted(p.name for p in tmp_path.iterdir())
    monkeypatch.setattr(durable_files, seam, _fail)
    with pytest.raises(CheckpointWriteError) as excinfo:  # (one of Gossamer's, naming the folder)
        store.save(_state(2 if same_step else 3, fill=99))
    assert isinstance(excinfo.value.__cause__, _InjectedFaultError)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    for kept in (1, 2):
        _assert_same(store.load(store.path_for(kept)), _state(kept))


def test_the_fallback_swap_failing_midway_restores_the_old_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = CheckpointStore(tmp_path)
    store.save(_state(2))
    monkeypatch.setattr(durable_files, "exchange_dirs", lambda first, second: False)
    real_rename = durable_files.rename
    calls: list[Path] = []

    def second_rename_fails(source: Path, target: Path) -> None:
        calls.append(source)
        if len(calls) == 2:  # old moved aside; now the new one fails to move in
            raise _InjectedFaultError("injected fault")
        real_rename(source, target)

    monkeypatch.setattr(durable_files, "rename", second_rename_fails)
    with pytest.raises(CheckpointWriteError) as excinfo:
        store.save(_state(2, fill=99))
    assert isinstance(excinfo.value.__cause__, _InjectedFaultError)
    monkeypatch.undo()
    _assert_same(store.load(store.path_for(2)), _state(2))


def test_a_writer_that_died_between_the_fallback_renames_is_undone(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "run")
    path = store.save(_state(2))
    newer = CheckpointStore(tmp_path / "elsewhere").save(_state(2, fill=7))
    # What the fallback leaves if killed between its two renames: the old one hidden, the new
    # one complete but still temporary.
    hidden = store.directory / ".old-step-000000002-deadbeef"
    path.rename(hidden)
    newer.rename(store.directory / ".tmp-step-000000002-cafef00d")
    # Until the next save, readers take the hidden old one for step 2 (never the temporary one):
    # finding nothing, a run would start over and later prune or overwrite it.
    latest = store.load_latest()
    assert latest is not None
    _assert_same(latest, _state(2))
    assert [(info.step, info.path, info.valid) for info in store.list()] == [(2, hidden, True)]
    assert store.steps() == [2]
    store.save(_state(1))  # the next save puts the old one back and removes the new one
    assert _steps(store.directory) == [1, 2]
    _assert_same(store.load(store.path_for(2)), _state(2))
    assert not [p for p in store.directory.iterdir() if p.name.startswith((".tmp", ".old"))]


def test_a_tensor_that_fails_to_serialize_leaves_the_old_checkpoint(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.save(_state(3))
    bad = CheckpointState(
        step=3,
        tensors={"model": {"w": torch.zeros(2)}, "sparse": {"s": torch.zeros(3).to_sparse()}},
        meta={},
    )
    with pytest.raises(ValueError, match="sparse"):
        store.save(bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "step-000000003"]
    _assert_same(store.load(store.path_for(3)), _state(3))


def test_stale_temporary_folders_are_ignored_then_cleaned(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.save(_state(1))
    stale = tmp_path / ".tmp-step-000000002-0badc0de"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half a file")
    latest = store.load_latest()
    assert latest is not None
    assert latest.step == 1
    assert store.skipped == []
    assert [info.step for info in store.list()] == [1]
    store.save(_state(2))
    assert not stale.exists()


def test_files_are_fsynced_before_the_rename_and_the_directory_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[str] = []
    real_write, real_fsync_dir, real_rename = (
        durable_files.write_file_durably,
        durable_files.fsync_dir,
        durable_files.rename,
    )

    def write(path: Path, data: bytes | memoryview) -> None:
        real_write(path, data)
        events.append(f"write {path.name}")

    def fsync_dir(path: Path) -> None:
        real_fsync_dir(path)
        events.append(f"fsync {'parent' if path == tmp_path else 'tmp'}")

    def rename(source: Path, target: Path) -> None:
        real_rename(source, target)
        events.append(f"rename to {target.name}")

    monkeypatch.setattr(durable_files, "write_file_durably", write)
    monkeypatch.setattr(durable_files, "fsync_dir", fsync_dir)
    monkeypatch.setattr(durable_files, "rename", rename)
    CheckpointStore(tmp_path).save(_state(1))
    assert events == [
        "write model.safetensors",
        "write optimizer.safetensors",
        "write manifest.json",
        "fsync tmp",
        "rename to step-000000001",
        "fsync parent",
    ]


def test_a_save_waits_for_another_writer_holding_the_directory_lock(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.save(_state(1))
    with durable_files.locked(tmp_path / ".lock"):
        writer = threading.Thread(target=store.save, args=(_state(2),))
        writer.start()
        writer.join(timeout=0.3)  # a bounded check that it is blocked, not a synchronisation
        assert writer.is_alive()
        assert _steps(tmp_path) == [1]
    writer.join(timeout=30)
    assert not writer.is_alive()
    assert _steps(tmp_path) == [1, 2]


def test_a_hidden_folder_is_a_checkpoint_only_by_its_exact_name_and_while_its_step_is_absent(
    tmp_path: Path,
) -> None:
    store = CheckpointStore(tmp_path)
    store.save(_state(2))
    elsewhere = CheckpointStore(tmp_path / "elsewhere")
    # A leftover beside its step (its removal failed): the step's own folder is the checkpoint.
    elsewhere.save(_state(2, fill=7)).rename(tmp_path / ".old-step-000000002-0123abcd")
    # Not names the fallback writes: never taken for a checkpoint.
    for name in (".old-step-000000003-DEADBEEF", ".old-step-000000004-cafe", ".old-step-5-x"):
        step = int(name.split("-")[2])
        elsewhere.save(_state(step)).rename(tmp_path / name)
    latest = store.load_latest()
    assert latest is not None
    _assert_same(latest, _state(2))
    assert [(info.step, info.path.name) for info in store.list()] == [(2, "step-000000002")]


# ---- malformed and oversized manifests ----------------------------------------------------------


def _deeply_nested_manifest(path: Path) -> None:
    (path / MANIFEST_NAME).write_bytes(b"[" * 200_000)


def _huge_creation_time(path: Path) -> None:
    # Intact (self-hash recomputed), but no float holds the number.
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    manifest.pop("manifest_sha256")
    manifest["created_unix_s"] = 10**400
    manifest["manifest_sha256"] = sha256_bytes(manifest_module._canonical(manifest).encode())
    (path / MANIFEST_NAME).write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("damage", "names"),
    [
        (_deeply_nested_manifest, "nested too deeply"),
        (_huge_creation_time, "too large"),
    ],
)
def test_a_manifest_that_breaks_the_parser_is_damage_like_any_other(
    tmp_path: Path, damage: Callable[[Path], None], names: str
) -> None:
    store = CheckpointStore(tmp_path, keep_last=2)
    store.save(_state(1))
    damaged = store.save(_state(2))
    damage(damaged)
    with pytest.raises(CheckpointCorruptedError, match=f"malformed manifest: .*{names}"):
        store.load(damaged)
    latest = store.load_latest()
    assert latest is not None
    _assert_same(latest, _state(1))
    assert [(info.step, info.valid) for info in store.list()] == [(1, True), (2, False)]
    store.save(_state(3))  # pruning reads it too, and must go on
    store.save(_state(4))
    assert _steps(tmp_path) == [3, 4]


def _in_under_8_mib(call: Callable[[], object]) -> None:
    """Run ``call`` (which must raise); the memory it allocated on the way stays under 8 MiB."""
    tracemalloc.start()
    try:
        call()
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak < 8 * 2**20


def test_an_oversized_manifest_is_refused_before_it_is_read(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    path = store.save(_state(1))
    with (path / MANIFEST_NAME).open("r+b") as f:
        f.truncate(MAX_MANIFEST_BYTES + 1)  # sparse: costs no disk
    with pytest.raises(CheckpointCorruptedError, match=r"manifest\.json: .*64 MiB"):
        _in_under_8_mib(lambda: store.load(path))


def test_a_manifest_too_big_for_readers_is_never_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(manifest_module, "MAX_MANIFEST_BYTES", 4096)
    store = CheckpointStore(tmp_path)
    with pytest.raises(ValueError, match="a reader accepts"):
        store.save(CheckpointState(step=1, tensors={}, meta={"notes": "x" * 5000}))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]


# ---- unknown format versions --------------------------------------------------------------------


def test_a_checkpoint_of_unknown_format_is_refused_by_load_and_listed_invalid(
    tmp_path: Path,
) -> None:
    store = CheckpointStore(tmp_path)
    path = store.save(_state(1))
    _future_version(path)
    with pytest.raises(IncompatibleCheckpointError, match="unknown format version 99"):
        store.load(path)
    [info] = store.list()
    assert not info.valid
    assert info.reason is not None
    assert "unknown format version 99" in info.reason
    with pytest.raises(IncompatibleCheckpointError, match="no valid checkpoint"):
        store.load_latest()


def test_load_latest_will_not_resume_past_a_newer_checkpoint_of_unknown_format(
    tmp_path: Path,
) -> None:
    store = CheckpointStore(tmp_path)
    store.save(_state(1))
    newer = store.save(_state(2))
    _future_version(newer)
    # Resuming from step 1 would lose step 2's progress, then overwrite it at step 2.
    with pytest.raises(IncompatibleCheckpointError) as excinfo:
        store.load_latest()
    message = str(excinfo.value)
    assert str(newer) in message
    assert "newer Gossamer" in message
    assert "Upgrade Gossamer" in message
    assert "move it out of" in message
    assert "step-000000001" in message
    newer.rename(tmp_path.parent / f"{tmp_path.name}-moved-away")
    latest = store.load_latest()
    assert latest is not None
    _assert_same(latest, _state(1))


def test_an_older_checkpoint_of_unknown_format_does_not_stop_a_resume(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    _future_version(store.save(_state(1)))
    store.save(_state(2))
    latest = store.load_latest()
    assert latest is not None
    _assert_same(latest, _state(2))


def test_saving_over_a_checkpoint_of_unknown_format_is_refused_and_leaves_it(
    tmp_path: Path,
) -> None:
    store = CheckpointStore(tmp_path)
    path = store.save(_state(3))
    _future_version(path)
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    with pytest.raises(IncompatibleCheckpointError) as excinfo:
        store.save(_state(3, fill=0))
    message = str(excinfo.value)
    assert str(path) in message
    assert "newer Gossamer" in message
    assert "Upgrade Gossamer" in message
    assert "move that folder out of" in message
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "step-000000003"]


# ---- readers racing the writer ------------------------------------------------------------------


def test_a_checkpoint_pruned_after_the_reader_listed_it_is_found_anew(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = CheckpointStore(tmp_path, keep_last=1)
    writer.save(_state(1))
    reader = CheckpointStore(tmp_path)
    real_scan = reader._scan
    num_scans = 0

    def scan_then_writer_saves() -> list[checkpoint_folders._FoundFolder]:
        nonlocal num_scans
        found = real_scan()
        num_scans += 1
        if num_scans == 1:  # the writer saves step 2 and prunes step 1 right after the listing
            writer.save(_state(2))
        return found

    monkeypatch.setattr(reader, "_scan", scan_then_writer_saves)
    latest = reader.load_latest()  # not None: that would start the run over
    assert latest is not None
    _assert_same(latest, _state(2))
    assert reader.skipped == []


@pytest.mark.parametrize("same_step", [False, True], ids=["pruned", "replaced"])
def test_a_checkpoint_changed_by_the_writer_while_read_is_read_anew(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, same_step: bool
) -> None:
    writer = CheckpointStore(tmp_path, keep_last=1)
    writer.save(_state(1))
    expected = _state(1, fill=9) if same_step else _state(2)
    reader = CheckpointStore(tmp_path)
    real_decode = manifest_module.decode_manifest
    num_decoded = 0

    def decode_then_writer_saves(data: bytes, where: Path) -> manifest_module.Manifest:
        nonlocal num_decoded
        num_decoded += 1
        if num_decoded == 1:  # between the reader's manifest and its tensor files
            writer.save(expected)
        return real_decode(data, where)

    monkeypatch.setattr(checkpoint_reader, "decode_manifest", decode_then_writer_saves)
    latest = reader.load_latest()
    assert latest is not None
    _assert_same(latest, expected)
    assert reader.skipped == []

    num_decoded = 0
    listing = reader.list()
    assert [(info.step, info.valid) for info in listing] == [(expected.step, True)]


def test_a_checkpoint_that_keeps_changing_is_read_a_bounded_number_of_times(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = CheckpointStore(tmp_path, keep_last=1)
    writer.save(_state(1))
    reader = CheckpointStore(tmp_path)
    real_decode = manifest_module.decode_manifest
    num_decoded = 0
    saving = False

    def decode_then_writer_saves(data: bytes, where: Path) -> manifest_module.Manifest:
        nonlocal num_decoded, saving
        if not saving:  # the writer's own reads (pruning) do not save again
            num_decoded += 1
            saving = True
            try:
                writer.save(_state(1, fill=num_decoded))
            finally:
                saving = False
        return real_decode(data, where)

    monkeypatch.setattr(checkpoint_reader, "decode_manifest", decode_then_writer_saves)
    with pytest.raises(CheckpointCorruptedError, match="changed while it was read"):
        reader.load_latest()
    assert num_decoded == checkpoint_loading._NUM_READ_PASSES


def test_a_listing_that_raced_a_rename_is_taken_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = CheckpointStore(tmp_path, keep_last=1)
    writer.save(_state(1))
    reader = CheckpointStore(tmp_path)
    real_entries = reader._entries
    num_listings = 0

    def entries_missing_both_names() -> list[os.DirEntry[str]]:
        nonlocal num_listings
        num_listings += 1
        if num_listings == 1:
            # readdir during the writer's renames may return neither step-1 nor step-2.
            writer.save(_state(2))
            return []
        return list(real_entries())

    os.utime(tmp_path, ns=(0, 0))  # so the writer's change shows in the directory's times
    monkeypatch.setattr(reader, "_entries", entries_missing_both_names)
    latest = reader.load_latest()
    assert latest is not None
    _assert_same(latest, _state(2))


# ---- what a reader opens ------------------------------------------------------------------------


def test_an_oversized_tensor_file_is_refused_without_reading_it(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    path = store.save(_state(1))
    with (path / "model.safetensors").open("r+b") as f:
        f.truncate(256 * 2**20)  # sparse: costs no disk
    with pytest.raises(CheckpointCorruptedError, match=r"model\.safetensors: size mismatch"):
        _in_under_8_mib(lambda: store.load(path))


def _link_to_a_copy(target: Path) -> None:
    copy = target.parent.parent / f"copy-of-{target.name}"
    shutil.copyfile(target, copy)
    target.unlink()
    target.symlink_to(copy)


def _fifo(target: Path) -> None:
    target.unlink()
    os.mkfifo(target)  # reading it would block forever


def _folder(target: Path) -> None:
    target.unlink()
    target.mkdir()


@pytest.mark.parametrize("name", ["model.safetensors", MANIFEST_NAME])
@pytest.mark.parametrize(
    ("replace", "reason"),
    [
        (_link_to_a_copy, "a symbolic link"),
        (_fifo, "not a regular file"),
        (_folder, "not a regular file"),
    ],
)
def test_only_regular_files_are_read(
    tmp_path: Path, name: str, replace: Callable[[Path], None], reason: str
) -> None:
    store = CheckpointStore(tmp_path / "run")
    path = store.save(_state(1))
    replace(path / name)
    with pytest.raises(CheckpointCorruptedError, match=f"{name}: {reason}"):
        store.load(path)
    [info] = store.list()
    assert not info.valid
    assert info.reason is not None
    assert reason in info.reason


# ---- what cannot be saved -----------------------------------------------------------------------


def test_a_quantized_tensor_is_refused_with_a_value_error(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch deprecates creating quantized tensors
        quantized = torch.quantize_per_tensor(torch.zeros(2), 0.1, 0, torch.quint8)
    state = CheckpointState(step=1, tensors={"model": {"w": quantized}}, meta={})
    with pytest.raises(ValueError, match=r"'w' is quantized \(torch\.quint8\)"):
        CheckpointStore(tmp_path).save(state)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]


def test_a_folder_that_cannot_be_read_is_listed_with_why_and_the_rest_listed_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = CheckpointStore(tmp_path)
    store.save(_state(1))
    unreadable = store.save(_state(2))
    verify = checkpoint_reader.CheckpointReader.verify_files

    def verify_files(self: checkpoint_reader.CheckpointReader) -> None:
        if self.folder == unreadable:  # (root reads any file: the error is made here)
            raise PermissionError(13, "Permission denied", str(unreadable / "model.safetensors"))
        verify(self)

    monkeypatch.setattr(checkpoint_reader.CheckpointReader, "verify_files", verify_files)
    listing = store.list()
    assert [(info.step, info.valid) for info in listing] == [(1, True), (2, False)]
    assert listing[1].reason is not None
    assert "Permission denied" in listing[1].reason
