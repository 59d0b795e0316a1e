"""The lab: namespaces, capped links, NAT and scheduled faults to rehearse a swarm on one machine.

It needs root and Debian's ``iproute2`` and ``iptables``; ``iperf3`` for throughput measurements.
Latency and loss are not emulated (this kernel has no netem); see docs/lab.md.
"""

from gossamer.lab.config import LAB_PREFIX, LabConfig, format_rate, parse_rate, parse_rates
from gossamer.lab.control import LabControl
from gossamer.lab.faults import (
    AppliedFault,
    Fault,
    FaultPlayer,
    load_schedule,
    parse_schedule,
    play_schedule,
)
from gossamer.lab.iperf import ThroughputResult, measure_tcp_throughput
from gossamer.lab.lifecycle import (
    LATENCY_NOTICE,
    LabStatus,
    attach_lab,
    lab_down,
    lab_status,
    lab_up,
    open_lab,
    remove_abandoned_labs,
)
from gossamer.lab.plan import PeerNode, Topology, plan_topology
from gossamer.lab.runner import (
    CommandFailedError,
    CommandRunner,
    FakeCommandRunner,
    SubprocessRunner,
)

__all__ = [
    "LAB_PREFIX",
    "LATENCY_NOTICE",
    "AppliedFault",
    "CommandFailedError",
    "CommandRunner",
    "FakeCommandRunner",
    "Fault",
    "FaultPlayer",
    "LabConfig",
    "LabControl",
    "LabStatus",
    "PeerNode",
    "SubprocessRunner",
    "ThroughputResult",
    "Topology",
    "attach_lab",
    "format_rate",
    "lab_down",
    "lab_status",
    "lab_up",
    "load_schedule",
    "measure_tcp_throughput",
    "open_lab",
    "parse_rate",
    "parse_rates",
    "parse_schedule",
    "plan_topology",
    "play_schedule",
    "remove_abandoned_labs",
]
