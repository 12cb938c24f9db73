"""Mixtral-style mixture of experts: the LLaMA block with ``n_expert`` SwiGLU experts, softmax top-k routing
and the Switch load-balancing loss.

Each block is the LLaMA block (:mod:`depthgrow.models.llama`: RMSNorm, RoPE, grouped-query attention) whose
feed-forward routes every token to ``top_k`` of ``n_expert`` SwiGLU experts, as Hugging Face's
``MixtralForCausalLM`` does: the router's logits (a bias-free Linear, in the input's dtype) go through a
softmax in float32 over all experts, the top_k probabilities are kept and renormalised to sum to 1, and each
chosen expert's output is weighted by its share in float32 before being cast back. There is no shared
expert and no balancing bias; load is balanced by the auxiliary loss of Switch Transformer as
``transformers``' ``load_balancing_loss_func`` computes it (without an attention mask: depthgrow trains on
unpadded windows). With f_e the routed (token, slot) pairs expert e received per token (the f_e sum to
top_k) and P_e the mean router probability of e, both pooled over the tokens of every block (so the mean
over the blocks of each block's f_e and P_e, not a sum or mean of per-block losses):

    aux = aux_loss_coef · n_expert · Σ_e f_e · P_e

whose value is top_k · aux_loss_coef whenever the probabilities are uniform or the load is even. Only P_e
carries a gradient (the choice does not). transformers recomputes the softmax in the logits' dtype;
depthgrow reuses the routing's float32 probabilities, which is the same in float32 and under autocast.
``Mixtral.auxiliary_loss`` gives the loss of the last training forward (train mode, gradients enabled),
which the trainer adds to the task's loss before the backward pass and leaves out of the logged loss.

The dispatch is moe.py's: (token, slot) pairs sorted by expert with static-shape load counts and two
grouped matmuls (:func:`~depthgrow.models.moe.experts_forward`), so the forward never reads a value back
from the device. Expert usage is logged at each evaluation as for the DeepSeek-style family
(``MoE.eval_metrics``), from the loads of the training steps.

Parameter names are Hugging Face's in-memory names (``model.layers.{i}.mlp.gate.weight`` for the router,
attention and norms as LLaMA's), but for the experts: depthgrow keeps each expert a :class:`SwiGLU`
(``mlp.experts.{j}.{gate,up,down}_proj``, so that growth, init and Muon treat them as block matrices), which
the export fuses into HF's ``experts.gate_up_proj`` (E, 2h, d) and ``experts.down_proj`` (E, d, h) and the
import splits again (``save_pretrained`` writes them per expert as Mixtral's checkpoints do,
``block_sparse_moe.experts.{j}.w1/w2/w3``). ``aux_loss_coef`` is HF's ``router_aux_loss_coef``. What does not
map: the expert-usage counts (a non-persistent buffer, zero after an import). What is refused on import:
a sliding attention window, router jitter noise, one expert per token (its renormalised weight is always 1,
so the router would learn from the balancing loss alone), and what every depthgrow decoder refuses (biases,
dropout, scaled RoPE, another activation or head size).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from depthgrow.docfield import doc_field
from depthgrow.models.base import Family
from depthgrow.models.hf import Adapter, StateDict, refuse, transformers_5
from depthgrow.models.llama import (
    DecoderConfig,
    Llama,
    SwiGLU,
    decoder_fields,
    decoder_from_hf,
    decoder_hf_fields,
    decoder_problems,
    decoder_to_hf,
    head_size_problems,
    rotary_past_context,
)
from depthgrow.models.moe import (
    MoE,
    RoutedFeedForward,
    expert_load,
    expert_problems,
    fuse_experts,
    routed_experts,
    split_experts,
)

if TYPE_CHECKING:
    from transformers import PretrainedConfig


@dataclass(kw_only=True, frozen=True)
class MixtralConfig(DecoderConfig):
    family: ClassVar[str] = "mixtral"
    # the defaults are the mixtral-200m preset: Mixtral's tokenizer, rotary base and untied head
    n_layer: int = 12
    n_embd: int = 768
    n_head: int = 12
    n_kv_head: int = 4
    vocab_size: int = 32000
    rope_theta: float = 1000000.0
    n_expert: int = doc_field(8, "routed experts per block")
    # at least 2: with one the renormalised weight is always 1, so the router would learn only from the
    # balancing loss, never from the task (HF's Mixtral allows it; depthgrow refuses it, as for the MoE family)
    top_k: int = doc_field(2, "routed experts each token uses (at least 2)")
    expert_hidden: int = doc_field(2560, "SwiGLU hidden size of one expert")
    aux_loss_coef: float = doc_field(
        0.001, "weight of the load-balancing loss added to the task's in training (HF's router_aux_loss_coef)"
    )

    def problems(self) -> list[str]:
        found = super().problems() + expert_problems(self.n_expert, self.top_k, self.expert_hidden)
        if not (math.isfinite(self.aux_loss_coef) and self.aux_loss_coef >= 0):
            found.append(f"model.aux_loss_coef must be a finite number >= 0, got {self.aux_loss_coef}")
        return found

    def block_weights(self, experts: int) -> int:
        """The matrices of one block that a token using ``experts`` experts multiplies: attention, the router
        (n_expert x d) and those experts (3·d·h each)."""
        d = self.n_embd
        return self.attention_params() + self.n_expert * d + experts * 3 * d * self.expert_hidden

    def num_params(self, *, embeddings: bool = True) -> int:
        block = self.block_weights(self.n_expert) + 2 * self.n_embd  # and two RMSNorm gains
        return self.n_layer * block + self.outer_params(embeddings=embeddings)

    def num_active_params(self, *, embeddings: bool = True) -> int:
        """The parameters one token uses: all but the n_expert - top_k experts it skips per block."""
        skipped = self.n_layer * (self.n_expert - self.top_k) * 3 * self.n_embd * self.expert_hidden
        return self.num_params(embeddings=embeddings) - skipped

    def flops_per_token(self, *, count_embeddings: bool = False, count_attention: bool = True) -> float:
        """Training FLOPs per token of the weights it multiplies, counted as for the DeepSeek-style family
        (``MoEConfig.flops_per_token``) without shared experts: 6·N with
        N = L·(2d² + 2·d·n_kv_head·head_dim + n_expert·d + top_k·3·d·h) + V·d, plus 12·L·T·d for the
        attention scores. The softmax, top-k, gathers, scatter-add and the balancing loss are not matmuls.
        ``count_embeddings=True`` counts 6 x ``num_active_params()``, the paper's counting for MoE."""
        L = self.n_layer
        if count_embeddings:
            n = self.num_active_params()
        else:
            n = L * self.block_weights(self.top_k) + self.vocab_size * self.n_embd
        attention = L * self.attention_score_flops() if count_attention else 0
        return 6.0 * n + attention


class MixtralFeedForward(RoutedFeedForward):
    def __init__(self, config: MixtralConfig) -> None:
        super().__init__(config.n_expert)
        self.top_k = config.top_k
        self.gate = nn.Linear(config.n_embd, config.n_expert, bias=False)  # the router
        self.experts = nn.ModuleList(SwiGLU(config.n_embd, config.expert_hidden) for _ in range(config.n_expert))
        # (f_e, P_e) of the last forward, for the model to take (see Mixtral.forward); None outside training
        self.balance: tuple[torch.Tensor, torch.Tensor] | None = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For tokens x (N, d): the chosen experts (N, top_k), their weights (N, top_k, float32, summing to 1)
        and every expert's router probability (N, n_expert, float32)."""
        # the logits in the input's dtype, the softmax in float32: HF's MixtralTopKRouter
        probabilities = F.softmax(self.gate(x).float(), dim=-1)
        top, chosen = torch.topk(probabilities, self.top_k, dim=-1)
        return chosen, top / top.sum(dim=-1, keepdim=True), probabilities

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        x = x.reshape(B * T, C)
        chosen, weights, probabilities = self.route(x)
        load = expert_load(chosen, len(self.experts))
        self.record_load(load)
        training = self.training and torch.is_grad_enabled()
        self.balance = (load.float() / x.shape[0], probabilities.mean(dim=0)) if training else None
        # weighted in float32 and cast back, as HF's MixtralExperts
        return routed_experts(self.experts, x, chosen, weights, load).view(B, T, C)

    def take_balance(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        balance, self.balance = self.balance, None
        return balance


class Mixtral(Llama):
    """The LLaMA decoder with a :class:`MixtralFeedForward` in every block (see the module docstring)."""

    def __init__(self, config: MixtralConfig) -> None:
        super().__init__(config)
        # each block's (f_e, P_e) of the last training forward; None: no training forward to balance
        self.balance: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def new_feed_forward(self) -> nn.Module:
        return MixtralFeedForward(self.config)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        logits = super().forward(idx)
        # taken from the blocks at once: a block holding part of the autograd graph could not be deep-copied,
        # and growth copies blocks
        balance = [block.mlp.take_balance() for block in self.model.layers]
        self.balance = balance if balance and all(b is not None for b in balance) else None
        return logits

    def auxiliary_loss(self) -> torch.Tensor | None:
        """The load-balancing loss of the last training forward, times ``aux_loss_coef`` (see the module
        docstring); None after a forward that was not training, and for a zero-layer model (no router)."""
        if self.balance is None:
            return None
        # taken: the tensors hold the forward's graph, which one backward frees
        balance, self.balance = self.balance, None
        # pooled over the blocks' tokens, as HF pools its layers' router logits: the blocks' mean f_e and P_e
        fractions, probabilities = torch.stack([torch.stack(block) for block in balance]).mean(dim=0)
        return self.config.aux_loss_coef * self.config.n_expert * (fractions * probabilities).sum()

    def before_optimizer_step(self) -> None:
        for block in self.model.layers:
            block.mlp.count_step_load()  # the usage counts only: Mixtral balances by its loss

    # the usage counts are kept as the DeepSeek-style family keeps them
    eval_metrics = MoE.eval_metrics

    def residual_projections(self, block: nn.Module) -> list[nn.Module]:
        # every expert's output reaches the residual stream: zeroing them all preserves the function
        return [block.self_attn.o_proj, *(expert.down_proj for expert in block.mlp.experts)]

    def init_block(self, stack: str, index: int, block: nn.Module, seed: int) -> None:
        """As LLaMA's block (the router as any block matrix, every expert's down projection scaled as a residual
        projection), with no usage counted."""
        super().init_block(stack, index, block, seed)
        block.mlp.tokens_per_expert.zero_()


# --- Hugging Face: MixtralForCausalLM ---


def _mixtral_to_hf_config(config: MixtralConfig, end_of_text: int | None) -> PretrainedConfig:
    return transformers_5().MixtralConfig(
        **decoder_hf_fields(config, end_of_text),
        head_dim=config.head_dim,
        intermediate_size=config.expert_hidden,
        num_local_experts=config.n_expert,
        num_experts_per_tok=config.top_k,
        router_aux_loss_coef=config.aux_loss_coef,
        router_jitter_noise=0.0,
        sliding_window=None,
    )


def _mixtral_from_hf_config(hf: PretrainedConfig) -> MixtralConfig:
    transformers_5()
    problems = decoder_problems(hf) + head_size_problems(hf)
    if hf.sliding_window is not None:
        problems.append(f"it attends within a sliding window of {hf.sliding_window} tokens")
    if hf.router_jitter_noise:
        problems.append(f"its router jitters its input by up to {hf.router_jitter_noise} in training")
    refuse("Mixtral", problems)
    return MixtralConfig(
        **decoder_fields(hf),
        n_expert=hf.num_local_experts,
        top_k=hf.num_experts_per_tok,
        expert_hidden=hf.intermediate_size,
        aux_loss_coef=hf.router_aux_loss_coef,
    )


def _mixtral_to_hf(config: MixtralConfig, state: StateDict) -> StateDict:
    """Fuse each block's experts as HF keeps them in memory: ``experts.gate_up_proj`` (E, 2h, d), each
    expert's gate rows then its up rows (HF splits the fused output in that order), and ``experts.down_proj``
    (E, d, h)."""
    return fuse_experts(decoder_to_hf(config, state), config.n_layer, config.n_expert)


def _mixtral_from_hf(config: MixtralConfig, hf: StateDict) -> StateDict:
    return split_experts(decoder_from_hf(config, hf), config.n_layer, config.n_expert, config.expert_hidden)


def _mixtral_card_notes(config: MixtralConfig) -> list[str]:
    return [
        f"The load-balancing loss depthgrow trained with (weight `aux_loss_coef` = {config.aux_loss_coef}) is "
        "exported as `router_aux_loss_coef`: Hugging Face's Mixtral adds it to the loss only when called with "
        "labels and `output_router_logits=True`. The per-expert token counts (`tokens_per_expert`), which only "
        "log expert usage, are not exported."
    ]


FAMILY = Family(
    config=MixtralConfig,
    model=Mixtral,
    presets={
        # Mixtral style mixture of experts (softmax top-2 routing, no shared expert, load-balancing loss)
        "mixtral-test": MixtralConfig(
            n_layer=2,
            n_embd=32,
            n_head=4,
            n_kv_head=2,
            n_expert=4,
            top_k=2,
            expert_hidden=32,
            block_size=32,
            vocab_size=256,
        ),
        "mixtral-micro": MixtralConfig(  # the compare recipe's size: two experts of 88 are llama-micro's 176
            n_layer=4,
            n_embd=64,
            n_head=2,
            n_kv_head=1,
            n_expert=8,
            top_k=2,
            expert_hidden=88,
            block_size=64,
            vocab_size=256,
        ),
        "mixtral-micro-bpe": MixtralConfig(  # llama-micro-bpe's active size: two experts of 64 are its 128
            n_layer=4,
            n_embd=48,
            n_head=2,
            n_kv_head=1,
            n_expert=8,
            top_k=2,
            expert_hidden=64,
            block_size=64,
            vocab_size=1024,
            tie_embeddings=True,
        ),
        # paper-sized, named by active parameters: 8 experts, top-2, as Mixtral 8x7B, with its tokenizer
        # (32000 tokens), rotary base and untied head; active, total and zero-layer parameters:
        "mixtral-200m": MixtralConfig(  # 209.7M active, 634.4M total, zero-layer 49.2M
            n_layer=12, n_embd=768, n_head=12, n_kv_head=4, n_expert=8, top_k=2, expert_hidden=2560
        ),
        "mixtral-500m": MixtralConfig(  # 509.3M active, 1698.4M total, zero-layer 65.5M (experts 3.5·d, Mixtral's)
            n_layer=18, n_embd=1024, n_head=16, n_kv_head=4, n_expert=8, top_k=2, expert_hidden=3584
        ),
    },
    hf=Adapter(
        model_type="mixtral",
        to_hf_config=_mixtral_to_hf_config,
        from_hf_config=_mixtral_from_hf_config,
        to_hf=_mixtral_to_hf,
        from_hf=_mixtral_from_hf,
        past_context=rotary_past_context,
        card_notes=_mixtral_card_notes,
    ),
)
