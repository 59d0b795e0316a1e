"""`gossamer train`, `eval`, `sample`, `demo`: bad input is one clear line before any work."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
from fifo_fakes import fifo_with_a_brief_writer
from typer.testing import CliRunner

from gossamer.cli import preflight
from gossamer.cli.main import app

TINY = [
    "--model.num-layers",
    "1",
    "--model.num-heads",
    "2",
    "--model.width",
    "16",
    "--model.context",
    "16",
    "--data.source",
    "text",
    "--train.max-steps",
    "2",
    "--train.batch-size",
    "2",
    "--train.eval-batches",
    "1",
    "--checkpoint.resume",
    "false",
]


def _invoke(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(app, args)
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output


@pytest.fixture
def tiny_train(tmp_path: Path) -> list[str]:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def square(x):\n    return x * x\n\n" * 200)
    return [
        "train",
        *TINY,
        "--data.path",
        str(corpus),
        "--checkpoint.directory",
        str(tmp_path / "ck"),
    ]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("trained")
    corpus = root / "corpus.txt"
    corpus.write_text("def square(x):\n    return x * x\n\n" * 200)
    args = ["train", *TINY, "--data.path", str(corpus), "--checkpoint.directory", str(root / "ck")]
    code, output = _invoke(args)
    assert code == 0, output
    return root / "ck"


@pytest.mark.parametrize(
    ("port", "fragment"), [("99999", "less than or equal to 65535"), ("-5", "greater than or")]
)
def test_train_refuses_a_metrics_port_outside_0_to_65535(
    tiny_train: list[str], port: str, fragment: str
) -> None:
    code, output = _invoke([*tiny_train, "--metrics-port", port])
    assert code == 2
    assert "--metrics-port" in output
    assert fragment in " ".join(output.replace("│", " ").split())


@pytest.mark.parametrize(
    "error",
    [
        OSError(98, "Address already in use"),
        socket.gaierror(-2, "Name or service not known"),
        OverflowError("bind(): port must be 0-65535."),
    ],
    ids=["in-use", "bad-host", "overflow"],
)
def test_train_says_which_metrics_address_cannot_be_served(
    tiny_train: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    def refuse(*_: object, **__: object) -> None:
        raise error

    monkeypatch.setattr(preflight, "serve_metrics", refuse)
    code, output = _invoke([*tiny_train, "--metrics-port", "9100", "--metrics-host", "bad host"])
    assert code == 2
    assert "cannot serve metrics on bad host:9100" in output
    assert not (tmp_path / "ck").exists()  # nothing trained


def test_train_checks_the_summary_path_before_training(
    tiny_train: list[str], tmp_path: Path
) -> None:
    code, output = _invoke([*tiny_train, "--summary-json", str(tmp_path / "missing" / "s.json")])
    assert code == 2
    assert "--summary-json" in output
    assert "does not exist" in output
    assert not (tmp_path / "ck").exists()  # it failed before training, not after


def test_train_refuses_a_file_as_checkpoint_directory(
    tiny_train: list[str], tmp_path: Path
) -> None:
    a_file = tmp_path / "corpus.txt"
    code, output = _invoke([*tiny_train, "--checkpoint.directory", str(a_file)])
    assert code == 2
    assert "checkpoint.directory" in output
    assert "is a file" in output


def test_a_missing_swarm_status_folder_names_the_option(
    tiny_train: list[str], tmp_path: Path
) -> None:
    args = [*tiny_train, "--swarm.strategy", "diloco"]
    code, output = _invoke([*args, "--swarm.status-file", str(tmp_path / "no" / "x.json")])
    assert code == 2
    assert "swarm.status_file: folder" in output
    assert "does not exist" in output


def test_swarm_settings_of_a_run_training_alone_are_refused_naming_them(
    tiny_train: list[str], tmp_path: Path
) -> None:
    # Only swarm.bootstrap was refused: a status file never written, a listen address never
    # bound, a codec never used, and the run trained alone at exit 0 without a word.
    args = [*tiny_train, "--swarm.status-file", str(tmp_path / "me.json")]
    code, output = _invoke([*args, "--swarm.codec", "int8", "--swarm.listen", "0.0.0.0:7000"])
    assert code == 2
    assert (
        "error: swarm.codec, swarm.listen, swarm.status_file are set but swarm.strategy is "
        "'local' (training alone)"
    ) in output
    assert "set swarm.strategy to 'sync' or 'diloco'" in output
    assert not (tmp_path / "ck").exists()
    code, output = _invoke([*tiny_train, "--swarm.inner-steps", "7"])
    assert code == 2
    assert "swarm.inner_steps is set but" in output
    assert "leave it out" in output
    code, output = _invoke([*tiny_train, "--swarm.strategy", "local", "--swarm.codec", "none"])
    assert code == 0, output  # (a default value named is no setting ignored)


def test_eval_of_a_run_s_directory_names_the_checkpoint_it_measured(checkpoint: Path) -> None:
    # --json said "checkpoint": the directory given, not which of its checkpoints it loaded.
    code, output = _invoke(["eval", "--checkpoint", str(checkpoint), "--json"])
    assert code == 0, output
    result = json.loads(output.strip().splitlines()[-1])
    assert Path(result["checkpoint"]).parent == checkpoint
    assert Path(result["checkpoint"]).name == f"step-{result['step']:09d}"


def test_eval_refuses_zero_batches(checkpoint: Path) -> None:
    code, output = _invoke(["eval", "--checkpoint", str(checkpoint), "--batches", "0"])
    assert code == 2
    assert "--batches" in output


def test_eval_refuses_to_change_the_checkpoint_model(checkpoint: Path) -> None:
    code, output = _invoke(["eval", "--checkpoint", str(checkpoint), "--model.context", "64"])
    assert code == 2
    assert "--model.context cannot be changed" in output


@pytest.mark.parametrize("flag", ["--train.max_steps", "--optim.lr", "--swarm.inner_steps"])
def test_eval_refuses_a_flag_that_changes_nothing_it_does(checkpoint: Path, flag: str) -> None:
    # Taken and ignored before: the command seemed to honour it.
    code, output = _invoke(["eval", "--checkpoint", str(checkpoint), flag, "5"])
    assert code == 2
    assert f"eval: {flag} does not change an evaluation; drop the flag" in output


def test_eval_refuses_a_model_changed_through_the_environment(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # (a longer context crashed in the model; a shorter one measured another loss silently)
    for context in ("256", "8"):
        monkeypatch.setenv("GOSSAMER_MODEL__CONTEXT", context)
        code, output = _invoke(["eval", "--checkpoint", str(checkpoint)])
        assert code == 2
        assert "GOSSAMER_MODEL__CONTEXT" in output
        assert "checkpoint's" in output
    monkeypatch.delenv("GOSSAMER_MODEL__CONTEXT")
    monkeypatch.setenv("GOSSAMER_MODEL__DROPOUT", "0.1")  # not the model's shape: fine
    code, output = _invoke(["eval", "--checkpoint", str(checkpoint)])
    assert code == 0, output


def test_sample_refuses_a_model_trained_on_token_ids(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.bin"
    np.random.default_rng(0).integers(0, 1000, 20_000).astype("<u2").tofile(tokens)
    args = ["train", *TINY, "--data.source", "tokens", "--data.path", str(tokens)]
    args += ["--model.vocab-size", "1000", "--checkpoint.directory", str(tmp_path / "ck")]
    code, output = _invoke(args)
    assert code == 0, output
    code, output = _invoke(["sample", "--checkpoint", str(tmp_path / "ck"), "--tokens", "5"])
    assert code == 2  # (a ValueError traceback from the byte decoder)
    assert "trained on token ids" in output


def test_train_refuses_an_id_past_the_vocabulary_before_its_first_step(tmp_path: Path) -> None:
    ids = np.arange(50_000, dtype="<u2") % 200
    ids[33_333] = 999  # no batch of the first steps touches it
    ids.tofile(tmp_path / "t.bin")
    args = ["train", *TINY, "--data.source", "tokens", "--data.path", str(tmp_path / "t.bin")]
    code, output = _invoke([*args, "--checkpoint.directory", str(tmp_path / "ck")])
    assert code == 2  # wrong input: the data, as a missing path is
    assert "token id 999 in training split" in output
    assert "DataError" not in output
    assert not list((tmp_path / "ck").glob("step-*"))  # (no checkpoint written)


def test_eval_checks_token_ids_against_the_vocabulary(checkpoint: Path, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.bin"
    np.arange(1000, 3000, dtype="<u2").tofile(tokens)
    args = ["eval", "--checkpoint", str(checkpoint), "--data.source", "tokens"]
    code, output = _invoke([*args, "--data.path", str(tokens)])
    assert code == 2
    assert "outside the model's vocabulary of 256" in output


def test_eval_and_sample_refuse_a_file_as_checkpoint(tmp_path: Path) -> None:
    a_file = tmp_path / "model.pt"
    a_file.write_bytes(b"x")
    for command in ("eval", "sample"):
        code, output = _invoke([command, "--checkpoint", str(a_file)])
        assert code == 2
        assert "is a file" in output


@pytest.mark.parametrize(
    "flags",
    [
        ["--temperature", "-1"],
        ["--temperature", "nan"],
        ["--temperature", "inf"],
        ["--tokens", "-5"],
        ["--top-k", "-3"],
        ["--seed", "99999999999999999999"],
    ],
)
def test_sample_refuses_impossible_settings(checkpoint: Path, flags: list[str]) -> None:
    code, output = _invoke(["sample", "--checkpoint", str(checkpoint), *flags])
    assert code == 2
    assert flags[0] in output


def test_eval_says_when_the_data_is_not_what_the_checkpoint_trained_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A corpus cut in half after training put text the model trained on in its validation
    # split: a loss of 0.59 where training measured 6.35, without a word.
    monkeypatch.chdir(tmp_path)
    Path("corpus.txt").write_text("def square(x):\n    return x * x\n\n" * 200)
    args = ["train", *TINY, "--data.path", "corpus.txt", "--checkpoint.directory", "ck"]
    assert _invoke(args)[0] == 0
    code, output = _invoke(["eval", "--checkpoint", "ck"])
    assert code == 0, output
    assert "warning" not in output
    Path("corpus.txt").write_text("def square(x):\n    return x * x\n\n" * 100)
    code, output = _invoke(["eval", "--checkpoint", "ck"])
    assert code == 0, output
    assert "is not what" in output
    assert "trained on" in output
    # From another folder the checkpoint's relative data.path is not found: said so, and
    # another source may be given without its path (it was refused as set for 'stdlib').
    monkeypatch.chdir(tmp_path / "ck")
    code, output = _invoke(["eval", "--checkpoint", "."])
    assert code == 2
    assert "from the checkpoint's config" in output
    assert "--data.path" in output
    code, output = _invoke(["eval", "--checkpoint", ".", "--data.source", "stdlib"])
    assert code == 0, output


def test_eval_gives_the_data_s_own_error_for_a_home_folder_path_that_is_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # (an emptied "~/c.txt" was said "not found from here")
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "c.txt").write_text("def square(x):\n    return x * x\n\n" * 200)
    ck = str(tmp_path / "ck")
    assert _invoke(["train", *TINY, "--data.path", "~/c.txt", "--checkpoint.directory", ck])[0] == 0
    (tmp_path / "c.txt").write_text("")
    code, output = _invoke(["eval", "--checkpoint", ck])
    assert code == 2
    assert "is empty" in output
    assert "not found" not in output


def test_sample_refuses_a_text_model_of_another_vocabulary_saying_why(tmp_path: Path) -> None:
    # (it said the model "was trained on token ids ... data.source = 'text'")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def square(x):\n    return x * x\n\n" * 200)
    args = ["train", *TINY, "--data.path", str(corpus), "--model.vocab-size", "300"]
    assert _invoke([*args, "--checkpoint.directory", str(tmp_path / "ck")])[0] == 0
    code, output = _invoke(["sample", "--checkpoint", str(tmp_path / "ck"), "--tokens", "5"])
    assert code == 2
    assert "model.vocab_size = 300" in output
    assert "token ids" not in output


def test_sample_takes_a_prompt_that_is_not_utf_8_as_its_bytes(checkpoint: Path) -> None:
    # (as Python hands over an argument holding byte 0xe9: a UnicodeEncodeError traceback)
    result = CliRunner().invoke(
        app, ["sample", "--checkpoint", str(checkpoint), "--prompt", "caf\udce9 ", "--tokens", "4"]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout_bytes.startswith(b"caf\xe9 ")


@pytest.mark.parametrize("seconds", ["nan", "inf", "0", "-3"])
def test_demo_refuses_a_budget_that_is_not_a_positive_number(tmp_path: Path, seconds: str) -> None:
    code, output = _invoke(["demo", "--seconds", seconds, "--runs-dir", str(tmp_path / "runs")])
    assert code == 2
    assert "--seconds" in output
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("name", ["binary", "folder"])
def test_a_config_file_that_is_binary_or_a_folder_is_one_line(tmp_path: Path, name: str) -> None:
    path = tmp_path / "config.toml"
    if name == "binary":
        path.write_bytes(b"\xff\xfe\x00\x81binary")
    else:
        path.mkdir()
    code, output = _invoke(["config", "show", "--config", str(path)])
    assert code == 2
    assert f"config file {path}" in output
    assert ("not UTF-8" if name == "binary" else "is a folder") in output


def test_a_config_file_that_is_a_fifo_is_one_line(tmp_path: Path) -> None:
    # Opened to read, a fifo with no writer blocked the command for ever.
    path = tmp_path / "config.toml"
    with fifo_with_a_brief_writer(path, b'name = "from-the-fifo"'):
        code, output = _invoke(["config", "show", "--config", str(path)])
    assert code == 2
    assert f"config file {path} is a fifo, not a TOML file" in output


@pytest.mark.parametrize("what", ["folder", "missing"])
def test_a_swarm_secret_file_that_cannot_be_read_names_the_key(
    tiny_train: list[str], tmp_path: Path, what: str
) -> None:
    # A folder ended in IsADirectoryError's traceback, a missing file in a bare errno line.
    path = tmp_path if what == "folder" else tmp_path / "no-such-secret"
    code, output = _invoke(
        [*tiny_train, "--swarm.strategy", "diloco", "--swarm.swarm-secret-file", str(path)]
    )
    assert code == 2
    assert "swarm.swarm_secret_file: cannot read" in output


@pytest.mark.parametrize("what", ["fifo", "too-long"])
def test_a_swarm_secret_file_that_holds_no_secret_is_refused_unread(
    tiny_train: list[str], tmp_path: Path, what: str
) -> None:
    # Read whole: a fifo with no writer blocked the peer for ever (/dev/zero ate its memory).
    path = tmp_path / "secret"
    if what == "fifo":
        os.mkfifo(path)
    else:
        path.write_bytes(b"s" * 5000)
    code, output = _invoke(
        [*tiny_train, "--swarm.strategy", "diloco", "--swarm.swarm-secret-file", str(path)]
    )
    assert code == 2
    assert f"swarm.swarm_secret_file: {path} is " in output
    assert ("not a regular file" if what == "fifo" else "longer than 4096 bytes") in output
    assert "peer address" not in output


def test_bootstrap_peers_of_both_flags_are_all_kept(tiny_train: list[str]) -> None:
    # --bootstrap replaced --swarm.bootstrap's list: its malformed entry went unseen.
    args = [*tiny_train, "--swarm.strategy", "diloco", "--swarm.bootstrap", "nope"]
    code, output = _invoke([*args, "--bootstrap", "127.0.0.1:1"])
    assert code == 2
    assert "'nope' is not one" in output
    assert "(from flags --swarm.bootstrap and --bootstrap)" in output


def test_a_bad_peer_of_the_bootstrap_option_is_blamed_on_that_option(
    tiny_train: list[str],
) -> None:
    # It was blamed on "flag --swarm.bootstrap", a flag the user never gave.
    code, output = _invoke([*tiny_train, "--swarm.strategy", "diloco", "--bootstrap", "nope"])
    assert code == 2
    assert "'nope' is not one" in output
    assert "(from flag --bootstrap)" in output


def test_a_table_printed_to_a_pipe_keeps_its_keys_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    # Off a terminal rich drew 80 columns: "data.validation_f…", "swarm.train_while…".
    monkeypatch.delenv("COLUMNS", raising=False)
    result = CliRunner().invoke(app, ["config", "keys"])
    assert result.exit_code == 0, result.output
    for key in ("data.validation_fraction", "swarm.train_while_averaging", "checkpoint.directory"):
        assert key in result.output


def test_config_show_refuses_a_path_that_is_not_utf_8_naming_it() -> None:
    # (a TOMLDecodeError traceback)
    code, output = _invoke(["config", "show", "--data.source", "text", "--data.path", "caf\udce9"])
    assert code == 2
    assert "data.path" in output
    assert "not UTF-8" in output


def test_sample_at_temperature_0_takes_the_likeliest_byte_whatever_the_seed(
    checkpoint: Path,
) -> None:
    # (refused as "must be > 0", though the model's generate takes 0 as greedy)
    outputs = []
    for seed in ("1", "2"):
        args = ["sample", "--checkpoint", str(checkpoint), "--temperature", "0", "--seed", seed]
        code, output = _invoke([*args, "--tokens", "20"])
        assert code == 0, output
        outputs.append(output)
    assert outputs[0] == outputs[1]


def test_a_swarm_peer_with_no_data_at_its_path_is_refused_before_its_node_starts(
    tmp_path: Path,
) -> None:
    # Found only once the peer's node had started and written its key (exit 1, a peer address
    # printed for a peer that was about to fail).
    folder = tmp_path / "ck"
    code, output = _invoke(
        [
            "train",
            *TINY,
            "--data.path",
            str(tmp_path / "corpus"),
            "--checkpoint.directory",
            str(folder),
            "--swarm.strategy",
            "diloco",
        ]
    )
    assert code == 2
    assert "corpus' does not exist; point data.path at a text file or folder" in output
    assert "peer address" not in output
    assert not (folder / "peer.key").exists()


def test_a_summary_path_given_with_a_tilde_is_written_in_the_home_folder(
    tiny_train: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Checked as $HOME/s.json but written to ./~/s.json: a traceback after the whole run (or a
    # folder named "~" here, where one happened to exist).
    home, here = tmp_path / "home", tmp_path / "here"
    home.mkdir()
    here.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(here)
    code, output = _invoke([*tiny_train, "--summary-json=~/s.json"])
    assert code == 0, output
    assert json.loads((home / "s.json").read_text())["steps"] == 2
    assert list(here.iterdir()) == []


def test_a_summary_that_cannot_be_written_after_the_run_is_one_line(
    tiny_train: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # (its folder removed while the run trained, say: an OSError traceback after the run)
    from gossamer.cli import train as train_cli

    monkeypatch.setattr(train_cli, "check_output_file", lambda *_: None)
    code, output = _invoke([*tiny_train, "--summary-json", str(tmp_path / "gone" / "s.json")])
    assert code == 1
    assert "error: --summary-json: cannot write" in output
    assert "No such file or directory" in output
    assert list((tmp_path / "ck").glob("step-*"))  # the run's work is kept


def test_wrong_data_and_a_checkpoint_of_another_model_exit_2_as_one_line(
    checkpoint: Path, tmp_path: Path
) -> None:
    # The same kind of input got exit 2 in one place and 1, with a "DataError:" prefix, in
    # another: a missing data.path 2 from train, 1 from eval; an empty file 1; another model 1.
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    base = ["train", *TINY, "--checkpoint.directory", str(tmp_path / "ck")]
    runs = [
        [*base, "--data.path", str(tmp_path / "missing.txt")],
        ["eval", "--checkpoint", str(checkpoint), "--data.path", str(tmp_path / "missing.txt")],
        [*base, "--data.path", str(empty)],
        ["eval", "--checkpoint", str(checkpoint), "--data.path", str(empty)],
    ]
    corpus = checkpoint.parent / "corpus.txt"
    other_model = ["--model.width", "32", "--checkpoint.resume", "true"]
    runs.append(["train", *TINY, "--data.path", str(corpus), "--checkpoint.directory",
                 str(checkpoint), *other_model])  # fmt: skip
    for args in runs:
        code, output = _invoke(args)
        assert code == 2, (args, output)
        assert output.strip().startswith("error: "), output
        assert "Error:" not in output, output
    assert "written for another model" in output


@pytest.mark.parametrize(
    "flags",
    [
        ["--model.context", str(2**62)],
        ["--model.vocab-size", str(2**62)],
        ["--model.width", str(2**62)],
        ["--train.batch-size", str(2**62)],
        ["--train.eval-batches", str(2**62)],
        ["--model.num-layers", "1000000000"],
    ],
    ids=["context", "vocab", "width", "batch", "eval-batches", "layers"],
)
def test_a_run_too_large_for_any_memory_is_refused_before_anything_is_built(
    tiny_train: list[str], tmp_path: Path, flags: list[str]
) -> None:
    # Values up to 2**62 pass the config's checks: torch's "Storage size calculation
    # overflowed", numpy's "array is too big" (after the first evaluation), or a billion layers
    # allocated for minutes.
    code, output = _invoke([*tiny_train, *flags])
    assert code == 2, output
    assert "error: this run needs at least" in output
    assert "more than this machine's" in output
    assert not (tmp_path / "ck").exists()


def test_eval_refuses_validation_batches_too_large_for_any_memory(checkpoint: Path) -> None:
    code, output = _invoke(["eval", "--checkpoint", str(checkpoint), "--batches", str(2**62)])
    assert code == 2, output
    assert "validation batches (train.eval_batches)" in output


def test_the_memory_estimate_counts_the_built_in_model_s_parameters_exactly() -> None:
    from gossamer.core.config import ModelConfig
    from gossamer.models import GPT

    for model in (
        ModelConfig(),
        ModelConfig(num_layers=2, width=64, num_heads=4, context=64, vocab_size=300),
        ModelConfig(num_layers=1, width=16, num_heads=2, context=16, tie_weights=False),
    ):
        built = sum(p.numel() for p in GPT(model).parameters())
        assert preflight.model_parameters(model) == built


def test_a_mistyped_option_of_the_command_is_named_with_the_closest() -> None:
    # It was "unknown config key 'metrics_prot'" and a list of every config key.
    code, output = _invoke(["train", "--metrics-prot", "0"])
    assert code == 2, output
    assert "unknown option --metrics-prot: did you mean --metrics-port?" in output
    assert "known keys" not in output


def test_a_bad_value_from_a_flag_is_said_to_come_from_the_flag() -> None:
    # It was "(in config)" where no config file was given.
    code, output = _invoke(["train", "--swarm.strategy", "diloc"])
    assert code == 2, output
    assert "swarm.strategy: 'diloc' is not one of" in output
    assert "(from flag --swarm.strategy)" in output
    assert "in config" not in output
