"""The README's config example and command tour work when copied as written.

A reviewer following the README in a fresh clone hit both: the example's placeholder bootstrap
made `gossamer config show` fail, and the tour's one-peer run and its swarm's first peer shared
the default checkpoint folder, so the swarm line was refused ("written for another model").
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from gossamer.core.config_loader import load_run_config

README = Path(__file__).resolve().parents[2] / "README.md"


def _block_after(marker: str, fence: str) -> str:
    """The first fenced block of kind ``fence`` after the line that starts with ``marker``."""
    text = README.read_text()
    start = text.index(f"\n{marker}")
    match = re.search(rf"```{fence}\n(.*?)```", text[start:], re.DOTALL)
    assert match, f"no ```{fence} block after {marker!r} in the README"
    return match.group(1)


def _tour_commands() -> list[list[str]]:
    """The tour's commands, continuation lines joined and comments dropped, as argv lists."""
    block = _block_after("## A quick tour of the command line", "sh")
    joined = block.replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in joined.splitlines() if line.strip()]


def test_the_config_example_loads_as_written(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text(_block_after("A config file", "toml"))
    config = load_run_config(path, environ={})
    assert config.name == "my-run"
    assert not config.swarm.bootstrap  # the placeholder address stays a comment
    # A data path of its own would name a corpus a fresh clone does not have.
    assert config.data.path is None or Path(config.data.path).exists()


def test_the_tour_makes_its_config_file_first() -> None:
    commands = _tour_commands()
    makes = [i for i, argv in enumerate(commands) if argv[:1] == ["printf"] and "run.toml" in argv]
    uses = [i for i, argv in enumerate(commands) if "run.toml" in argv and argv[0] == "gossamer"]
    assert makes, "the tour uses run.toml without making one"
    assert uses
    assert makes[0] < uses[0]


def test_every_training_line_of_the_tour_has_a_checkpoint_folder_of_its_own() -> None:
    folders: list[str] = []
    for argv in _tour_commands():
        if argv[:2] != ["gossamer", "train"]:
            continue
        flag = "--checkpoint.directory"
        folders.append(argv[argv.index(flag) + 1] if flag in argv else "checkpoints")
    assert len(folders) >= 3  # one peer, then a swarm of two
    assert len(set(folders)) == len(folders), folders


def test_the_tours_swarm_and_standing_peer_listen_where_other_machines_reach_them() -> None:
    # swarm.listen defaults to 127.0.0.1:0: a swarm started as the tour said was this machine's.
    swarm = [a for a in _tour_commands() if a[:2] == ["gossamer", "train"] and "diloco" in a]
    assert swarm
    for argv in swarm:
        assert argv[argv.index("--swarm.listen") + 1].startswith("0.0.0.0:"), argv
    standing = [a for a in _tour_commands() if a[:3] == ["gossamer", "peer", "start"]]
    assert standing
    assert standing[0][standing[0].index("--listen") + 1].startswith("0.0.0.0:")


def test_the_tour_puts_gossamer_on_the_path_before_its_first_command() -> None:
    # After `make demo`, `gossamer` was "command not found": it lives in the clone's .venv.
    commands = _tour_commands()
    first = next(i for i, argv in enumerate(commands) if argv[0] == "gossamer")
    assert any(argv[:1] == ["source"] and argv[1].endswith(".venv/bin/activate")
               for argv in commands[:first])  # fmt: skip


def test_the_tours_dashboard_scrapes_a_port_a_tour_peer_serves_metrics_on() -> None:
    # It scraped HOST:9100 while the tour's peers served metrics on port 0 (any free one).
    commands = _tour_commands()
    served = {
        argv[argv.index("--metrics-port") + 1]
        for argv in commands
        if argv[:2] == ["gossamer", "train"] and "--metrics-port" in argv
    }
    [dashboard] = [argv for argv in commands if argv[:2] == ["gossamer", "dashboard"]]
    scraped = dashboard[dashboard.index("--scrape") + 1].rpartition(":")[2]
    assert scraped in served, (scraped, served)
