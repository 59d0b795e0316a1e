"""Commands that only speak to the network load without torch; the public API keeps its names."""

from __future__ import annotations

import subprocess
import sys


def _python(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    return done.stdout.strip()


def test_network_commands_import_no_torch() -> None:
    # `gossamer doctor` spent seconds importing torch (tens of seconds with a cold file cache)
    # before it did anything; a netlab test timed it at 10.9 s against its 10 s.
    code = (
        "import sys\n"
        "from gossamer.cli.main import build_app\n"
        "for command in ('peer', 'peers', 'doctor', 'lab', 'trace', 'dashboard'):\n"
        "    build_app(command)\n"
        "print('torch' in sys.modules)\n"
    )
    assert _python(code) == "False"
    assert _python("import sys, gossamer.cli.main as m; m.build_app('train'); "
                   "print('torch' in sys.modules)") == "True"  # fmt: skip


def test_gossamer_train_stays_the_function_whatever_is_imported_first() -> None:
    code = (
        "import gossamer.train.swarm, gossamer\n"
        "print(callable(gossamer.train), gossamer.Trainer.__name__, gossamer.GPT.__name__)\n"
    )
    assert _python(code) == "True Trainer GPT"
