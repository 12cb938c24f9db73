"""GPT-2 (pre-LN, learned positions, GELU, tied embeddings, SDPA attention) at any depth >= 0.

A zero-layer GPT-2 is token + position embeddings, the final LayerNorm and the tied LM head: a bigram-
like model that already learns the unigram/bigram statistics and the embeddings. Parameter names follow
the Hugging Face ``GPT2LMHeadModel`` layout (``transformer.wte``, ``transformer.h.{i}.attn.c_attn`` ...);
exporting is a rename-free copy, except that HF stores ``Conv1D`` weights transposed (in, out) and keeps a
separate ``lm_head.weight`` entry for the tied head.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from depthgrow.docfield import doc_field
from depthgrow.errors import DepthgrowError
from depthgrow.models.base import (
    EMBEDDING_STREAM,
    Family,
    GrowableModel,
    ModelConfig,
    block_generator,
    init_block_weights,
    materialize,
    normal_,
)
from depthgrow.models.hf import (
    Adapter,
    StateDict,
    refuse,
    special_tokens,
    transformers_module,
    with_tied_head,
    without_head,
)
from depthgrow.seeding import derived_generator

if TYPE_CHECKING:
    from transformers import PretrainedConfig


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


class GPT2(GrowableModel):
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


# --- Hugging Face: GPT2LMHeadModel ---

# HF GPT-2 keeps these four projections as Conv1D, whose weight is stored (in, out): nn.Linear's transposed
_GPT2_CONV1D = re.compile(r"transformer\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight")
_GPT2_POSITIONS = "transformer.wpe.weight"
_GPT2_EMBEDDINGS = ("transformer.wte.weight", _GPT2_POSITIONS)
# HF's GPT-2 looks each position up in its table, so a generation past the context would index past the
# depthgrow model's: the exported table holds this many contexts, every row past the first context a copy of
# its last row. Eight: long continuations, for 7 · block_size · n_embd more parameters (4 % of GPT-2 124M)
_GPT2_EXPORTED_CONTEXTS = 8
_GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")  # both the tanh-approximated GELU depthgrow uses
_LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which depthgrow's GPT-2 uses


def _gpt2_to_hf_config(config: GPT2Config, end_of_text: int | None) -> PretrainedConfig:
    return transformers_module().GPT2Config(
        vocab_size=config.vocab_size,
        n_positions=_GPT2_EXPORTED_CONTEXTS * config.block_size,
        # the context the model was trained on, which the import reads back: transformers no longer reads it,
        # and older GPT-2 tooling takes the context from it
        n_ctx=config.block_size,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        n_inner=None,  # 4 * n_embd, as depthgrow's MLP
        activation_function="gelu_new",
        layer_norm_epsilon=_LAYER_NORM_EPS,
        resid_pdrop=config.dropout,
        embd_pdrop=config.dropout,
        attn_pdrop=config.dropout,
        initializer_range=config.init_std,
        tie_word_embeddings=True,
        **special_tokens(end_of_text),
    )


def _gpt2_from_hf_config(hf: PretrainedConfig) -> GPT2Config:
    problems = []
    if hf.activation_function not in _GPT2_ACTIVATIONS:
        problems.append(f"activation_function is {hf.activation_function!r}, not the tanh GELU (gelu_new)")
    if hf.n_inner not in (None, 4 * hf.n_embd):
        problems.append(f"n_inner is {hf.n_inner}, not 4 * n_embd")
    if hf.layer_norm_epsilon != _LAYER_NORM_EPS:
        problems.append(f"layer_norm_epsilon is {hf.layer_norm_epsilon}, not {_LAYER_NORM_EPS}")
    if not hf.tie_word_embeddings:
        problems.append("its LM head is not tied to the token embedding")
    if not hf.scale_attn_weights or hf.scale_attn_by_inverse_layer_idx:
        problems.append("its attention scores are not scaled by 1/sqrt(head size)")
    if hf.add_cross_attention:
        problems.append("it has cross-attention")
    # depthgrow has one dropout rate where GPT-2 has three
    dropouts = {hf.resid_pdrop, hf.embd_pdrop, hf.attn_pdrop}
    if len(dropouts) > 1:
        problems.append(f"its dropout rates differ (resid/embd/attn {hf.resid_pdrop}/{hf.embd_pdrop}/{hf.attn_pdrop})")
    context = _gpt2_context(hf)
    if context > hf.n_positions:
        problems.append(
            f"its context n_ctx ({context}) is longer than its position table (n_positions {hf.n_positions})"
        )
    refuse("GPT-2", problems)
    return GPT2Config(
        n_layer=hf.n_layer,
        n_embd=hf.n_embd,
        n_head=hf.n_head,
        block_size=context,
        vocab_size=hf.vocab_size,
        bias=True,  # HF's GPT-2 always has biases, and after an export of bias=False they may have trained
        dropout=hf.resid_pdrop,
        init_std=hf.initializer_range,
    )


def _gpt2_context(hf: PretrainedConfig) -> int:
    # a GPT-2 not exported by depthgrow may lack n_ctx: its whole position table is then its context
    return getattr(hf, "n_ctx", None) or hf.n_positions


def _gpt2_to_hf(config: GPT2Config, state: StateDict) -> StateDict:
    hf = {}
    for name, tensor in state.items():
        hf[name] = tensor.t().contiguous() if _GPT2_CONV1D.fullmatch(name) else tensor
        if name == _GPT2_POSITIONS:
            # every position past the context reads as its last one (the card says so)
            rows = torch.arange(_GPT2_EXPORTED_CONTEXTS * config.block_size).clamp(max=config.block_size - 1)
            hf[name] = tensor[rows.to(tensor.device)]
        bias = name.removesuffix("weight") + "bias"
        if name.endswith(".weight") and name not in _GPT2_EMBEDDINGS and bias not in state:
            # a bias=False model: HF's GPT-2 has no switch for biases, and a zero bias adds nothing, so the
            # export computes exactly the function of the depthgrow model (the card says so)
            hf[bias] = tensor.new_zeros(tensor.shape[0])
    return with_tied_head(hf, "transformer.wte.weight")


def _gpt2_from_hf(config: GPT2Config, hf: StateDict) -> StateDict:
    # the head is the token embedding (from_hf_config refuses an untied one); depthgrow keeps it once
    state = {
        name: tensor.t().contiguous() if _GPT2_CONV1D.fullmatch(name) else tensor
        for name, tensor in without_head(hf).items()
    }
    positions, context = state[_GPT2_POSITIONS], config.block_size
    past = positions[context:]
    # rows past the context are an export's copies of its last row, which the import drops; other rows there
    # would be positions of their own, which depthgrow's GPT-2 of this context has no place for
    if not torch.equal(past, positions[context - 1].expand_as(past)):
        raise DepthgrowError(
            f"this GPT-2's position embeddings past its context (n_ctx {context}) differ from the last one within "
            f"it: depthgrow's GPT-2 has one per position of its context (set n_ctx to n_positions to import them)"
        )
    # a copy: a view would keep the whole table alive
    state[_GPT2_POSITIONS] = positions[:context].clone()
    return state


def _gpt2_past_context(config: GPT2Config) -> str:
    context, rows = config.block_size, _GPT2_EXPORTED_CONTEXTS * config.block_size
    return (
        f"Hugging Face's GPT-2 gives every position a learned embedding of its own, and the depthgrow model "
        f"learned {context}. So that a generation past the context does not index past that table, this export's "
        f"table has {rows} rows (`n_positions: {rows}`; `n_ctx: {context}` is the context): rows {context} to "
        f"{rows - 1} are copies of row {context - 1}, so every position past the context is read as the last "
        f"position within it. The first {context} tokens give exactly the depthgrow model's outputs; past them the "
        f"model reads sequences longer than any it was trained on, with positions it never told apart, so expect "
        f"the text to degrade. Beyond {rows} tokens (prompt and continuation together) it cannot run at all (an "
        f"IndexError). An import into depthgrow (`depthgrow.export.import_pretrained`) drops the copies."
    )


def _gpt2_card_notes(config: GPT2Config) -> list[str]:
    if config.bias:
        return []
    return [
        "The depthgrow model was trained without biases (`model.bias = false`). Hugging Face's GPT-2 always "
        "has them, so every bias in this export is zero and the model computes exactly what the depthgrow "
        "model did."
    ]


FAMILY = Family(
    config=GPT2Config,
    model=GPT2,
    presets={
        # a few thousand parameters per block: for tests and smoke runs
        "gpt2-test": GPT2Config(n_layer=2, n_embd=32, n_head=2, block_size=32, vocab_size=256),
        # the byte-level demo (the embedded default before the faithful recipe): four blocks of width 64, context 64
        "gpt2-micro": GPT2Config(n_layer=4, n_embd=64, n_head=2, block_size=64, vocab_size=256),
        # the embedded-default demo since the faithful recipe: four blocks of width 48 over a 1024-token BPE
        # vocabulary; the token and position embeddings are 31.6 % of its 165K parameters (GPT-2 124M: 31.7 %)
        "gpt2-micro-bpe": GPT2Config(n_layer=4, n_embd=48, n_head=2, block_size=64, vocab_size=1024),
        "gpt2-tiny": GPT2Config(n_layer=4, n_embd=128, n_head=4, block_size=128, vocab_size=256),
        "gpt2-mini": GPT2Config(n_layer=8, n_embd=256, n_head=8, block_size=256, vocab_size=256),
        # the paper's models
        "gpt2-124m": GPT2Config(n_layer=12, n_embd=768, n_head=12),
        "gpt2-350m": GPT2Config(n_layer=24, n_embd=1024, n_head=16),
        "gpt2-7b": GPT2Config(n_layer=60, n_embd=3072, n_head=24),
    },
    hf=Adapter(
        model_type="gpt2",
        to_hf_config=_gpt2_to_hf_config,
        from_hf_config=_gpt2_from_hf_config,
        to_hf=_gpt2_to_hf,
        from_hf=_gpt2_from_hf,
        past_context=_gpt2_past_context,
        card_notes=_gpt2_card_notes,
    ),
)
