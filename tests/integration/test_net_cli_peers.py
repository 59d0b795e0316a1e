"""`gossamer peers --bootstrap` lists a running swarm's peers (it joins without announcing)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

GOSSAMER = [sys.executable, "-m", "gossamer.cli"]


@pytest.fixture(scope="module")
def two_peers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[dict[str, object]]]:
    tmp_path = tmp_path_factory.mktemp("peers")
    processes: list[subprocess.Popen[bytes]] = []
    statuses: list[dict[str, object]] = []
    try:
        bootstrap: list[str] = []
        for index in range(2):
            status_file = tmp_path / f"s{index}.json"
            processes.append(
                subprocess.Popen(
                    [
                        *GOSSAMER,
                        "peer",
                        "start",
                        "--listen",
                        "127.0.0.1:0",
                        "--key-file",
                        str(tmp_path / f"k{index}"),
                        "--status-file",
                        str(status_file),
                        *bootstrap,
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            deadline = time.monotonic() + 60
            while not status_file.exists():
                assert time.monotonic() < deadline, "peer did not write its status"
                time.sleep(0.1)
            status = json.loads(status_file.read_text())
            statuses.append(status)
            bootstrap = ["--bootstrap", str(statuses[0]["addresses"][0])]  # type: ignore[index]
        yield statuses
    finally:
        for process in processes:
            process.kill()
            process.wait(timeout=10)


def test_peers_lists_the_swarm(two_peers: list[dict[str, object]]) -> None:
    address = str(two_peers[0]["addresses"][0])  # type: ignore[index]
    wanted = {str(s["peer_id"]) for s in two_peers}
    deadline = time.monotonic() + 30
    found: set[str] = set()
    while time.monotonic() < deadline and not wanted <= found:
        result = subprocess.run(
            [*GOSSAMER, "peers", "--bootstrap", address, "--json"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        found = {str(peer["peer_id"]) for peer in json.loads(result.stdout)}
    assert wanted <= found


def _free_port_holder() -> socket.socket:
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    return holder


def _gossamer(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the CLI to completion (a minute at most), its output captured."""
    return subprocess.run(
        [*GOSSAMER, *args], capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.parametrize("command", ["peers", "doctor"])
def test_no_bootstrap_peer_answering_is_an_error_not_an_empty_list(command: str) -> None:
    with _free_port_holder() as holder:
        port = holder.getsockname()[1]
    result = _gossamer(command, "--bootstrap", f"127.0.0.1:{port}")
    assert result.returncode == 1, result.stdout
    assert "no bootstrap peer answered" in result.stderr
    assert f"127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr
    # One line: the node's own warning about the same peer came first (its logging was set
    # by the root command, and the command's quieter setting did nothing).
    assert "WARNING" not in result.stderr, result.stderr


def test_a_live_peer_that_is_not_the_pinned_one_is_an_error(
    two_peers: list[dict[str, object]],
) -> None:
    address = str(two_peers[0]["addresses"][0])  # type: ignore[index]
    pinned = str(two_peers[1]["peer_id"])  # a real peer id, but not the one at that address
    result = _gossamer("peers", "--bootstrap", f"{pinned}@{address}", "--json")
    assert result.returncode == 1, result.stdout
    assert "no bootstrap peer answered" in result.stderr
    assert result.stdout.strip() == ""


def test_peer_start_says_when_its_metrics_port_is_taken(tmp_path: Path) -> None:
    with _free_port_holder() as holder:
        port = holder.getsockname()[1]
        result = _gossamer(
            "peer", "start", "--listen", "127.0.0.1:0", "--key-file", str(tmp_path / "k"),
            "--metrics-port", str(port),
        )  # fmt: skip
    assert result.returncode == 2  # as `gossamer train` with a port taken: pick another
    assert f"cannot serve metrics on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_peer_start_names_the_flag_of_a_bad_address_and_makes_no_key(tmp_path: Path) -> None:
    key = tmp_path / "key.pem"
    result = _gossamer("peer", "start", "--listen", "nonsense", "--key-file", str(key))
    assert result.returncode == 2
    assert "error: --listen: expected HOST:PORT" in result.stderr, result.stderr
    assert not key.exists()  # the input was wrong: nothing was made
    result = _gossamer("peers", "--bootstrap", "1.2.3.4:99999")
    assert result.returncode == 2
    assert "error: --bootstrap:" in result.stderr, result.stderr


def test_peer_start_names_its_listen_flag_when_the_port_is_taken(tmp_path: Path) -> None:
    with _free_port_holder() as holder:
        port = holder.getsockname()[1]
        result = _gossamer(
            "peer", "start", "--listen", f"127.0.0.1:{port}", "--key-file", str(tmp_path / "k")
        )
    assert result.returncode == 2
    assert f"error: --listen: cannot listen on 127.0.0.1:{port}" in result.stderr, result.stderr
    assert f"port {port} is in use by another program" in result.stderr, result.stderr
    # (gRPC's core printed its own "add_port.cc ... Failed to add port" line to stderr first)
    assert "add_port" not in result.stderr, result.stderr


def test_peer_start_on_an_address_of_another_machine_says_so(tmp_path: Path) -> None:
    # 192.0.2.1 (TEST-NET-1, RFC 5737) is no address of this machine: nothing is sent to it.
    result = _gossamer(
        "peer", "start", "--listen", "192.0.2.1:7000", "--key-file", str(tmp_path / "k")
    )
    assert result.returncode == 2
    assert "192.0.2.1 is not an address of this machine" in result.stderr, result.stderr
    assert "add_port" not in result.stderr, result.stderr


def test_a_private_swarm_asked_without_its_secret_says_to_pass_the_secret(
    tmp_path: Path,
) -> None:
    # The hint said to check the address and the peer id, both right: the secret was missing.
    secret = tmp_path / "secret"
    secret.write_text("a private swarm's secret, long enough")
    status_file = tmp_path / "status.json"
    peer = subprocess.Popen(
        [
            *GOSSAMER, "peer", "start", "--listen", "127.0.0.1:0",
            "--key-file", str(tmp_path / "key"), "--status-file", str(status_file),
            "--swarm-secret-file", str(secret),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not status_file.exists():
            assert time.monotonic() < deadline, "peer did not write its status"
            time.sleep(0.1)  # polling the file it writes, under a deadline
        address = str(json.loads(status_file.read_text())["addresses"][0])
        result = _gossamer("peers", "--bootstrap", address)
    finally:
        peer.kill()
        peer.wait(timeout=10)
    assert result.returncode == 1, result.stdout
    assert "--swarm-secret-file" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_a_second_peer_with_a_running_peers_key_file_is_refused(
    two_peers: list[dict[str, object]], tmp_path_factory: pytest.TempPathFactory
) -> None:
    # Two `peer start` with one --key-file were one peer id publishing records that replaced
    # each other's, without a word.
    key_file = tmp_path_factory.getbasetemp() / "peers0" / "k0"  # (the first running peer's)
    assert key_file.is_file()
    result = subprocess.run(
        [*GOSSAMER, "peer", "start", "--listen", "127.0.0.1:0", "--key-file", str(key_file)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "in use by another running peer" in result.stderr
    assert "give each peer its own key file" in result.stderr
