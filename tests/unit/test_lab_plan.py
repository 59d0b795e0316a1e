"""The plan of a lab, and the commands that build it: every one stays inside lab namespaces."""

from __future__ import annotations

import ipaddress

from gossamer.lab.build import build_commands
from gossamer.lab.config import LabConfig
from gossamer.lab.plan import SUBNET, Topology, plan_topology


def _config() -> LabConfig:
    return LabConfig(num_peers=4, rate_bps=50_000_000, num_nat=2, name="t1")


def test_names_carry_the_lab_prefix_and_are_unique() -> None:
    topology = plan_topology(_config())
    namespaces = topology.namespaces()
    assert len(namespaces) == len(set(namespaces)) == 1 + 4 + 2
    assert all(ns.startswith("gsl-t1-") for ns in namespaces)
    assert [p.name for p in topology.peers] == ["p0", "p1", "p2", "p3"]
    assert all(p.switch_port.startswith("gsl-") for p in topology.peers)
    assert all(len(p.switch_port) <= 15 for p in topology.peers)  # Linux interface name limit


def test_addresses_are_private_unique_and_inside_the_lab_subnet() -> None:
    topology = plan_topology(LabConfig(num_peers=64, num_nat=10))
    subnet = ipaddress.ip_network(SUBNET)
    publics = [p.public_address for p in topology.peers]
    owns = [p.address for p in topology.peers]
    assert len(set(publics)) == 64
    assert len(set(owns)) == 64
    assert all(ipaddress.ip_address(a) in subnet for a in publics + owns)


def test_nat_peers_hide_behind_their_router_address() -> None:
    topology = plan_topology(_config())
    public, natted = topology.peer("p1"), topology.peer("p3")
    assert not public.behind_nat
    assert public.address == public.public_address
    assert natted.behind_nat
    assert natted.router_namespace == "gsl-t1-r3"
    assert natted.address == "10.213.103.2"
    assert natted.public_address == "10.213.0.13"
    assert len(natted.shaped_ends) == 4
    assert len(public.shaped_ends) == 2


def test_topology_round_trips_through_json() -> None:
    topology = plan_topology(_config())
    assert Topology.from_json(topology.to_json()) == topology


def test_every_build_command_targets_a_lab_namespace_never_the_root_one() -> None:
    topology = plan_topology(_config())
    lab_namespaces = set(topology.namespaces())
    for argv in build_commands(topology):
        if argv[:3] == ["ip", "netns", "add"]:
            assert argv[3] in lab_namespaces
            continue
        if argv[:3] == ["ip", "netns", "exec"]:
            target = argv[3]
        else:
            assert argv[0] in ("ip", "tc"), argv
            assert argv[1] == "-n", argv
            target = argv[2]
        assert target in lab_namespaces, argv
        if "netns" in argv[4:]:  # the far end of a veth
            assert argv[argv.index("netns", 4) + 1] in lab_namespaces, argv


def test_every_link_end_gets_a_tbf_at_the_peer_rate() -> None:
    topology = plan_topology(_config())
    shaped = {
        (argv[2], argv[6], argv[10])
        for argv in build_commands(topology)
        if argv[0] == "tc" and "tbf" in argv
    }
    expected = {
        (end.namespace, end.device, "50000000bit")
        for peer in topology.peers
        for end in peer.shaped_ends
    }
    assert shaped == expected


def test_nat_router_masquerades_and_drops_unsolicited_inbound() -> None:
    topology = plan_topology(_config())
    rules = [
        argv[6:]
        for argv in build_commands(topology)
        if argv[3:6] == ["gsl-t1-r2", "iptables", "-w"]
    ]
    assert ["-t", "nat", "-A", "POSTROUTING", "-s", "10.213.102.0/24", "-o", "wan", "-j",
            "MASQUERADE"] in rules  # fmt: skip
    assert ["-A", "FORWARD", "-i", "wan", "-j", "DROP"] in rules
    assert ["-A", "INPUT", "-i", "wan", "-j", "DROP"] in rules
    # the drops come after the rules that let replies back in
    forward = [r for r in rules if r[:2] == ["-A", "FORWARD"]]
    assert forward[-1][-1] == "DROP"
    assert "ESTABLISHED,RELATED" in forward[-2]


def test_a_congestion_control_is_set_in_every_peer_namespace_before_any_link() -> None:
    config = LabConfig(num_peers=3, num_nat=1, name="t1", tcp_congestion_control="cubic")
    topology = plan_topology(config)
    commands = build_commands(topology)
    sysctls = [argv for argv in commands if "net.ipv4.tcp_congestion_control=cubic" in argv]
    assert [argv[3] for argv in sysctls] == [p.namespace for p in topology.peers]
    first_link = min(i for i, argv in enumerate(commands) if "veth" in argv)
    assert all(commands.index(argv) < first_link for argv in sysctls)
    assert Topology.from_json(topology.to_json()) == topology
    plain = plan_topology(_config())  # empty: each namespace keeps what the host gives it
    assert not [argv for argv in build_commands(plain) if "sysctl" in argv and "tcp" in str(argv)]
    old_record = plain.to_json()
    del old_record["tcp_congestion_control"]  # a state file written before the field existed
    assert Topology.from_json(old_record).tcp_congestion_control == ""
