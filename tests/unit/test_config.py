"""Config dataclasses and the loader: unknown keys, wrong types and bad values fail early."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gossamer.core.config import (
    CheckpointConfig,
    DataConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    SwarmConfig,
    TrainConfig,
)
from gossamer.core.config_loader import (
    config_from_dict,
    config_to_dict,
    describe_fields,
    load_run_config,
    parse_flag_overrides,
)
from gossamer.core.errors import ConfigError, FatalError
from gossamer.net.config import NodeConfig


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_defaults_are_valid() -> None:
    config = load_run_config(None, environ={})
    assert config == RunConfig()


def test_configs_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        RunConfig().train.max_steps = 3  # type: ignore[misc]


def test_heads_must_divide_width_and_message_says_how_to_fix() -> None:
    with pytest.raises(ConfigError, match=r"model\.num_heads.*do not divide width 128.*divisors"):
        ModelConfig(width=128, num_heads=3)


@pytest.mark.parametrize(
    ("factory", "key"),
    [
        (lambda: TrainConfig(max_steps=0), "train.max_steps"),
        (lambda: TrainConfig(batch_size=-1), "train.batch_size"),
        (lambda: OptimConfig(lr=0.0), "optim.lr"),
        (lambda: OptimConfig(beta2=1.0), "optim.beta2"),
        (lambda: DataConfig(source="text"), "data.path"),
        (lambda: DataConfig(validation_fraction=1.0), "data.validation_fraction"),
        (lambda: ModelConfig(dropout=1.5), "model.dropout"),
        # inf passed the sign checks: NaN losses at exit 0, or an OverflowError in a timer.
        (lambda: OptimConfig(lr=math.inf), "optim.lr"),
        (lambda: TrainConfig(max_seconds=math.inf), "train.max_seconds"),
        (lambda: SwarmConfig(strategy="diloco", round_timeout_s=1e308), "swarm.round_timeout_s"),
        (lambda: SwarmConfig(strategy="diloco", join_window_s=math.inf), "swarm.join_window_s"),
        (lambda: TrainConfig(seed=99999999999999999999), "train.seed"),
        (lambda: TrainConfig(num_threads=2**31), "train.num_threads"),
        # Read by nothing: the run trained on the embedded corpus, or alone, without a word.
        (lambda: DataConfig(path="corpus/"), "data.path"),
        (lambda: SwarmConfig(bootstrap="127.0.0.1:4000"), "swarm.bootstrap"),
        # Refused by net only once the peer started (named by net's key, not this one).
        (lambda: SwarmConfig(strategy="diloco", bootstrap="10.0.0.1:7000,nope"), "swarm.bootstrap"),
        (lambda: SwarmConfig(strategy="diloco", bootstrap="10.0.0.1:0"), "swarm.bootstrap"),
        # `gossamer config show` printed it as fine; only the run refused it.
        (lambda: SwarmConfig(strategy="diloco", bootstrap="nope@10.0.0.1:7000"), "swarm.bootstrap"),
        (
            lambda: SwarmConfig(strategy="diloco", bootstrap="A" * 52 + "@10.0.0.1:7000"),
            "swarm.bootstrap",
        ),
        (lambda: SwarmConfig(listen="1.2.3.4:99999"), "swarm.listen"),
        (lambda: SwarmConfig(listen=":7000"), "swarm.listen"),
        (lambda: SwarmConfig(listen="127.0.0.1:\u00b2"), "swarm.listen"),  # ('²': a ValueError)
        # In every round key and record: 20,000 characters broke torch.distributed's rendezvous.
        (
            lambda: RunConfig(name="n" * 129, swarm=SwarmConfig(strategy="diloco")),
            "name: must be at most 128 characters in a swarm",
        ),
        (lambda: RunConfig(name="a\x7fb"), "name: must be printable"),
        (lambda: RunConfig(name="caf\udce9"), "name: must be printable"),  # (not UTF-8 bytes)
    ],
)
def test_impossible_values_name_their_key(factory: object, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        factory()  # type: ignore[operator]


def test_a_run_name_of_128_printable_characters_is_fine() -> None:
    assert RunConfig(name="r" * 128).name == "r" * 128


def test_a_run_training_alone_takes_a_longer_name() -> None:
    # Its checkpoints, written before the limit, are loaded by eval, sample and resume.
    assert RunConfig(name="r" * 200).name == "r" * 200
    assert RunConfig(name="team ä/run 1").name == "team ä/run 1"


def test_config_error_is_fatal_and_a_value_error() -> None:
    assert issubclass(ConfigError, FatalError)
    assert issubclass(ConfigError, ValueError)


def test_toml_file_is_loaded(tmp_path: Path) -> None:
    path = _toml(tmp_path, "[model]\nwidth = 64\nnum_heads = 2\n[train]\nmax_steps = 7\n")
    config = load_run_config(path, environ={})
    assert config.model.width == 64
    assert config.model.num_heads == 2
    assert config.train.max_steps == 7


def test_unknown_key_in_file_is_named_with_a_suggestion(tmp_path: Path) -> None:
    path = _toml(tmp_path, "[train]\nmax_step = 7\n")
    with pytest.raises(ConfigError, match=r"train\.max_step.*did you mean 'train\.max_steps'"):
        load_run_config(path, environ={})


def test_unknown_section_is_named(tmp_path: Path) -> None:
    path = _toml(tmp_path, "[trian]\nmax_steps = 7\n")
    with pytest.raises(ConfigError, match="trian"):
        load_run_config(path, environ={})


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ('[train]\nmax_steps = "ten"\n', r"train\.max_steps: expected int, got 'ten'"),
        ("[train]\nmax_steps = 1.5\n", r"train\.max_steps: expected int"),
        ("[checkpoint]\nresume = 1\n", r"checkpoint\.resume: expected bool"),
        ('[data]\nsource = "web"\n', r"data\.source: 'web' is not one of"),
        ("train = 3\n", r"train must be a table"),
    ],
)
def test_wrong_types_are_named(tmp_path: Path, text: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        load_run_config(_toml(tmp_path, text), environ={})


def test_int_is_accepted_for_float(tmp_path: Path) -> None:
    config = load_run_config(_toml(tmp_path, "[optim]\nlr = 1\n"), environ={})
    assert config.optim.lr == 1.0
    assert isinstance(config.optim.lr, float)


def test_missing_and_malformed_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_run_config(tmp_path / "nope.toml", environ={})
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_run_config(_toml(tmp_path, "[train\n"), environ={})


def test_precedence_defaults_file_env_flags(tmp_path: Path) -> None:
    path = _toml(tmp_path, "[train]\nmax_steps = 10\nbatch_size = 4\nseed = 1\n")
    environ = {"GOSSAMER_TRAIN__MAX_STEPS": "20", "GOSSAMER_TRAIN__BATCH_SIZE": "8"}
    config = load_run_config(path, [("train.max_steps", "30")], environ=environ)
    assert config.train.max_steps == 30  # flag beats environment
    assert config.train.batch_size == 8  # environment beats file
    assert config.train.seed == 1  # file beats default
    assert config.train.eval_every == TrainConfig().eval_every


def test_the_run_name_comes_from_the_environment_and_other_variables_are_left_alone() -> None:
    # GOSSAMER_NAME was ignored: only variables naming a section key (with "__") were read.
    environ = {"GOSSAMER_NAME": "nightly", "GOSSAMER_HOME": "/elsewhere", "GOSSAMER_TRAIN": "x"}
    config = load_run_config(None, environ=environ)
    assert config.name == "nightly"
    assert load_run_config(None, [("name", "flagged")], environ=environ).name == "flagged"


def test_unknown_environment_key_is_an_error() -> None:
    with pytest.raises(ConfigError, match="GOSSAMER_TRAIN__MAX_STPES"):
        load_run_config(None, environ={"GOSSAMER_TRAIN__MAX_STPES": "3"})


def test_an_environment_key_joined_by_one_underscore_is_an_error_naming_the_right_one() -> None:
    # GOSSAMER_TRAIN_MAX_STEPS=7 was ignored: the run took 200 steps, and nothing said why.
    with pytest.raises(ConfigError, match="write GOSSAMER_TRAIN__MAX_STEPS"):
        load_run_config(None, environ={"GOSSAMER_TRAIN_MAX_STEPS": "7"})


def test_unrelated_environment_variables_are_ignored() -> None:
    assert load_run_config(None, environ={"GOSSAMER_HOME": "/x", "PATH": "/bin"}) == RunConfig()


def test_an_environment_variable_a_letter_off_a_root_key_is_an_error_naming_it() -> None:
    # GOSSAMER_NAMEE=nightly was ignored: the run went on under its default name.
    with pytest.raises(ConfigError, match="did you mean GOSSAMER_NAME"):
        load_run_config(None, environ={"GOSSAMER_NAMEE": "nightly"})


def test_flag_parsing_forms() -> None:
    pairs = parse_flag_overrides(
        ["--train.max-steps", "5", "--model.width=64", "--checkpoint.resume", "--optim.lr", "1e-3"]
    )
    assert pairs == [
        ("train.max_steps", "5"),
        ("model.width", "64"),
        ("checkpoint.resume", "true"),
        ("optim.lr", "1e-3"),
    ]
    config = load_run_config(None, [*pairs, ("model.num_heads", "2")], environ={})
    assert config.train.max_steps == 5
    assert config.checkpoint.resume is True
    assert config.optim.lr == pytest.approx(1e-3)


@pytest.mark.parametrize(
    ("args", "pattern"),
    [
        (["--train.max_stepz", "5"], "did you mean 'train.max_steps'"),
        (["5"], "unexpected argument '5'"),
        (["--train.max_steps", "five"], r"train\.max_steps: expected int, got 'five'"),
    ],
)
def test_bad_flags_are_named(args: list[str], pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        load_run_config(None, parse_flag_overrides(args), environ={})


@pytest.mark.parametrize(
    ("entry", "pattern"),
    [
        ("host name:5", "not an IPv4 literal or DNS hostname"),
        ("zzz@127.0.0.1:4000", "a peer id has 52 characters"),
        ("127.0.0.1:0", "port in 1..65535"),
    ],
)
def test_a_bootstrap_entry_others_would_refuse_is_a_config_error(entry: str, pattern: str) -> None:
    # It was tried, failed with a warning, and the peer started a swarm of its own (exit 0).
    with pytest.raises(ConfigError, match=rf"net\.bootstrap.*{pattern}"):
        NodeConfig(bootstrap=(entry,))
    NodeConfig(bootstrap=("a" * 52 + "@127.0.0.1:4000", "localhost:4000"))


def test_bad_value_from_flag_names_key() -> None:
    with pytest.raises(ConfigError, match=r"model\.num_heads"):
        load_run_config(None, [("model.num_heads", "5")], environ={})


def test_optional_path_accepts_none_text() -> None:
    config = load_run_config(None, [("data.path", "none")], environ={})
    assert config.data.path is None


def test_every_field_is_documented() -> None:
    infos = describe_fields(RunConfig)
    assert {i.key for i in infos} >= {"train.max_steps", "model.width", "data.source"}
    undocumented = [i.key for i in infos if not i.doc]
    assert not undocumented


def test_the_stdlib_source_is_described_as_read_from_this_machine() -> None:
    # `gossamer config keys` said "the Python standard library's sources, embedded", while the
    # corpus reads the installed standard library's files (README, data/corpus.py).
    doc = next(i.doc for i in describe_fields(RunConfig) if i.key == "data.source")
    assert "embedded" not in doc
    assert "this machine's Python standard library" in doc


def test_base_values_are_overridden_by_flags() -> None:
    base = config_to_dict(RunConfig(train=TrainConfig(batch_size=3)))
    config = load_run_config(None, [("train.seed", "9")], environ={}, base=base)
    assert config.train.batch_size == 3
    assert config.train.seed == 9


@given(
    max_steps=st.integers(1, 10_000),
    lr=st.floats(1e-6, 1.0),
    width_heads=st.sampled_from([(64, 2), (128, 4), (96, 3)]),
)
def test_round_trip_through_dict(max_steps: int, lr: float, width_heads: tuple[int, int]) -> None:
    width, heads = width_heads
    config = RunConfig(
        model=ModelConfig(width=width, num_heads=heads),
        optim=OptimConfig(lr=lr),
        train=TrainConfig(max_steps=max_steps),
    )
    assert config_from_dict(RunConfig, config_to_dict(config)) == config


def test_a_home_folder_in_a_path_from_a_file_is_expanded() -> None:
    # "~/runs" from a TOML file (no shell to expand it) made a folder named "~" in the current
    # one (and the preflight checks looked at the home folder's).
    home = str(Path.home())
    assert CheckpointConfig(directory="~/runs").directory == f"{home}/runs"
    assert SwarmConfig(status_file="~/me.json").status_file == f"{home}/me.json"
    assert SwarmConfig().status_file == ""


def test_a_bad_value_is_said_to_come_from_where_it_was_given(tmp_path: Path) -> None:
    # The file, a variable and a flag each set a bad choice: each error names its own source.
    # A variable's or a flag's was said to be "(in config)", or "(in FILE)" where a file was
    # given too, although the file held no such key.
    path = _toml(tmp_path, '[swarm]\nstrategy = "diloc"\n')
    with pytest.raises(
        ConfigError, match=rf"swarm.strategy: 'diloc' is not one of .*\(in {path}\)"
    ):
        load_run_config(path, environ={})
    plain = _toml(tmp_path, "[train]\nmax_steps = 3\n")
    env = {"GOSSAMER_SWARM__STRATEGY": "diloc"}
    with pytest.raises(
        ConfigError, match=r"\(from environment variable GOSSAMER_SWARM__STRATEGY\)"
    ):
        load_run_config(plain, environ=env)
    with pytest.raises(ConfigError, match=r"\(from flag --swarm.strategy\)"):
        load_run_config(plain, [("swarm.strategy", "diloc")], environ={})
    with pytest.raises(ConfigError, match=r"\(from bench diloco's defaults\)"):
        load_run_config(
            None,
            [("swarm.strategy", "diloc")],
            environ={},
            override_origins={"swarm.strategy": "bench diloco's defaults"},
        )


@pytest.mark.parametrize("address", ["::0", "::1:7000", "fd00::2:7000", "[]:7000"])
def test_a_listen_address_with_an_ipv6_host_out_of_brackets_is_refused(address: str) -> None:
    # "::0" passed as host ":" at port 0, and the peer that listened on it crashed with a
    # traceback once it had started.
    with pytest.raises(ConfigError, match=r"net\.listen_address: .*IPv6 host in brackets"):
        NodeConfig(listen_address=address)
    with pytest.raises(ConfigError, match=r"swarm\.listen: .*IPv6 host in brackets"):
        load_run_config(None, [("swarm.listen", address)], environ={})
    NodeConfig(listen_address="[::]:0")
    NodeConfig(listen_address="[::1]:7000")


def test_a_value_a_config_refuses_names_where_it_came_from(tmp_path: Path) -> None:
    # A config's own checks ("must be positive") named the key but never the source.
    path = _toml(tmp_path, "[optim]\nlr = -1.0\n")
    with pytest.raises(ConfigError, match=rf"optim\.lr: .*positive.*\(in {path}\)"):
        load_run_config(path, environ={})
    with pytest.raises(ConfigError, match=r"optim\.lr: .*\(from environment variable "):
        load_run_config(None, environ={"GOSSAMER_OPTIM__LR": "-1"})
    with pytest.raises(ConfigError, match=r"optim\.lr: .*\(from flag --optim\.lr\)"):
        load_run_config(None, [("optim.lr", "-1")], environ={})


def test_a_section_set_to_a_value_in_the_file_is_blamed_on_the_file(tmp_path: Path) -> None:
    # It was blamed on the flag that set a key inside it.
    path = _toml(tmp_path, "swarm = 5\n")
    with pytest.raises(
        ConfigError,
        match=rf"swarm must be a table of keys, not 5 \(in {path}\); flag --swarm\.outer-lr",
    ):
        load_run_config(path, [("swarm.outer_lr", "1")], environ={})
