"""LLaMA-3 style decoder (pre-norm RMSNorm, rotary positions, SwiGLU, grouped-query attention) at any depth >= 0.

A zero-layer LLaMA is the token embedding, the final RMSNorm and the LM head: with rotary positions there is
no position embedding, so it is a bigram model. Parameter names follow Hugging Face's ``LlamaForCausalLM``
(``model.embed_tokens``, ``model.layers.{i}.self_attn.q_proj``, ``model.layers.{i}.mlp.gate_proj`` ...,
``lm_head``) and so does the math (RMSNorm in float32, RoPE in the rotate-half convention): exporting is a
rename-free copy of the state dict into a ``LlamaForCausalLM`` whose ``LlamaConfig`` has
``tie_word_embeddings=tie_embeddings``; a tied model has no ``lm_head.weight`` entry, HF ties it itself.

The attention, RMSNorm, rotary tables, SwiGLU and the decoder itself are shared with the families built on
it, which swap a block's attention (:mod:`~depthgrow.models.qwen3`'s QK-norm, :mod:`~depthgrow.models.deepseek`'s
latent attention) or its feed-forward (the mixtures of experts :mod:`~depthgrow.models.moe` and
:mod:`~depthgrow.models.mixtral`), and with their Hugging Face mappings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from depthgrow.docfield import doc_field
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
    transformers_5,
    with_tied_head,
    without_head,
)
from depthgrow.seeding import derived_generator

if TYPE_CHECKING:
    from transformers import PretrainedConfig


@dataclass(kw_only=True, frozen=True)
class DecoderConfig(ModelConfig):
    """The fields of a LLaMA-style decoder that do not depend on its feed-forward. The defaults are the
    llama3-1b preset with an untied head."""

    n_layer: int = 32
    n_embd: int = doc_field(1536, "the width: the residual stream's dimension")
    n_head: int = doc_field(12, "query heads (n_embd must be divisible by it)")
    n_kv_head: int = doc_field(
        4, "grouped-query attention: key/value heads, each serving n_head / n_kv_head query heads"
    )
    block_size: int = doc_field(2048, "context length; also the training sequence length")
    # LLaMA-3's tokenizer and rope_theta (LLaMA-1/2 used 10000)
    vocab_size: int = doc_field(128256, "tokens in the vocabulary (data.tokenizer=auto chooses the tokenizer by it)")
    rope_theta: float = doc_field(500000.0, "the base of the rotary embeddings' frequencies")
    norm_eps: float = doc_field(1e-5, "RMSNorm's epsilon")
    tie_embeddings: bool = doc_field(False, "the LM head is the token embedding (one parameter, no lm_head entry)")
    init_std: float = doc_field(0.02, "the std of weight_init=standard (GPT-2's); the spectral init does not use it")

    def units_per_example(self) -> int:
        return self.block_size

    @property
    def head_dim(self) -> int:
        """The size of one attention head (a family may set it apart from the width, as Qwen3 does)."""
        return self.n_embd // self.n_head

    @property
    def rope_dim(self) -> int:
        """The dimensions of a head that the rotary embedding turns (all of them, but for latent attention)."""
        return self.head_dim

    def problems(self) -> list[str]:
        found = super().problems()
        for name in ("n_embd", "n_head", "n_kv_head", "block_size", "vocab_size"):
            if getattr(self, name) < 1:
                found.append(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_head >= 1:
            found += self.head_problems()
        if self.n_kv_head >= 1 and self.n_head % self.n_kv_head:
            found.append(f"model.n_head ({self.n_head}) must be divisible by model.n_kv_head ({self.n_kv_head})")
        for name in ("rope_theta", "norm_eps", "init_std"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                found.append(f"model.{name} must be a finite number > 0, got {value}")
        return found

    def head_problems(self) -> list[str]:
        """What is wrong with the head size (n_head >= 1): here, the width split into n_head heads of even
        size; a family whose head size is its own says so instead."""
        if self.n_embd % self.n_head:
            return [f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})"]
        if self.head_dim % 2:  # RoPE rotates pairs of coordinates
            return [f"the head dimension n_embd / n_head = {self.head_dim} must be even for rotary embeddings"]
        return []

    def attention_params(self) -> int:
        """The attention's matrices: q_proj and o_proj d x (n_head · head_dim) each, k_proj and v_proj
        d x (n_kv_head · head_dim) each (d x d and smaller when head_dim = d / n_head)."""
        return 2 * self.n_embd * (self.n_head + self.n_kv_head) * self.head_dim

    def attention_score_flops(self) -> int:
        """Training FLOPs per token of one block's attention scores Q·Kᵀ and weighted sum of V: 2·T FLOPs per
        query dimension each forward over the full T x T matrix (as ``torch.utils.flop_counter`` counts
        them), three times that in training: 12·T·n_head·head_dim (every query head attends, so sharing
        key/value heads does not change it)."""
        return 12 * self.block_size * self.n_head * self.head_dim

    def outer_params(self, *, embeddings: bool) -> int:
        """What is outside the blocks: the token embedding (when ``embeddings``), an untied LM head and the
        final norm's gain."""
        table = self.vocab_size * self.n_embd
        return (table if embeddings else 0) + (0 if self.tie_embeddings else table) + self.n_embd


@dataclass(kw_only=True, frozen=True)
class LlamaConfig(DecoderConfig):
    family: ClassVar[str] = "llama"
    ffn_hidden: int | None = doc_field(
        None, "SwiGLU hidden size; none: LLaMA's rule, 8/3 · n_embd rounded up to a multiple of 256"
    )

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        return 256 * math.ceil(8 * self.n_embd / 3 / 256)

    def problems(self) -> list[str]:
        found = super().problems()
        if self.ffn_hidden is not None and self.ffn_hidden < 1:
            found.append(f"model.ffn_hidden must be >= 1 (or none), got {self.ffn_hidden}")
        return found

    def block_weights(self) -> int:
        """The matrices of one block: attention and the SwiGLU's gate, up and down projections."""
        return self.attention_params() + 3 * self.n_embd * self.ffn_size

    def num_params(self, *, embeddings: bool = True) -> int:
        block = self.block_weights() + 2 * self.n_embd  # and two RMSNorm gains
        return self.n_layer * block + self.outer_params(embeddings=embeddings)

    def flops_per_token(self, *, count_embeddings: bool = False, count_attention: bool = True) -> float:
        """Training FLOPs (forward + backward) per token.

        A matrix multiply of a token's d_in-vector by a d_in x d_out weight costs 2·d_in·d_out FLOPs
        forward and twice that backward (input gradient and weight gradient), so a weight matrix with n
        entries costs 6·n per token in training. The weights that multiply every token are, per block,
        q_proj and o_proj (d² each), k_proj and v_proj (d·n_kv_head·head_dim each: grouped-query attention
        shrinks them) and the SwiGLU's gate, up and down projections (d·f each, f = ``ffn_size``), plus the
        LM head (V·d, tied or not; the embedding lookup is free): 6·N with
        N = L·(2d² + 2·d·n_kv_head·head_dim + 3·d·f) + V·d.

        Attention adds the scores Q·Kᵀ and the weighted sum of V, 2·T·d FLOPs per token each forward over
        the full T x T matrix (as ``torch.utils.flop_counter`` counts them), so 12·L·T·d in training, with
        d = n_head·head_dim (``attention_score_flops``): every query head attends, so sharing key/value heads
        does not change it.

        ``count_embeddings=True`` follows the paper instead: N counts every parameter (the embedding, an
        untied head as a second V x d matrix, the norms). Combine it with ``count_attention=False`` for the
        paper's 6·N exactly.
        """
        L = self.n_layer
        n = self.num_params() if count_embeddings else L * self.block_weights() + self.vocab_size * self.n_embd
        attention = L * self.attention_score_flops() if count_attention else 0
        return 6.0 * n + attention


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in float32 and cast back before the gain, as Hugging Face's LlamaRMSNorm: low-precision squares
        # would lose the mean
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rotary_tables(length: int, head_dim: int, theta: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, (length, head_dim), in float32 and in Hugging Face's layout: the
    frequencies repeated for the two halves of the head, which ``rotate_half`` pairs up."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=device) / head_dim))
    angles = torch.arange(length, dtype=torch.float, device=device)[:, None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


class Attention(nn.Module):
    """Grouped-query attention with rotary positions; a family changes how the heads are made by overriding
    :meth:`heads` (Qwen3 normalises queries and keys there)."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        self.group = config.n_head // config.n_kv_head
        d, q, kv = config.n_embd, config.n_head * config.head_dim, config.n_kv_head * config.head_dim
        self.q_proj = nn.Linear(d, q, bias=False)
        self.k_proj = nn.Linear(d, kv, bias=False)
        self.v_proj = nn.Linear(d, kv, bias=False)
        self.o_proj = nn.Linear(q, d, bias=False)

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values (B, heads, T, head_dim) of x (B, T, d), before the rotary embedding."""
        B, T, _ = x.shape
        return tuple(
            proj(x).view(B, T, -1, self.head_dim).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj)
        )

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.heads(x)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.group > 1:
            # each key/value head serves its group of query heads; repeated here rather than with SDPA's
            # enable_gqa, which no fused CUDA kernel takes in float32 (it falls back to the T x T math path)
            k, v = k.repeat_interleave(self.group, dim=1), v.repeat_interleave(self.group, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    """LLaMA's feed-forward, also each expert of the MoE family: down(silu(gate(x)) · up(x))."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: DecoderConfig, attention: nn.Module, mlp: nn.Module) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.n_embd, config.norm_eps)
        self.self_attn = attention
        self.post_attention_layernorm = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = mlp

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(GrowableModel):
    STACK = "model.layers"

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(
            dict(
                embed_tokens=nn.Embedding(config.vocab_size, config.n_embd),
                layers=nn.ModuleList(self.new_block() for _ in range(config.n_layer)),
                norm=RMSNorm(config.n_embd, config.norm_eps),
            )
        )
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.n_embd, config.vocab_size, bias=False)

    def new_block(self) -> Block:
        """A block on the current device, uninitialised, of the family's attention and feed-forward."""
        return Block(self.config, self.new_attention(), self.new_feed_forward())

    def new_attention(self) -> nn.Module:
        """A block's attention: called with x (B, T, d) and the rotary tables, it returns (B, T, d). The
        families built on this decoder swap it here (Qwen3's QK-norm, DeepSeek's latent attention)."""
        return Attention(self.config)

    def new_feed_forward(self) -> nn.Module:
        """A block's feed-forward; the mixture-of-experts families swap it here."""
        return SwiGLU(self.config.n_embd, self.config.ffn_size)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> logits (B, T, vocab_size)."""
        T = idx.shape[1]
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds the context length {self.config.block_size}")
        x = self.model.embed_tokens(idx)
        # recomputed per forward (a few T x head_dim tables): nothing to re-create after to_empty or growth
        cos, sin = rotary_tables(T, self.config.rope_dim, self.config.rope_theta, idx.device)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        for block in self.model.layers:
            x = block(x, cos, sin)
        x = self.model.norm(x)
        if self.lm_head is None:
            return F.linear(x, self.model.embed_tokens.weight)
        return self.lm_head(x)

    # --- what growth needs (see depthgrow.models.base.GrowableModel) ---

    def block_stacks(self) -> dict[str, nn.ModuleList]:
        return {self.STACK: self.model.layers}

    def make_block(self, stack: str) -> nn.Module:
        return materialize(self.new_block, like=self.model.embed_tokens.weight)

    def residual_projections(self, block: nn.Module) -> list[nn.Module]:
        return [block.self_attn.o_proj, block.mlp.down_proj]

    def init_block(self, stack: str, index: int, block: nn.Module, seed: int) -> None:
        init_block_weights(
            block,
            config=self.config,
            residual=self.residual_projections(block),
            std=self.config.init_std,
            generator=block_generator(seed, stack, index),
            norms=(RMSNorm,),
        )

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Initialise every parameter, GPT-2 style (``weight_init="standard"``, as depthgrow.models.gpt2)
        or muP-style (``"spectral"``, s(out, in) = :func:`~depthgrow.models.base.spectral_std`):

        ====================================  ========================  ==========================
        parameter                             standard                  spectral
        ====================================  ========================  ==========================
        ``embed_tokens``, ``lm_head`` (the    N(0, init_std²)           N(0, s(V, d)²)
        head drawn after the embedding)
        Linear weights in a block             N(0, init_std²)           N(0, s(out, in)²)
        ``residual_projections(block)``       as above / sqrt(2·n_layer): the 2·L residual
        (``o_proj``, ``mlp.down_proj``)       branches then add up to O(1)
        RMSNorm gains                         1
        ====================================  ========================  ==========================

        Each block draws from its own generator, derived from (seed, stack, block index), and draws on the CPU:
        block i of a model grown to depth L is therefore initialised bit for bit as block i of a fresh
        depth-L model with the same seed, on any device. The rotary tables are not state: ``forward``
        computes them.
        """
        generator = derived_generator(seed, EMBEDDING_STREAM)
        embedding_std = self.config.matrix_std(self.config.vocab_size, self.config.n_embd, self.config.init_std)
        normal_(self.model.embed_tokens.weight, embedding_std, generator)
        if self.lm_head is not None:
            normal_(self.lm_head.weight, embedding_std, generator)
        self.model.norm.weight.fill_(1.0)
        for index, block in enumerate(self.model.layers):
            self.init_block(self.STACK, index, block, seed)


# --- Hugging Face: what every LLaMA-style decoder's mapping shares (LlamaForCausalLM, Glm4MoeForCausalLM, ...) ---

# depthgrow's decoders take their parameter names from these two classes: nothing is renamed; only a tied
# head (and the MoE's experts, which HF fuses) differ between the two state dicts
DECODER_EMBEDDING = "model.embed_tokens.weight"


def decoder_hf_fields(config: DecoderConfig, end_of_text: int | None, **rope: float) -> dict[str, Any]:
    """The config fields every HF decoder takes from depthgrow's decoder (attention, norms, positions, head,
    special tokens); ``rope`` adds to the rotary parameters."""
    return dict(
        vocab_size=config.vocab_size,
        hidden_size=config.n_embd,
        num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head,
        num_key_value_heads=config.n_kv_head,
        max_position_embeddings=config.block_size,
        rms_norm_eps=config.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta, **rope},
        tie_word_embeddings=config.tie_embeddings,
        hidden_act="silu",
        attention_bias=False,
        attention_dropout=0.0,
        initializer_range=config.init_std,
        **special_tokens(end_of_text),
    )


def decoder_problems(hf: PretrainedConfig) -> list[str]:
    """What depthgrow's decoders cannot express in the fields every HF decoder shares (the head size is each
    family's: see :func:`head_size_problems`)."""
    problems = []
    if hf.hidden_act != "silu":
        problems.append(f"hidden_act is {hf.hidden_act!r}, not 'silu' (SwiGLU)")
    rope_type = hf.rope_parameters.get("rope_type", "default")
    if rope_type != "default":
        problems.append(f"its rotary embedding is scaled ({rope_type!r}), not plain RoPE")
    if getattr(hf, "attention_bias", False):  # a class whose attention never has biases has no such field
        problems.append("its attention projections have biases")
    if hf.attention_dropout:
        problems.append(f"it has attention dropout ({hf.attention_dropout})")
    return problems


def head_size_problems(hf: PretrainedConfig) -> list[str]:
    """A head size other than hidden_size / num_attention_heads, for the families whose head size is that."""
    head_dim = getattr(hf, "head_dim", None)
    if head_dim not in (None, hf.hidden_size // hf.num_attention_heads):
        return [f"head_dim is {head_dim}, not hidden_size / num_attention_heads"]
    return []


def decoder_fields(hf: PretrainedConfig) -> dict[str, Any]:
    """The :class:`DecoderConfig` fields of an HF decoder's config."""
    return dict(
        n_layer=hf.num_hidden_layers,
        n_embd=hf.hidden_size,
        n_head=hf.num_attention_heads,
        n_kv_head=hf.num_key_value_heads,
        block_size=hf.max_position_embeddings,
        vocab_size=hf.vocab_size,
        rope_theta=float(hf.rope_parameters["rope_theta"]),
        norm_eps=hf.rms_norm_eps,
        tie_embeddings=hf.tie_word_embeddings,
        init_std=hf.initializer_range,
    )


def decoder_to_hf(config: DecoderConfig, state: StateDict) -> StateDict:
    # a tied depthgrow model has no lm_head entry; HF's strict load wants one
    return with_tied_head(state, DECODER_EMBEDDING) if config.tie_embeddings else dict(state)


def decoder_from_hf(config: DecoderConfig, hf: StateDict) -> StateDict:
    return without_head(hf) if config.tie_embeddings else dict(hf)


def rotary_past_context(config: DecoderConfig) -> str:
    return (
        "Rotary positions need no table: asked to, the model generates past its context, reading sequences longer "
        "than any it was trained on, so expect the text to degrade there."
    )


# --- Hugging Face: LlamaForCausalLM ---


def _llama_to_hf_config(config: LlamaConfig, end_of_text: int | None) -> PretrainedConfig:
    return transformers_5().LlamaConfig(
        **decoder_hf_fields(config, end_of_text),
        head_dim=config.head_dim,
        intermediate_size=config.ffn_size,
        mlp_bias=False,
    )


def _llama_from_hf_config(hf: PretrainedConfig) -> LlamaConfig:
    transformers_5()
    problems = decoder_problems(hf) + head_size_problems(hf)
    if hf.mlp_bias:
        problems.append("its feed-forward projections have biases")
    refuse("LLaMA", problems)
    # ffn_hidden set even where LLaMA's rule would give the same size: the config then says it as HF does
    return LlamaConfig(**decoder_fields(hf), ffn_hidden=hf.intermediate_size)


FAMILY = Family(
    config=LlamaConfig,
    model=Llama,
    presets={
        # LLaMA-3 style (RMSNorm, RoPE, SwiGLU, grouped-query attention); the CPU ones match gpt2-test/-tiny
        "llama-test": LlamaConfig(
            n_layer=2, n_embd=32, n_head=4, n_kv_head=2, ffn_hidden=96, block_size=32, vocab_size=256
        ),
        "llama-micro": LlamaConfig(  # the compare recipe's size (gpt2-micro)
            n_layer=4, n_embd=64, n_head=2, n_kv_head=1, ffn_hidden=176, block_size=64, vocab_size=256
        ),
        "llama-micro-bpe": LlamaConfig(  # gpt2-micro-bpe's size: the tied embedding 33 % of 151K parameters
            n_layer=4,
            n_embd=48,
            n_head=2,
            n_kv_head=1,
            ffn_hidden=128,
            block_size=64,
            vocab_size=1024,
            tie_embeddings=True,
        ),  # fmt: skip
        "llama-tiny": LlamaConfig(  # 0.80M parameters (gpt2-tiny: 0.83M)
            n_layer=4, n_embd=128, n_head=4, n_kv_head=2, ffn_hidden=352, block_size=128, vocab_size=256
        ),
        # the paper's dense scaling-law sizes, embeddings tied as in LLaMA-3.2 1B/3B (an untied 128256 x d head
        # would be most of the small ones); total parameters, and of the zero-layer model:
        "llama3-250m": LlamaConfig(  # 249.5M, zero-layer 98.5M
            n_layer=24, n_embd=768, n_head=12, n_kv_head=4, ffn_hidden=2048, tie_embeddings=True
        ),
        "llama3-500m": LlamaConfig(  # 492.1M, zero-layer 131.3M
            n_layer=32, n_embd=1024, n_head=16, n_kv_head=4, ffn_hidden=2816, tie_embeddings=True
        ),
        "llama3-1b": LlamaConfig(  # 1002.4M, zero-layer 197.0M
            n_layer=32, n_embd=1536, n_head=12, n_kv_head=4, ffn_hidden=4096, tie_embeddings=True
        ),
        "llama3-2b": LlamaConfig(  # 2024.4M, zero-layer 262.7M (LLaMA-3.2 1B's blocks, 28 of them)
            n_layer=28, n_embd=2048, n_head=16, n_kv_head=8, ffn_hidden=8192, tie_embeddings=True
        ),
    },
    hf=Adapter(
        model_type="llama",
        to_hf_config=_llama_to_hf_config,
        from_hf_config=_llama_from_hf_config,
        to_hf=decoder_to_hf,
        from_hf=decoder_from_hf,
        past_context=rotary_past_context,
    ),
)
