"""Hugging Face export: a depthgrow checkpoint as a ``transformers`` model folder (safetensors), and back.

Each model family maps onto one ``transformers`` architecture through the :class:`~depthgrow.models.hf.Adapter`
it declares beside its model (``FAMILY.hf``): the config mapping both ways and the state-dict mapping both
ways. This module holds what is common to every family: building the ``transformers`` model, writing the
folder with the run's tokenizer, whatever its vocabulary (bytes, GPT-2's BPE, a trained BPE), naming its
end-of-text token in the model's generation settings (so a folder works with
``transformers.pipeline("text-generation", model=folder)`` as it is), the model card, and the import.

``transformers`` and ``safetensors`` are the optional ``export`` extra: depthgrow imports without them,
and only the functions here that need them import them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from depthgrow.bpe import END_OF_TEXT, TOKENIZER_NAME, load_bpe
from depthgrow.checkpoint import CHECKPOINT_NAME, model_checkpoint
from depthgrow.config import RunConfig
from depthgrow.data import GPT2_BPE_ENV, VOCAB_SIZES, gpt2_encoding
from depthgrow.errors import DepthgrowError
from depthgrow.metrics import LOG_NAME, read_log
from depthgrow.models import FAMILIES, ModelConfig
from depthgrow.models.hf import Adapter, StateDict, special_tokens, transformers_module
from depthgrow.sampling import tokenizer_name
from depthgrow.trainer import SUMMARY_NAME

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

CARD_NAME = "README.md"
LOSS_CURVE_NAME = "loss.png"  # the run's validation loss, shown by the card


def _adapters() -> dict[str, Adapter]:
    """The Hugging Face adapter of every family that has one, by family name."""
    return {name: family.hf for name, family in FAMILIES.items() if family.hf is not None}


def adapter_for(family: str) -> Adapter:
    adapters = _adapters()
    try:
        return adapters[family]
    except KeyError:
        raise DepthgrowError(
            f"no Hugging Face export for model family {family!r} yet; families with one: {', '.join(adapters)}"
        ) from None


# --- conversion ---


def _to_hf_model(config: ModelConfig, state: StateDict, end_of_text: int | None) -> PreTrainedModel:
    """The ``transformers`` model of a depthgrow model's config and state dict, to save: it holds the same
    tensors (transposed or fused ones copied) rather than a second set of weights. Non-persistent buffers stay
    on the meta device (transformers 4.x's GPT-2 causal masks, the rotary frequencies of LLaMA and Glm4Moe),
    so it is fit for ``save_pretrained``, which writes parameters and persistent buffers only, but not for
    running. ``end_of_text``: the tokenizer's ``<|endoftext|>`` id, none where it has none."""
    adapter = adapter_for(config.family)
    transformers = transformers_module()
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
        **special_tokens(end_of_text),
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
    checkpoint = model_checkpoint(checkpoint_path)
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
    transformers = transformers_module()
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
    transformers = transformers_module()
    hf_config = transformers.AutoConfig.from_pretrained(hf_dir, local_files_only=True)
    adapter = next((a for a in _adapters().values() if a.model_type == hf_config.model_type), None)
    if adapter is None:
        known = ", ".join(a.model_type for a in _adapters().values())
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
    model_class = FAMILIES[config.family].model
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
