"""Datasets: the embedded corpus, text files, token files, and per-peer streams. Torch only."""
