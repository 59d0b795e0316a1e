"""Gossamer: train PyTorch models on machines that are heterogeneous, unreliable and far apart."""
