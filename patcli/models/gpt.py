"""A small decoder-only transformer (GPT) whose attention keeps heads explicit, so they can be scored and removed.

Each attention layer exposes two ``nn.Identity`` hook points — ``attention_probs`` (B, H, T, T) and
``head_output`` (B, H, T, head_dim) — that head scorers observe with ordinary forward hooks. The number of heads
is read from the weights, so a physically pruned layer needs no other change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError
from ..engine.layouts import ChannelGroup, Slice
from . import MODELS


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, head_dim: int, block_size: int, dropout: float) -> None:
        super().__init__()
        self.head_dim = head_dim
        width = n_heads * head_dim
        self.q, self.k, self.v = (nn.Linear(d_model, width) for _ in range(3))
        self.out = nn.Linear(width, d_model)
        self.dropout = nn.Dropout(dropout)
        self.attention_probs = nn.Identity()
        self.head_output = nn.Identity()
        self.register_buffer("causal", torch.tril(torch.ones(block_size, block_size, dtype=torch.bool)), persistent=False)

    @property
    def n_heads(self) -> int:
        return self.q.out_features // self.head_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        heads = self.n_heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, length, heads, self.head_dim).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        scores = scores.masked_fill(~self.causal[:length, :length], float("-inf"))
        probs = self.attention_probs(F.softmax(scores, dim=-1))
        heads_out = self.head_output(self.dropout(probs) @ v)
        return self.out(heads_out.transpose(1, 2).reshape(batch, length, heads * self.head_dim))


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, head_dim: int, block_size: int, mlp_ratio: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, head_dim, block_size, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, mlp_ratio * d_model), nn.GELU(), nn.Linear(mlp_ratio * d_model, d_model),
                                 nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Token + position embeddings, ``n_layer`` pre-norm blocks, a final LayerNorm and an untied output head."""

    def __init__(self, vocab_size: int, block_size: int, n_layer: int, n_head: int, d_model: int, head_dim: int,
                 mlp_ratio: int, dropout: float) -> None:
        super().__init__()
        self.token = nn.Embedding(vocab_size, d_model)
        self.position = nn.Embedding(block_size, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_head, head_dim, block_size, mlp_ratio, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.token(tokens) + self.position(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    def channel_groups(self, kind: str) -> list[ChannelGroup]:
        """Heads (Q/K/V rows + output-projection columns) or MLP neurons (fc rows + proj columns) per block."""
        groups = []
        for i, block in enumerate(self.blocks):
            if kind == "heads":
                attn, name = block.attn, f"blocks.{i}.attn"
                width = attn.head_dim
                slices = [Slice(f"{name}.{p}.{t}", 0, width) for p in ("q", "k", "v") for t in ("weight", "bias")]
                slices.append(Slice(f"{name}.out.weight", 1, width))
                groups.append(ChannelGroup(name, attn.n_heads, slices, attn.q.weight.shape,
                                           activation=f"{name}.head_output", activation_dim=1,
                                           attention=f"{name}.attention_probs"))
            elif kind == "neurons":
                name = f"blocks.{i}.mlp"
                fc = block.mlp[0]
                slices = [Slice(f"{name}.0.weight", 0), Slice(f"{name}.0.bias", 0), Slice(f"{name}.2.weight", 1)]
                groups.append(ChannelGroup(name, fc.out_features, slices, fc.weight.shape,
                                           activation=f"{name}.2", activation_dim=-1))
            else:
                raise ValueError(f"gpt has no {kind}; allowed: heads, neurons")
        return groups


@MODELS.register("gpt")
@dataclass
class GPTConfig:
    """A small character-level GPT; vocabulary and context length come from the dataset."""

    n_layer: int = 2
    n_head: int = 4
    d_model: int = 128
    head_dim: int | None = None  # default d_model // n_head
    mlp_ratio: int = 4
    dropout: float = 0.0

    def validate(self, prefix: str) -> None:
        for key in ("n_layer", "n_head", "d_model", "mlp_ratio"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{prefix}.{key}", f"{getattr(self, key)} is out of range; allowed: >= 1")
        if self.head_dim is not None and self.head_dim < 1:
            raise ConfigError(f"{prefix}.head_dim", f"{self.head_dim} is out of range; allowed: >= 1, or null for d_model / n_head")
        if self.head_dim is None and self.d_model % self.n_head:
            raise ConfigError(f"{prefix}.n_head", f"{self.n_head} does not divide d_model={self.d_model}; set head_dim")
        if not 0.0 <= self.dropout < 1.0:  # as the MLP's: 1.0 would drop everything
            raise ConfigError(f"{prefix}.dropout", f"{self.dropout} is out of range; allowed: 0 <= value < 1")

    def build(self, meta: dict[str, Any]) -> nn.Module:
        if "vocab_size" not in meta:
            raise ConfigError("model", "model=gpt needs a language-modelling dataset (dataset=pysrc or dataset=text)")
        return GPT(meta["vocab_size"], meta["block_size"], self.n_layer, self.n_head, self.d_model,
                   self.d_model // self.n_head if self.head_dim is None else self.head_dim, self.mlp_ratio, self.dropout)
