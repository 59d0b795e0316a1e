"""`gossamer peer start` and a swarm `gossamer train`: a failed start leaves nothing behind, and
Ctrl-C exits 130 (real processes on loopback)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gossamer.cli.main import app
from gossamer.store import lease

GOSSAMER = [sys.executable, "-m", "gossamer.cli"]


def _port_in_use() -> socket.socket:
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    return holder


def _gossamer(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run the CLI to completion (two minutes at most), its output captured."""
    return subprocess.run(
        [*GOSSAMER, *args], capture_output=True, text=True, timeout=120, check=False, cwd=cwd
    )


def test_peer_start_on_a_port_in_use_leaves_no_new_key_file(tmp_path: Path) -> None:
    # (the key was made before the port was found taken, and stayed)
    key = tmp_path / "b.key"
    with _port_in_use() as holder:
        port = holder.getsockname()[1]
        result = _gossamer(
            "peer", "start", "--listen", f"127.0.0.1:{port}", "--key-file", str(key), cwd=tmp_path
        )
    assert result.returncode == 2, result.stderr
    assert f"error: --listen: cannot listen on 127.0.0.1:{port}" in result.stderr
    assert not key.exists()


def test_peer_start_on_a_port_in_use_keeps_a_key_file_it_did_not_make(tmp_path: Path) -> None:
    key = tmp_path / "a.key"
    made = _gossamer("peer", "id", "--key-file", str(key), cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    before = key.read_bytes()
    with _port_in_use() as holder:
        port = holder.getsockname()[1]
        result = _gossamer(
            "peer", "start", "--listen", f"127.0.0.1:{port}", "--key-file", str(key), cwd=tmp_path
        )
    assert result.returncode == 2, result.stderr
    assert key.read_bytes() == before


def test_a_swarm_peer_on_a_port_in_use_leaves_no_checkpoint_folder(tmp_path: Path) -> None:
    # (`train` left c/peer.key behind)
    with _port_in_use() as holder:
        port = holder.getsockname()[1]
        result = _gossamer(
            "train", "--swarm.strategy", "diloco", "--checkpoint.directory", "c",
            "--swarm.listen", f"127.0.0.1:{port}", "--train.max-steps", "2",
            "--model.num-layers", "1", "--model.width", "32", "--model.num-heads", "2",
            "--model.context", "32",
            cwd=tmp_path,
        )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "cannot listen" in result.stderr, result.stderr
    assert not (tmp_path / "c").exists(), list((tmp_path / "c").iterdir())


_TAKES_THE_FOLDER = """
import fcntl, os, sys
folder = sys.argv[1]
os.mkdir(folder)
fd = os.open(os.path.join(folder, ".in-use"), os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, f"{os.getpid()}\\n".encode())
with open(os.path.join(folder, "peer.key"), "wb") as key:
    key.write(b"its key")
print("held", flush=True)
sys.stdin.read()
"""
"""A process that makes a run's checkpoint folder, holds it as `train` does, with its key in it,
until its stdin closes."""


def test_a_swarm_peer_failing_on_anothers_new_folder_leaves_the_others_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # (it listed the folder as its own while the folder was missing; the other process made
    # it and took it before this one's lease, which failed, and this one then removed the
    # other's key and lease file, and the folder, as the other trained)
    folder = tmp_path / "c"
    others: list[subprocess.Popen[str]] = []
    take = lease._acquire

    def the_other_takes_it_first(directory: Path, key: str) -> Path:
        if not others:  # (just before this process takes the folder: the race's window)
            other = subprocess.Popen(
                [sys.executable, "-c", _TAKES_THE_FOLDER, str(folder)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            others.append(other)
            assert other.stdout is not None
            assert other.stdout.readline() == "held\n"  # (it exits, "", where it failed)
        return take(directory, key)

    monkeypatch.setattr(lease, "_acquire", the_other_takes_it_first)
    monkeypatch.chdir(tmp_path)
    try:
        result = CliRunner().invoke(
            app,
            ["train", "--swarm.strategy", "diloco", "--checkpoint.directory", str(folder),
             "--swarm.listen", "127.0.0.1:0", "--train.max-steps", "2",
             "--model.num-layers", "1", "--model.width", "32", "--model.num-heads", "2",
             "--model.context", "32"],
        )  # fmt: skip
        assert result.exit_code == 2, result.output
        assert "is in use by another Gossamer process" in result.output
        assert others[0].poll() is None
        assert (folder / "peer.key").read_bytes() == b"its key"
        assert (folder / ".in-use").exists()
    finally:
        for other in others:
            assert other.stdin is not None
            other.stdin.close()
            other.wait(timeout=30)
            assert other.stdout is not None
            other.stdout.close()


def test_peer_start_stopped_by_ctrl_c_exits_130(tmp_path: Path) -> None:
    # (it exited 0, as if it had finished; the README says 130)
    process = subprocess.Popen(
        [*GOSSAMER, "peer", "start", "--listen", "127.0.0.1:0", "--key-file", str(tmp_path / "k")],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stdout is not None
        deadline = time.monotonic() + 60
        line = process.stdout.readline()  # (the first line: "peer ... listening on ...")
        assert "listening on" in line, line
        assert time.monotonic() < deadline
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()
    assert process.returncode == 130
