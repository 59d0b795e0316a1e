"""Issue 4's netlab acceptance: 2 peers behind NAT, 2 reachable, every pair streams 50 MB.

The peers are real processes (tests/net_lab_peer.py) inside the lab's namespaces. The NATed ones
find out by dial-back that nobody can reach them, reserve a relay and publish it; every peer then
sends 50 MB to every other one (through a relay where the receiver is behind NAT, at first), and
``gossamer doctor`` run inside a NATed peer says it is relayed.

Then the upgrade: every NATed peer has offered each reachable peer that tunnelled to it a direct
way back, so a second round of 10 MB per pair goes directly between a reachable and a NATed peer
(the relays' counters grow only by the NATed pair's bytes), while the two NATed peers stay relayed.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from netlab_support import MakeLab, stop_processes, wait_for_json

from gossamer.lab.runner import RunningProcess

_TESTS = Path(__file__).resolve().parent.parent
_PEER_PROGRAM = _TESTS / "net_lab_peer.py"
_GOSSAMER = Path(sys.executable).parent / "gossamer"
_NAMES = ("p0", "p1", "p2", "p3")
_NATED = ("p2", "p3")

sys.path.insert(0, str(_TESTS))
from net_lab_peer import PAYLOAD_BYTES, SECOND_ROUND_BYTES, payload_of  # noqa: E402


def _fresh_states(folder: Path, processes: list[RunningProcess]) -> dict[str, Any]:
    """Every peer's state file, as written after this call began (they rewrite it every 0.2 s)."""
    since = time.time()
    deadline = time.monotonic() + 10
    while True:
        states = {n: wait_for_json(folder / f"{n}.state.json", 5, processes) for n in _NAMES}
        if all(s["written_at"] > since for s in states.values()):
            return states
        assert time.monotonic() < deadline, "the peers stopped writing their state"
        time.sleep(0.05)  # polling files the peers rewrite, under a deadline


@pytest.mark.slow
def test_nated_peers_are_relayed_and_every_pair_streams_50_mb(
    make_lab: MakeLab, tmp_path: Path
) -> None:
    started = time.monotonic()
    processes: list[RunningProcess] = []
    with make_lab(num_peers=4, num_nat=2, rate_bps=1_000_000_000) as lab:
        try:

            def spawn(name: str, *extra: str) -> None:
                argv = [sys.executable, str(_PEER_PROGRAM), name, str(tmp_path), *extra]
                with (tmp_path / f"{name}.log").open("w") as log:
                    processes.append(
                        subprocess.Popen(lab.command_in(name, argv), stdout=log, stderr=log)
                    )

            spawn("p0", "--advertise-host", lab.address_of("p0"))
            first = wait_for_json(tmp_path / "p0.ready.json", 20, processes)
            bootstrap = f"{first['peer_id']}@{lab.address_of('p0')}:{first['port']}"
            for name in _NAMES[1:]:
                spawn(name, bootstrap)
            ready = {n: wait_for_json(tmp_path / f"{n}.ready.json", 30, processes) for n in _NAMES}
            for name in _NATED:
                assert ready[name]["reachability"] == "relayed", ready[name]
                assert ready[name]["relays"], f"{name} holds no relay"
            assert ready["p1"]["reachability"] == "direct"

            ids = {name: ready[name]["peer_id"] for name in _NAMES}
            # one stream per pair, towards the NATed side where there is one
            plan = {n: [ids[m] for m in _NAMES[i + 1 :]] for i, n in enumerate(_NAMES)}
            (tmp_path / "plan.json").write_text(json.dumps(plan))
            sent = {n: wait_for_json(tmp_path / f"{n}.sent.json", 60, processes) for n in _NAMES}

            # every reachable peer holds a direct way back to every NATed one
            deadline = time.monotonic() + 20
            while True:
                state = _fresh_states(tmp_path, processes)
                back = {r: set(state[r]["direct_back"]) for r in ("p0", "p1")}
                if all(ids[n] in back[r] for r in back for n in _NATED):
                    break
                assert time.monotonic() < deadline, f"no direct way back: {back}"
                time.sleep(0.2)  # the peers rewrite their state files every 0.2 s
            relayed_before = sum(s["relayed_bytes"] for s in state.values())
            (tmp_path / "plan2.json").write_text("{}")
            sent2 = {n: wait_for_json(tmp_path / f"{n}.sent2.json", 60, processes) for n in _NAMES}
            state = _fresh_states(tmp_path, processes)
            relayed_after = sum(s["relayed_bytes"] for s in state.values())

            # doctor inside a NATed peer: unreachable, relayed, within 10 s
            doctor_started = time.monotonic()
            doctor = lab.run_in(
                "p2",
                [str(_GOSSAMER), "doctor", "--bootstrap", bootstrap, "--json"],
                check=False,
                timeout_s=30,
            )
            doctor_s = time.monotonic() - doctor_started
        finally:
            stop_processes(processes)

    logs = {n: (tmp_path / f"{n}.log").read_text()[-3000:] for n in _NAMES}
    expected = {ids[n]: hashlib.sha256(payload_of(n)).hexdigest() for n in _NAMES}
    for name in _NAMES:
        path = tmp_path / f"{name}.received.json"
        received = json.loads(path.read_text()) if path.exists() else []
        got = {r["from"]: r["sha256"] for r in received if r["bytes"] == PAYLOAD_BYTES}
        want = {ids[m]: expected[ids[m]] for m in _NAMES[: _NAMES.index(name)]}
        assert got == want, logs[name]
        got = {r["from"] for r in received if r["bytes"] == SECOND_ROUND_BYTES}
        assert got == set(want), logs[name]
    kinds = {(n, s["to"]): s["kind"] for n in _NAMES for s in sent[n]}
    assert len(kinds) == 6
    assert kinds.pop(("p0", ids["p1"])) == "direct"
    assert kinds.pop(("p2", ids["p3"])) == "relayed"
    assert set(kinds.values()) <= {"relayed", "direct"}, kinds  # upgraded during the send or not
    rates = {f"{n}->{s['to'][:6]}": round(50 / s["seconds"], 1) for n in _NAMES for s in sent[n]}
    print(f"\nMB/s per transfer: {rates}")

    # after the upgrade: reachable-NATed pairs are direct, the NATed pair is still relayed, and
    # the relays carried only the NATed pair's second round (plus TLS framing)
    kinds2 = {(n, s["to"]): s["kind"] for n in _NAMES for s in sent2[n]}
    assert kinds2.pop(("p2", ids["p3"])) == "relayed"
    assert set(kinds2.values()) == {"direct"}, kinds2
    grown = relayed_after - relayed_before
    assert SECOND_ROUND_BYTES <= grown < 1.1 * SECOND_ROUND_BYTES, grown
    num_upgrades = sum(s["num_direct_upgrades"] for s in state.values())
    rates2 = {f"{n}->{s['to'][:6]}": round(10 / s["seconds"], 1) for n in _NAMES for s in sent2[n]}
    print(f"after the upgrade, MB/s: {rates2}; upgrades counted: {num_upgrades}")

    assert doctor.ok, doctor.stderr
    verdict = json.loads(doctor.stdout)
    assert verdict["reachable"] is False
    assert verdict["relayed"] is True, doctor.stdout + doctor.stderr[-3000:]
    assert verdict["advice"].startswith("fine: relayed through")
    assert doctor_s < 10.0, f"doctor took {doctor_s:.1f} s"
    print(f"doctor: {doctor_s:.1f} s; whole test {time.monotonic() - started:.1f} s")
