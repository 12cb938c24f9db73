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
tokens routed to it, so the expert matmuls cost ``top_k / n_expert`` of running every expert on every token:
one grouped matmul (``torch._grouped_mm``) per projection over all experts, its groups given by a tensor of
offsets, so the forward never waits for the device to say how many tokens each expert got (no host sync).
It runs on the CPU in any float dtype and on CUDA in bfloat16 (compute capability 9.0 and up, as under
``train.precision=bf16``); elsewhere each expert runs in a loop over its group, which reads the group sizes
(one device-to-host copy per block). Every expert is in the graph whether or not it got a token (a zero
gradient if not), so data-parallel wrappers need no notion of unused parameters.

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
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils import flop_counter

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

if TYPE_CHECKING:
    from transformers import PretrainedConfig


def expert_problems(n_expert: int, top_k: int, expert_hidden: int) -> list[str]:
    """What is wrong with a routed feed-forward's sizes, as short sentences."""
    found = [] if expert_hidden >= 1 else [f"model.expert_hidden must be >= 1, got {expert_hidden}"]
    if n_expert < 2:  # routing needs two experts to choose from (top_k >= 2)
        found.append(f"model.n_expert must be >= 2, got {n_expert}")
    elif not 2 <= top_k <= n_expert:
        # with one chosen expert its normalised gate weight is always 1: the router would get no gradient
        found.append(f"model.top_k must be in [2, n_expert={n_expert}], got {top_k}")
    return found


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
    balance_rate: float = doc_field(1e-3, "step of the balancing bias per optimizer step (DeepSeek-V3's gamma)")

    def problems(self) -> list[str]:
        found = super().problems() + expert_problems(self.n_expert, self.top_k, self.expert_hidden)
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
        L = self.n_layer
        if count_embeddings:
            n = self.num_active_params()
        else:
            n = L * self.block_weights(self.top_k) + self.vocab_size * self.n_embd
        attention = L * self.attention_score_flops() if count_attention else 0
        return 6.0 * n + attention


class Router(nn.Linear):
    """Scores every expert for every token (``MoEFeedForward.route`` applies it, in float32). A Linear, so
    that init and Muon treat it as any block matrix; the balancing bias is a buffer, not a parameter: it is
    set by counting the load, never by gradients."""

    def __init__(self, dim: int, n_expert: int) -> None:
        super().__init__(dim, n_expert, bias=False)
        self.register_buffer("e_score_correction_bias", torch.empty(n_expert))


class RoutedFeedForward(nn.Module):
    """What every routed feed-forward keeps about its load: the tokens each expert got in the training
    forwards since the last optimizer step (this rank's), and the usage counts that the evaluations log."""

    def __init__(self, n_expert: int) -> None:
        super().__init__()
        # tokens routed to each expert by training steps since the last reset; only for logging, so
        # it stays out of the state dict (and of an export)
        self.register_buffer("tokens_per_expert", torch.empty(n_expert, dtype=torch.long), persistent=False)
        self.pending_load: torch.Tensor | None = None  # this rank's load in the training forwards since the last step

    def record_load(self, load: torch.Tensor) -> None:
        """Keep ``load`` for the next optimizer step if this forward is a training one."""
        if self.training and torch.is_grad_enabled():
            self.pending_load = load if self.pending_load is None else self.pending_load + load

    @torch.no_grad()
    def count_step_load(self) -> torch.Tensor | None:
        """The load of the step's training forwards over the global batch, added to the usage counts (None
        without a training forward since the last step)."""
        if self.pending_load is None:
            return None
        load, self.pending_load = global_load(self.pending_load), None
        self.tokens_per_expert += load
        return load


class MoEFeedForward(RoutedFeedForward):
    def __init__(self, config: MoEConfig) -> None:
        super().__init__(config.n_expert)
        self.top_k = config.top_k
        self.balance_rate = config.balance_rate
        self.gate = Router(config.n_embd, config.n_expert)
        self.experts = nn.ModuleList(SwiGLU(config.n_embd, config.expert_hidden) for _ in range(config.n_expert))
        shared = config.n_shared_expert * config.expert_hidden
        self.shared_experts = SwiGLU(config.n_embd, shared) if shared else None

    @property
    def down_projections(self) -> list[nn.Module]:
        shared = [] if self.shared_experts is None else [self.shared_experts.down_proj]
        return [expert.down_proj for expert in self.experts] + shared

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For tokens x (N, d): the chosen experts (N, top_k) and their weights (N, top_k), summing to 1."""
        # scored in float32 as DeepSeek-V3 does (autocast off, or it would run the product in bf16): in bf16
        # close scores would tie and flip the choice
        with torch.autocast(x.device.type, enabled=False):
            scores = F.linear(x.float(), self.gate.weight.float()).sigmoid()
        # the bias decides which experts are chosen, never how much their outputs weigh
        chosen = torch.topk(scores + self.gate.e_score_correction_bias, self.top_k, dim=-1).indices
        weights = scores.gather(1, chosen)
        return chosen, (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        x = x.reshape(B * T, C)
        chosen, weights = self.route(x)
        load = expert_load(chosen, len(self.experts))
        self.record_load(load)  # the bias moves at the optimizer step (apply_balance), by the global batch's load
        y = routed_experts(self.experts, x, chosen, weights, load)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y.view(B, T, C)

    @torch.no_grad()
    def apply_balance(self) -> None:
        """Count the load of the step's training forwards over the global batch and move the balancing bias
        by it."""
        load = self.count_step_load()
        if load is None:
            return
        # DeepSeek-V3's auxiliary-loss-free balancing: an overloaded expert's bias falls, an idle one's rises
        self.gate.e_score_correction_bias += self.balance_rate * torch.sign(load.float().mean() - load)


def expert_load(chosen: torch.Tensor, n_expert: int) -> torch.Tensor:
    """Tokens routed to each expert by the choices ``chosen`` (N, top_k): a tensor of static shape (bincount's
    length would depend on the values)."""
    pairs = chosen.flatten()
    return torch.zeros(n_expert, dtype=torch.long, device=pairs.device).scatter_add_(0, pairs, torch.ones_like(pairs))


def routed_experts(
    experts: nn.ModuleList, x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor, load: torch.Tensor
) -> torch.Tensor:
    """The routed experts' output for tokens x (N, d): each token's chosen experts (N, top_k) weighted by
    ``weights`` (N, top_k; the products in their dtype, cast to x's) and summed; ``load`` is
    :func:`expert_load` of ``chosen``."""
    top_k = chosen.shape[1]
    # the (token, slot) pairs sorted by expert: each expert's tokens are then one contiguous group
    order = chosen.flatten().argsort(stable=True)
    tokens = order // top_k
    routed = experts_forward(experts, x[tokens], load)
    weighted = (routed * weights.flatten()[order, None]).to(x.dtype)
    return torch.zeros_like(x).index_add_(0, tokens, weighted)


def experts_forward(experts: nn.ModuleList, x: torch.Tensor, load: torch.Tensor) -> torch.Tensor:
    """Each expert (a :class:`SwiGLU`) applied to its group of the rows of ``x`` (sorted by expert, ``load``
    rows per expert): two grouped matmuls over the experts' stacked weights, or a loop where the device has
    no grouped matmul (see the module docstring)."""
    dtype = _grouped_dtype(x, experts[0].down_proj.weight)
    if dtype is None:
        rows = x.split(load.tolist())  # the one host sync, on devices without a grouped matmul
        return torch.cat([expert(part) for expert, part in zip(experts, rows, strict=True)])
    gate_up = torch.stack([torch.cat([e.gate_proj.weight, e.up_proj.weight]) for e in experts])  # (E, 2h, d)
    down = torch.stack([e.down_proj.weight for e in experts])  # (E, d, h)
    hidden = down.shape[-1]
    offsets = load.cumsum(0).to(torch.int32)
    h = torch._grouped_mm(x.to(dtype), gate_up.to(dtype).transpose(-2, -1), offs=offsets)
    h = F.silu(h[:, :hidden]) * h[:, hidden:]
    return torch._grouped_mm(h, down.to(dtype).transpose(-2, -1), offs=offsets).to(x.dtype)


def _grouped_mm_flops(
    a_shape: torch.Size, b_shape: torch.Size, *args: object, out_shape: torch.Size, **kwargs: object
) -> int:
    """2 FLOPs per multiply-add. Two 2-D operands are a weight gradient, whose groups split the contraction
    (a: (K, M), b: (M, N), out: (E, K, N)); otherwise every output element contracts a's last dimension."""
    if len(a_shape) == len(b_shape) == 2:
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]
    return 2 * math.prod(out_shape) * a_shape[-1]


# torch's FLOP counter has no formula for the grouped matmul (torch 2.13): without one it counts the
# experts as free, and the families' FLOP formulas could not be checked against it
if torch.ops.aten._grouped_mm not in flop_counter.flop_registry:
    flop_counter.register_flop_formula(torch.ops.aten._grouped_mm)(_grouped_mm_flops)


def _grouped_dtype(x: torch.Tensor, down: torch.Tensor) -> torch.dtype | None:
    """The dtype in which ``torch._grouped_mm`` can run an expert of down projection ``down`` on ``x`` here,
    or None."""
    if x.device.type == "cpu":
        return x.dtype
    # the CUDA kernel takes rows of 16 bytes' multiples: widths that are multiples of 8 in bfloat16
    aligned = all(size % 8 == 0 for size in down.shape)
    if x.device.type == "cuda" and aligned and torch.cuda.get_device_capability(x.device) >= (9, 0):
        autocast_bf16 = torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") == torch.bfloat16
        if autocast_bf16 or x.dtype == down.dtype == torch.bfloat16:
            return torch.bfloat16  # what autocast gives a Linear; the kernel takes bfloat16 only
    return None


@torch.no_grad()
def global_load(load: torch.Tensor) -> torch.Tensor:
    """The load over the global batch: balanced as one process training on all of it would be."""
    if dist.is_available() and dist.is_initialized():
        load = load.clone()
        dist.all_reduce(load)
    return load


class MoE(Llama):
    """The LLaMA decoder with a :class:`MoEFeedForward` in every block (see the module docstring)."""

    def new_feed_forward(self) -> nn.Module:
        return MoEFeedForward(self.config)

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

    def eval_metrics(self) -> dict[str, dict[str, float]]:
        """``expert_usage``: per block, the busiest and the idlest expert's token count over the mean (1.0 and
        1.0 when perfectly balanced; a min_load of 0 is an expert that got no token), counted over the
        training steps since the last call (the global batch's). Blocks that have routed no token are left
        out. The counts then start again."""
        usage = {}
        for index, block in enumerate(self.model.layers):
            counts = block.mlp.tokens_per_expert.float()
            if counts.sum() > 0:
                mean = counts.mean()
                usage[f"{self.STACK}.{index}.max_load"] = (counts.max() / mean).item()
                usage[f"{self.STACK}.{index}.min_load"] = (counts.min() / mean).item()
            block.mlp.tokens_per_expert.zero_()
        return {"expert_usage": usage}


# --- Hugging Face: Glm4MoeForCausalLM ---

_SWIGLU = ("gate", "up", "down")


def _moe_to_hf_config(config: MoEConfig, end_of_text: int | None) -> PretrainedConfig:
    # Glm4Moe's router sums the top 2 scores of each expert group, so it needs 2 experts or more: so does
    # a valid MoEConfig (top_k >= 2)
    return transformers_5().Glm4MoeConfig(
        # Glm4Moe's default rotates half of each head (GLM's partial RoPE); depthgrow rotates all of it
        **decoder_hf_fields(config, end_of_text, partial_rotary_factor=1.0),
        n_routed_experts=config.n_expert,
        num_experts_per_tok=config.top_k,
        n_shared_experts=config.n_shared_expert,
        moe_intermediate_size=config.expert_hidden,
        first_k_dense_replace=0,  # every block routed; GLM's first block is dense
        intermediate_size=config.expert_hidden,  # of those dense blocks' feed-forward, so unused
        # one expert group that is always chosen: top-k over all experts, as depthgrow's router
        n_group=1,
        topk_group=1,
        norm_topk_prob=True,
        routed_scaling_factor=1.0,
        use_qk_norm=False,
        num_nextn_predict_layers=0,  # no multi-token-prediction layers
    )


def _moe_from_hf_config(hf: PretrainedConfig) -> MoEConfig:
    transformers_5()
    problems = decoder_problems(hf) + head_size_problems(hf)
    rotated = hf.rope_parameters.get("partial_rotary_factor", 1.0)
    if rotated != 1.0:
        problems.append(f"its rotary embedding turns {rotated} of each head, not all of it")
    if hf.first_k_dense_replace:
        problems.append(f"its first {hf.first_k_dense_replace} blocks have a dense feed-forward")
    if hf.use_qk_norm:
        problems.append("it normalises queries and keys")
    refuse("Glm4Moe", problems + routing_problems(hf))
    # balance_rate is not in HF's config (HF does not train the balancing bias): depthgrow's default
    return MoEConfig(
        **decoder_fields(hf),
        n_expert=hf.n_routed_experts,
        top_k=hf.num_experts_per_tok,
        n_shared_expert=hf.n_shared_experts,
        expert_hidden=hf.moe_intermediate_size,
    )


def fuse_experts(state: StateDict, n_layer: int, n_expert: int) -> StateDict:
    """Each block's experts (``model.layers.{i}.mlp.experts.{j}``) fused as HF's MoE classes keep them in
    memory, in place: ``experts.gate_up_proj`` (E, 2h, d), each expert's gate rows then its up rows (HF
    splits the fused output in that order), and ``experts.down_proj`` (E, d, h). ``save_pretrained``
    writes them back per expert, under depthgrow's names."""
    for i in range(n_layer):
        experts = f"model.layers.{i}.mlp.experts"
        gate, up, down = ([state.pop(f"{experts}.{j}.{kind}_proj.weight") for j in range(n_expert)] for kind in _SWIGLU)
        state[f"{experts}.gate_up_proj"] = torch.stack([torch.cat(pair) for pair in zip(gate, up, strict=True)])
        state[f"{experts}.down_proj"] = torch.stack(down)
    return state


def split_experts(state: StateDict, n_layer: int, n_expert: int, hidden: int) -> StateDict:
    """The inverse of :func:`fuse_experts`, in place."""
    for i in range(n_layer):
        experts = f"model.layers.{i}.mlp.experts"
        gate_up, down = state.pop(f"{experts}.gate_up_proj"), state.pop(f"{experts}.down_proj")
        for j in range(n_expert):
            # copies: views would make every expert's parameters share one storage (safetensors refuses that)
            # and keep the whole fused tensor alive
            parts = (gate_up[j, :hidden], gate_up[j, hidden:], down[j])
            for kind, tensor in zip(_SWIGLU, parts, strict=True):
                state[f"{experts}.{j}.{kind}_proj.weight"] = tensor.clone()
    return state


def routing_problems(hf: PretrainedConfig) -> list[str]:
    """What depthgrow's DeepSeek-style router cannot express in an HF config of its routing (Glm4Moe's,
    DeepseekV3's): expert groups that restrict the choice, unnormalised or scaled weights."""
    problems = []
    if hf.topk_group != hf.n_group:  # equal: every group is chosen, so the groups do not restrict the choice
        problems.append(f"it routes within the best {hf.topk_group} of {hf.n_group} expert groups")
    if not hf.norm_topk_prob:
        problems.append("the weights of the chosen experts are not normalised to sum to 1")
    if hf.routed_scaling_factor != 1.0:
        problems.append(f"the routed experts' output is scaled by {hf.routed_scaling_factor}")
    return problems


def moe_to_hf(config: MoEConfig, state: StateDict) -> StateDict:
    """The decoder's state with the experts fused (:func:`fuse_experts`) and, without shared experts, HF's
    shared expert of width 0."""
    hf = fuse_experts(decoder_to_hf(config, state), config.n_layer, config.n_expert)
    if not config.n_shared_expert:
        # HF always has a shared expert, of width n_shared_experts · moe_intermediate_size: here 0, and a
        # SwiGLU of width 0 adds exactly 0, so the export computes what the depthgrow model does
        like = next(iter(hf.values()))
        for i in range(config.n_layer):
            for kind, shape in zip(_SWIGLU, [(0, config.n_embd), (0, config.n_embd), (config.n_embd, 0)], strict=True):
                hf[f"model.layers.{i}.mlp.shared_experts.{kind}_proj.weight"] = like.new_zeros(shape)
    return hf


def moe_from_hf(config: MoEConfig, hf: StateDict) -> StateDict:
    state = split_experts(decoder_from_hf(config, hf), config.n_layer, config.n_expert, config.expert_hidden)
    for i in range(config.n_layer):
        mlp = f"model.layers.{i}.mlp"
        if not config.n_shared_expert:
            for kind in _SWIGLU:
                del state[f"{mlp}.shared_experts.{kind}_proj.weight"]  # width 0: depthgrow has no module there
    return state


def _moe_card_notes(config: MoEConfig) -> list[str]:
    notes = [
        "The balancing bias of each block (`mlp.gate.e_score_correction_bias`) is exported, and Hugging Face's "
        "Glm4Moe adds it to the sigmoid router scores to choose the experts (and only to choose them) as "
        "depthgrow does, so both pick the same experts. Only depthgrow updates it during training: its step "
        f"`balance_rate` ({config.balance_rate}) is not carried (an import into depthgrow takes the default), "
        "nor are the per-expert token counts (`tokens_per_expert`), which only log expert usage."
    ]
    if not config.n_shared_expert:
        notes.append(
            "The depthgrow model has no shared expert (`model.n_shared_expert = 0`). Hugging Face's Glm4Moe always "
            "has one, so this export's has width 0 (`n_shared_experts: 0`): it adds nothing, and the model "
            "computes exactly what the depthgrow model did."
        )
    return notes


FAMILY = Family(
    config=MoEConfig,
    model=MoE,
    presets={
        # DeepSeek-V3 style mixture of experts (sigmoid top-k routing, shared experts, bias balancing)
        "moe-test": MoEConfig(
            n_layer=2,
            n_embd=32,
            n_head=4,
            n_kv_head=2,
            n_expert=4,
            top_k=2,
            n_shared_expert=1,
            expert_hidden=32,
            block_size=32,
            vocab_size=256,
        ),
        "moe-micro": MoEConfig(  # the compare recipe's size: active parameters near gpt2-micro's
            n_layer=4,
            n_embd=64,
            n_head=2,
            n_kv_head=1,
            n_expert=8,
            top_k=2,
            n_shared_expert=1,
            expert_hidden=64,
            block_size=64,
            vocab_size=256,
        ),
        "moe-micro-bpe": MoEConfig(  # gpt2-micro-bpe's active size: the tied embedding 30 % of the active parameters
            n_layer=4,
            n_embd=48,
            n_head=2,
            n_kv_head=1,
            n_expert=8,
            top_k=2,
            n_shared_expert=1,
            expert_hidden=48,
            block_size=64,
            vocab_size=1024,
        ),
        "moe-tiny": MoEConfig(  # 2.04M parameters, 0.86M active
            n_layer=4,
            n_embd=128,
            n_head=4,
            n_kv_head=2,
            n_expert=8,
            top_k=2,
            n_shared_expert=1,
            expert_hidden=128,
            block_size=128,
            vocab_size=256,
        ),
        # the paper's MoE sizes, named by active parameters; 64 routed experts, 6 active, 2 shared, as
        # DeepSeek-V2-Lite; embeddings tied (an untied head alone would be 0.1B of the 0.2B active):
        "deepseek-v3-200m": MoEConfig(  # 203.7M active, 819.5M total, zero-layer 99.3M
            n_layer=12, n_embd=768, n_head=12, n_kv_head=4, n_expert=64, top_k=6, n_shared_expert=2, expert_hidden=384
        ),
        "deepseek-v3-500m": MoEConfig(  # 498.9M active, 2688.3M total, zero-layer 132.4M
            n_layer=24, n_embd=1024, n_head=16, n_kv_head=4, n_expert=64, top_k=6, n_shared_expert=2, expert_hidden=512
        ),
    },
    hf=Adapter(
        model_type="glm4_moe",
        to_hf_config=_moe_to_hf_config,
        from_hf_config=_moe_from_hf_config,
        to_hf=moe_to_hf,
        from_hf=moe_from_hf,
        past_context=rotary_past_context,
        card_notes=_moe_card_notes,
    ),
)
