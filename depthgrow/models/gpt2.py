"""GPT-2 (pre-LN, learned positions, GELU, tied embeddings, SDPA attention) at any depth >= 0.

A zero-layer GPT-2 is token + position embeddings, the final LayerNorm and the tied LM head: a bigram-
like model that already learns the unigram/bigram statistics and the embeddings. Parameter names follow
the Hugging Face ``GPT2LMHeadModel`` layout (``transformer.wte``, ``transformer.h.{i}.attn.c_attn`` ...);
exporting is a rename-free copy, except that HF stores ``Conv1D`` weights transposed (in, out) and keeps a
separate ``lm_head.weight`` entry for the tied head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from depthgrow.docfield import doc_field
from depthgrow.models.base import (
    EMBEDDING_STREAM,
    ModelConfig,
    block_generator,
    init_block_weights,
    materialize,
    normal_,
)
from depthgrow.seeding import derived_generator


@dataclass(kw_only=True, frozen=True)
class GPT2Config(ModelConfig):
    family: ClassVar[str] = "gpt2"
    n_layer: int = 12
    n_embd: int = doc_field(768, "the width: the residual stream's dimension")
    n_head: int = doc_field(12, "attention heads (n_embd must be divisible by it)")
    block_size: int = doc_field(1024, "context length; also the training sequence length")
    vocab_size: int = doc_field(50257, "tokens in the vocabulary (data.tokenizer=auto chooses the tokenizer by it)")
    bias: bool = doc_field(True, "biases in Linear and LayerNorm, as in GPT-2")
    dropout: float = doc_field(0.0, "dropout on the embeddings, attention weights and residual branches")
    init_std: float = doc_field(0.02, "the std of weight_init=standard (GPT-2's); the spectral init does not use it")

    def problems(self) -> list[str]:
        found = super().problems()
        for name in ("n_embd", "n_head", "block_size", "vocab_size"):
            if getattr(self, name) < 1:
                found.append(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_head >= 1 and self.n_embd % self.n_head:
            found.append(f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            found.append(f"model.dropout must be in [0, 1), got {self.dropout}")
        if not (math.isfinite(self.init_std) and self.init_std > 0):
            found.append(f"model.init_std must be a finite number > 0, got {self.init_std}")
        return found

    def units_per_example(self) -> int:
        return self.block_size

    def block_params(self) -> int:
        d = self.n_embd
        # weights: c_attn 3d^2, attn.c_proj d^2, c_fc 4d^2, mlp.c_proj 4d^2; two LayerNorm gains;
        # biases: ln_1 d, c_attn 3d, attn.c_proj d, ln_2 d, c_fc 4d, mlp.c_proj d
        return 12 * d * d + 2 * d + (11 * d if self.bias else 0)

    def num_params(self, *, embeddings: bool = True) -> int:
        d = self.n_embd
        ln_f = d + (d if self.bias else 0)
        embedding = self.vocab_size * d + self.block_size * d
        return self.n_layer * self.block_params() + ln_f + (embedding if embeddings else 0)

    def flops_per_token(self, *, count_embeddings: bool = False, count_attention: bool = True) -> float:
        """Training FLOPs (forward + backward) per token.

        A matrix multiply of a token's d_in-vector by a d_in x d_out weight costs 2·d_in·d_out FLOPs
        forward; backward computes the input gradient and the weight gradient, each as large, so a weight
        matrix with n entries costs 6·n per token in training. Summed over the weights that multiply every
        token - 12·d² per block (c_attn 3d², attn.c_proj d², c_fc 4d², mlp.c_proj 4d²) and the tied LM head
        (V·d; the embedding lookups themselves are free) - that is 6·N with N = 12·L·d² + V·d.

        Attention adds two matmuls per layer that no weight accounts for: scores Q·Kᵀ and the weighted sum
        of V, each 2·T·d FLOPs per token forward over the full T x T score matrix (as
        ``torch.utils.flop_counter`` counts them; the causal mask would halve the useful part). Training
        triples it: 12·L·T·d per token (the PaLM appendix's 12·L·H·Q·T with H·Q = d).

        ``count_embeddings=True`` follows the paper instead: N counts every parameter (token and position
        embeddings, biases and norms too), which is what makes a zero-layer GPT-2 124M "39M". Combine it
        with ``count_attention=False`` for the paper's 6·N exactly.
        """
        d, L, T = self.n_embd, self.n_layer, self.block_size
        n = self.num_params() if count_embeddings else 12 * L * d * d + self.vocab_size * d
        attention = 12 * L * T * d if count_attention else 0
        return 6.0 * n + attention


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, nh, T, hs)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GPT-2's GELU is the tanh approximation ("gelu_new" in Hugging Face)
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT2(nn.Module):
    STACK = "transformer.h"

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> logits (B, T, vocab_size)."""
        T = idx.shape[1]
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds the context length {self.config.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        # the LM head is the token embedding itself (tied), so it is one parameter under one name
        return F.linear(self.transformer.ln_f(x), self.transformer.wte.weight)

    # --- what growth needs (see depthgrow.models.base.GrowableModel) ---

    def block_stacks(self) -> dict[str, nn.ModuleList]:
        return {self.STACK: self.transformer.h}

    def before_optimizer_step(self) -> None:
        pass  # nothing beside the gradients

    def make_block(self, stack: str) -> nn.Module:
        return materialize(lambda: Block(self.config), like=self.transformer.wte.weight)

    def residual_projections(self, block: nn.Module) -> list[nn.Module]:
        return [block.attn.c_proj, block.mlp.c_proj]

    def init_block(self, stack: str, index: int, block: nn.Module, seed: int) -> None:
        init_block_weights(
            block,
            config=self.config,
            residual=self.residual_projections(block),
            std=self.config.init_std,
            generator=block_generator(seed, stack, index),
            norms=(nn.LayerNorm,),
        )

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Initialise every parameter, GPT-2 style (``weight_init="standard"``) or muP-style
        (``"spectral"``, s(out, in) = :func:`~depthgrow.models.base.spectral_std`):

        ====================================  ========================  ==========================
        parameter                             standard                  spectral
        ====================================  ========================  ==========================
        ``wte`` (also the LM head), ``wpe``   N(0, init_std²)           N(0, s(V, d)²)
        Linear weights in a block             N(0, init_std²)           N(0, s(out, in)²)
        ``attn.c_proj``, ``mlp.c_proj``       as above / sqrt(2·n_layer): the 2·L residual
                                              branches then add up to O(1)
        Linear biases                         0
        LayerNorm gain / bias                 1 / 0
        ====================================  ========================  ==========================

        Each block draws from its own generator, derived from (seed, block index), and draws on the CPU:
        block i of a model grown to depth L is therefore initialised bit for bit as block i of a fresh
        depth-L model with the same seed, on any device.
        """
        generator = derived_generator(seed, EMBEDDING_STREAM)
        embedding_std = self.config.matrix_std(self.config.vocab_size, self.config.n_embd, self.config.init_std)
        normal_(self.transformer.wte.weight, embedding_std, generator)
        normal_(self.transformer.wpe.weight, embedding_std, generator)
        self.transformer.ln_f.weight.fill_(1.0)
        if self.transformer.ln_f.bias is not None:
            self.transformer.ln_f.bias.zero_()
        for index, block in enumerate(self.transformer.h):
            self.init_block(self.STACK, index, block, seed)
