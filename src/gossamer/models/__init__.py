"""The built-in models (a small GPT). Torch only."""

from gossamer.models.gpt import GPT

__all__ = ["GPT"]
