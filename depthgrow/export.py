"""Hugging Face export: a depthgrow checkpoint as a ``transformers`` model folder (safetensors), and back.

Each model family maps onto one ``transformers`` architecture through an :class:`Adapter` in
:data:`ADAPTERS`, keyed by the depthgrow family: the config mapping both ways and the state-dict mapping
both ways. GPT-2 maps onto ``GPT2LMHeadModel``, LLaMA onto ``LlamaForCausalLM`` and the mixture of experts
onto ``Glm4MoeForCausalLM`` (the one ``transformers`` class with its structure: see :mod:`depthgrow.models.moe`);
another family is one more entry.

The export also writes the run's tokenizer, whatever its vocabulary (bytes, GPT-2's BPE, a trained BPE), and
names its end-of-text token in the model's generation settings: this is shared by every family, so a folder
works with ``transformers.pipeline("text-generation", model=folder)`` as it is.

``transformers`` and ``safetensors`` are the optional ``export`` extra: depthgrow imports without them,
and only the functions here that need them import them.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from depthgrow.bpe import END_OF_TEXT, TOKENIZER_NAME, load_bpe
from depthgrow.checkpoint import CHECKPOINT_NAME, load_checkpoint
from depthgrow.config import RunConfig
from depthgrow.data import GPT2_BPE_ENV, VOCAB_SIZES, gpt2_encoding
from depthgrow.errors import DepthgrowError
from depthgrow.metrics import LOG_NAME, read_log
from depthgrow.models import FAMILIES, GPT2Config, LlamaConfig, ModelConfig, MoEConfig
from depthgrow.models.llama import DecoderConfig
from depthgrow.sampling import tokenizer_name
from depthgrow.trainer import SUMMARY_NAME

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast

StateDict = dict[str, torch.Tensor]

MISSING_EXTRA = "export needs transformers and safetensors: pip install 'depthgrow[export]'"
CARD_NAME = "README.md"
LOSS_CURVE_NAME = "loss.png"  # the run's validation loss, shown by the card
_HEAD = "lm_head.weight"  # the LM head in every depthgrow family and in the transformers classes they map onto


def _transformers() -> ModuleType:
    try:
        import safetensors  # noqa: F401 - save_pretrained writes safetensors through it
        import transformers
    except ImportError:
        raise DepthgrowError(MISSING_EXTRA) from None
    return transformers


def _transformers_5() -> ModuleType:
    transformers = _transformers()
    # transformers 4 reads the rotary base from rope_theta and would silently ignore rope_parameters (a model
    # with the wrong positions), and it keeps MoE experts unfused
    if int(transformers.__version__.split(".")[0]) < 5:
        raise DepthgrowError(
            f"LLaMA and MoE export needs transformers >= 5, found {transformers.__version__}: "
            "pip install -U transformers"
        )
    return transformers


def _special_tokens(end_of_text: int | None) -> dict[str, int | None]:
    """The special-token fields of every HF config: the token that ends (and so separates) the training
    documents ends a generation, starts one from an empty prompt, and pads (masked out). Set at construction,
    None included: HF's defaults are ids of other vocabularies (GPT-2's 50256, LLaMA-1's 1 and 2)."""
    return dict(bos_token_id=end_of_text, eos_token_id=end_of_text, pad_token_id=end_of_text)


def _refuse(name: str, problems: list[str]) -> None:
    if problems:
        raise DepthgrowError(f"this {name} differs from depthgrow's: " + "; ".join(problems))


def _with_tied_head(state: StateDict, embedding: str) -> StateDict:
    # HF's state dict lists a tied head under its own name too, as the same tensor as the embedding
    return {**state, _HEAD: state[embedding]}


def _without_head(hf: StateDict) -> StateDict:
    return {name: tensor for name, tensor in hf.items() if name != _HEAD}


@dataclass(frozen=True)
class Adapter:
    """How one depthgrow family maps onto one ``transformers`` architecture."""

    model_type: str  # transformers' config.model_type: finds the adapter of a saved folder on import
    # with the tokenizer's end-of-text id (None where it has none), which it names through _special_tokens
    to_hf_config: Callable[[ModelConfig, int | None], PretrainedConfig]
    from_hf_config: Callable[[PretrainedConfig], ModelConfig]
    # the state-dict mappings, given the depthgrow config (of the exported model; of the import)
    to_hf: Callable[[ModelConfig, StateDict], StateDict]
    from_hf: Callable[[ModelConfig, StateDict], StateDict]
    # the model card's sentences on generating past the context the model was trained on
    past_context: Callable[[ModelConfig], str]
    # sentences for the model card about where the export differs in form from the depthgrow model
    card_notes: Callable[[ModelConfig], list[str]] = field(default=lambda config: [])


# --- GPT-2 -> GPT2LMHeadModel ---

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
    return _transformers().GPT2Config(
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
        **_special_tokens(end_of_text),
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
    _refuse("GPT-2", problems)
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
    return _with_tied_head(hf, "transformer.wte.weight")


def _gpt2_from_hf(config: GPT2Config, hf: StateDict) -> StateDict:
    # the head is the token embedding (from_hf_config refuses an untied one); depthgrow keeps it once
    state = {
        name: tensor.t().contiguous() if _GPT2_CONV1D.fullmatch(name) else tensor
        for name, tensor in _without_head(hf).items()
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


# --- LLaMA-style decoders: what LlamaForCausalLM and Glm4MoeForCausalLM share ---

# depthgrow's decoders take their parameter names from these two classes: nothing is renamed; only a tied
# head (and the MoE's experts, which HF fuses) differ between the two state dicts
_DECODER_EMBEDDING = "model.embed_tokens.weight"


def _decoder_hf_fields(config: DecoderConfig, end_of_text: int | None, **rope: float) -> dict[str, Any]:
    """The config fields of both HF decoders for depthgrow's decoder (attention, norms, positions, head,
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
        **_special_tokens(end_of_text),
    )


def _decoder_problems(hf: PretrainedConfig) -> list[str]:
    """What depthgrow's decoder cannot express in the fields both HF decoders share."""
    problems = []
    if hf.hidden_act != "silu":
        problems.append(f"hidden_act is {hf.hidden_act!r}, not 'silu' (SwiGLU)")
    rope_type = hf.rope_parameters.get("rope_type", "default")
    if rope_type != "default":
        problems.append(f"its rotary embedding is scaled ({rope_type!r}), not plain RoPE")
    if hf.attention_bias:
        problems.append("its attention projections have biases")
    if hf.attention_dropout:
        problems.append(f"it has attention dropout ({hf.attention_dropout})")
    head_dim = getattr(hf, "head_dim", None)
    if head_dim not in (None, hf.hidden_size // hf.num_attention_heads):
        problems.append(f"head_dim is {head_dim}, not hidden_size / num_attention_heads")
    return problems


def _decoder_fields(hf: PretrainedConfig) -> dict[str, Any]:
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


def _decoder_to_hf(config: DecoderConfig, state: StateDict) -> StateDict:
    # a tied depthgrow model has no lm_head entry; HF's strict load wants one
    return _with_tied_head(state, _DECODER_EMBEDDING) if config.tie_embeddings else dict(state)


def _decoder_from_hf(config: DecoderConfig, hf: StateDict) -> StateDict:
    return _without_head(hf) if config.tie_embeddings else dict(hf)


def _rotary_past_context(config: DecoderConfig) -> str:
    return (
        "Rotary positions need no table: asked to, the model generates past its context, reading sequences longer "
        "than any it was trained on, so expect the text to degrade there."
    )


# --- LLaMA -> LlamaForCausalLM ---


def _llama_to_hf_config(config: LlamaConfig, end_of_text: int | None) -> PretrainedConfig:
    return _transformers_5().LlamaConfig(
        **_decoder_hf_fields(config, end_of_text),
        head_dim=config.head_dim,
        intermediate_size=config.ffn_size,
        mlp_bias=False,
    )


def _llama_from_hf_config(hf: PretrainedConfig) -> LlamaConfig:
    _transformers_5()
    problems = _decoder_problems(hf)
    if hf.mlp_bias:
        problems.append("its feed-forward projections have biases")
    _refuse("LLaMA", problems)
    # ffn_hidden set even where LLaMA's rule would give the same size: the config then says it as HF does
    return LlamaConfig(**_decoder_fields(hf), ffn_hidden=hf.intermediate_size)


# --- MoE -> Glm4MoeForCausalLM ---

_SWIGLU = ("gate", "up", "down")


def _moe_to_hf_config(config: MoEConfig, end_of_text: int | None) -> PretrainedConfig:
    # Glm4Moe's router sums the top 2 scores of each expert group, so it needs 2 experts or more: so does
    # a valid MoEConfig (top_k >= 2)
    return _transformers_5().Glm4MoeConfig(
        # Glm4Moe's default rotates half of each head (GLM's partial RoPE); depthgrow rotates all of it
        **_decoder_hf_fields(config, end_of_text, partial_rotary_factor=1.0),
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
    _transformers_5()
    problems = _decoder_problems(hf)
    rotated = hf.rope_parameters.get("partial_rotary_factor", 1.0)
    if rotated != 1.0:
        problems.append(f"its rotary embedding turns {rotated} of each head, not all of it")
    if hf.first_k_dense_replace:
        problems.append(f"its first {hf.first_k_dense_replace} blocks have a dense feed-forward")
    if hf.use_qk_norm:
        problems.append("it normalises queries and keys")
    if hf.topk_group != hf.n_group:  # equal: every group is chosen, so the groups do not restrict the choice
        problems.append(f"it routes within the best {hf.topk_group} of {hf.n_group} expert groups")
    if not hf.norm_topk_prob:
        problems.append("the weights of the chosen experts are not normalised to sum to 1")
    if hf.routed_scaling_factor != 1.0:
        problems.append(f"the routed experts' output is scaled by {hf.routed_scaling_factor}")
    _refuse("Glm4Moe", problems)
    # balance_rate is not in HF's config (HF does not train the balancing bias): depthgrow's default
    return MoEConfig(
        **_decoder_fields(hf),
        n_expert=hf.n_routed_experts,
        top_k=hf.num_experts_per_tok,
        n_shared_expert=hf.n_shared_experts,
        expert_hidden=hf.moe_intermediate_size,
    )


def _moe_to_hf(config: MoEConfig, state: StateDict) -> StateDict:
    """Fuse each block's experts as HF keeps them in memory: ``experts.gate_up_proj`` (E, 2h, d), each
    expert's gate rows then its up rows (HF splits the fused output in that order), and ``experts.down_proj``
    (E, d, h). ``save_pretrained`` writes them back per expert, under depthgrow's names."""
    hf = _decoder_to_hf(config, state)
    for i in range(config.n_layer):
        mlp = f"model.layers.{i}.mlp"
        gate, up, down = (
            [hf.pop(f"{mlp}.experts.{j}.{kind}_proj.weight") for j in range(config.n_expert)] for kind in _SWIGLU
        )
        hf[f"{mlp}.experts.gate_up_proj"] = torch.stack([torch.cat(pair) for pair in zip(gate, up, strict=True)])
        hf[f"{mlp}.experts.down_proj"] = torch.stack(down)
        if not config.n_shared_expert:
            # HF always has a shared expert, of width n_shared_experts · moe_intermediate_size: here 0, and a
            # SwiGLU of width 0 adds exactly 0, so the export computes what the depthgrow model does
            d, like = config.n_embd, down[0]
            for kind, shape in zip(_SWIGLU, [(0, d), (0, d), (d, 0)], strict=True):
                hf[f"{mlp}.shared_experts.{kind}_proj.weight"] = like.new_zeros(shape)
    return hf


def _moe_from_hf(config: MoEConfig, hf: StateDict) -> StateDict:
    state = _decoder_from_hf(config, hf)
    h = config.expert_hidden
    for i in range(config.n_layer):
        mlp = f"model.layers.{i}.mlp"
        gate_up, down = state.pop(f"{mlp}.experts.gate_up_proj"), state.pop(f"{mlp}.experts.down_proj")
        for j in range(config.n_expert):
            # copies: views would make every expert's parameters share one storage (safetensors refuses that)
            # and keep the whole fused tensor alive
            parts = (gate_up[j, :h], gate_up[j, h:], down[j])
            for kind, tensor in zip(_SWIGLU, parts, strict=True):
                state[f"{mlp}.experts.{j}.{kind}_proj.weight"] = tensor.clone()
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


ADAPTERS: dict[str, Adapter] = {
    GPT2Config.family: Adapter(
        model_type="gpt2",
        to_hf_config=_gpt2_to_hf_config,
        from_hf_config=_gpt2_from_hf_config,
        to_hf=_gpt2_to_hf,
        from_hf=_gpt2_from_hf,
        past_context=_gpt2_past_context,
        card_notes=_gpt2_card_notes,
    ),
    LlamaConfig.family: Adapter(
        model_type="llama",
        to_hf_config=_llama_to_hf_config,
        from_hf_config=_llama_from_hf_config,
        to_hf=_decoder_to_hf,
        from_hf=_decoder_from_hf,
        past_context=_rotary_past_context,
    ),
    MoEConfig.family: Adapter(
        model_type="glm4_moe",
        to_hf_config=_moe_to_hf_config,
        from_hf_config=_moe_from_hf_config,
        to_hf=_moe_to_hf,
        from_hf=_moe_from_hf,
        past_context=_rotary_past_context,
        card_notes=_moe_card_notes,
    ),
}


def adapter_for(family: str) -> Adapter:
    try:
        return ADAPTERS[family]
    except KeyError:
        raise DepthgrowError(
            f"no Hugging Face export for model family {family!r} yet; families with one: {', '.join(ADAPTERS)}"
        ) from None


# --- conversion ---


def _to_hf_model(config: ModelConfig, state: StateDict, end_of_text: int | None) -> PreTrainedModel:
    """The ``transformers`` model of a depthgrow model's config and state dict, to save: it holds the same
    tensors (transposed or fused ones copied) rather than a second set of weights. Non-persistent buffers stay
    on the meta device (transformers 4.x's GPT-2 causal masks, the rotary frequencies of LLaMA and Glm4Moe),
    so it is fit for ``save_pretrained``, which writes parameters and persistent buffers only, but not for
    running. ``end_of_text``: the tokenizer's ``<|endoftext|>`` id, none where it has none."""
    adapter = adapter_for(config.family)
    transformers = _transformers()
    hf_config = adapter.to_hf_config(config, end_of_text)
    # built on the meta device and filled by assignment: no memory for a random init that is overwritten
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
    try:
        model.load_state_dict(adapter.to_hf(config, state), strict=True, assign=True)
    except RuntimeError as error:
        raise DepthgrowError(f"the weights do not match the {config.family} config: {_first_line(error)}") from None
    # assignment gives the head and the embedding separate parameters; tying makes them one again
    model.tie_weights()
    model.generation_config = transformers.GenerationConfig(
        **_special_tokens(end_of_text),
        # without max_new_tokens a generation stops where the text fills the context the model was trained on
        # (the pipeline's own default, 256 new tokens, would run past it); past it, see the card
        max_length=config.block_size,
    )
    return model


def export_checkpoint(source: str | Path, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Write the model of a depthgrow checkpoint (or of a run folder's ``checkpoint.pt``) to ``out_dir`` as
    a Hugging Face model folder: ``config.json``, ``generation_config.json``, ``model.safetensors``, the run's
    tokenizer (``tokenizer.json``, ``tokenizer_config.json``) and a ``README.md`` model card.
    ``transformers.AutoModelForCausalLM.from_pretrained(out_dir)`` loads it, and
    ``transformers.pipeline("text-generation", model=out_dir)`` generates text with it."""
    source, out_dir = Path(source), Path(out_dir)
    checkpoint_path = source / CHECKPOINT_NAME if source.is_dir() else source
    if out_dir.exists() and not out_dir.is_dir():
        raise DepthgrowError(f"{out_dir} is a file, not a folder to export into")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise DepthgrowError(f"{out_dir} is not empty; pass --overwrite to export into it anyway")
    checkpoint = load_checkpoint(checkpoint_path)
    checkpoint.pop("optimizer", None)  # often twice the model's size, and not exported
    run = RunConfig.from_dict(checkpoint["config"])
    # a run stopped before its expansion holds a shallower model than its config's target depth
    config = run.model.with_depth(checkpoint["train_state"]["depth"])
    adapter_for(config.family)  # first: a family without an export (an image model) has no tokenizer either
    # the tokenizer the checkpoint records having trained with, else the one its config means; built before
    # anything is written, so that one that cannot be made leaves no half-written folder
    kind = tokenizer_name(run, checkpoint.get("tokenizer"))
    tokenizer = _run_tokenizer(kind, run, checkpoint_path.parent)
    model = _to_hf_model(config, checkpoint["model"], tokenizer.eos_token_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    curve = _loss_curve(checkpoint_path.parent, out_dir / LOSS_CURVE_NAME, title=run.model_preset or config.family)
    card = _model_card(run, config, checkpoint, checkpoint_path, kind, tokenizer.eos_token_id, curve=curve)
    (out_dir / CARD_NAME).write_text(card)
    return out_dir


def _loss_curve(run_dir: Path, path: Path, *, title: str) -> bool:
    """The run's validation loss against step and FLOPs as an image, when the run's log and matplotlib (the
    plot extra) are there; whether it was written."""
    if not (run_dir / LOG_NAME).is_file():
        return False
    try:
        from depthgrow.plot import plot_compare
    except ImportError:
        return False
    records = read_log(run_dir / LOG_NAME)
    if not any(r["event"] == "eval" for r in records):
        return False
    plot_compare({run_dir.name: records}, path, title=f"{title}: validation loss")
    return True


# --- the tokenizer ---


def _run_tokenizer(kind: str, run: RunConfig, run_dir: Path) -> PreTrainedTokenizerFast:
    """The tokenizer that made the run's ids (``kind``: byte, gpt2 or bpe), as a Hugging Face fast tokenizer.
    Where the vocabulary has ``<|endoftext|>``, which ends every training document, it is the end-of-text, start
    and padding token; the byte vocabulary has no special token at all."""
    transformers = _transformers()
    if kind == "byte":
        tokenizer = _byte_tokenizer()
    elif kind == "gpt2":
        tokenizer = _gpt2_bpe_tokenizer(run.data.bpe_file)
    else:
        tokenizer = _trained_bpe_tokenizer(run_dir / TOKENIZER_NAME)
    has_end = tokenizer.token_to_id(END_OF_TEXT) is not None
    special = {role: END_OF_TEXT for role in ("bos_token", "eos_token", "pad_token")} if has_end else {}
    # no model_max_length (the context): transformers would warn past it of indexing errors, where the model runs
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, **special)


def _byte_tokenizer() -> Any:
    """The byte vocabulary as a ``tokenizers`` BPE without merges whose vocabulary is GPT-2's byte-level
    alphabet (a printable character for each byte), each character at its byte's id: the ids of a text are
    its UTF-8 bytes, and any ids decode (invalid UTF-8 as U+FFFD)."""
    import tokenizers  # a dependency of transformers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocabulary = {character: byte for byte, character in bytes_to_unicode().items()}
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocabulary, merges=[]))
    # no split into words: without merges, words would change no id
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    return tokenizer


def _gpt2_bpe_tokenizer(run_file: str | None) -> Any:
    """GPT-2's BPE as a ``tokenizers`` BPE, from the ranks of the tiktoken encoding the run used."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    path = _gpt2_bpe_file(run_file)
    encoding = gpt2_encoding(str(path))
    if encoding.n_vocab != VOCAB_SIZES["gpt2"]:
        raise DepthgrowError(
            f"{path} holds {encoding.n_vocab} tokens with <|endoftext|>, not GPT-2's {VOCAB_SIZES['gpt2']}: "
            "not GPT-2's gpt2.tiktoken"
        )
    # the merges follow from the ranks; the converter's loader is tiktoken's, which caches files by path, so it
    # is given the ranks depthgrow read (through the encoding's private fields, as transformers' own
    # convert_tiktoken_to_fast reads them)
    converter = TikTokenConverter(vocab_file=str(path), pattern=encoding._pat_str, extra_special_tokens=[END_OF_TEXT])
    converter.load_tiktoken_bpe = lambda _: encoding._mergeable_ranks
    return converter.converted()


def _gpt2_bpe_file(run_file: str | None) -> Path:
    """The gpt2.tiktoken to write the tokenizer from: the run's ``data.bpe_file`` where it is still a file
    (training took it before the environment variable too), else ``$DEPTHGROW_GPT2_BPE``."""
    from_env = os.environ.get(GPT2_BPE_ENV)
    for candidate in (run_file, from_env):
        if candidate and Path(candidate).expanduser().is_file():
            return Path(candidate).expanduser()
    tried = [f"the run's data.bpe_file {run_file}"] if run_file else []
    tried += [f"{GPT2_BPE_ENV}={from_env}"] if from_env else []
    found = f" ({' and '.join(tried)}: no such file)" if tried else ""
    raise DepthgrowError(
        f"the run's tokens are GPT-2's BPE, and the export writes its tokenizer from a gpt2.tiktoken file{found}: "
        f"set {GPT2_BPE_ENV} to one (the openai-whisper source package ships whisper/assets/gpt2.tiktoken)"
    )


def _trained_bpe_tokenizer(run_tokenizer: Path) -> Any:
    """The BPE vocabulary the run trained (its folder's copy)."""
    if not run_tokenizer.is_file():
        raise DepthgrowError(f"the run was trained with a BPE vocabulary, but {run_tokenizer} is missing")
    return load_bpe(run_tokenizer)


def import_pretrained(hf_dir: str | Path) -> tuple[ModelConfig, nn.Module]:
    """A saved Hugging Face model folder (an export, or a compatible model) as a depthgrow config and model,
    in the folder's dtype, ready to train or grow."""
    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise DepthgrowError(f"{hf_dir} is not a Hugging Face model folder: it has no config.json")
    transformers = _transformers()
    hf_config = transformers.AutoConfig.from_pretrained(hf_dir, local_files_only=True)
    adapter = next((a for a in ADAPTERS.values() if a.model_type == hf_config.model_type), None)
    if adapter is None:
        known = ", ".join(a.model_type for a in ADAPTERS.values())
        raise DepthgrowError(
            f"no depthgrow family for Hugging Face model type {hf_config.model_type!r}; known: {known}"
        )
    config = adapter.from_hf_config(hf_config)
    problems = config.problems()
    if problems:
        raise DepthgrowError(f"{hf_dir} is not a valid depthgrow {config.family} model: {'; '.join(problems)}")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, config=hf_config, local_files_only=True)
    state = adapter.from_hf(config, hf_model.state_dict())
    del hf_model
    _, model_class = FAMILIES[config.family]
    with torch.device("meta"):
        model = model_class(config)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as error:
        raise DepthgrowError(f"{hf_dir} does not match its config: {_first_line(error)}") from None
    # buffers outside the state dict (the MoE's expert-usage counts) are still on the meta device: they start
    # from zero, as in a freshly initialised block
    device = next(iter(state.values())).device
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.is_meta:
                setattr(module, name, torch.zeros_like(buffer, device=device))
    return config, model


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0]


# --- the model card ---

_TOKENIZER_NOTES = {
    "byte": (
        "Tokens are raw UTF-8 bytes: token id = byte value, a vocabulary of 256. This folder's tokenizer "
        "(`tokenizer.json`) gives exactly these ids, `list(text.encode('utf-8'))`, and decodes any ids (invalid "
        "UTF-8 as U+FFFD). The vocabulary has no end-of-text token, so a generation ends only at its length "
        "limit, and no padding token (any byte made one would be taken for padding wherever it occurs in a "
        "text), so the pipeline takes prompts one at a time, not in padded batches (`batch_size` above 1)."
    ),
    "gpt2": (
        "Tokens are GPT-2's BPE (tiktoken's `gpt2` encoding, 50257 tokens). This folder's tokenizer "
        "(`tokenizer.json`, written from the run's `gpt2.tiktoken`) gives tiktoken's ids."
    ),
    "bpe": (
        "Tokens are a byte-level BPE trained by depthgrow on the run's training text (its `tokenizer.json`), "
        "included here: `transformers.AutoTokenizer.from_pretrained` on this folder gives the ids the model was "
        "trained on."
    ),
}


def _model_card(
    run: RunConfig,
    config: ModelConfig,
    checkpoint: dict[str, Any],
    checkpoint_path: Path,
    tokenizer_kind: str,
    end_of_text: int | None,
    *,
    curve: bool,
) -> str:
    state = checkpoint["train_state"]
    plan = run.plan()
    name = run.model_preset or config.family
    lines = [
        "---",
        "library_name: transformers",
        "tags: [depthgrow]",
        "---",
        "",
        f"# {name}, exported by depthgrow",
        "",
        f"Exported by depthgrow from `{checkpoint_path}`: a {config.family} model "
        f"(preset `{run.model_preset or 'none'}`) at depth {config.n_layer}, {config.num_params():,} parameters, "
        f"after {state['step']} of {run.train.steps} training steps.",
    ]
    if plan.steps:
        depths = " -> ".join(map(str, plan.depths))
        steps = ", ".join(map(str, plan.steps))
        lines.append(f"Depth plan: {depths} layers, growing at step {steps} (init `{run.growth.init}`).")
    summary_path = checkpoint_path.parent / SUMMARY_NAME
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
    # summary.json is written when a run finishes; it speaks for this checkpoint only if the steps agree
    if summary is not None and summary.get("step") == state["step"] and summary.get("final_val_loss") is not None:
        lines.append(f"Final validation loss: {summary['final_val_loss']:.4f}.")
    else:
        lines.append("The run had not finished when exported: no final validation loss.")
    tokenizer = _TOKENIZER_NOTES[tokenizer_kind]
    if end_of_text is not None:
        tokenizer += (
            f" `{END_OF_TEXT}` (id {end_of_text}) ended every training document: it is the end-of-text token (a "
            "generation stops at it), and the start and padding token."
        )
    adapter = adapter_for(config.family)
    lines += [
        "",
        "## Use",
        "",
        '`"."` is this folder: run the code from inside it, or give the folder\'s path instead.',
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline",
        "",
        'model = AutoModelForCausalLM.from_pretrained(".")',
        'tokenizer = AutoTokenizer.from_pretrained(".")',
        "",
        'generate = pipeline("text-generation", model=".")',
        'print(generate("Once upon a time", do_sample=False)[0]["generated_text"])',
        "```",
        "",
        "## Tokenizer",
        "",
        tokenizer,
        "",
        "## Past the context",
        "",
        f"The model was trained on contexts of {config.block_size} tokens. Unless given `max_new_tokens`, a "
        f"generation stops where prompt and continuation fill that context (`max_length: {config.block_size}` in "
        "`generation_config.json`), and a prompt that fills it already is refused (transformers asks for "
        "`max_new_tokens`). Given `max_new_tokens`, it goes past the context.",
        adapter.past_context(config),
    ]
    if curve:
        lines += ["", "## Training", "", f"![validation loss against step and FLOPs]({LOSS_CURVE_NAME})"]
    notes = adapter.card_notes(config)
    if notes:
        lines += ["", "## Notes", "", *notes]
    lines.append("")
    return "\n".join(lines)
