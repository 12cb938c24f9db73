"""What every family's Hugging Face mapping shares: the :class:`Adapter` a family declares beside its model
(see :class:`depthgrow.models.base.Family`), and the helpers its mapping functions use.

``transformers`` and ``safetensors`` are the optional ``export`` extra: nothing here imports them until a
mapping function asks for them through :func:`transformers_module`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING

import torch

from depthgrow.errors import DepthgrowError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from depthgrow.models.base import ModelConfig

StateDict = dict[str, torch.Tensor]

MISSING_EXTRA = "export needs transformers and safetensors: pip install 'depthgrow[export]'"
HEAD = "lm_head.weight"  # the LM head in every depthgrow language model and in the transformers classes they map onto


def transformers_module() -> ModuleType:
    try:
        import safetensors  # noqa: F401 - save_pretrained writes safetensors through it
        import transformers
    except ImportError:
        raise DepthgrowError(MISSING_EXTRA) from None
    return transformers


def transformers_5() -> ModuleType:
    transformers = transformers_module()
    # transformers 4 reads the rotary base from rope_theta and would silently ignore rope_parameters (a model
    # with the wrong positions), and it keeps MoE experts unfused
    if int(transformers.__version__.split(".")[0]) < 5:
        raise DepthgrowError(
            f"this export needs transformers >= 5, found {transformers.__version__}: pip install -U transformers"
        )
    return transformers


def special_tokens(end_of_text: int | None) -> dict[str, int | None]:
    """The special-token fields of every HF config: the token that ends (and so separates) the training
    documents ends a generation, starts one from an empty prompt, and pads (masked out). Set at construction,
    None included: HF's defaults are ids of other vocabularies (GPT-2's 50256, LLaMA-1's 1 and 2)."""
    return dict(bos_token_id=end_of_text, eos_token_id=end_of_text, pad_token_id=end_of_text)


def refuse(name: str, problems: list[str]) -> None:
    if problems:
        raise DepthgrowError(f"this {name} differs from depthgrow's: " + "; ".join(problems))


def with_tied_head(state: StateDict, embedding: str) -> StateDict:
    # HF's state dict lists a tied head under its own name too, as the same tensor as the embedding
    return {**state, HEAD: state[embedding]}


def without_head(hf: StateDict) -> StateDict:
    return {name: tensor for name, tensor in hf.items() if name != HEAD}


@dataclass(frozen=True)
class Adapter:
    """How one depthgrow family maps onto one ``transformers`` architecture."""

    model_type: str  # transformers' config.model_type: finds the adapter of a saved folder on import
    # with the tokenizer's end-of-text id (None where it has none), which it names through special_tokens
    to_hf_config: Callable[[ModelConfig, int | None], PretrainedConfig]
    from_hf_config: Callable[[PretrainedConfig], ModelConfig]
    # the state-dict mappings, given the depthgrow config (of the exported model; of the import)
    to_hf: Callable[[ModelConfig, StateDict], StateDict]
    from_hf: Callable[[ModelConfig, StateDict], StateDict]
    # the model card's sentences on generating past the context the model was trained on
    past_context: Callable[[ModelConfig], str]
    # sentences for the model card about where the export differs in form from the depthgrow model
    card_notes: Callable[[ModelConfig], list[str]] = field(default=lambda config: [])
