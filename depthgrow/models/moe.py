"""Mixture-of-experts decoder, DeepSeek-V3 style: LLaMA's attention with a routed SwiGLU feed-forward.

Each block is the LLaMA block (:mod:`depthgrow.models.llama`: RMSNorm, RoPE, grouped-query attention) whose
feed-forward is ``n_expert`` small SwiGLU experts, of which every token uses the ``top_k`` with the highest
sigmoid router scores, their outputs weighted by those scores normalised over the chosen k, plus
``n_shared_expert`` experts that every token uses. Load is balanced without an auxiliary loss, as in
DeepSeek-V3: a per-expert bias, added to the scores only to choose the experts, is nudged at every
optimizer step by ``balance_rate · sign(mean load - load)``, the load being that of the step's training
forward, so that overloaded experts are chosen less. The forward only records the load; the bias moves in
``before_optimizer_step``, which ``build_optimizer``'s optimizers call from a pre-step hook (as
torchtitan does), so that a forward outside a training step (evaluation, generation, a forward in train
mode under ``no_grad``) never changes the model. A loop with its own torch optimizer calls
``model.before_optimizer_step()`` before each step.
Routing has no noise: a seed and a batch determine it.

Tokens are dispatched by sorting the (token, expert) pairs by expert and running each expert once on the
tokens routed to it, so the expert matmuls cost ``top_k / n_expert`` of running every expert on every token.

Parameter names are DeepSeek-V3's checkpoint names (``model.layers.{i}.mlp.gate.weight`` for the router,
``mlp.gate.e_score_correction_bias`` for the balancing bias, ``mlp.experts.{j}.{gate,up,down}_proj`` and
``mlp.shared_experts.{gate,up,down}_proj``). Hugging Face's ``DeepseekV3ForCausalLM`` has multi-head latent
attention, which this model has not; the class with this exact structure is ``Glm4MoeForCausalLM`` with
``first_k_dense_replace=0``, ``use_qk_norm=False``, ``attention_bias=False``, ``partial_rotary_factor=1``,
``n_group=topk_group=1``, ``norm_topk_prob=True``, ``routed_scaling_factor=1``. Its ``from_pretrained``
loads these names as they are (it fuses the experts into ``experts.gate_up_proj`` (E, 2h, d) and
``experts.down_proj`` (E, d, h) itself); its shared experts are one SwiGLU of width
``n_shared_expert · expert_hidden``, as here (``n_shared_expert=0`` exports as a shared expert of width 0,
which adds nothing). What does not map: the usage counts (a non-persistent buffer) and ``balance_rate``
(HF does not train the bias).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from depthgrow.docfield import doc_field
from depthgrow.models.llama import Block, DecoderConfig, Llama, SwiGLU


@dataclass(kw_only=True, frozen=True)
class MoEConfig(DecoderConfig):
    family: ClassVar[str] = "moe"
    # the defaults are the deepseek-v3-200m preset
    n_layer: int = 12
    n_embd: int = 768
    n_head: int = 12
    n_kv_head: int = 4
    vocab_size: int = 129280  # DeepSeek-V3's tokenizer
    rope_theta: float = 10000.0  # DeepSeek-V3's
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    n_expert: int = doc_field(64, "routed experts per block")
    # at least 2: with 1 the weight normalised over the chosen experts is always 1, so the router would get
    # no gradient and only the balancing bias would route
    top_k: int = doc_field(6, "routed experts each token uses (at least 2)")
    n_shared_expert: int = doc_field(2, "experts every token uses")
    expert_hidden: int = doc_field(384, "SwiGLU hidden size of one expert")
    balance_rate: float = doc_field(1e-3, "step of the balancing bias per training forward (DeepSeek-V3's gamma)")

    def problems(self) -> list[str]:
        found = super().problems()
        for name in ("n_expert", "expert_hidden"):
            if getattr(self, name) < 1:
                found.append(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if not 2 <= self.top_k <= max(self.n_expert, 2):
            # with one chosen expert its normalised gate weight is always 1: the router would get no gradient
            found.append(f"model.top_k must be in [2, n_expert={self.n_expert}], got {self.top_k}")
        if self.n_shared_expert < 0:
            found.append(f"model.n_shared_expert must be >= 0, got {self.n_shared_expert}")
        if not (math.isfinite(self.balance_rate) and self.balance_rate >= 0):
            found.append(f"model.balance_rate must be a finite number >= 0, got {self.balance_rate}")
        return found

    def expert_params(self) -> int:
        return 3 * self.n_embd * self.expert_hidden

    def block_weights(self, experts: int) -> int:
        """The matrices of one block that a token using ``experts`` routed experts multiplies: attention,
        the router (n_expert x d), those experts and the shared ones."""
        d = self.n_embd
        return self.attention_params() + self.n_expert * d + (experts + self.n_shared_expert) * self.expert_params()

    def num_params(self, *, embeddings: bool = True) -> int:
        block = self.block_weights(self.n_expert) + 2 * self.n_embd  # and two RMSNorm gains
        return self.n_layer * block + self.outer_params(embeddings=embeddings)

    def num_active_params(self, *, embeddings: bool = True) -> int:
        """The parameters one token uses: all but the n_expert - top_k routed experts it skips per block."""
        skipped = self.n_layer * (self.n_expert - self.top_k) * self.expert_params()
        return self.num_params(embeddings=embeddings) - skipped

    def flops_per_token(self, *, count_embeddings: bool = False, count_attention: bool = True) -> float:
        """Training FLOPs (forward + backward) per token, of the weights the token really multiplies.

        As for LLaMA (see ``LlamaConfig.flops_per_token``) a weight matrix of n entries that multiplies a
        token costs 6·n FLOPs in training. Per block a token multiplies the attention's matrices
        (2d² + 2·d·n_kv_head·head_dim), the router (n_expert·d: every expert is scored), its top_k routed
        experts and the n_shared_expert shared ones (3·d·h each, h = ``expert_hidden``); the other experts
        never see it. With the LM head (V·d): 6·N with
        N = L·(2d² + 2·d·n_kv_head·head_dim + n_expert·d + (top_k + n_shared_expert)·3·d·h) + V·d.
        The router's sigmoid and top-k, the gathers and the weighted scatter-add are not matmuls.

        Attention scores add 12·L·T·d, as for LLaMA. ``count_embeddings=True`` counts 6 x the active
        parameters (``num_active_params``: embedding and norms included), the paper's counting for MoE.
        """
        L, T = self.n_layer, self.block_size
        if count_embeddings:
            n = self.num_active_params()
        else:
            n = L * self.block_weights(self.top_k) + self.vocab_size * self.n_embd
        attention = 12 * L * T * self.n_embd if count_attention else 0
        return 6.0 * n + attention


class Router(nn.Linear):
    """Scores every expert for every token (``MoEFeedForward.route`` applies it, in float32). A Linear, so
    that init and Muon treat it as any block matrix; the balancing bias is a buffer, not a parameter: it is
    set by counting the load, never by gradients."""

    def __init__(self, dim: int, n_expert: int) -> None:
        super().__init__(dim, n_expert, bias=False)
        self.register_buffer("e_score_correction_bias", torch.empty(n_expert))


class MoEFeedForward(nn.Module):
    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.top_k = config.top_k
        self.balance_rate = config.balance_rate
        self.gate = Router(config.n_embd, config.n_expert)
        self.experts = nn.ModuleList(SwiGLU(config.n_embd, config.expert_hidden) for _ in range(config.n_expert))
        shared = config.n_shared_expert * config.expert_hidden
        self.shared_experts = SwiGLU(config.n_embd, shared) if shared else None
        # tokens routed to each expert by training steps since the last reset; only for logging, so
        # it stays out of the state dict (and of an export)
        self.register_buffer("tokens_per_expert", torch.empty(config.n_expert, dtype=torch.long), persistent=False)
        self.pending_load: torch.Tensor | None = None  # the global load of the step's training forward

    @property
    def down_projections(self) -> list[nn.Module]:
        shared = [] if self.shared_experts is None else [self.shared_experts.down_proj]
        return [expert.down_proj for expert in self.experts] + shared

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For tokens x (N, d): the chosen experts (N, top_k) and their weights (N, top_k), summing to 1."""
        # scored in float32 as DeepSeek-V3 does: in bf16 close scores would tie and flip the choice
        scores = F.linear(x.float(), self.gate.weight.float()).sigmoid()
        # the bias decides which experts are chosen, never how much their outputs weigh
        chosen = torch.topk(scores + self.gate.e_score_correction_bias, self.top_k, dim=-1).indices
        weights = scores.gather(1, chosen)
        return chosen, (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        x = x.reshape(B * T, C)
        chosen, weights = self.route(x)
        load = torch.bincount(chosen.flatten(), minlength=len(self.experts))
        global_load = _global(load) if self.training else load
        if self.training and torch.is_grad_enabled():
            self.pending_load = global_load  # the bias moves at the optimizer step (apply_balance)
        # the (token, slot) pairs sorted by expert: each expert then runs once, on its own tokens only
        order = chosen.flatten().argsort(stable=True)
        sizes, global_sizes = torch.stack([load, global_load]).tolist()
        tokens, pair_weights = (order // self.top_k).split(sizes), weights.flatten()[order].split(sizes)
        y = torch.zeros_like(x)
        for expert, rows, w, anywhere in zip(self.experts, tokens, pair_weights, global_sizes, strict=True):
            # an expert that got no token is left out of the graph: no gradient, so no optimizer step
            # (nor weight decay) for it, as if it were not there for this batch. Across processes that is
            # decided by the global batch: an expert with tokens on another rank only runs here on none,
            # so that its gradient (zero here) exists on every rank, as FSDP2's reduce-scatter needs
            if anywhere:
                y.index_add_(0, rows, expert(x[rows]) * w[:, None])
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y.view(B, T, C)

    @torch.no_grad()
    def apply_balance(self) -> None:
        """Count the load of the step's training forward and move the balancing bias by it."""
        if self.pending_load is None:
            return
        load, self.pending_load = self.pending_load, None
        self.tokens_per_expert += load
        # DeepSeek-V3's auxiliary-loss-free balancing: an overloaded expert's bias falls, an idle one's rises
        self.gate.e_score_correction_bias += self.balance_rate * torch.sign(load.float().mean() - load)


@torch.no_grad()
def _global(load: torch.Tensor) -> torch.Tensor:
    """The load over the global batch: balanced as one process training on all of it would be."""
    if dist.is_available() and dist.is_initialized():
        load = load.clone()
        dist.all_reduce(load)
    return load


class MoE(Llama):
    """The LLaMA decoder with a :class:`MoEFeedForward` in every block (see the module docstring)."""

    may_skip_parameters = True  # an expert that gets no token in a step has no gradient (DDP must know)

    def new_block(self) -> Block:
        return Block(self.config, MoEFeedForward(self.config))

    def before_optimizer_step(self) -> None:
        for block in self.model.layers:
            block.mlp.apply_balance()

    def residual_projections(self, block: nn.Module) -> list[nn.Module]:
        # every expert's output reaches the residual stream: zeroing them all preserves the function
        return [block.self_attn.o_proj, *block.mlp.down_projections]

    def init_block(self, stack: str, index: int, block: nn.Module, seed: int) -> None:
        """As LLaMA's block (the router as any block matrix, every expert's down projection scaled as a residual
        projection), and a fresh block starts balanced: zero bias, no usage counted."""
        super().init_block(stack, index, block, seed)
        block.mlp.gate.e_score_correction_bias.zero_()
        block.mlp.tokens_per_expert.zero_()

    def expert_usage(self) -> dict[str, float]:
        """Per block, the busiest and the idlest expert's token count over the mean (1.0 and 1.0 when
        perfectly balanced; a min_load of 0 is an expert that got no token), counted over the training
        forwards since :meth:`reset_expert_usage`. Blocks that have routed no token yet are left out."""
        usage = {}
        for index, block in enumerate(self.model.layers):
            counts = block.mlp.tokens_per_expert.float()
            if counts.sum() > 0:
                mean = counts.mean()
                usage[f"{self.STACK}.{index}.max_load"] = (counts.max() / mean).item()
                usage[f"{self.STACK}.{index}.min_load"] = (counts.min() / mean).item()
        return usage

    def reset_expert_usage(self) -> None:
        for block in self.model.layers:
            block.mlp.tokens_per_expert.zero_()
