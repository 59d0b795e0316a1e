"""`gossamer peer start` and a swarm `gossamer train`: a failed start leaves nothing behind, and
Ctrl-C exits 130 (real processes on loopback)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

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
