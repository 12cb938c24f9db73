"""DeepSeek-V3 style decoder: multi-head latent attention (MLA), with DeepSeek-V3's mixture of experts or a
dense SwiGLU in every block.

Each block is the LLaMA block (:mod:`depthgrow.models.llama`: pre-norm RMSNorm, rotary positions) whose
attention is DeepSeek-V2/V3's latent attention and whose feed-forward is the routed experts of
:mod:`depthgrow.models.moe` (``moe=True``) or a SwiGLU of ``ffn_hidden`` (``moe=False``: MLA alone).
Latent attention (arXiv 2405.04434) compresses the keys and values of a token into one latent of
``kv_lora_rank`` dimensions: ``kv_a_proj_with_mqa`` maps x to that latent and to one rotary key of
``qk_rope_head_dim`` dimensions shared by every head; the latent is RMS-normalised (``kv_a_layernorm``) and
``kv_b_proj`` expands it into each head's non-rotary key (``qk_nope_head_dim``) and value (``v_head_dim``).
The queries come from ``q_proj`` (``q_lora_rank`` none) or through a latent of their own (``q_a_proj``,
``q_a_layernorm``, ``q_b_proj``); each head's query and key are its non-rotary part followed by its rotary
part, and the softmax scale is 1/sqrt(qk_nope_head_dim + qk_rope_head_dim). ``o_proj`` maps the heads'
values back to the residual stream. A zero-layer model is the embedding, the final norm and the head.

Parameter names and math are Hugging Face's ``DeepseekV3ForCausalLM`` (``self_attn.q_a_proj``,
``self_attn.kv_a_proj_with_mqa``, ``mlp.gate.e_score_correction_bias``, ``mlp.experts.{j}.gate_proj`` ...),
which an export is, with ``n_group=topk_group=1`` (top-k over all experts), ``norm_topk_prob=True``,
``routed_scaling_factor=1`` and ``first_k_dense_replace`` 0 (every block routed) or the number of blocks (every
block dense); HF fuses the experts as for :mod:`~depthgrow.models.moe`'s Glm4Moe export. Rotary positions:
depthgrow rotates the rotary dimensions in LLaMA's halves, HF in DeepSeek's own interleaved pairs
(``rope_interleave=True``, the layout of DeepSeek's checkpoints and of the inference engines that read them);
a pairing is only an order of the rotary rows of the query projection and of ``kv_a_proj_with_mqa``, so an
export reorders those rows and an import puts them back, and both compute the same.

What does not map: DeepSeek-V3's multi-token-prediction layers (depthgrow has none, an export declares
``num_mtp_layers=0``, and an import ignores those of a checkpoint, as ``DeepseekV3ForCausalLM`` itself does:
they are no part of its logits); the balancing step ``balance_rate`` and the usage counts, as for the MoE
family. Refused on import: scaled rotary embeddings (YaRN, whose softmax scale also changes), attention biases,
grouped routing that restricts the choice, a routed-output scale, dense first blocks other than none or all,
the halves layout (``rope_interleave=False``: the import cannot tell the mapping which layout it reads).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from depthgrow.docfield import doc_field
from depthgrow.models.base import Family
from depthgrow.models.hf import Adapter, StateDict, refuse, transformers_5
from depthgrow.models.llama import (
    Llama,
    RMSNorm,
    SwiGLU,
    apply_rotary,
    decoder_fields,
    decoder_from_hf,
    decoder_hf_fields,
    decoder_problems,
    decoder_to_hf,
    rotary_past_context,
)
from depthgrow.models.moe import MoE, MoEConfig, moe_from_hf, moe_to_hf, routing_problems

if TYPE_CHECKING:
    from transformers import PretrainedConfig

# DeepSeek's q_a_layernorm and kv_a_layernorm take RMSNorm's default epsilon, not rms_norm_eps (as in HF)
LATENT_NORM_EPS = 1e-6


@dataclass(kw_only=True, frozen=True)
class DeepseekConfig(MoEConfig):
    family: ClassVar[str] = "deepseek"
    # the defaults are the deepseek-200m preset (the MoE's routing fields: MoEConfig's)
    n_kv_head: int = 12  # every head its own key and value: n_head
    q_lora_rank: int | None = doc_field(None, "latent attention: the queries' latent size; none: a plain q_proj")
    kv_lora_rank: int = doc_field(256, "latent attention: the size of the latent that keys and values share")
    qk_nope_head_dim: int = doc_field(64, "latent attention: the dimensions of a query/key head without rotary")
    qk_rope_head_dim: int = doc_field(32, "latent attention: the rotary dimensions of a query/key head (even)")
    v_head_dim: int = doc_field(64, "latent attention: the size of a value head")
    moe: bool = doc_field(True, "the feed-forward: routed experts (true) or a dense SwiGLU of ffn_hidden (false)")
    ffn_hidden: int = doc_field(2048, "SwiGLU hidden size of the dense feed-forward (model.moe=false)")

    @property
    def rope_dim(self) -> int:
        return self.qk_rope_head_dim

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def problems(self) -> list[str]:
        found = super().problems()
        if self.n_kv_head != self.n_head:
            found.append(
                f"model.n_kv_head ({self.n_kv_head}) must equal model.n_head ({self.n_head}): latent attention "
                "gives every head its own key and value"
            )
        if self.q_lora_rank is not None and self.q_lora_rank < 1:
            found.append(f"model.q_lora_rank must be >= 1 (or none), got {self.q_lora_rank}")
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "ffn_hidden"):
            if getattr(self, name) < 1:
                found.append(f"model.{name} must be >= 1, got {getattr(self, name)}")
        return found

    def head_problems(self) -> list[str]:
        # the head sizes are latent attention's own fields, not n_embd / n_head: only the rotary part must pair up
        if self.qk_rope_head_dim % 2:  # RoPE rotates pairs of coordinates
            return [f"model.qk_rope_head_dim must be even, got {self.qk_rope_head_dim}"]
        return []

    def attention_params(self) -> int:
        """The attention's matrices: the queries' (d x H·qk, or d x r_q and r_q x H·qk through their latent),
        kv_a_proj_with_mqa (d x (kv_lora_rank + qk_rope_head_dim)), kv_b_proj (kv_lora_rank x
        H·(qk_nope_head_dim + v_head_dim)) and o_proj (H·v_head_dim x d), with H = n_head and qk = qk_head_dim."""
        d, H = self.n_embd, self.n_head
        q_out = H * self.qk_head_dim
        queries = d * q_out if self.q_lora_rank is None else self.q_lora_rank * (d + q_out)
        kv = d * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank * H * (
            self.qk_nope_head_dim + self.v_head_dim
        )
        return queries + kv + H * self.v_head_dim * d

    def latent_norm_params(self) -> int:
        """The gains of the latent norms (q_a_layernorm, kv_a_layernorm): parameters that multiply no token as
        a matrix, so counted in ``num_params`` but not in the FLOPs."""
        return self.kv_lora_rank + (self.q_lora_rank or 0)

    def attention_score_flops(self) -> int:
        """Training FLOPs per token of one block's attention: the scores Q·Kᵀ over qk_head_dim and the weighted
        sum over v_head_dim, 2·T FLOPs per dimension and head each forward over the full T x T matrix, three
        times that in training: 6·T·n_head·(qk_head_dim + v_head_dim)."""
        return 6 * self.block_size * self.n_head * (self.qk_head_dim + self.v_head_dim)

    def block_weights(self, experts: int) -> int:
        """The matrices of one block that a token multiplies: the MoE's (with ``experts`` routed experts) or,
        dense, the attention and the SwiGLU's three projections."""
        if self.moe:
            return super().block_weights(experts)
        return self.attention_params() + 3 * self.n_embd * self.ffn_hidden

    def num_params(self, *, embeddings: bool = True) -> int:
        return super().num_params(embeddings=embeddings) + self.n_layer * self.latent_norm_params()

    def num_active_params(self, *, embeddings: bool = True) -> int:
        if self.moe:
            return super().num_active_params(embeddings=embeddings)
        return self.num_params(embeddings=embeddings)


class LatentAttention(nn.Module):
    """Multi-head latent attention (see the module docstring), called as :class:`~depthgrow.models.llama.
    Attention` is: x (B, T, d) and rotary tables (T, qk_rope_head_dim) -> (B, T, d)."""

    def __init__(self, config: DeepseekConfig) -> None:
        super().__init__()
        d, H = config.n_embd, config.n_head
        self.split_q = [config.qk_nope_head_dim, config.qk_rope_head_dim]
        self.split_kv_a = [config.kv_lora_rank, config.qk_rope_head_dim]
        self.split_kv_b = [config.qk_nope_head_dim, config.v_head_dim]
        self.scale = config.qk_head_dim**-0.5
        q_out = H * config.qk_head_dim
        self.low_rank_q = config.q_lora_rank is not None
        if self.low_rank_q:
            self.q_a_proj = nn.Linear(d, config.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(config.q_lora_rank, q_out, bias=False)
        else:
            self.q_proj = nn.Linear(d, q_out, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, config.kv_lora_rank + config.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(config.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(config.kv_lora_rank, H * (config.qk_nope_head_dim + config.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * config.v_head_dim, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.low_rank_q else self.q_proj(x)
        q_nope, q_rope = q.view(B, T, -1, sum(self.split_q)).transpose(1, 2).split(self.split_q, dim=-1)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split(self.split_kv_a, dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(latent)).view(B, T, -1, sum(self.split_kv_b)).transpose(1, 2)
        k_nope, v = kv.split(self.split_kv_b, dim=-1)
        k_rope = apply_rotary(k_rope[:, None], cos, sin)  # (B, 1, T, rope): one rotary key for every head
        q = torch.cat((q_nope, apply_rotary(q_rope, cos, sin)), dim=-1)
        k = torch.cat((k_nope, k_rope.expand(-1, k_nope.shape[1], -1, -1)), dim=-1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class Deepseek(MoE):
    """The LLaMA decoder with latent attention, and the MoE's routed feed-forward or a dense SwiGLU."""

    config: DeepseekConfig

    def new_attention(self) -> nn.Module:
        return LatentAttention(self.config)

    def new_feed_forward(self) -> nn.Module:
        return super().new_feed_forward() if self.config.moe else SwiGLU(self.config.n_embd, self.config.ffn_hidden)

    # MoE's hooks reach into the router and the experts: a dense block takes the LLaMA decoder's

    def residual_projections(self, block: nn.Module) -> list[nn.Module]:
        return super().residual_projections(block) if self.config.moe else Llama.residual_projections(self, block)

    def init_block(self, stack: str, index: int, block: nn.Module, seed: int) -> None:
        if self.config.moe:
            super().init_block(stack, index, block, seed)
        else:
            Llama.init_block(self, stack, index, block, seed)

    def before_optimizer_step(self) -> None:
        if self.config.moe:
            super().before_optimizer_step()

    def eval_metrics(self) -> dict[str, dict[str, float]]:
        return super().eval_metrics() if self.config.moe else {}


# --- Hugging Face: DeepseekV3ForCausalLM ---


def _deepseek_to_hf_config(config: DeepseekConfig, end_of_text: int | None) -> PretrainedConfig:
    return transformers_5().DeepseekV3Config(
        **decoder_hf_fields(config, end_of_text),
        q_lora_rank=config.q_lora_rank,
        kv_lora_rank=config.kv_lora_rank,
        qk_nope_head_dim=config.qk_nope_head_dim,
        qk_rope_head_dim=config.qk_rope_head_dim,
        v_head_dim=config.v_head_dim,
        rope_interleave=True,  # DeepSeek's layout: the export reorders the rotary rows (_reorder_rope)
        # at least 1: a zero-layer export still says that its blocks are dense, so that it imports as such
        first_k_dense_replace=0 if config.moe else max(config.n_layer, 1),
        intermediate_size=config.ffn_hidden,  # of the dense blocks; carried by a routed model too
        n_routed_experts=config.n_expert,
        num_experts_per_tok=config.top_k,
        n_shared_experts=config.n_shared_expert,
        moe_intermediate_size=config.expert_hidden,
        # one expert group that is always chosen: top-k over all experts, as depthgrow's router
        n_group=1,
        topk_group=1,
        norm_topk_prob=True,
        routed_scaling_factor=1.0,
        num_mtp_layers=0,
    )


def _deepseek_from_hf_config(hf: PretrainedConfig) -> DeepseekConfig:
    transformers_5()
    problems = decoder_problems(hf)
    if hf.num_key_value_heads != hf.num_attention_heads:
        problems.append(f"num_key_value_heads is {hf.num_key_value_heads}, not num_attention_heads")
    if not hf.rope_interleave:
        problems.append("its rotary dimensions are laid out in halves (rope_interleave=false), not in pairs")
    layers, dense = hf.num_hidden_layers, hf.first_k_dense_replace
    moe = dense == 0
    if not moe and dense < layers:
        problems.append(f"its first {dense} of {layers} blocks have a dense feed-forward, the others experts")
    if moe:  # routing fields that a dense model never reads are left as they are
        problems += routing_problems(hf)
    refuse("DeepseekV3", problems)
    return DeepseekConfig(
        **decoder_fields(hf),
        q_lora_rank=hf.q_lora_rank,
        kv_lora_rank=hf.kv_lora_rank,
        qk_nope_head_dim=hf.qk_nope_head_dim,
        qk_rope_head_dim=hf.qk_rope_head_dim,
        v_head_dim=hf.v_head_dim,
        moe=moe,
        ffn_hidden=hf.intermediate_size,
        n_expert=hf.n_routed_experts,
        top_k=hf.num_experts_per_tok,
        n_shared_expert=hf.n_shared_experts,
        expert_hidden=hf.moe_intermediate_size,
    )


def _interleaved(rope: int) -> torch.Tensor:
    """Row j of DeepSeek's interleaved rotary layout is row ``order[j]`` of depthgrow's halves: pair i is
    (i, rope/2 + i) in halves and (2i, 2i + 1) interleaved."""
    return torch.arange(rope).view(2, rope // 2).t().flatten()


def _reorder_rope(config: DeepseekConfig, state: StateDict, order: torch.Tensor) -> StateDict:
    """The rotary rows of each block's query projection (the last qk_rope_head_dim of every head) and of
    kv_a_proj_with_mqa (its last qk_rope_head_dim) put in ``order``: the other rows, and every other tensor,
    as they are."""
    query = "q_proj" if config.q_lora_rank is None else "q_b_proj"
    for i in range(config.n_layer):
        for name, kept in ((query, config.qk_nope_head_dim), ("kv_a_proj_with_mqa", config.kv_lora_rank)):
            key = f"model.layers.{i}.self_attn.{name}.weight"
            weight = state[key]
            index = torch.cat((torch.arange(kept), kept + order)).to(weight.device)
            # a new tensor (indexing copies): the source's rows stay as they are
            state[key] = weight.view(-1, len(index), weight.shape[-1])[:, index].reshape(weight.shape)
    return state


def _deepseek_to_hf(config: DeepseekConfig, state: StateDict) -> StateDict:
    hf = moe_to_hf(config, state) if config.moe else decoder_to_hf(config, state)
    return _reorder_rope(config, hf, _interleaved(config.qk_rope_head_dim))


def _deepseek_from_hf(config: DeepseekConfig, hf: StateDict) -> StateDict:
    state = moe_from_hf(config, hf) if config.moe else decoder_from_hf(config, hf)
    return _reorder_rope(config, state, _interleaved(config.qk_rope_head_dim).argsort())


def _deepseek_card_notes(config: DeepseekConfig) -> list[str]:
    notes = [
        "depthgrow rotates the rotary dimensions of each query and key head in halves (LLaMA's layout); this "
        "export stores them in DeepSeek's interleaved pairs (`rope_interleave: true`), its rotary rows of "
        "`q_proj`/`q_b_proj` and `kv_a_proj_with_mqa` reordered to match: the logits are the same."
    ]
    if config.moe:
        notes.append(
            "Hugging Face's DeepseekV3 adds the exported balancing bias (`mlp.gate.e_score_correction_bias`) to "
            "the router scores to choose the experts, as depthgrow does; only depthgrow moves it during training "
            f"(`balance_rate` {config.balance_rate}, not carried; an import takes the default)."
        )
        if not config.n_shared_expert:
            notes.append(
                "The depthgrow model has no shared expert: Hugging Face's DeepseekV3 always has one, so this "
                "export's has width 0 (`n_shared_experts: 0`), which adds nothing."
            )
    return notes


def _mla(n_head: int, q_lora_rank: int | None, kv_lora_rank: int, nope: int, rope: int, v: int) -> dict:
    """A preset's attention fields; n_kv_head is n_head, which latent attention requires."""
    return dict(
        n_head=n_head,
        n_kv_head=n_head,
        q_lora_rank=q_lora_rank,
        kv_lora_rank=kv_lora_rank,
        qk_nope_head_dim=nope,
        qk_rope_head_dim=rope,
        v_head_dim=v,
    )


# both feed-forwards' sizes in every preset, so that model.moe alone switches between them
_TEST = dict(
    n_layer=2,
    n_embd=32,
    **_mla(4, 16, 16, 8, 4, 8),
    n_expert=4,
    top_k=2,
    n_shared_expert=1,
    expert_hidden=32,
    ffn_hidden=96,
    block_size=32,
    vocab_size=256,
)

FAMILY = Family(
    config=DeepseekConfig,
    model=Deepseek,
    presets={
        # latent attention with DeepSeek-V3's experts, and ("mla") alone with a dense SwiGLU
        "deepseek-test": DeepseekConfig(**_TEST),
        "deepseek-mla-test": DeepseekConfig(**_TEST, moe=False),
        "deepseek-micro": DeepseekConfig(  # the compare recipe's size: 224K active (gpt2-micro: 221K), 519K total
            n_layer=4,
            n_embd=64,
            **_mla(2, None, 32, 16, 16, 32),
            n_expert=8,
            top_k=2,
            n_shared_expert=1,
            expert_hidden=64,
            ffn_hidden=176,
            block_size=64,
            vocab_size=256,
        ),
        "deepseek-micro-bpe": DeepseekConfig(  # 166K active (gpt2-micro-bpe: 165K), the tied embedding 30 % of it
            n_layer=4,
            n_embd=48,
            **_mla(2, None, 24, 16, 8, 24),
            n_expert=8,
            top_k=2,
            n_shared_expert=1,
            expert_hidden=48,
            ffn_hidden=128,
            block_size=64,
            vocab_size=1024,
            tie_embeddings=True,
        ),
        # paper-scale, DeepSeek's tokenizer; total, active and zero-layer parameters:
        "deepseek-200m": DeepseekConfig(),  # deepseek-v3-200m's sizes with MLA: 209.9M active, 825.7M total, 99.3M
        "deepseek-mla-250m": DeepseekConfig(  # llama3-250m's sizes, MLA alone: 262.7M, zero-layer 99.3M
            n_layer=24, n_embd=768, **_mla(12, None, 256, 64, 32, 64), moe=False, ffn_hidden=2048
        ),
        "deepseek-v2-lite": DeepseekConfig(  # DeepSeek-V2-Lite's blocks, every one routed: 2.7B active, 16.2B
            n_layer=27,  # total, zero-layer 0.4B (an untied 102400-token vocabulary)
            n_embd=2048,
            **_mla(16, None, 512, 128, 64, 128),
            n_expert=64,
            top_k=6,
            n_shared_expert=2,
            expert_hidden=1408,
            ffn_hidden=10944,
            block_size=4096,
            vocab_size=102400,
            tie_embeddings=False,
        ),
    },
    hf=Adapter(
        model_type="deepseek_v3",
        to_hf_config=_deepseek_to_hf_config,
        from_hf_config=_deepseek_from_hf_config,
        to_hf=_deepseek_to_hf,
        from_hf=_deepseek_from_hf,
        past_context=rotary_past_context,
        card_notes=_deepseek_card_notes,
    ),
)
