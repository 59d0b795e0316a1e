"""What the `gossamer` command sets up in its process before any command runs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def _python(code: str, env: dict[str, str]) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        env=env,
    )
    return done.stdout.strip()


_GRPC_VERBOSITY_AT_IMPORT = (
    "import os, sys\n"
    "class Spy:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name == 'grpc':\n"
    "            print('at import:', os.environ.get('GRPC_VERBOSITY'))\n"
    "            sys.meta_path.remove(self)\n"
    "sys.meta_path.insert(0, Spy())\n"
    "from gossamer.cli.main import main\n"
    "sys.argv = ['gossamer', 'version']\n"
    "main()\n"
)


def test_grpc_logs_errors_only_unless_the_user_says_otherwise() -> None:
    """gRPC core logged at INFO to stderr, a remote peer's GOAWAY text included, raw: any
    caller could write terminal escape sequences to a peer's console."""
    env = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}
    assert _python(_GRPC_VERBOSITY_AT_IMPORT, env).splitlines()[0] == "at import: ERROR"
    chosen = {**env, "GRPC_VERBOSITY": "DEBUG"}
    assert _python(_GRPC_VERBOSITY_AT_IMPORT, chosen).splitlines()[0] == "at import: DEBUG"


@pytest.mark.skipif(sys.platform == "win32", reason="no open-file limits to raise")
def test_the_soft_limit_on_open_files_is_raised_to_the_hard_one() -> None:
    """At the common soft limit of 1,024, idle connections from callers with no secret took
    every descriptor of a node, and honest dials failed."""
    code = (
        "import atexit, logging, resource, sys\n"
        "from gossamer.cli.main import main\n"
        "_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))\n"
        "def report():\n"
        "    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "    print(soft == (1 << 20 if hard == resource.RLIM_INFINITY else hard))\n"
        "atexit.register(report)\n"
        "logging.basicConfig(level=logging.DEBUG, format='%(message)s')  # (main's is a no-op)\n"
        "sys.argv = ['gossamer', 'version']\n"
        "main()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.stdout.strip().splitlines()[-1] == "True"
    assert "open files: soft limit raised from 64" in done.stderr
