"""`gossamer lab`: build and drive a rehearsal swarm on this machine."""

from __future__ import annotations

import typer

app = typer.Typer(help="Rehearse a swarm on one machine: namespaces, capped links, NAT, faults.")
