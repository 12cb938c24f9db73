"""What every model family supplies, so that growth, FLOP accounting and the trainer never special-case one.

A family is one module of :mod:`depthgrow.models` that declares ``FAMILY = Family(...)``: its config dataclass
(a subclass of :class:`ModelConfig`), its model class (a subclass of :class:`GrowableModel`), its named presets
and, for language models, its Hugging Face :class:`~depthgrow.models.hf.Adapter`. The registry
(:data:`depthgrow.models.FAMILIES`) finds every such module by itself: adding a family is adding its file.
Growth only needs the block stacks (found by their parameter-name prefix), a way to make and initialise one
block as a fresh model of the current depth would, and the modules whose outputs are added to the residual
stream (zeroed by the function-preserving inits); the trainer only the hooks of :class:`GrowableModel`.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import nn

from depthgrow.docfield import doc_field
from depthgrow.seeding import derived_generator

if TYPE_CHECKING:
    from depthgrow.models.hf import Adapter

WeightInit = Literal["standard", "spectral"]


@dataclass(kw_only=True, frozen=True)
class ModelConfig:
    """Fields shared by every family. ``n_layer`` is the depth that growth changes: the number of blocks
    in each block stack."""

    family: ClassVar[str]
    task: ClassVar[str] = "lm"  # what the trainer feeds the model: "lm" token windows, "image" images
    unit: ClassVar[str] = "token"  # what FLOPs and throughput are counted per
    n_layer: int = doc_field(doc="the depth: blocks in each block stack (a growing run's target depth)")
    # spectral by default: the better of the two in `depthgrow experiment recipe` (see spectral_std)
    weight_init: WeightInit = doc_field(
        "spectral",
        "spectral: muP-style, every weight matrix with spectral norm about sqrt(fan_out / fan_in) (the paper's "
        "condition); standard: the family's usual init (GPT-2's N(0, init_std²), He's for ResNets)",
    )

    def with_depth(self, depth: int) -> ModelConfig:
        return dataclasses.replace(self, n_layer=depth)

    def units_per_example(self) -> int:
        """Units (tokens, images) in one example of a batch: the context length for a language model."""
        raise NotImplementedError

    def num_params(self, *, embeddings: bool = True) -> int:
        raise NotImplementedError

    def num_active_params(self) -> int:
        """Parameters used for each token: all of them, but for mixtures of experts."""
        return self.num_params()

    def flops_per_unit(self, *, count_embeddings: bool = False, count_attention: bool = True) -> float:
        """Training FLOPs per unit (see each family's derivation); a language model's is per token."""
        return self.flops_per_token(count_embeddings=count_embeddings, count_attention=count_attention)

    def flops_per_token(self, *, count_embeddings: bool = False, count_attention: bool = True) -> float:
        raise NotImplementedError

    def problems(self) -> list[str]:
        """Everything wrong with this config, as short sentences (empty when it is valid)."""
        return [] if self.n_layer >= 0 else [f"model.n_layer must be >= 0, got {self.n_layer}"]

    def matrix_std(self, fan_out: int, fan_in: int, standard: float) -> float:
        """The std of a fan_out x fan_in weight matrix: ``standard`` under the family's usual init, or
        :func:`spectral_std` under ``weight_init="spectral"``."""
        return spectral_std(fan_out, fan_in) if self.weight_init == "spectral" else standard


class GrowableModel(nn.Module):
    """The base of every family's model: what growth and the trainer call. A family overrides the methods
    that raise, and the hooks whose defaults (a dense model's) do not fit it."""

    config: ModelConfig

    def block_stacks(self) -> dict[str, nn.ModuleList]:
        """The stacks whose length is the depth, keyed by their parameter-name prefix."""
        raise NotImplementedError

    def make_block(self, stack: str) -> nn.Module:
        """A new, uninitialised block for ``stack``, on the model's device and dtype."""
        raise NotImplementedError

    def init_block(self, stack: str, index: int, block: nn.Module, seed: int) -> None:
        """Initialise ``block`` as slot ``index`` of ``stack`` in a fresh model of depth ``config.n_layer``
        would be, drawing from a generator derived from (seed, stack, index) only."""
        raise NotImplementedError

    def residual_projections(self, block: nn.Module) -> list[nn.Module]:
        """The modules whose outputs the block adds to the residual stream."""
        raise NotImplementedError

    def init_weights(self, seed: int) -> None:
        """Set every parameter and buffer: the model is built on the meta device and allocated with
        ``to_empty``, so nothing holds a meaningful value before this."""
        raise NotImplementedError

    # --- hooks: a dense model's defaults ---

    def auxiliary_loss(self) -> torch.Tensor | None:
        """A loss the last training forward adds to the task's (a router's load-balancing loss), or None.
        The trainer backpropagates the sum and logs the task's loss alone, comparable across families."""
        return None

    def before_optimizer_step(self) -> None:
        """Apply what the training forwards since the last step decided beside the gradients (an MoE's
        balancing bias); ``build_optimizer`` calls it from an optimizer pre-step hook, so that only a training
        step changes the model. Nothing for the dense families."""

    def eval_metrics(self) -> dict[str, Any]:
        """Fields an evaluation record adds about the training since the last evaluation (an MoE's expert
        usage), after which their counts start again. Nothing for the dense families."""
        return {}


@dataclass(frozen=True)
class Family:
    """One model family, declared as ``FAMILY`` in its module of :mod:`depthgrow.models`."""

    config: type[ModelConfig]
    model: type[GrowableModel]
    presets: dict[str, ModelConfig]  # named configs of this family (``model.preset``)
    hf: Adapter | None = None  # the Hugging Face export; None: the family has none (an image model)

    @property
    def name(self) -> str:
        return self.config.family


# --- helpers every family's init uses, so that all families draw the same way ---


def spectral_std(fan_out: int, fan_in: int) -> float:
    """The std that gives a fan_out x fan_in Gaussian matrix a spectral norm of about sqrt(fan_out / fan_in).

    This is the spectral condition for feature learning (Yang, Simon and Bernstein, arXiv 2310.17813) that
    the paper's muP-style init asks for: a matrix W with ||W||_2 ~ sqrt(fan_out / fan_in) maps an input of
    RMS 1 to an output of RMS about 1, at any width. A Gaussian matrix with i.i.d. N(0, s²) entries has its
    largest singular value at about s·(sqrt(fan_out) + sqrt(fan_in)) (Gordon; Bai-Yin at large sizes), so

        s = sqrt(fan_out / fan_in) / (sqrt(fan_out) + sqrt(fan_in)).

    For a square d x d matrix that is 1 / (2·sqrt(d)); for fan_out >> fan_in, about 1 / sqrt(fan_in). A conv
    kernel (out, in, kh, kw) counts as the (out, in·kh·kw) matrix it applies.

    Embeddings and the LM head (every family): the token embedding is a V x d matrix that a tied head applies
    as the map from d features to V logits, so it takes that map's std, spectral_std(V, d), about
    1 / sqrt(d): initial logits of RMS about 1 whatever the width (GPT-2's 0.02 gives 0.02·sqrt(d)), rows of
    norm about 1. An untied head and an untied input embedding take the same std (the embedding's scale only
    sets the residual stream's initial size: every block and the final norm start with a normalisation),
    and GPT-2's position embedding the token embedding's, so that both add at one scale. torch's Muon steps
    these V x d matrices by the same rule (lr·sqrt(V / d) on an orthogonalised update).
    """
    return math.sqrt(fan_out / fan_in) / (math.sqrt(fan_out) + math.sqrt(fan_in))


EMBEDDING_STREAM = 0
BLOCK_STREAM = 1


def block_generator(seed: int, stack: str, index: int) -> torch.Generator:
    """The generator of slot ``index`` of ``stack``: a function of (seed, stack, index) only, so that a
    block grown into a slot is drawn exactly as the same slot of a fresh model of the target depth."""
    return derived_generator(seed, BLOCK_STREAM, zlib.crc32(stack.encode()), index)


def normal_(tensor: torch.Tensor, std: float, generator: torch.Generator) -> None:
    """Fill ``tensor`` with N(0, std²) drawn on the CPU, so every device gets the same numbers."""
    tensor.copy_(torch.randn(tensor.shape, generator=generator, dtype=torch.float32) * std)


@torch.no_grad()
def init_block_weights(
    block: nn.Module,
    *,
    config: ModelConfig,
    residual: list[nn.Module],
    std: float,
    generator: torch.Generator,
    norms: tuple[type[nn.Module], ...],
) -> None:
    """Linear weights N(0, s²) with s = ``config.matrix_std(out, in, std)``, the ``residual`` projections'
    scaled by 1/sqrt(2·n_layer) (the 2·L residual branches then add up to O(1)), biases 0, and the gains of
    ``norms`` modules 1 (their biases 0), in module order."""
    residual_ids = {id(module) for module in residual}
    depth_scale = 1.0 / math.sqrt(2 * config.n_layer)
    for module in block.modules():
        if isinstance(module, nn.Linear):
            scale = depth_scale if id(module) in residual_ids else 1.0
            normal_(module.weight, scale * config.matrix_std(*module.weight.shape, std), generator)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, norms):
            module.weight.fill_(1.0)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()


def materialize(factory: Callable[[], nn.Module], like: torch.Tensor) -> nn.Module:
    """Build a module on the meta device (no memory and no random draws for values an init overwrites),
    then allocate it on ``like``'s device and dtype."""
    with torch.device("meta"):
        module = factory()
    return module.to_empty(device=like.device).to(dtype=like.dtype)
