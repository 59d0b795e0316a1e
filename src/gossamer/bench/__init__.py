"""Benchmark programs: each runs Gossamer and its reference side by side and reports ratios."""

SMALL_GPT: tuple[tuple[str, str], ...] = (
    ("model.num_layers", "2"),
    ("model.num_heads", "2"),
    ("model.width", "64"),
    ("model.context", "64"),
    ("train.batch_size", "8"),
    ("train.num_threads", "1"),
)
"""The model `gossamer bench diloco` trains unless config flags say otherwise: a GPT of 121k
parameters, 512 tokens a step, one thread per peer, so 4 peers take 5000 steps each in minutes on
2 shared cores."""
