"""Qwen3-style dense decoder: the LLaMA-3 block (:mod:`depthgrow.models.llama`) with QK-norm, at any depth >= 0.

QK-norm is an RMSNorm over the head dimension, with its own gain, applied to every query head and every key
head after the q/k projections and before the rotary embedding (one ``q_norm`` and one ``k_norm`` per block,
shared by all heads), as Hugging Face's ``Qwen3Attention`` does: attention logits then stay bounded whatever
the scale of q_proj and k_proj. Qwen3 also sets the head size apart from the width (``head_size``: 128 in
every Qwen3, so Qwen3-0.6B's 16 heads of 128 are twice its width of 1024). Everything else (pre-norm RMSNorm
in float32, rotate-half RoPE, SwiGLU, grouped-query attention, the growth hooks and the init) is LLaMA's:
the norms' gains start at 1 like every RMSNorm gain, so a zero-layer Qwen3 is LLaMA's bigram model.

Parameter names are Hugging Face's ``Qwen3ForCausalLM``'s (``model.layers.{i}.self_attn.q_norm.weight``,
``...k_norm.weight`` beside LLaMA's), so exporting is a rename-free copy of the state dict into a
``Qwen3ForCausalLM`` with ``head_dim=head_size``, no sliding window (``use_sliding_window=False``: every layer
``full_attention``) and no attention bias; a tied head is tied by HF, as for LLaMA. An import refuses, in one
line, what this model cannot compute: sliding-window layers, attention biases or dropout, a scaled rotary
embedding (YaRN, linear, ...), an activation other than SiLU. It takes ``head_dim`` as an explicit
``head_size`` (HF's config always states it), so a model whose head size followed its width imports as the
same model with that size written out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from depthgrow.docfield import doc_field
from depthgrow.models.base import Family
from depthgrow.models.hf import Adapter, refuse, transformers_5
from depthgrow.models.llama import (
    Attention,
    DecoderConfig,
    Llama,
    LlamaConfig,
    RMSNorm,
    decoder_fields,
    decoder_from_hf,
    decoder_hf_fields,
    decoder_problems,
    decoder_to_hf,
    rotary_past_context,
)

if TYPE_CHECKING:
    from transformers import PretrainedConfig


@dataclass(kw_only=True, frozen=True)
class Qwen3Config(LlamaConfig):
    """The defaults are Qwen3-0.6B's (the qwen3-0.6b preset)."""

    family: ClassVar[str] = "qwen3"
    n_layer: int = 28
    n_embd: int = 1024
    n_head: int = 16
    n_kv_head: int = 8
    vocab_size: int = 151936  # Qwen's tokenizer
    rope_theta: float = 1000000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = True  # as Qwen3 up to 4B
    ffn_hidden: int | None = 3072
    head_size: int | None = doc_field(
        128, "the size of one attention head (Qwen3's head_dim); none: n_embd / n_head, as LLaMA's"
    )

    @property
    def head_dim(self) -> int:
        return self.head_size if self.head_size is not None else super().head_dim

    def head_problems(self) -> list[str]:
        if self.head_size is None:
            return super().head_problems()
        if self.head_size < 1:
            return [f"model.head_size must be >= 1 (or none), got {self.head_size}"]
        if self.head_size % 2:  # RoPE rotates pairs of coordinates
            return [f"model.head_size ({self.head_size}) must be even for rotary embeddings"]
        return []

    def num_params(self, *, embeddings: bool = True) -> int:
        # LLaMA's, and each block's q_norm and k_norm gains; they multiply nothing, so the FLOPs are LLaMA's
        return super().num_params(embeddings=embeddings) + self.n_layer * 2 * self.head_dim


class Qwen3Attention(Attention):
    """LLaMA's attention with every query and key head RMS-normalised (its own gain over the head dimension)
    before the rotary embedding."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__(config)
        self.q_norm = RMSNorm(config.head_dim, config.norm_eps)
        self.k_norm = RMSNorm(config.head_dim, config.norm_eps)

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = super().heads(x)
        return self.q_norm(q), self.k_norm(k), v


class Qwen3(Llama):
    def new_attention(self) -> nn.Module:
        return Qwen3Attention(self.config)


# --- Hugging Face: Qwen3ForCausalLM ---


def _qwen3_to_hf_config(config: Qwen3Config, end_of_text: int | None) -> PretrainedConfig:
    return transformers_5().Qwen3Config(
        **decoder_hf_fields(config, end_of_text),
        head_dim=config.head_dim,
        intermediate_size=config.ffn_size,
        use_sliding_window=False,
    )


def _qwen3_from_hf_config(hf: PretrainedConfig) -> Qwen3Config:
    transformers_5()
    problems = decoder_problems(hf)
    sliding = sum(kind == "sliding_attention" for kind in hf.layer_types)
    if sliding:
        problems.append(f"{sliding} of its layers attend within a sliding window ({hf.sliding_window} tokens)")
    refuse("Qwen3", problems)
    return Qwen3Config(**decoder_fields(hf), head_size=hf.head_dim, ffn_hidden=hf.intermediate_size)


FAMILY = Family(
    config=Qwen3Config,
    model=Qwen3,
    presets={
        # LLaMA-3 blocks with QK-norm; the CPU ones have the LLaMA presets' sizes
        "qwen3-test": Qwen3Config(  # heads of 16 on a width of 32: q_proj is wider than the residual stream
            n_layer=2,
            n_embd=32,
            n_head=4,
            n_kv_head=2,
            head_size=16,
            ffn_hidden=96,
            block_size=32,
            vocab_size=256,
        ),
        # the head size follows the width, as LLaMA's, so that a ladder of widths (depthgrow scaling) scales it
        "qwen3-micro": Qwen3Config(  # llama-micro's size (gpt2-micro's), untied like it
            n_layer=4,
            n_embd=64,
            n_head=2,
            n_kv_head=1,
            head_size=None,
            ffn_hidden=176,
            block_size=64,
            vocab_size=256,
            tie_embeddings=False,
        ),
        "qwen3-micro-bpe": Qwen3Config(  # llama-micro-bpe's size (gpt2-micro-bpe's), tied
            n_layer=4,
            n_embd=48,
            n_head=2,
            n_kv_head=1,
            head_size=None,
            ffn_hidden=128,
            block_size=64,
            vocab_size=1024,
        ),
        # Qwen3's own dense shapes (tied, heads of 128, rope_theta 1e6) at a 2048-token context; total
        # parameters, and of the zero-layer model:
        "qwen3-0.6b": Qwen3Config(  # 596.0M, zero-layer 155.6M
            n_layer=28, n_embd=1024, n_head=16, n_kv_head=8, head_size=128, ffn_hidden=3072
        ),
        "qwen3-1.7b": Qwen3Config(  # 1720.6M, zero-layer 311.2M
            n_layer=28, n_embd=2048, n_head=16, n_kv_head=8, head_size=128, ffn_hidden=6144
        ),
    },
    hf=Adapter(
        model_type="qwen3",
        to_hf_config=_qwen3_to_hf_config,
        from_hf_config=_qwen3_from_hf_config,
        to_hf=decoder_to_hf,
        from_hf=decoder_from_hf,
        past_context=rotary_past_context,
    ),
)
