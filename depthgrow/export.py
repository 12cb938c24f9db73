"""Hugging Face export: a depthgrow checkpoint as a ``transformers`` model folder (safetensors), and back.

Each model family maps onto one ``transformers`` architecture through an :class:`Adapter` in
:data:`ADAPTERS`, keyed by the depthgrow family: the config mapping both ways and the state-dict mapping
both ways. GPT-2 maps onto ``GPT2LMHeadModel``; another family (LLaMA onto ``LlamaForCausalLM``, an MoE
onto its ``transformers`` counterpart) is one more entry.

``transformers`` and ``safetensors`` are the optional ``export`` extra: depthgrow imports without them,
and only the functions here that need them import them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from depthgrow.checkpoint import CHECKPOINT_NAME, load_checkpoint
from depthgrow.config import RunConfig
from depthgrow.errors import DepthgrowError
from depthgrow.models import FAMILIES, GPT2Config, ModelConfig
from depthgrow.train import SUMMARY_NAME

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

StateDict = dict[str, torch.Tensor]

MISSING_EXTRA = "export needs transformers and safetensors: pip install 'depthgrow[export]'"
CARD_NAME = "README.md"


def _transformers() -> ModuleType:
    try:
        import safetensors  # noqa: F401 - save_pretrained writes safetensors through it
        import transformers
    except ImportError:
        raise DepthgrowError(MISSING_EXTRA) from None
    return transformers


@dataclass(frozen=True)
class Adapter:
    """How one depthgrow family maps onto one ``transformers`` architecture."""

    model_type: str  # transformers' config.model_type: finds the adapter of a saved folder on import
    to_hf_config: Callable[[ModelConfig], PretrainedConfig]
    from_hf_config: Callable[[PretrainedConfig], ModelConfig]
    to_hf: Callable[[StateDict], StateDict]
    from_hf: Callable[[StateDict], StateDict]
    # sentences for the model card about where the export differs in form from the depthgrow model
    card_notes: Callable[[ModelConfig], list[str]] = field(default=lambda config: [])


# --- GPT-2 -> GPT2LMHeadModel ---

# HF GPT-2 keeps these four projections as Conv1D, whose weight is stored (in, out): nn.Linear's transposed
_GPT2_CONV1D = re.compile(r"transformer\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight")
_GPT2_EMBEDDINGS = ("transformer.wte.weight", "transformer.wpe.weight")
_GPT2_HEAD = "lm_head.weight"
_GPT2_END_OF_TEXT = 50256  # <|endoftext|> in GPT-2's BPE vocabulary
_GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")  # both the tanh-approximated GELU depthgrow uses
_LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which depthgrow's GPT-2 uses


def _gpt2_to_hf_config(config: GPT2Config) -> PretrainedConfig:
    # <|endoftext|> exists only in GPT-2's BPE vocabulary; in the byte vocabulary there is no such token
    end_of_text = _GPT2_END_OF_TEXT if config.vocab_size > _GPT2_END_OF_TEXT else None
    return _transformers().GPT2Config(
        vocab_size=config.vocab_size,
        n_positions=config.block_size,
        n_ctx=config.block_size,  # transformers no longer reads it; older GPT-2 tooling takes the context from it
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
        bos_token_id=end_of_text,
        eos_token_id=end_of_text,
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
    if problems:
        raise DepthgrowError("this GPT-2 differs from depthgrow's: " + "; ".join(problems))
    return GPT2Config(
        n_layer=hf.n_layer,
        n_embd=hf.n_embd,
        n_head=hf.n_head,
        block_size=hf.n_positions,
        vocab_size=hf.vocab_size,
        bias=True,  # HF's GPT-2 always has biases, and after an export of bias=False they may have trained
        dropout=hf.resid_pdrop,
        init_std=hf.initializer_range,
    )


def _gpt2_to_hf(state: StateDict) -> StateDict:
    hf = {}
    for name, tensor in state.items():
        hf[name] = tensor.t().contiguous() if _GPT2_CONV1D.fullmatch(name) else tensor
        bias = name.removesuffix("weight") + "bias"
        if name.endswith(".weight") and name not in _GPT2_EMBEDDINGS and bias not in state:
            # a bias=False model: HF's GPT-2 has no switch for biases, and a zero bias adds nothing, so the
            # export computes exactly the function of the depthgrow model (the card says so)
            hf[bias] = tensor.new_zeros(tensor.shape[0])
    hf[_GPT2_HEAD] = state["transformer.wte.weight"]  # tied: HF lists the head under its own name too
    return hf


def _gpt2_from_hf(hf: StateDict) -> StateDict:
    # the head is the token embedding (from_hf_config refuses an untied one); depthgrow keeps it once
    return {
        name: tensor.t().contiguous() if _GPT2_CONV1D.fullmatch(name) else tensor
        for name, tensor in hf.items()
        if name != _GPT2_HEAD
    }


def _gpt2_card_notes(config: GPT2Config) -> list[str]:
    if config.bias:
        return []
    return [
        "The depthgrow model was trained without biases (`model.bias = false`). Hugging Face's GPT-2 always "
        "has them, so every bias in this export is zero and the model computes exactly what the depthgrow "
        "model did."
    ]


ADAPTERS: dict[str, Adapter] = {
    GPT2Config.family: Adapter(
        model_type="gpt2",
        to_hf_config=_gpt2_to_hf_config,
        from_hf_config=_gpt2_from_hf_config,
        to_hf=_gpt2_to_hf,
        from_hf=_gpt2_from_hf,
        card_notes=_gpt2_card_notes,
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


def _to_hf_model(config: ModelConfig, state: StateDict) -> PreTrainedModel:
    """The ``transformers`` model of a depthgrow model's config and state dict, to save: it holds the same
    tensors (transposed ones copied) rather than a second set of weights. Buffers stay on the meta device
    (transformers 4.x's GPT-2 has non-persistent causal-mask buffers; 5.x none), so it is fit for
    ``save_pretrained``, which writes parameters only, but not for running."""
    adapter = adapter_for(config.family)
    transformers = _transformers()
    hf_config = adapter.to_hf_config(config)
    # built on the meta device and filled by assignment: no memory for a random init that is overwritten
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
    try:
        model.load_state_dict(adapter.to_hf(state), strict=True, assign=True)
    except RuntimeError as error:
        raise DepthgrowError(f"the weights do not match the {config.family} config: {_first_line(error)}") from None
    # assignment gives the head and the embedding separate parameters; tying makes them one again
    model.tie_weights()
    return model


def export_checkpoint(source: str | Path, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Write the model of a depthgrow checkpoint (or of a run folder's ``checkpoint.pt``) to ``out_dir`` as
    a Hugging Face model folder: ``config.json``, ``model.safetensors`` and a ``README.md`` model card.
    ``transformers.AutoModelForCausalLM.from_pretrained(out_dir)`` loads it."""
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
    model = _to_hf_model(config, checkpoint["model"])
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    card = _model_card(run, config, checkpoint, checkpoint_path, out_dir)
    (out_dir / CARD_NAME).write_text(card)
    return out_dir


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
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, config=hf_config, local_files_only=True)
    state = adapter.from_hf(hf_model.state_dict())
    del hf_model
    _, model_class = FAMILIES[config.family]
    with torch.device("meta"):
        model = model_class(config)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as error:
        raise DepthgrowError(f"{hf_dir} does not match its config: {_first_line(error)}") from None
    return config, model


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0]


# --- the model card ---

_TOKENIZER_NOTES = {
    "byte": (
        "Tokens are raw UTF-8 bytes: token id = byte value, a vocabulary of 256. There is no Hugging Face "
        "tokenizer for this; encode with `list(text.encode('utf-8'))` and decode with "
        "`bytes(ids).decode('utf-8', errors='replace')`."
    ),
    "gpt2": (
        "Tokens are GPT-2's BPE (tiktoken's `gpt2` encoding, 50257 tokens). No tokenizer files are included; "
        "`transformers.AutoTokenizer.from_pretrained('openai-community/gpt2')` gives the same ids."
    ),
}


def _model_card(
    run: RunConfig, config: ModelConfig, checkpoint: dict[str, Any], checkpoint_path: Path, out_dir: Path
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
    lines += ["", "## Tokenizer", "", _TOKENIZER_NOTES[run.data.tokenizer]]
    notes = adapter_for(config.family).card_notes(config)
    if notes:
        lines += ["", "## Notes", "", *notes]
    lines += [
        "",
        "## Loading",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{out_dir}")',
        "```",
        "",
    ]
    return "\n".join(lines)
