"""Corpora: the embedded stdlib corpus, text files and folders, token files, and bad input."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from gossamer.core.config import DataConfig, ModelConfig, RunConfig
from gossamer.core.errors import ConfigError, DataError
from gossamer.data import TokenSource, load_corpus, stdlib_source_files


def _sha256(tokens: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(tokens).tobytes()).hexdigest()


def _is_mapped(source: TokenSource) -> bool:
    """Whether ``source``'s tokens are a view of its file's memory map, not a copy."""
    return source.mapped is not None and np.shares_memory(
        source.tokens, np.frombuffer(source.mapped.mapping, dtype=np.uint8)
    )


# --- the embedded corpus ---------------------------------------------------------------------


def test_stdlib_split_is_the_same_every_time_and_disjoint() -> None:
    first = load_corpus(DataConfig())
    second = load_corpus(DataConfig())
    assert first.manifest == second.manifest
    assert np.array_equal(first.train.tokens, second.train.tokens)
    train_files = set(first.manifest["train_files"])
    validation_files = set(first.manifest["validation_files"])
    assert train_files
    assert validation_files
    assert not train_files & validation_files
    _, all_files = stdlib_source_files()
    assert train_files | validation_files == set(all_files)


def test_stdlib_manifest_is_json_and_matches_the_tokens() -> None:
    corpus = load_corpus(DataConfig())
    manifest = json.loads(json.dumps(corpus.manifest))
    assert manifest["source"] == "stdlib"
    assert manifest["python_version"].count(".") == 2
    assert manifest["num_train_tokens"] == len(corpus.train) == manifest["train_bytes"]
    assert manifest["num_validation_tokens"] == len(corpus.validation)
    assert manifest["train_sha256"] == _sha256(corpus.train.tokens)
    assert manifest["validation_sha256"] == _sha256(corpus.validation.tokens)
    assert corpus.train.tokens.dtype == np.uint8
    assert len(corpus.train) > 1_000_000


def test_stdlib_leaves_out_tests_third_party_code_and_build_config() -> None:
    _, files = stdlib_source_files()
    assert "os.py" in files
    assert "json/decoder.py" in files
    for name in files:
        parts = name.split("/")
        assert not {"test", "tests", "idle_test", "site-packages", "dist-packages"} & set(parts)
        assert not parts[-1].startswith("_sysconfigdata")
        assert name.endswith(".py")
    assert files == sorted(files)


def test_stdlib_corpus_is_cached_but_its_manifest_is_a_fresh_copy() -> None:
    first = load_corpus(DataConfig())
    first.manifest["train_files"].clear()
    assert load_corpus(DataConfig()).manifest["train_files"]
    assert not first.train.tokens.flags.writeable


def test_raising_the_validation_fraction_only_moves_files_into_validation() -> None:
    small = load_corpus(DataConfig(validation_fraction=0.05)).manifest
    large = load_corpus(DataConfig(validation_fraction=0.2)).manifest
    assert set(small["validation_files"]) < set(large["validation_files"])


def test_max_corpus_bytes_takes_a_prefix_and_keeps_the_split() -> None:
    full = load_corpus(DataConfig())
    capped = load_corpus(DataConfig(max_corpus_bytes=50_000))
    assert len(capped.train) == 50_000
    assert np.array_equal(capped.train.tokens, full.train.tokens[:50_000])
    assert 0 < len(capped.validation) <= 50_000
    assert np.array_equal(
        capped.validation.tokens, full.validation.tokens[: len(capped.validation)]
    )
    assert (
        capped.manifest["train_files"]
        == full.manifest["train_files"][: len(capped.manifest["train_files"])]
    )


# --- text files and folders ------------------------------------------------------------------


def test_single_text_file_is_split_by_its_tail(tmp_path: Path) -> None:
    data = bytes(range(32, 127)) * 20
    path = tmp_path / "book.txt"
    path.write_bytes(data)
    corpus = load_corpus(DataConfig(source="text", path=str(path), validation_fraction=0.1))
    split = corpus.manifest["split_index"]
    assert split == len(data) - round(len(data) * 0.1)
    assert corpus.train.tokens.tobytes() == data[:split]
    assert corpus.validation.tokens.tobytes() == data[split:]
    assert _is_mapped(corpus.train)


def _write_folder(root: Path, num_files: int) -> dict[str, bytes]:
    contents = {}
    for index in range(num_files):
        name = f"part{index % 3}/file{index:02d}.txt"
        contents[name] = f"text of file {index}\n".encode() * (index + 1)
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(contents[name])
    return contents


def test_text_folder_is_read_recursively_in_order_and_split_by_file(tmp_path: Path) -> None:
    contents = _write_folder(tmp_path, 30)
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (tmp_path / "image.bin").write_bytes(b"\x89PNG\0\0\0")
    (tmp_path / "empty.txt").write_bytes(b"")
    config = DataConfig(source="text", path=str(tmp_path), validation_fraction=0.3)
    corpus = load_corpus(config)
    train_files = corpus.manifest["train_files"]
    validation_files = corpus.manifest["validation_files"]
    assert sorted(train_files + validation_files) == sorted(contents)
    assert train_files == sorted(train_files)
    assert train_files
    assert validation_files
    assert corpus.train.tokens.tobytes() == b"".join(contents[name] for name in train_files)
    assert corpus.validation.tokens.tobytes() == b"".join(
        contents[name] for name in validation_files
    )
    assert load_corpus(config).manifest == corpus.manifest


def test_a_folder_of_two_files_is_split_by_its_tail(tmp_path: Path) -> None:
    # One file each way would hold out half the bytes for 1% asked.
    contents = _write_folder(tmp_path, 2)
    corpus = load_corpus(DataConfig(source="text", path=str(tmp_path), validation_fraction=0.01))
    assert corpus.manifest["split"] == "tail"
    total = sum(len(data) for data in contents.values())
    assert len(corpus.validation) == max(1, round(total * 0.01))
    joined = b"".join(contents[name] for name in sorted(contents))
    assert corpus.train.tokens.tobytes() + corpus.validation.tokens.tobytes() == joined


def test_a_large_file_is_not_held_out_whole(tmp_path: Path) -> None:
    # A book and a README: the book's path fell in validation, and training ran on the README.
    (tmp_path / "book.txt").write_bytes(b"It was a dark and stormy night. " * 30_000)
    (tmp_path / "README.md").write_bytes(b"# notes\n" * 30)
    corpus = load_corpus(DataConfig(source="text", path=str(tmp_path), validation_fraction=0.05))
    share = len(corpus.validation) / (len(corpus.train) + len(corpus.validation))
    assert share == pytest.approx(0.05, abs=0.001)


def test_a_file_name_that_is_not_utf8_is_read(tmp_path: Path) -> None:
    for index in range(3):
        (tmp_path / f"f{index}.txt").write_bytes(b"plain text here\n" * 200)
    (tmp_path / os.fsdecode(b"caf\xe9.txt")).write_bytes(b"latin-1 named file\n" * 200)
    corpus = load_corpus(DataConfig(source="text", path=str(tmp_path), validation_fraction=0.3))
    assert len(corpus.train) + len(corpus.validation) == 3 * 16 * 200 + 19 * 200
    json.dumps(corpus.manifest)  # the manifest goes into checkpoints as JSON


def test_ids_past_the_vocabulary_anywhere_in_a_token_file_are_found_at_load(
    tmp_path: Path,
) -> None:
    ids = np.arange(100_000, dtype="<u2") % 200
    ids[77_777] = 999  # deep in training data, far from any first batch
    ids.tofile(tmp_path / "t.bin")
    corpus = load_corpus(DataConfig(source="tokens", path=str(tmp_path / "t.bin")))
    assert corpus.manifest["max_train_token_id"] == 999
    assert corpus.manifest["max_validation_token_id"] == 199


def test_uint32_ids_read_as_uint16_are_refused(tmp_path: Path) -> None:
    np.random.default_rng(0).integers(1, 50_000, 10_000).astype("<u4").tofile(tmp_path / "t.bin")
    with pytest.raises(DataError, match="token_dtype = 'uint32'"):
        load_corpus(DataConfig(source="tokens", path=str(tmp_path / "t.bin")))
    corpus = load_corpus(
        DataConfig(source="tokens", path=str(tmp_path / "t.bin"), token_dtype="uint32")
    )
    assert len(corpus.train) + len(corpus.validation) == 10_000


def test_a_text_file_given_as_token_ids_is_refused(tmp_path: Path) -> None:
    # It trained, at exit 0, on ids made of two characters each.
    (tmp_path / "train.txt").write_text("def f(x):\n    return x  # caf\u00e9\n" * 400)
    with pytest.raises(DataError, match=r"looks like text.*data\.source = 'text'"):
        load_corpus(DataConfig(source="tokens", path=str(tmp_path / "train.txt")))
    (tmp_path / "odd.txt").write_text("def f(x):\n    return x\n" * 400 + "!")  # (odd size)
    with pytest.raises(DataError, match="looks like text"):
        load_corpus(DataConfig(source="tokens", path=str(tmp_path / "odd.txt")))
    # Token ids whose bytes are all printable for a while are not text all the way.
    ids = np.full(10_000, 0x4142, dtype="<u2")
    ids[3_000] = 7
    ids.tofile(tmp_path / "t.bin")
    load_corpus(DataConfig(source="tokens", path=str(tmp_path / "t.bin")))


def test_ids_of_a_vocabulary_past_uint16_are_not_read_as_uint16() -> None:
    # cl100k-style ids saved as uint32, read as the default uint16 with model.vocab_size
    # 100352: every id cut in two, and a run at exit 0.
    with pytest.raises(ConfigError, match=r"data\.token_dtype.*'uint32'"):
        RunConfig(
            data=DataConfig(source="tokens", path="t.bin"), model=ModelConfig(vocab_size=100_352)
        )
    RunConfig(
        data=DataConfig(source="tokens", path="t.bin", token_dtype="uint32"),
        model=ModelConfig(vocab_size=100_352),
    )
    RunConfig(data=DataConfig(source="tokens", path="t.bin"), model=ModelConfig(vocab_size=50_304))


# --- token files -----------------------------------------------------------------------------


@pytest.mark.parametrize(("token_dtype", "numpy_dtype"), [("uint16", "<u2"), ("uint32", "<u4")])
def test_token_files_are_memory_mapped_and_split_by_tail(
    tmp_path: Path, token_dtype: str, numpy_dtype: str
) -> None:
    values = (np.arange(1000, dtype=np.uint64) * 7919 % 50_000).astype(numpy_dtype)
    path = tmp_path / "tokens.bin"
    values.tofile(path)
    config = DataConfig(source="tokens", path=str(path), token_dtype=token_dtype)  # type: ignore[arg-type]
    corpus = load_corpus(config)
    assert _is_mapped(corpus.train)
    assert corpus.train.tokens.dtype == np.dtype(numpy_dtype)
    assert len(corpus.train) + len(corpus.validation) == 1000
    assert len(corpus.validation) == 50
    assert np.array_equal(corpus.train.tokens, values[:950])
    assert np.array_equal(corpus.validation.tokens, values[950:])
    manifest = json.loads(json.dumps(corpus.manifest))
    assert manifest["split_index"] == 950
    assert manifest["token_dtype"] == token_dtype
    assert manifest["train_sha256"] == _sha256(values[:950])
    with pytest.raises(ValueError, match="read-only"):
        corpus.train.tokens[0] = 1


def test_token_file_cap_is_in_bytes(tmp_path: Path) -> None:
    path = tmp_path / "tokens.bin"
    np.arange(1000, dtype="<u4").tofile(path)
    config = DataConfig(source="tokens", path=str(path), token_dtype="uint32", max_corpus_bytes=400)
    corpus = load_corpus(config)
    assert len(corpus.train) == 100
    assert corpus.train.tokens[-1] == 99


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["text", "tokens"])
def test_a_missing_path_names_the_path(tmp_path: Path, source: str) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=r"nowhere.*does not exist.*data\.path"):
        load_corpus(DataConfig(source=source, path=str(missing)))  # type: ignore[arg-type]


@pytest.mark.parametrize("source", ["text", "tokens"])
def test_an_empty_file_is_a_clear_error(tmp_path: Path, source: str) -> None:
    path = tmp_path / "empty"
    path.write_bytes(b"")
    with pytest.raises(DataError, match="is empty"):
        load_corpus(DataConfig(source=source, path=str(path)))  # type: ignore[arg-type]


def test_a_folder_without_text_files_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "data.bin").write_bytes(b"\0\1\2")
    (tmp_path / ".hidden.txt").write_text("secret")
    with pytest.raises(DataError, match="holds no text files"):
        load_corpus(DataConfig(source="text", path=str(tmp_path)))


@pytest.mark.parametrize("source", ["text", "tokens"])
@pytest.mark.parametrize("what", ["fifo", "device"])
def test_a_fifo_or_a_device_as_data_path_is_neither_a_file_nor_a_folder(
    tmp_path: Path, source: str, what: str
) -> None:
    # A fifo or /dev/zero given as text was "a folder [that] holds no text files".
    path = tmp_path / "corpus.fifo"
    if what == "fifo":
        os.mkfifo(path)
    else:
        path = Path("/dev/zero")
    kind = "a fifo" if what == "fifo" else "a character device"
    with pytest.raises(DataError, match=f"is neither a regular file nor a folder \\({kind}\\)"):
        load_corpus(DataConfig(source=source, path=str(path)))  # type: ignore[arg-type]


def _text_folder(root: Path, num_files: int, size: int) -> Path:
    folder = root / "corpus"
    folder.mkdir()
    for index in range(num_files):
        (folder / f"part{index}.txt").write_text("x = 1\n" * (size // 6))
    return folder


def test_a_folder_larger_than_memory_is_refused_naming_its_size_and_the_remedies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # It was read into one buffer of its size: a MemoryError, said to be the model's fault (or,
    # where the system overcommits memory, a process killed once the reads filled it).
    from gossamer.data import corpus as corpus_module

    folder = _text_folder(tmp_path, 4, 6_000)
    folder_bytes = sum(p.stat().st_size for p in folder.iterdir())
    monkeypatch.setattr(corpus_module, "physical_memory_bytes", lambda: 10_000)
    with pytest.raises(DataError) as refused:
        load_corpus(DataConfig(source="text", path=str(folder)))
    message = str(refused.value)
    assert f"data.path {str(folder)!r} holds {folder_bytes:,} bytes" in message
    assert "more than fits in memory" in message
    assert "data.max_corpus_bytes" in message
    assert "into one file, which is memory-mapped" in message
    # A cap that fits is fine: only what is read counts.
    corpus = load_corpus(DataConfig(source="text", path=str(folder), max_corpus_bytes=5_000))
    assert len(corpus.train) + len(corpus.validation) <= 5_000 + 5_000 // 19 + 1


def test_a_folder_whose_buffer_cannot_be_allocated_is_a_data_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _text_folder(tmp_path, 4, 6_000)
    real_empty = np.empty

    def no_memory(shape: object, *args: object, **kwargs: object) -> object:
        if kwargs.get("dtype") is np.uint8 and isinstance(shape, int) and shape > 1000:
            raise MemoryError(f"Unable to allocate {shape} bytes for an array")
        return real_empty(shape, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(np, "empty", no_memory)
    with pytest.raises(DataError, match=r"more than fits in memory \(reading it failed: Unable"):
        load_corpus(DataConfig(source="text", path=str(folder)))


def test_a_token_file_of_the_wrong_size_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "tokens.bin"
    path.write_bytes(b"\0" * 7)
    with pytest.raises(DataError, match=r"not a multiple of 2 .*token_dtype"):
        load_corpus(DataConfig(source="tokens", path=str(path)))


def test_a_folder_as_token_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="is not a file"):
        load_corpus(DataConfig(source="tokens", path=str(tmp_path)))


def test_a_single_token_is_too_few_to_split(tmp_path: Path) -> None:
    path = tmp_path / "one.txt"
    path.write_bytes(b"x")
    with pytest.raises(DataError, match="too few to split"):
        load_corpus(DataConfig(source="text", path=str(path)))


def test_an_unreadable_file_is_a_data_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_folder(tmp_path, 3)

    def refuse(self: Path, *args: object, **kwargs: object) -> bytes:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "open", refuse)
    with pytest.raises(DataError, match=r"Permission denied.*readable"):
        load_corpus(DataConfig(source="text", path=str(tmp_path)))


def test_a_single_binary_file_as_text_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"text at first" + b"\0\1\2" * 1000)
    with pytest.raises(DataError, match=r"looks binary.*data.source = 'tokens'"):
        load_corpus(DataConfig(source="text", path=str(path)))


def test_a_folder_is_held_in_memory_once(tmp_path: Path) -> None:
    num_files, file_bytes = 8, 1 << 20
    for index in range(num_files):
        (tmp_path / f"f{index}.txt").write_bytes(bytes([97 + index]) * file_bytes)
    tracemalloc.start()
    try:
        corpus = load_corpus(DataConfig(source="text", path=str(tmp_path)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    data_bytes = num_files * file_bytes
    assert len(corpus.train) + len(corpus.validation) == data_bytes
    assert peak < 1.3 * data_bytes, f"peak {peak / data_bytes:.2f}x the data"
    assert not corpus.train.tokens.flags.writeable
    assert not corpus.validation.tokens.flags.writeable


@pytest.mark.parametrize(("encoding", "name"), [("utf-16", "UTF-16"), ("utf-32", "UTF-32")])
def test_a_utf16_file_is_named_as_such_with_the_conversion(
    tmp_path: Path, encoding: str, name: str
) -> None:
    # Called binary, it was refused with the advice to read it as token ids.
    path = tmp_path / "book.txt"
    path.write_bytes(("hello world " * 300).encode(encoding))
    with pytest.raises(DataError) as excinfo:
        load_corpus(DataConfig(source="text", path=str(path)))
    message = str(excinfo.value)
    assert f"is {name} text" in message
    assert f"iconv -f {name} -t UTF-8" in message
    assert "tokens" not in message


def test_a_utf16_file_without_nul_bytes_is_not_read_as_bytes(tmp_path: Path) -> None:
    # Text outside ASCII has no NUL byte in UTF-16: it was trained on as if it were UTF-8.
    path = tmp_path / "book.txt"
    path.write_bytes(b"\xfe\xff" + ("\u4e2d\u6587\u6587\u672c" * 500).encode("utf-16-be"))
    assert b"\0" not in path.read_bytes()
    with pytest.raises(DataError, match="is UTF-16 text"):
        load_corpus(DataConfig(source="text", path=str(path)))


def test_a_folder_of_utf16_files_says_they_are_utf16(tmp_path: Path) -> None:
    # "holds no text files (hidden and binary files are skipped)"
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_bytes(("hello world " * 300).encode("utf-16"))
    with pytest.raises(DataError) as excinfo:
        load_corpus(DataConfig(source="text", path=str(tmp_path)))
    message = str(excinfo.value)
    assert "2 UTF-16 file(s) (a.txt, b.txt)" in message
    assert "iconv -f UTF-16 -t UTF-8" in message


def test_utf16_files_left_out_of_a_folder_are_named_in_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    contents = _write_folder(tmp_path, 6)
    (tmp_path / "notes.txt").write_bytes(("hello world " * 300).encode("utf-16"))
    with caplog.at_level(logging.WARNING, logger="gossamer.data.corpus"):
        corpus = load_corpus(DataConfig(source="text", path=str(tmp_path)))
    assert len(corpus.train) + len(corpus.validation) == sum(map(len, contents.values()))
    assert "1 UTF-16 file(s) left out of the corpus (notes.txt)" in caplog.text


_READ_AFTER_TRUNCATION = """
import os, sys
import numpy as np
from gossamer.core.config import DataConfig
from gossamer.core.errors import DataError
from gossamer.data import TokenStream, load_corpus

path = sys.argv[1]
with open(path, "wb") as f:
    f.write(bytes(range(32, 127)) * 20_000)
corpus = load_corpus(DataConfig(source="text", path=path))
stream = TokenStream(corpus.train, seq_len=64, batch_size=8, seed=0)
stream.next_batch()
os.truncate(path, 1000)  # (rewritten in place: `cat new > corpus.txt` starts so)
try:
    for _ in range(1000):
        stream.next_batch()
except DataError as exc:
    print("DataError:", exc)
"""


def test_a_batch_read_from_a_mapped_file_truncated_since_is_a_data_error(
    tmp_path: Path,
) -> None:
    # The pages the file lost were read: SIGBUS, a bare "Bus error" (exit 135), no checkpoint.
    # (In a child process: that signal ends the process that reads them.)
    result = subprocess.run(
        [sys.executable, "-c", _READ_AFTER_TRUNCATION, str(tmp_path / "corpus.txt")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert "shrank from 1900000 to 1000 bytes while this run read it" in result.stdout
    assert "rename it over the old one" in result.stdout


def test_a_mapped_file_renamed_over_is_read_as_it_was(tmp_path: Path) -> None:
    # Replacing a corpus the safe way: the map keeps the old file, and no error is raised.
    path = tmp_path / "corpus.txt"
    data = bytes(range(32, 127)) * 100
    path.write_bytes(data)
    corpus = load_corpus(DataConfig(source="text", path=str(path)))
    new = tmp_path / "new.txt"
    new.write_bytes(b"short")
    new.replace(path)
    corpus.train.check_intact()
    assert corpus.train.tokens.tobytes() == data[: len(corpus.train)]
