"""Training: the loop, strategies, and state sync for newcomers."""
