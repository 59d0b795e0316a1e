"""`gossamer peer`, `peers`, `doctor`: bad paths and options are one clear line, checked first."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from fifo_fakes import fifo_with_a_brief_writer
from typer.testing import CliRunner

from gossamer.cli import peer as peer_cli
from gossamer.cli.main import app
from gossamer.cli.preflight import read_swarm_secret
from gossamer.core.config_loader import MAX_CONFIG_FILE_BYTES, load_run_config
from gossamer.core.errors import ConfigError


def _invoke(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(app, args)
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, " ".join(result.output.replace("│", " ").split())


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    return tmp_path / "key.pem"


def test_a_missing_status_folder_is_refused_before_the_peer_starts(
    tmp_path: Path, key_file: Path
) -> None:
    status = tmp_path / "missing" / "s.json"
    code, output = _invoke(
        ["peer", "start", "--key-file", str(key_file), "--status-file", str(status)]
    )
    assert code == 2  # wrong input
    assert "--status-file" in output
    assert "does not exist" in output
    assert not key_file.exists()  # refused before anything was done


def test_a_folder_as_status_file_is_refused_and_nothing_is_written_beside_it(
    tmp_path: Path, key_file: Path
) -> None:
    folder = tmp_path / "status"
    folder.mkdir()
    code, output = _invoke(
        ["peer", "start", "--key-file", str(key_file), "--status-file", str(folder)]
    )
    assert code == 2  # wrong input
    assert "is a folder" in output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["status"]  # no status.tmp


@pytest.mark.parametrize(("port", "fragment"), [("99999", "65535"), ("-5", "greater than or")])
def test_peer_start_refuses_a_metrics_port_outside_0_to_65535(
    key_file: Path, port: str, fragment: str
) -> None:
    code, output = _invoke(["peer", "start", "--key-file", str(key_file), "--metrics-port", port])
    assert code == 2
    assert "--metrics-port" in output
    assert fragment in output


def test_a_folder_as_key_file_is_not_told_to_chmod(tmp_path: Path) -> None:
    code, output = _invoke(["peer", "id", "--key-file", str(tmp_path)])
    assert code == 2  # wrong input
    assert "must be a regular file" in output
    assert "chmod" not in output


def test_a_key_file_under_a_file_says_what_is_in_the_way(tmp_path: Path) -> None:
    a_file = tmp_path / "small.txt"
    a_file.write_text("text")
    code, output = _invoke(["peer", "id", "--key-file", str(a_file / "k.pem")])
    assert code == 2  # wrong input
    assert f"{a_file} is a file, not a folder" in output


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (None, "no such file"),
        ("{", "not JSON"),
        ("{}", "'peer_id' is missing"),
        ("[]", "a JSON object is expected"),
        (
            '{"peer_id": "p", "reachability": "relayed", "addresses": [], "peers": [], '
            '"relays": [1]}',
            "a relay is not",
        ),
        (
            '{"peer_id": "p", "reachability": "direct", "addresses": [1], "peers": [], '
            '"relays": []}',
            "an address is not a string",
        ),
    ],
    ids=["missing", "torn", "empty-object", "a-list", "bad-relay", "bad-address"],
)
def test_doctor_explains_a_bad_status_file(tmp_path: Path, text: str | None, fragment: str) -> None:
    path = tmp_path / "status.json"
    if text is not None:
        path.write_text(text)
    code, output = _invoke(["doctor", "--status-file", str(path)])
    assert code == 2  # wrong input
    assert f"--status-file {path}" in output
    assert fragment in output


def test_doctor_refuses_a_status_file_that_is_a_fifo(tmp_path: Path) -> None:
    # Read whole, a fifo with no writer blocked the command for ever.
    path = tmp_path / "status.json"
    with fifo_with_a_brief_writer(path, b"{}"):
        code, output = _invoke(["doctor", "--status-file", str(path)])
    assert code == 2
    assert f"--status-file {path}: not a regular file" in output


def test_doctor_refuses_a_status_file_longer_than_any_status(tmp_path: Path) -> None:
    # Read whole, a huge file (or /dev/zero's like) ate the memory before the JSON was parsed.
    path = tmp_path / "status.json"
    with path.open("wb") as f:
        f.truncate(MAX_CONFIG_FILE_BYTES + 1)
    code, output = _invoke(["doctor", "--status-file", str(path)])
    assert code == 2
    assert f"--status-file {path}: longer than {MAX_CONFIG_FILE_BYTES} bytes" in output


def test_a_config_file_longer_than_any_config_is_refused_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    with path.open("wb") as f:
        f.truncate(MAX_CONFIG_FILE_BYTES + 1)
    with pytest.raises(ConfigError, match=r"longer than .* far more than a config"):
        load_run_config(path)


def test_doctor_reads_a_good_status_file(tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    status = {
        "peer_id": "abc",
        "reachability": "direct",
        "addresses": ["10.0.0.1:4000"],
        "relays": [],
        "peers": [],
        "port": 4000,
    }
    path.write_text(json.dumps(status))
    code, output = _invoke(["doctor", "--status-file", str(path)])
    assert code == 0, output
    assert "reachable directly: True" in output


@pytest.mark.parametrize("wait_s", ["inf", "nan", "0", "-1"])
def test_peers_refuses_a_wait_that_is_not_a_positive_number(wait_s: str) -> None:
    code, output = _invoke(["peers", "--bootstrap", "127.0.0.1:1", "--wait-s", wait_s])
    assert code == 2
    assert "--wait-s" in output


@pytest.mark.parametrize("what", ["fifo", "device", "too-long", "folder"])
def test_a_swarm_secret_file_that_holds_no_secret_is_refused_without_reading_it_whole(
    tmp_path: Path, what: str
) -> None:
    # It was read whole: /dev/zero ate the machine's memory, a fifo with no writer blocked the
    # command for ever.
    path = tmp_path / "secret"
    if what == "fifo":
        os.mkfifo(path)
    elif what == "device":
        path = Path("/dev/zero")
    elif what == "too-long":
        path.write_bytes(b"s" * 5000)
    else:
        path.mkdir()
    args = ["peers", "--bootstrap", "127.0.0.1:1", "--wait-s", "1"]
    code, output = _invoke([*args, "--swarm-secret-file", str(path)])
    assert code == 2
    assert output.startswith("error: --swarm-secret-file: ")
    assert str(path) in output
    expected = {
        "fifo": "is not a regular file",
        "device": "is not a regular file",
        "too-long": "is longer than 4096 bytes",
        "folder": "it is a folder",
    }[what]
    assert expected in output


def test_a_swarm_secret_file_s_home_folder_and_whitespace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "secret").write_bytes(b"  a private swarm's secret, long enough\n")
    assert read_swarm_secret(Path("~/secret")) == b"a private swarm's secret, long enough"


@pytest.mark.parametrize("ttl_s", [60.0, 20_000.0, 86_400.0])
def test_a_record_ttl_longer_than_others_keep_records_still_makes_a_config(ttl_s: float) -> None:
    # Over 3 h, the republish interval (a third of the TTL) passed limits.max_stored_ttl_s and
    # the peer refused to start, naming dht.republish_interval_s, a key no flag sets.
    config = peer_cli._config("127.0.0.1:0", None, None, record_ttl_s=ttl_s)
    assert config.dht.record_ttl_s == ttl_s
    assert config.dht.republish_interval_s < config.limits.max_stored_ttl_s
    assert config.dht.republish_interval_s <= ttl_s / 3


def _relayed_view(port: int) -> dict[str, object]:
    return {
        "peer_id": "doctorpeer",
        "reachability": "relayed",
        "addresses": [f"192.0.2.2:{port}"],
        "relays": [{"peer_id": "relaypeer0000", "address": "127.0.0.1:7104"}],
        "peers": [{"peer_id": "relaypeer0000"}],
        "port": port,
    }


def test_doctor_asking_only_over_loopback_says_it_cannot_tell(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A peer does not dial back a caller on loopback: doctor said "reachable directly: False"
    # and advised forwarding its own random port and an --advertise it does not have.
    monkeypatch.setattr(peer_cli, "_transient_view", lambda *a, **k: _relayed_view(41234))
    code, output = _invoke(["doctor", "--bootstrap", "127.0.0.1:7104"])
    assert code == 0, output
    assert "reachable directly: unknown" in output
    assert "cannot tell from here" in output
    assert "--bootstrap PEER_ID@OTHER_HOST:PORT" in output
    assert "41234" not in output


def test_doctor_advises_a_fixed_port_where_its_own_was_random(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(peer_cli, "_transient_view", lambda *a, **k: _relayed_view(41234))
    monkeypatch.setattr(peer_cli, "local_interface_addresses", lambda: ["127.0.0.1", "10.9.9.1"])
    code, output = _invoke(["doctor", "--bootstrap", "203.0.113.9:7100"])
    assert code == 0, output
    assert "reachable directly: False" in output
    assert "41234" not in output  # (this run's port: forwarding it helps no later run)
    assert "--listen 0.0.0.0:7100" in output


@pytest.mark.parametrize(
    "bootstrap",
    [
        f"{'a' * 52}@10.9.9.1:7100",
        "10.9.9.1:7100",
        "localhost:7100",
        "[::1]:7100",
        # Written as a dual-stack socket shows them, these were taken for other machines:
        "[::ffff:10.9.9.1]:7100",
        "[::ffff:127.0.0.1]:7100",
    ],
)
def test_doctor_asking_a_peer_on_this_machine_by_its_lan_address_says_it_cannot_tell(
    monkeypatch: pytest.MonkeyPatch, bootstrap: str
) -> None:
    # A peer on this machine asked by its LAN address dials doctor back from this machine: doctor
    # said "reachable directly: True, fine", which says nothing of other machines.
    direct = {**_relayed_view(41234), "reachability": "direct", "relays": []}
    monkeypatch.setattr(peer_cli, "_transient_view", lambda *a, **k: direct)
    monkeypatch.setattr(peer_cli, "local_interface_addresses", lambda: ["127.0.0.1", "10.9.9.1"])
    code, output = _invoke(["doctor", "--bootstrap", bootstrap])
    assert code == 0, output
    assert "reachable directly: unknown" in output
    assert "cannot tell from here" in output
    assert "--bootstrap PEER_ID@OTHER_HOST:PORT" in output
    # A peer on another machine, or one of several asked, is an answer.
    for others in (["10.9.9.2:7100"], [bootstrap, "10.9.9.2:7100"]):
        args = [a for entry in others for a in ("--bootstrap", entry)]
        code, output = _invoke(["doctor", *args])
        assert code == 0, output
        assert "reachable directly: True" in output


def test_doctor_reads_a_training_peers_status_file(tmp_path: Path) -> None:
    # The README's swarm line writes `--swarm.status-file me.json`; doctor refused it:
    # "not a peer's status: 'reachability' is missing".
    path = tmp_path / "me.json"
    status = {
        "peer_id": "trainer",
        "state": "training",
        "pid": 1,
        "step": 20,
        "max_steps": 400,
        "outer_step": 0,
        "group_size": 0,
        "address": "trainer@127.0.0.1:38957",
    }
    path.write_text(json.dumps(status))
    code, output = _invoke(["doctor", "--status-file", str(path)])
    assert code == 0, output
    assert "peer trainer (training)" in output
    assert "state: training, step 20/400" in output
    assert "gossamer doctor --bootstrap trainer@127.0.0.1:38957" in output
    code, output = _invoke(["doctor", "--status-file", str(path), "--json"])
    assert code == 0, output
    assert json.loads(output)["step"] == 20


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ('{"peer_id": "x", "state": "training", "step": ' + "9" * 5000 + "}", "a number too long"),
    ],
)
def test_doctor_refuses_a_status_file_json_cannot_read_in_one_line(
    tmp_path: Path, text: str, reason: str
) -> None:
    # A traceback, rc 1: RecursionError and ValueError (over 4300 digits) got past the check.
    path = tmp_path / "status.json"
    path.write_text(text)
    code, output = _invoke(["doctor", "--status-file", str(path)])
    assert code == 2, output
    assert f"not JSON ({reason})" in output


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("max_steps", {"a": [1]}),
        ("outer_step", "NaN"),
        ("group_size", 2.5),
        ("loss", "high"),
        ("address", ["a"]),
        ("max_steps", True),
    ],
)
def test_doctor_refuses_a_training_status_with_a_field_of_the_wrong_type(
    tmp_path: Path, key: str, value: object
) -> None:
    # Doctor printed them as they came: "state: training, step 3/{'a': [1]}".
    path = tmp_path / "me.json"
    status = {"peer_id": "x", "state": "training", "step": 3, "max_steps": 9, key: value}
    path.write_text(json.dumps(status))
    for extra in ([], ["--json"]):
        code, output = _invoke(["doctor", "--status-file", str(path), *extra])
        assert code == 2, output
        assert f"not a training peer's status: {key!r} is not" in output


def test_doctor_reads_a_training_status_with_null_and_float_fields(tmp_path: Path) -> None:
    path = tmp_path / "me.json"
    status = {"peer_id": "x", "state": "training", "step": 3, "max_steps": None, "loss": 2.5}
    path.write_text(json.dumps(status))
    code, output = _invoke(["doctor", "--status-file", str(path)])
    assert code == 0, output
    assert "state: training, step 3" in output
