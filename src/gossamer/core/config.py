"""Config dataclasses for a training run.

Each component owns a small frozen dataclass, checked in ``__post_init__`` with messages that say
what is wrong and what to do. :class:`RunConfig` is the root; :mod:`gossamer.core.config_loader`
builds one from a TOML file, environment variables and flags.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, fields
from typing import Literal

from gossamer.core.errors import ConfigError

__all__ = [
    "MAX_NAME_LENGTH",
    "CheckpointConfig",
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "SwarmConfig",
    "TrainConfig",
    "is_host_port",
]

_PEER_ID_SPELLING = re.compile(r"[a-z2-7]{52}")
"""A peer id as peers print it: 52 characters of lower-case base32 (net checks the rest)."""

DataSource = Literal["stdlib", "text", "tokens"]
TokenDtype = Literal["uint16", "uint32"]


_MAX_INT = 2**62
"""No count, step or size in a run comes near it; a value past it overflows torch or a timer."""
MAX_NAME_LENGTH = 128
"""The longest run name: it is in every round key and DHT record of the swarm (20,000
characters broke torch.distributed's rendezvous, and each round fell back to p2p)."""
_MAX_SECONDS = 10 * 365 * 86400.0
"""Ten years: the longest duration a config may name (``inf`` or 1e308 overflowed timers)."""


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


def _set(config: object, name: str, value: object) -> None:
    """Set a field of a frozen config while it is made (a value normalised)."""
    object.__setattr__(config, name, value)


def _check_numbers(section: str, config: object) -> None:
    """Every number of a config section finite and within bounds: a float ``inf`` passed the
    sign checks and ended a run in NaN losses or an OverflowError deep in a timer, and an
    integer past 2**63 overflowed torch."""
    for name in config.__dataclass_fields__:  # type: ignore[attr-defined]
        value = getattr(config, name)
        if isinstance(value, bool):
            continue
        if isinstance(value, float):
            _require(
                math.isfinite(value), f"{section}.{name}", f"must be a finite number, got {value}"
            )
            if name.endswith("_s"):
                _require(
                    value <= _MAX_SECONDS,
                    f"{section}.{name}",
                    f"must be at most {_MAX_SECONDS:.0f} s (ten years), got {value}",
                )
        elif isinstance(value, int):
            _require(
                abs(value) <= _MAX_INT,
                f"{section}.{name}",
                f"must be at most 2**62, got {value}",
            )


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelConfig:
    """The built-in decoder-only transformer (GPT)."""

    num_layers: int = 4
    """Transformer blocks."""
    num_heads: int = 4
    """Attention heads per block; must divide ``width``."""
    width: int = 128
    """Embedding and residual stream width."""
    context: int = 128
    """Longest sequence the model attends over (tokens); also the training sequence length."""
    vocab_size: int = 256
    """Token vocabulary; 256 for the byte-level corpora."""
    dropout: float = 0.0
    """Dropout probability in attention and MLP outputs."""
    tie_weights: bool = True
    """Share the token embedding with the output projection."""

    def __post_init__(self) -> None:
        _check_numbers("model", self)
        _require(
            self.num_layers >= 1, "model.num_layers", f"must be at least 1, got {self.num_layers}"
        )
        _require(
            self.num_heads >= 1, "model.num_heads", f"must be at least 1, got {self.num_heads}"
        )
        _require(self.width >= 1, "model.width", f"must be at least 1, got {self.width}")
        _require(
            self.width % self.num_heads == 0,
            "model.num_heads",
            f"{self.num_heads} heads do not divide width {self.width}; "
            f"choose num_heads among the divisors of {self.width} or change model.width",
        )
        _require(self.context >= 2, "model.context", f"must be at least 2, got {self.context}")
        _require(
            self.vocab_size >= 2, "model.vocab_size", f"must be at least 2, got {self.vocab_size}"
        )
        _require(
            0.0 <= self.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {self.dropout}"
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class DataConfig:
    """Where training tokens come from and how they are split."""

    source: DataSource = "stdlib"
    """``stdlib`` (this machine's Python standard library's .py files), ``text`` or ``tokens``."""
    path: str | None = None
    """A text file or folder (``text``) or a token file (``tokens``); unused for ``stdlib``."""
    token_dtype: TokenDtype = "uint16"
    """Element type of a pre-tokenized file (``tokens`` only)."""
    validation_fraction: float = 0.05
    """Share of files (or of tokens, for a single file) held out for validation."""
    max_corpus_bytes: int = 0
    """Cap on the training corpus size in bytes; 0 means no cap."""

    def __post_init__(self) -> None:
        _check_numbers("data", self)
        _require(
            self.source in ("stdlib", "text", "tokens"),
            "data.source",
            f"unknown source {self.source!r}; use 'stdlib', 'text' or 'tokens'",
        )
        _require(
            self.source == "stdlib" or bool(self.path),
            "data.path",
            f"data.source = {self.source!r} needs data.path (a file or folder to read)",
        )
        _require(
            self.source != "stdlib" or not self.path,
            "data.path",
            f"{self.path!r} is set but data.source is 'stdlib' (the embedded corpus, which "
            "reads no path): set data.source to 'text' or 'tokens' to train on it",
        )
        _require(
            self.token_dtype in ("uint16", "uint32"),
            "data.token_dtype",
            f"unknown dtype {self.token_dtype!r}; use 'uint16' or 'uint32'",
        )
        _require(
            0.0 < self.validation_fraction < 1.0,
            "data.validation_fraction",
            f"must be strictly between 0 and 1, got {self.validation_fraction}",
        )
        _require(
            self.max_corpus_bytes >= 0,
            "data.max_corpus_bytes",
            f"must be 0 (no cap) or positive, got {self.max_corpus_bytes}",
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class OptimConfig:
    """AdamW with linear warm-up then cosine decay, and gradient clipping."""

    lr: float = 3e-3
    """Peak learning rate, reached at the end of warm-up."""
    min_lr_ratio: float = 0.1
    """Learning rate at the end of the cosine, as a fraction of ``lr``."""
    warmup_steps: int = 20
    """Steps of linear warm-up from 0 to ``lr`` (at most half of the run's schedule)."""
    weight_decay: float = 0.1
    """AdamW weight decay (applied to matrices only, not to biases and norms)."""
    beta1: float = 0.9
    """AdamW first-moment decay."""
    beta2: float = 0.95
    """AdamW second-moment decay."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""

    def __post_init__(self) -> None:
        _check_numbers("optim", self)
        _require(self.lr > 0, "optim.lr", f"must be positive, got {self.lr}")
        _require(
            0.0 <= self.min_lr_ratio <= 1.0,
            "optim.min_lr_ratio",
            f"must be in [0, 1], got {self.min_lr_ratio}",
        )
        _require(
            self.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {self.warmup_steps}"
        )
        _require(
            self.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {self.weight_decay}"
        )
        _require(0.0 <= self.beta1 < 1.0, "optim.beta1", f"must be in [0, 1), got {self.beta1}")
        _require(0.0 <= self.beta2 < 1.0, "optim.beta2", f"must be in [0, 1), got {self.beta2}")
        _require(self.grad_clip >= 0, "optim.grad_clip", f"must be >= 0, got {self.grad_clip}")


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainConfig:
    """The training loop: how long, how big a batch, how often to evaluate."""

    max_steps: int = 200
    """Optimizer steps to run (the learning-rate schedule spans this many)."""
    max_seconds: float = 0.0
    """Wall-time budget; 0: none. With one, the LR schedule is fitted to it after 20 steps, and
    fitted again as the step rate changes (a swarm's rounds slow a peer's steps)."""
    batch_size: int = 16
    """Sequences per micro-batch."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated into one optimizer step."""
    eval_every: int = 50
    """Evaluate on the validation split every this many steps; 0 disables periodic evaluation."""
    eval_batches: int = 8
    """Validation batches per evaluation, of 16 sequences each whatever ``batch_size`` is (so
    validation losses compare across batch sizes; evaluated ``batch_size`` sequences at a time
    at most)."""
    seed: int = 0
    """Seeds the model initialisation, the data streams and dropout."""
    num_threads: int = 0
    """Torch intra-op threads; 0 leaves torch's default."""
    log_every: int = 10
    """Log a progress line every this many steps."""

    def __post_init__(self) -> None:
        _check_numbers("train", self)
        _require(
            self.max_steps >= 1, "train.max_steps", f"must be at least 1, got {self.max_steps}"
        )
        _require(
            self.max_seconds >= 0, "train.max_seconds", f"must be >= 0, got {self.max_seconds}"
        )
        _require(
            self.batch_size >= 1, "train.batch_size", f"must be at least 1, got {self.batch_size}"
        )
        _require(
            self.grad_accum_steps >= 1,
            "train.grad_accum_steps",
            f"must be at least 1, got {self.grad_accum_steps}",
        )
        _require(self.eval_every >= 0, "train.eval_every", f"must be >= 0, got {self.eval_every}")
        _require(
            self.eval_batches >= 1,
            "train.eval_batches",
            f"must be at least 1, got {self.eval_batches}",
        )
        _require(self.seed >= 0, "train.seed", f"must be >= 0, got {self.seed}")
        _require(
            0 <= self.num_threads <= 4096,
            "train.num_threads",
            f"must be in 0..4096 (0: torch's default), got {self.num_threads}",
        )
        _require(
            self.log_every >= 1, "train.log_every", f"must be at least 1, got {self.log_every}"
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class CheckpointConfig:
    """Where and how often checkpoints are written, and whether a run resumes from one."""

    directory: str = "checkpoints"
    """Folder that holds this run's checkpoints (one sub-folder per checkpoint)."""
    every_steps: int = 100
    """Write a checkpoint every this many steps (and always at the end); 0: only at the end."""
    keep_last: int = 3
    """How many of the newest checkpoints to keep; older ones are deleted."""
    resume: bool = True
    """Resume from the newest valid checkpoint in ``directory`` if there is one."""

    def __post_init__(self) -> None:
        _check_numbers("checkpoint", self)
        _require(bool(self.directory), "checkpoint.directory", "must not be empty")
        # "~/runs" from a TOML file (no shell to expand it) made a folder named "~" here
        _set(self, "directory", os.path.expanduser(self.directory))
        _require(
            self.every_steps >= 0, "checkpoint.every_steps", f"must be >= 0, got {self.every_steps}"
        )
        _require(
            self.keep_last >= 1, "checkpoint.keep_last", f"must be at least 1, got {self.keep_last}"
        )


Strategy = Literal["local", "sync", "diloco"]
CodecName = Literal["none", "fp16", "bf16", "int8"]
BackendName = Literal["auto", "p2p", "torch"]


def port_number(text: str) -> int | None:
    """The port ``text`` names (ASCII digits, 0..65535), or None.

    ('²' is a digit to ``isdigit``, not to ``int``; and ``int`` raises on a string of more than
    4,300 digits, which a peer can send.)
    """
    if not (0 < len(text) <= 5 and text.isascii() and text.isdigit()):
        return None
    number = int(text)
    return number if number <= 65535 else None


def is_host_port(address: str, *, lowest_port: int) -> bool:
    """Whether ``address`` is HOST:PORT with a port from ``lowest_port`` to 65535, an IPv6 host
    in brackets (``::0`` alone passed, as host ``:`` and port 0, and crashed the peer that
    listened on it)."""
    host, sep, port = address.rpartition(":")
    number = port_number(port)
    bracketed = host.startswith("[") and host.endswith("]") and len(host) > 2
    if (":" in host or host.startswith("[")) and not bracketed:
        return False
    return bool(sep and host) and number is not None and number >= lowest_port


@dataclass(frozen=True, kw_only=True, slots=True)
class SwarmConfig:
    """How this peer trains with others: the strategy, the network, the rounds."""

    strategy: Strategy = "local"
    """``local`` (alone), ``sync`` (average gradients every step) or ``diloco``."""
    inner_steps: int = 50
    """DiLoCo: inner steps (H) between averaging rounds."""
    outer_lr: float = 0.7
    """DiLoCo: outer Nesterov SGD learning rate (DiLoCo paper: 0.7)."""
    outer_momentum: float = 0.9
    """DiLoCo: outer Nesterov momentum (DiLoCo paper: 0.9)."""
    outer_momentum_warmup: bool = True
    """DiLoCo: ramp the outer momentum up along Nesterov's sequence t / (t + 3), from none at the
    first outer step to ``outer_momentum`` (false: the paper's constant momentum from the start)."""
    overlap: bool = False
    """DiLoCo: average each round in the background during the next H inner steps (applied a
    round late), so training does not wait for the network."""
    train_while_forming: bool = True
    """DiLoCo: keep taking inner steps while a round's group forms (waiting for slower peers)
    and average once it has formed, each peer's pseudo-gradient weighted by the inner steps
    behind it; false: stop at every H-th step until the round is done. Moot with ``overlap``."""
    train_while_averaging: bool = True
    """DiLoCo, with ``train_while_forming``: keep taking inner steps while the formed round's
    all-reduce runs too; the steps taken meanwhile are kept and go into the next round (false:
    stop while the round averages). A boundary still waits for a round not yet averaged."""
    codec: CodecName = "none"
    """Codec of averaged tensors: none (fp32), fp16, bf16 or int8 (blockwise, error feedback)."""
    backend: BackendName = "auto"
    """Who averages: p2p (over the peers' authenticated links), torch (a torch.distributed gloo
    group of each round's members, fp32, plain TCP) or auto (torch where the codec is none and
    every member is on a loopback or private address, p2p otherwise)."""
    listen: str = "127.0.0.1:0"
    """HOST:PORT this peer listens on (port 0: any free one)."""
    bootstrap: str = ""
    """Comma-separated [PEER_ID@]HOST:PORT of peers to join through; empty: start a swarm."""
    key_file: str = ""
    """This peer's identity key (created if missing); empty: ``<checkpoint.directory>/peer.key``."""
    swarm_secret_file: str = ""
    """A file holding the private swarm's secret; empty: an open swarm."""
    max_group_size: int = 16
    """Peers per averaging group; a larger swarm splits into groups that change every round."""
    join_window_s: float = 30.0
    """Longest a round waits for the previous round's peers (the dead are dropped sooner)."""
    round_timeout_s: float = 60.0
    """Shortest deadline of an averaging round: each round's own is twice the time its buffer
    takes round the ring at the slowest member's measured send rate, never below this."""
    max_round_timeout_s: float = 900.0
    """Longest deadline of an averaging round, whatever its members' links (or a member that
    lies about its link) say: raise it for a model too large for its links (a warning says
    by how much)."""
    status_file: str = ""
    """If set, this peer keeps a JSON status (step, loss, throughput, bytes) in this file."""

    def __post_init__(self) -> None:
        _check_numbers("swarm", self)
        _set(self, "status_file", os.path.expanduser(self.status_file))
        _require(
            self.strategy in ("local", "sync", "diloco"),
            "swarm.strategy",
            f"unknown strategy {self.strategy!r}; use 'local', 'sync' or 'diloco'",
        )
        _require(
            self.inner_steps >= 1, "swarm.inner_steps", f"must be >= 1, got {self.inner_steps}"
        )
        _require(self.outer_lr > 0, "swarm.outer_lr", f"must be positive, got {self.outer_lr}")
        _require(
            0.0 <= self.outer_momentum < 1.0,
            "swarm.outer_momentum",
            f"must be in [0, 1), got {self.outer_momentum}",
        )
        _require(
            self.codec in ("none", "fp16", "bf16", "int8"),
            "swarm.codec",
            f"unknown codec {self.codec!r}; use 'none', 'fp16', 'bf16' or 'int8'",
        )
        _require(
            self.backend in ("auto", "p2p", "torch"),
            "swarm.backend",
            f"unknown backend {self.backend!r}; use 'auto', 'p2p' or 'torch'",
        )
        _require(
            self.backend != "torch" or self.codec == "none",
            "swarm.backend",
            f"backend 'torch' averages in fp32 and cannot use codec {self.codec!r}; "
            "set swarm.codec to 'none' or swarm.backend to 'p2p' or 'auto'",
        )
        _require(
            is_host_port(self.listen, lowest_port=0),
            "swarm.listen",
            "expected HOST:PORT, an IPv6 host in brackets ([::]:7000; port 0 picks a free one), "
            f"got {self.listen!r}",
        )
        for entry in self.bootstrap_addresses:
            peer_id, at, address = entry.rpartition("@")
            _require(
                is_host_port(address, lowest_port=1)
                and (not at or _PEER_ID_SPELLING.fullmatch(peer_id) is not None),
                "swarm.bootstrap",
                f"expected [PEER_ID@]HOST:PORT entries, comma-separated; {entry!r} is not one "
                "(`gossamer peer id` prints a peer's id)",
            )
        _require(
            self.max_group_size >= 1,
            "swarm.max_group_size",
            f"must be at least 1, got {self.max_group_size}",
        )
        _require(self.join_window_s > 0, "swarm.join_window_s", "must be positive")
        _require(self.round_timeout_s > 0, "swarm.round_timeout_s", "must be positive")
        _require(
            self.max_round_timeout_s >= self.round_timeout_s,
            "swarm.max_round_timeout_s",
            f"must be at least swarm.round_timeout_s ({self.round_timeout_s:g} s), got "
            f"{self.max_round_timeout_s:g} s: raise it, or lower swarm.round_timeout_s",
        )
        _require(
            self.strategy != "local" or not self.bootstrap_addresses,
            "swarm.bootstrap",
            "is set but swarm.strategy is 'local' (training alone): choose 'sync' or 'diloco' "
            "to train with the swarm, or leave out --bootstrap",
        )

    @property
    def bootstrap_addresses(self) -> tuple[str, ...]:
        """The bootstrap list, split and stripped."""
        return tuple(a.strip() for a in self.bootstrap.split(",") if a.strip())

    def keys_changed(self) -> tuple[str, ...]:
        """The ``swarm.*`` keys set away from their defaults, ``swarm.strategy`` left out."""
        default = SwarmConfig()
        return tuple(
            f"swarm.{item.name}"
            for item in fields(self)
            if item.name != "strategy" and getattr(self, item.name) != getattr(default, item.name)
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class RunConfig:
    """The root config of a training run."""

    name: str = "gossamer"
    """The run's name; peers training together share it."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The built-in model (ignored when a custom model factory is given)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training and validation data."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and learning-rate schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The training loop."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing and resume."""
    swarm: SwarmConfig = field(default_factory=SwarmConfig)
    """Training with other peers."""

    def __post_init__(self) -> None:
        _require(bool(self.name), "name", "must not be empty")
        _require(  # (a run training alone has no rounds: its checkpoints of longer names load)
            self.swarm.strategy == "local" or len(self.name) <= MAX_NAME_LENGTH,
            "name",
            f"must be at most {MAX_NAME_LENGTH} characters in a swarm (it names the swarm's "
            f"rounds and records), got {len(self.name)}",
        )
        _require(
            self.name.isprintable(),
            "name",
            f"must be printable text (it names the swarm's rounds, records and trace spans), "
            f"got {self.name!r}",
        )
        _require(
            self.data.source != "tokens"
            or self.data.token_dtype != "uint16"
            or self.model.vocab_size <= 1 << 16,
            "data.token_dtype",
            f"'uint16' holds ids up to 65535, and model.vocab_size is {self.model.vocab_size}: a "
            "tokenizer with that many ids writes them as uint32 (read as uint16, every id was "
            "cut in two); set data.token_dtype = 'uint32'",
        )
