"""The built-in models (a small GPT). Torch only."""
