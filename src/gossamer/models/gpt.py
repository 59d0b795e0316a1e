"""The built-in model: a small decoder-only transformer (GPT-2 style) with ``generate``.

Pre-norm blocks (LayerNorm, causal self-attention, residual; LayerNorm, GELU MLP 4x, residual),
learned positional embeddings, a final LayerNorm and an output projection that shares its weight
with the token embedding when ``ModelConfig.tie_weights`` is set. Attention goes through
``torch.nn.functional.scaled_dot_product_attention`` so that torch picks its fastest kernel on
every device. Initialisation follows GPT-2: normal with std 0.02, residual output projections
scaled down by ``1 / sqrt(2 * num_layers)`` so the residual stream's variance does not grow with
depth. Construction draws only from torch's global generator, so ``torch.manual_seed(s)`` before
``GPT(config)`` gives bit-identical weights on every run.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gossamer.core.config import ModelConfig

__all__ = ["GPT"]

_INIT_STD = 0.02


class _CausalSelfAttention(nn.Module):
    """Multi-head self-attention where each position attends only to itself and earlier ones."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.dropout = config.dropout
        self.qkv_projection = nn.Linear(config.width, 3 * config.width)
        self.output_projection = nn.Linear(config.width, config.width)
        self.output_dropout = nn.Dropout(config.dropout)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        batch_size, seq_len, width = hidden.shape
        head_width = width // self.num_heads
        query, key, value = self.qkv_projection(hidden).split(width, dim=2)
        # [B, T, C] -> [B, heads, T, head_width]
        query = query.view(batch_size, seq_len, self.num_heads, head_width).transpose(1, 2)
        key = key.view(batch_size, seq_len, self.num_heads, head_width).transpose(1, 2)
        value = value.view(batch_size, seq_len, self.num_heads, head_width).transpose(1, 2)
        attended = F.scaled_dot_product_attention(
            query,
            key,
            value,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=True,
        )
        attended = attended.transpose(1, 2).contiguous().view(batch_size, seq_len, width)
        return self.output_dropout(self.output_projection(attended))  # type: ignore[no-any-return]


class _MLP(nn.Module):
    """Position-wise feed-forward network, 4x wider inside, GELU."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.up_projection = nn.Linear(config.width, 4 * config.width)
        self.activation = nn.GELU()
        self.down_projection = nn.Linear(4 * config.width, config.width)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        projected = self.down_projection(self.activation(self.up_projection(hidden)))
        return self.dropout(projected)  # type: ignore[no-any-return]


class _Block(nn.Module):
    """One pre-norm transformer block."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(config.width)
        self.attention = _CausalSelfAttention(config)
        self.mlp_norm = nn.LayerNorm(config.width)
        self.mlp = _MLP(config)

    def residual_projections(self) -> tuple[nn.Linear, nn.Linear]:
        """The layers whose outputs are added to the residual stream."""
        return self.attention.output_projection, self.mlp.down_projection

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.attention(self.attention_norm(hidden))
        return hidden + self.mlp(self.mlp_norm(hidden))  # type: ignore[no-any-return]


class GPT(nn.Module):
    """A decoder-only transformer language model.

    Args:
        config: Depth, width, heads, context length, vocabulary, dropout and weight tying.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.position_embedding = nn.Embedding(config.context, config.width)
        self.embedding_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(_Block(config) for _ in range(config.num_layers))
        self.final_norm = nn.LayerNorm(config.width)
        self.output_projection = nn.Linear(config.width, config.vocab_size, bias=False)
        if config.tie_weights:
            self.output_projection.weight = self.token_embedding.weight
        # Registered as a buffer so that it follows the model across devices; not persistent, so
        # it never enters a checkpoint.
        self.register_buffer("positions", torch.arange(config.context), persistent=False)
        self.apply(self._init_weights)
        residual_std = _INIT_STD / math.sqrt(2 * config.num_layers)
        for block in self.blocks:
            assert isinstance(block, _Block)
            for projection in block.residual_projections():
                nn.init.normal_(projection.weight, mean=0.0, std=residual_std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=_INIT_STD)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=_INIT_STD)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Next-token logits for every position.

        Args:
            tokens: Token ids, an integer tensor of shape ``[batch, seq_len]`` with
                ``seq_len <= config.context``.

        Returns:
            Float logits of shape ``[batch, seq_len, vocab_size]``; position ``t`` depends only on
            tokens ``0..t``.

        Raises:
            ValueError: ``tokens`` is not 2-D, not integer, or longer than the context.
        """
        if tokens.dim() != 2:
            raise ValueError(
                f"GPT expects tokens of shape [batch, seq_len], got shape {tuple(tokens.shape)}"
            )
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise ValueError(f"GPT expects integer token ids, got dtype {tokens.dtype}")
        seq_len = tokens.shape[1]
        if seq_len > self.config.context:
            raise ValueError(
                f"sequence of {seq_len} tokens is longer than the model's context of "
                f"{self.config.context}; crop it to the last {self.config.context} tokens or "
                "build the model with a larger model.context"
            )
        positions: torch.Tensor = self.positions[:seq_len]  # type: ignore[index]
        hidden = self.token_embedding(tokens) + self.position_embedding(positions)
        hidden = self.embedding_dropout(hidden)
        for block in self.blocks:
            hidden = block(hidden)
        return self.output_projection(self.final_norm(hidden))  # type: ignore[no-any-return]

    @torch.no_grad()
    def generate(
        self,
        prompt: torch.Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Continue ``prompt`` by sampling one token at a time.

        The model attends to at most the last ``config.context`` tokens. It runs in eval mode
        (no dropout) and is put back in its previous mode afterwards.

        Args:
            prompt: Token ids of shape ``[batch, seq_len]``, ``seq_len >= 1``.
            max_new_tokens: How many tokens to append (0 returns the prompt).
            temperature: Divides the logits; higher is more random. 0 means greedy (argmax).
            top_k: Sample only among the ``top_k`` most likely tokens; ``None`` for all.
            generator: Source of randomness for sampling, so a sample can be reproduced
                without touching torch's global generator.

        Returns:
            Token ids of shape ``[batch, seq_len + max_new_tokens]``, the prompt first.

        Raises:
            ValueError: An argument is out of range.
        """
        if prompt.dim() != 2 or prompt.shape[1] == 0:
            raise ValueError(
                f"prompt must have shape [batch, seq_len] with seq_len >= 1, "
                f"got {tuple(prompt.shape)}"
            )
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be at least 1 or None, got {top_k}")
        was_training = self.training
        self.eval()
        try:
            tokens = prompt
            for _ in range(max_new_tokens):
                window = tokens[:, -self.config.context :]
                logits = self(window)[:, -1, :].float()
                tokens = torch.cat(
                    [tokens, self._pick_next(logits, temperature, top_k, generator)], 1
                )
            return tokens
        finally:
            self.train(was_training)

    @staticmethod
    def _pick_next(
        logits: torch.Tensor,
        temperature: float,
        top_k: int | None,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        if temperature == 0:
            return logits.argmax(dim=-1, keepdim=True)
        # The largest logit first taken out: divided by a tiny temperature (1e-39), the logits
        # overflowed to inf and the softmax gave NaN; now the others go to -inf, the largest
        # stays 0, as greedy picking would.
        logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
        if top_k is not None and top_k < logits.shape[-1]:
            kth_largest = torch.topk(logits, top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth_largest, float("-inf"))
        probabilities = torch.softmax(logits, dim=-1)
        if generator is not None and generator.device != probabilities.device:
            # A CPU generator with a GPU model: sample where the generator lives, so the same
            # seed gives the same sample whatever device the model is on.
            sampled = torch.multinomial(
                probabilities.to(generator.device), num_samples=1, generator=generator
            )
            return sampled.to(probabilities.device)
        return torch.multinomial(probabilities, num_samples=1, generator=generator)

    def num_parameters(self) -> int:
        """Number of trainable scalars, counting a tied weight once."""
        return sum(parameter.numel() for parameter in self.parameters())
