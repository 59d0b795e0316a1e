"""The lab: namespaces, capped links, NAT and scheduled faults to rehearse a swarm."""
