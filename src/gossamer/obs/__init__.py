"""Observability: Prometheus metrics, goodput accounting, trace events, structured logs."""
