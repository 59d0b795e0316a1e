"""Corpora: where training and validation tokens come from, split deterministically.

Three sources, chosen by ``DataConfig.source``:

- ``stdlib``: the embedded corpus, the ``.py`` sources of the Python standard library installed on
  this machine, as bytes. Nothing is downloaded.
- ``text``: a text file or a folder of text files, as bytes.
- ``tokens``: a pre-tokenized file of little-endian ``uint16`` or ``uint32`` ids, memory-mapped.

Folders (the standard library included) are split **by file**: a file goes to validation when the
sha256 of its relative path, read as a fraction in [0, 1), is below ``validation_fraction``, so
every machine with the same files puts a file on the same side. Adding or removing a file leaves
the others where they were, except in two cases where the split depends on the whole set of
files: with so few files that one side would be empty, the file nearest the line is moved across;
and where a split by file would hold out less than a third or more than three times
``validation_fraction`` of the bytes (a few files of different sizes: one large file added, say),
the folder is split as one file instead, by its tail, and a file held out before may then be
trained on (and the other way). A single file is split by its tail: the last
``validation_fraction`` of its tokens are validation. UTF-16 and UTF-32 files (a byte-order mark)
are refused, or left out of a folder with a warning: the corpus is bytes, read as UTF-8.

A single file (text or tokens) is memory-mapped: it must not be truncated or rewritten in place
while a run reads it (replace it by writing a new file and renaming it over the old one). A batch
read from a file that has shrunk since it was mapped raises :class:`DataError` instead of the
bus error that touching its missing pages gives.

``max_corpus_bytes`` caps the training split to a prefix (files in sorted order, the last one cut);
the validation split is capped in proportion, so the train/validation ratio stays
``validation_fraction``. The cap is applied after the split, so it never moves a file across it.

Every :class:`Corpus` carries a JSON-serializable manifest that says exactly which files (or which
token range) went where and the sha256 of each split's tokens, so two peers can check that they
train on the same data.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import logging
import math
import mmap
import os
import platform
import stat
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from gossamer.core.config import DataConfig
from gossamer.core.errors import DataError
from gossamer.core.machine import physical_memory_bytes

__all__ = [
    "Corpus",
    "MappedFile",
    "TokenSource",
    "check_data_path",
    "load_corpus",
    "stdlib_source_files",
]

MANIFEST_VERSION = 1
_TOKEN_DTYPES: dict[str, np.dtype[Any]] = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
_SNIFF_BYTES = 8192
logger = logging.getLogger(__name__)
_HASH_CHUNK_TOKENS = 1 << 20
_SNIFF_TOKENS = 64
"""A uint16 token file this long or longer is checked for uint32 ids read in halves."""
_TEXT_SNIFF_BYTES = 8192
"""A token file's first bytes read to tell it from a text file."""
_SHARE_SLACK = 3.0
"""A folder's split by file may hold out from a third to 3x the validation fraction of its bytes
(the standard library's sources: 10% for 5%)."""
# Test suites are left out of the embedded corpus (see stdlib_source_files); build-configuration
# folders (config-3.11-x86_64-linux-gnu) hold platform-specific files.
_STDLIB_SKIPPED_FOLDERS = frozenset(
    {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
)
_BYTE_ORDER_MARKS = (
    (b"\xff\xfe\x00\x00", "UTF-32"),  # (before UTF-16's, which it starts with)
    (b"\x00\x00\xfe\xff", "UTF-32"),
    (b"\xff\xfe", "UTF-16"),
    (b"\xfe\xff", "UTF-16"),
)
"""Byte-order marks of text the corpus, read as bytes (UTF-8), cannot use as it is."""
_NAMED_FILES = 3
"""Files named in a message about several (the rest are counted)."""


@dataclass(frozen=True, slots=True, eq=False)
class MappedFile:
    """A file mapped into memory, and the check that it still holds every mapped byte.

    A mapped page the file no longer holds (truncated, or rewritten in place, after it was
    mapped) kills the process with SIGBUS when touched: a bare "Bus error", without a
    checkpoint. Reading batches checks first (one ``fstat`` of the mapped file, which a file
    renamed over the path leaves alone: the map keeps the old one).
    """

    path: Path
    """Where the file was when it was mapped, for messages."""
    mapping: mmap.mmap
    """The map (it holds the file open: its size is the mapped file's, whatever the path holds
    now)."""

    def check_intact(self) -> None:
        """Raise :class:`DataError` where the file is shorter than its map.

        Raises:
            DataError: it was truncated or is being rewritten in place.
        """
        num_bytes = len(self.mapping)
        try:
            now = self.mapping.size()
        except (OSError, ValueError):  # (no size to tell: reading goes on as it did)
            return
        if now < num_bytes:
            raise DataError(
                f"{str(self.path)!r} shrank from {num_bytes} to {now} bytes while this run "
                "read it (truncated, or rewritten in place); the run stops here, its last "
                "checkpoint kept: put the file back as it was and resume. To change a corpus "
                "file while a run trains, write the new one beside it and rename it over the "
                "old one (mv): a running peer goes on reading the old one"
            )


@dataclass(frozen=True, slots=True)
class TokenSource:
    """A read-only 1-D array of token ids: one split of a corpus.

    ``tokens`` is ``uint8`` for byte corpora and ``uint16`` or ``uint32`` for token files; a
    single file's are a read-only view of its memory map (pages are read only when a batch
    touches them).
    """

    tokens: npt.NDArray[np.unsignedinteger[Any]]
    """The token ids, in corpus order."""
    description: str
    """What this is, for error messages ("validation split of /data/corpus.bin")."""
    mapped: MappedFile | None = None
    """The file ``tokens`` are mapped from (None: they are in memory)."""

    def __post_init__(self) -> None:
        if self.tokens.ndim != 1:
            raise ValueError(f"{self.description}: tokens must be 1-D, got {self.tokens.shape}")

    def check_intact(self) -> None:
        """Raise :class:`DataError` where the file the tokens are mapped from has shrunk: call
        before reading them (a read of a page it lost is a bus error, not an exception).

        Raises:
            DataError: the mapped file was truncated or is being rewritten in place.
        """
        if self.mapped is not None:
            self.mapped.check_intact()

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


@dataclass(frozen=True, slots=True)
class Corpus:
    """A dataset's training and validation splits plus the manifest that describes them."""

    train: TokenSource
    """Tokens to train on."""
    validation: TokenSource
    """Held-out tokens for evaluation; disjoint from ``train``."""
    manifest: dict[str, Any]
    """JSON-serializable record of the source, the split and the sha256 of each split's tokens."""


def load_corpus(config: DataConfig) -> Corpus:
    """Load the dataset that ``config`` names and split it into train and validation.

    The embedded corpus is read once per process and cached; later calls with the same split
    settings return it at once (with a fresh copy of the manifest).

    Raises:
        DataError: The path is missing, unreadable or holds no data, or a split comes out empty.
    """
    try:
        return _load_corpus(config)
    except OSError as exc:
        raise DataError(
            f"could not read the {config.source} corpus ({exc}); check that data.path is "
            "readable by this user"
        ) from exc


def check_data_path(config: DataConfig) -> Path | None:
    """The path the corpus is read from (None for the stdlib source), once it is found there.

    Raises:
        DataError: it does not exist.
    """
    if config.source == "stdlib" or config.path is None:
        return None
    path = Path(os.path.expanduser(config.path))
    what = "text file or folder" if config.source == "text" else "token file"
    if not path.exists():
        raise DataError(
            f"data.path {str(path)!r} does not exist; point data.path at a {what}, or use "
            "data.source = 'stdlib' for the Python standard library's sources found on this "
            "machine"
        )
    if not path.is_file() and not path.is_dir():  # (a fifo was "a folder with no text files")
        raise DataError(
            f"data.path {str(path)!r} is neither a regular file nor a folder ({_kind_of(path)}); "
            f"point data.path at a {what}"
        )
    return path


def _kind_of(path: Path) -> str:
    """What ``path``, neither a regular file nor a folder, is, in a few words."""
    mode = path.stat().st_mode
    for test, kind in (
        (stat.S_ISFIFO, "a fifo"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return kind
    return "a special file"


def _load_corpus(config: DataConfig) -> Corpus:
    if config.source == "stdlib":
        corpus = _load_stdlib_cached(config.validation_fraction, config.max_corpus_bytes)
        return Corpus(corpus.train, corpus.validation, copy.deepcopy(corpus.manifest))
    path = check_data_path(config)
    assert path is not None, "DataConfig checks that text and tokens sources have a path"
    if config.source == "tokens":
        if not path.is_file():
            raise DataError(
                f"data.path {str(path)!r} is not a file; data.source = 'tokens' reads one file "
                "of raw uint16/uint32 token ids"
            )
        return _load_single_file(path, config, _TOKEN_DTYPES[config.token_dtype])
    if path.is_file():
        kind = _sniff(path)
        if kind == "binary":
            raise DataError(
                f"data.path {str(path)!r} looks binary (it has NUL bytes), and data.source = "
                "'text' reads text; for a file of token ids use data.source = 'tokens', "
                "otherwise point data.path at a text file"
            )
        if kind:
            raise DataError(
                f"data.path {str(path)!r} is {kind} text (it starts with a {kind} byte-order "
                f"mark), and data.source = 'text' reads UTF-8; convert it to UTF-8 and point "
                f"data.path at the result, e.g. iconv -f {kind} -t UTF-8 {str(path)!r} > "
                "corpus.txt"
            )
        return _load_single_file(path, config, np.dtype(np.uint8))
    files, wide = _text_files(path)
    if wide:
        kinds = sorted(set(wide.values()))
        named = ", ".join(sorted(wide)[:_NAMED_FILES])
        more = f" and {len(wide) - _NAMED_FILES} more" if len(wide) > _NAMED_FILES else ""
        advice = (
            f"convert them to UTF-8 (iconv -f {kinds[0]} -t UTF-8 FILE > NEW_FILE; "
            "the corpus is bytes, read as UTF-8)"
        )
        if not files:
            raise DataError(
                f"data.path {str(path)!r} holds no UTF-8 text files: its {len(wide)} "
                f"{' and '.join(kinds)} file(s) ({named}{more}) are not read; {advice}"
            )
        logger.warning(
            "data.path %r: %d %s file(s) left out of the corpus (%s%s); %s",
            str(path), len(wide), " and ".join(kinds), named, more, advice,
        )  # fmt: skip
    if not files:
        raise DataError(
            f"data.path {str(path)!r} holds no text files (hidden and binary files are skipped); "
            "add .txt or source files to it, or point data.path at another folder"
        )
    if len(files) == 1:
        return _load_single_file(path / files[0], config, np.dtype(np.uint8))
    manifest: dict[str, Any] = {"source": "text", "path": str(path)}
    return _load_files(path, files, config, manifest, str(path))


def stdlib_source_files() -> tuple[Path, list[str]]:
    """The embedded corpus's files: the standard library root and its ``.py`` files, sorted.

    Left out: ``site-packages``/``dist-packages`` (third-party code, different on every
    machine), caches, symlinks, the build-configuration folder and ``_sysconfigdata*`` (their
    contents are specific to how this Python was built), and the test suites (``test``, ``tests``,
    ``idle_test``). Tests are skipped because they are about 60% of the bytes yet mostly
    repetitive assertions and deliberately odd inputs (bad encodings, invalid syntax), and because
    distributions ship them separately (Debian's ``libpython3.X-testsuite``), so leaving them out
    keeps the corpus the same on more machines with the same Python version.

    Returns:
        The root folder and the relative POSIX paths of the files, in sorted order.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    found: list[str] = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [
            name
            for name in subfolders
            if name not in _STDLIB_SKIPPED_FOLDERS
            and not name.startswith((".", "config-"))
            and not os.path.islink(os.path.join(folder, name))
        ]
        for name in names:
            full = os.path.join(folder, name)
            if (
                name.endswith(".py")
                and not name.startswith("_sysconfigdata")
                and not os.path.islink(full)
                and os.path.getsize(full) > 0
            ):
                found.append(Path(full).relative_to(root).as_posix())
    return root, sorted(found)


@functools.cache
def _load_stdlib_cached(validation_fraction: float, max_corpus_bytes: int) -> Corpus:
    root, files = stdlib_source_files()
    if not files:
        raise DataError(
            f"found no .py files under the standard library at {str(root)!r}; this Python "
            "installation has no sources (only .pyc?), so use data.source = 'text' with a folder"
        )
    config = DataConfig(
        source="stdlib",
        validation_fraction=validation_fraction,
        max_corpus_bytes=max_corpus_bytes,
    )
    manifest: dict[str, Any] = {
        "source": "stdlib",
        "path": str(root),
        "python_implementation": platform.python_implementation(),
    }
    return _load_files(root, files, config, manifest, "the stdlib corpus")


def _text_files(folder: Path) -> tuple[list[str], dict[str, str]]:
    """Relative POSIX paths of the non-empty, non-hidden, non-binary files under ``folder``,
    sorted; and those of UTF-16 and UTF-32 files, with their encoding (left out)."""
    found: list[str] = []
    wide: dict[str, str] = {}
    for current, subfolders, names in os.walk(folder):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        for name in names:
            full = Path(current) / name
            if name.startswith(".") or not full.is_file() or full.stat().st_size == 0:
                continue
            kind = _sniff(full)
            if kind == "binary":
                continue
            if kind:
                wide[full.relative_to(folder).as_posix()] = kind
                continue
            found.append(full.relative_to(folder).as_posix())
    return sorted(found), wide


def _sniff(path: Path) -> str:
    """What keeps ``path`` out of a text corpus: "UTF-16" or "UTF-32" where it starts with that
    byte-order mark (UTF-16 text of ASCII has a NUL byte every other byte: called binary, it was
    refused with the advice to read it as token ids); "binary" where its first 8 KiB hold a NUL
    byte, as git and grep say; "" for text."""
    with path.open("rb") as f:
        head = f.read(_SNIFF_BYTES)
    for mark, encoding in _BYTE_ORDER_MARKS:
        if head.startswith(mark):
            return encoding
    return "binary" if b"\0" in head else ""


def _path_fraction(relative_path: str) -> float:
    """The sha256 of a relative path read as a number in [0, 1): where the file falls. A name
    that is not UTF-8 counts by its bytes as the file system holds them."""
    digest = hashlib.sha256(relative_path.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _split_files(files: list[str], validation_fraction: float) -> tuple[list[str], list[str]]:
    """Split by path hash; with few files, move the nearest file across so neither side is empty
    (a split whose bytes are far off the fraction is made by the tail instead: ``_load_files``)."""
    train = [name for name in files if _path_fraction(name) >= validation_fraction]
    validation = [name for name in files if _path_fraction(name) < validation_fraction]
    if len(files) >= 2 and not validation:
        moved = min(files, key=_path_fraction)
        train, validation = [name for name in files if name != moved], [moved]
    elif len(files) >= 2 and not train:
        moved = max(files, key=_path_fraction)
        train, validation = [moved], [name for name in files if name != moved]
    return train, validation


def _caps(config: DataConfig) -> tuple[int | None, int | None]:
    """Byte caps for the train and validation splits (``None``: no cap)."""
    if config.max_corpus_bytes == 0:
        return None, None
    ratio = config.validation_fraction / (1.0 - config.validation_fraction)
    return config.max_corpus_bytes, max(1, math.ceil(config.max_corpus_bytes * ratio))


def _gib(num_bytes: int) -> str:
    return f"{num_bytes / 2**30:,.1f} GiB"


def _too_large_for_memory(config: DataConfig, label: str, num_bytes: int, why: str) -> DataError:
    """The error of a folder whose text does not fit in memory (it was blamed on the model)."""
    what = label if config.source == "stdlib" else f"data.path {label!r}"
    return DataError(
        f"{what} holds {num_bytes:,} bytes ({_gib(num_bytes)}) of text files, more than fits "
        f"in memory ({why}): a folder is read into memory whole; set data.max_corpus_bytes to "
        "train on a part of it, or concatenate its files into one file, which is memory-mapped "
        "instead (cat FILES > corpus.txt)"
    )


def _read_prefix(
    root: Path, files: list[str], cap: int | None
) -> tuple[npt.NDArray[np.uint8], list[str]]:
    """The files' bytes concatenated in order, stopping at ``cap`` bytes; the files used.

    The files are read straight into one buffer sized from their lengths, so a folder costs its
    size in memory once (not once per file and again for the joined copy). The buffer is returned
    read-only.
    """
    used: list[str] = []
    sizes: list[int] = []
    total = 0
    for name in files:
        if cap is not None and total >= cap:
            break
        size = (root / name).stat().st_size
        if cap is not None:
            size = min(size, cap - total)
        used.append(name)
        sizes.append(size)
        total += size
    buffer = np.empty(total, dtype=np.uint8)
    view = buffer.data
    offset = 0
    for name, size in zip(used, sizes, strict=True):
        end = offset + size
        with (root / name).open("rb") as f:
            while offset < end:  # a file that shrank since stat() ends early; the rest is cut
                num_read = f.readinto(view[offset:end])
                if not num_read:
                    break
                offset += num_read
    view.release()
    tokens = buffer[:offset]
    tokens.flags.writeable = False
    return tokens, used


def _byte_share(root: Path, some: list[str], files: list[str]) -> float:
    """The share of ``files``' bytes that ``some`` of them hold."""
    total = sum((root / name).stat().st_size for name in files)
    return sum((root / name).stat().st_size for name in some) / max(1, total)


def _load_files(
    root: Path, files: list[str], config: DataConfig, manifest: dict[str, Any], label: str
) -> Corpus:
    """A folder's files read into memory and split (see the module's docstring).

    Raises:
        DataError: the folder holds more than fits in memory, or too little to split.
    """
    folder_bytes = _check_fits_in_memory(root, files, config, label)
    try:
        return _split_and_read(root, files, config, manifest, label)
    except MemoryError as exc:  # (numpy's too; it was blamed on the model)
        raise _too_large_for_memory(
            config, label, folder_bytes, f"reading it failed: {exc}"
        ) from exc


def _check_fits_in_memory(root: Path, files: list[str], config: DataConfig, label: str) -> int:
    """The folder's bytes; refused where what would be read of them (with data.max_corpus_bytes)
    is more than this machine's memory, before any of it is.

    Raises:
        DataError: it would not fit.
    """
    folder_bytes = sum((root / name).stat().st_size for name in files)
    train_cap, validation_cap = _caps(config)
    to_read = folder_bytes
    if train_cap is not None and validation_cap is not None:
        to_read = min(folder_bytes, train_cap + validation_cap)
    memory = physical_memory_bytes()
    if memory is not None and to_read > memory:
        raise _too_large_for_memory(
            config, label, folder_bytes, f"this machine has {_gib(memory)} of memory"
        )
    return folder_bytes


def _split_and_read(
    root: Path, files: list[str], config: DataConfig, manifest: dict[str, Any], label: str
) -> Corpus:
    train_files, validation_files = _split_files(files, config.validation_fraction)
    train_cap, validation_cap = _caps(config)
    wanted = config.validation_fraction
    share = _byte_share(root, validation_files, files)
    if not wanted / _SHARE_SLACK <= share <= wanted * _SHARE_SLACK:
        # A few files of different sizes (one large file in validation took all of a user's
        # data): split as one file, every file in path order, the last share of the bytes out.
        logger.info(
            "%s: a split by file would hold out %.1f%% of the bytes (%d of %d files) for %.1f%% "
            "asked; split as one file instead, its last %.1f%% held out",
            label, 100 * share, len(validation_files), len(files), 100 * wanted, 100 * wanted,
        )  # fmt: skip
        cap = None if train_cap is None or validation_cap is None else train_cap + validation_cap
        tokens, used = _read_prefix(root, files, cap)
        split_index = len(tokens) - max(1, round(len(tokens) * config.validation_fraction))
        train, validation = tokens[: max(0, split_index)], tokens[max(0, split_index) :]
        split: dict[str, Any] = {"split": "tail", "files": used, "split_index": split_index}
    else:
        train, train_used = _read_prefix(root, train_files, train_cap)
        validation, validation_used = _read_prefix(root, validation_files, validation_cap)
        split = {"train_files": train_used, "validation_files": validation_used}
    if not len(train) or not len(validation):
        raise DataError(
            f"{label} at {str(root)!r} has too little data to split ({len(files)} file(s), "
            f"{len(train) + len(validation)} bytes); add files to it"
        )
    manifest.update(_common_manifest(config, train, validation, "uint8"), **split)
    return Corpus(
        TokenSource(train, f"training split of {label}"),
        TokenSource(validation, f"validation split of {label}"),
        manifest,
    )


def _load_single_file(path: Path, config: DataConfig, dtype: np.dtype[Any]) -> Corpus:
    num_bytes = path.stat().st_size
    if num_bytes == 0:
        raise DataError(f"data.path {str(path)!r} is empty; point data.path at a file with data")
    if config.source == "tokens":  # (before the size check: half of all text files fail it)
        _refuse_text_as_tokens(path)
    if num_bytes % dtype.itemsize:
        raise DataError(
            f"token file {str(path)!r} is {num_bytes} bytes, not a multiple of "
            f"{dtype.itemsize} ({config.token_dtype}); the file is truncated or "
            "data.token_dtype is wrong"
        )
    mapped = _map_file(path)
    num_tokens = len(mapped.mapping) // dtype.itemsize  # (a file that grew since: its prefix)
    tokens: npt.NDArray[np.unsignedinteger[Any]] = np.frombuffer(
        mapped.mapping, dtype=dtype, count=num_tokens
    )
    if dtype.itemsize == 2 and num_tokens >= _SNIFF_TOKENS and num_tokens % 2 == 0:
        head = np.asarray(tokens[: min(num_tokens, 1 << 16)])
        if head[0::2].any() and not head[1::2].any():  # the high halves of uint32 ids
            raise DataError(
                f"token file {str(path)!r}, read as uint16, has id 0 at every other place of "
                f"its first {len(head)} ids: it looks like uint32 ids; set data.token_dtype = "
                "'uint32'"
            )
    num_validation = max(1, round(num_tokens * config.validation_fraction))
    split_index = num_tokens - num_validation
    if split_index < 1:
        raise DataError(
            f"data.path {str(path)!r} holds only {num_tokens} token(s), too few to split into "
            "training and validation; add data"
        )
    train_cap, validation_cap = _caps(config)
    train_end = split_index if train_cap is None else min(split_index, train_cap // dtype.itemsize)
    validation_end = num_tokens
    if validation_cap is not None:
        validation_end = min(num_tokens, split_index + max(1, validation_cap // dtype.itemsize))
    train, validation = tokens[: max(1, train_end)], tokens[split_index:validation_end]
    token_dtype = "uint8" if dtype.itemsize == 1 else config.token_dtype
    manifest: dict[str, Any] = {
        "source": config.source,
        "path": str(path),
        "split_index": split_index,
        **_common_manifest(config, train, validation, token_dtype),
    }
    return Corpus(
        TokenSource(train, f"training split of {str(path)!r}", mapped),
        TokenSource(validation, f"validation split of {str(path)!r}", mapped),
        manifest,
    )


def _map_file(path: Path) -> MappedFile:
    """``path`` mapped read-only, whole.

    Raises:
        DataError: it is empty now (it was emptied since its size was read).
    """
    with path.open("rb") as file:
        try:
            mapping = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # ("cannot mmap an empty file")
            raise DataError(
                f"data.path {str(path)!r} is empty; point data.path at a file with data"
            ) from None
    return MappedFile(path, mapping)


def _refuse_text_as_tokens(path: Path) -> None:
    """A text file given as token ids trained on garbage (two characters an id) at exit 0.

    Token ids make no run of printable UTF-8: a uint16 id has both bytes printable about one
    time in seven, so 4,096 of them in a row never do.
    """
    with path.open("rb") as file:
        head = file.read(_TEXT_SNIFF_BYTES)
    for cut in range(4):  # (a character cut at the end of the head)
        try:
            text = head[: len(head) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
        if text and all(c.isprintable() or c in "\t\n\r\f\v" for c in text):
            raise DataError(
                f"data.path {str(path)!r} looks like text, not token ids (its first "
                f"{len(head)} bytes are printable UTF-8); train on it with data.source = 'text'"
            )
        return


def _common_manifest(
    config: DataConfig,
    train: npt.NDArray[np.unsignedinteger[Any]],
    validation: npt.NDArray[np.unsignedinteger[Any]],
    token_dtype: str,
) -> dict[str, Any]:
    train_sha256, max_train = _digest_tokens(train)
    validation_sha256, max_validation = _digest_tokens(validation)
    return {
        "manifest_version": MANIFEST_VERSION,
        "python_version": platform.python_version(),
        "token_dtype": token_dtype,
        "validation_fraction": config.validation_fraction,
        "max_corpus_bytes": config.max_corpus_bytes,
        "num_train_tokens": len(train),
        "num_validation_tokens": len(validation),
        "train_bytes": int(train.nbytes),
        "validation_bytes": int(validation.nbytes),
        "train_sha256": train_sha256,
        "validation_sha256": validation_sha256,
        "max_train_token_id": max_train,
        "max_validation_token_id": max_validation,
    }


def _digest_tokens(tokens: npt.NDArray[np.unsignedinteger[Any]]) -> tuple[str, int]:
    """Hex sha256 of the tokens' little-endian bytes and their largest id, a chunk at a time
    (memory maps stay cold): one pass finds an id past the vocabulary before training, not when
    a batch first touches it hours in."""
    digest = hashlib.sha256()
    largest = 0
    for start in range(0, len(tokens), _HASH_CHUNK_TOKENS):
        chunk = np.ascontiguousarray(tokens[start : start + _HASH_CHUNK_TOKENS])
        digest.update(chunk.data)
        largest = max(largest, int(chunk.max()))
    return digest.hexdigest(), largest
