"""Text from a trained run: :func:`load_run` gives its model, config and tokenizer; :func:`generate`
samples a continuation token by token (greedy at temperature 0), cropping the context to the model's
``block_size`` as it goes, so any run of a language-model family, at any depth, generates any length.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from depthgrow.bpe import END_OF_TEXT, TOKENIZER_NAME, load_bpe
from depthgrow.checkpoint import CHECKPOINT_NAME, model_checkpoint
from depthgrow.config import RunConfig
from depthgrow.data import gpt2_encoding
from depthgrow.errors import DepthgrowError
from depthgrow.models import ModelConfig, build_model


@dataclass(frozen=True)
class Tokenizer:
    """The run's tokenizer: ``name`` (byte, gpt2 or bpe), text <-> ids, and the end-of-text id if the
    vocabulary has one (bytes have none)."""

    name: str
    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    vocab_size: int
    end_of_text: int | None


@dataclass
class LoadedRun:
    model: nn.Module  # in eval mode, at the checkpoint's depth
    config: RunConfig  # the run's config (its model section at the target depth)
    model_config: ModelConfig  # the model as it is in the checkpoint
    tokenizer: Tokenizer
    step: int  # training steps done


def load_run(path: str | Path, *, device: str | torch.device = "cpu") -> LoadedRun:
    """The model of a run folder (or of a checkpoint file), with its config and tokenizer."""
    path = Path(path)
    checkpoint_path = path / CHECKPOINT_NAME if path.is_dir() else path
    if not path.exists():
        raise DepthgrowError(f"no run at {path}")
    checkpoint = model_checkpoint(checkpoint_path)
    config = RunConfig.from_dict(checkpoint["config"])
    state = checkpoint["train_state"]
    model_config = config.model.with_depth(state["depth"])
    model = build_model(model_config, seed=config.train.seed, device=device)
    model.load_state_dict(checkpoint["model"])
    model.eval()
    tokenizer = run_tokenizer(config, checkpoint_path.parent, checkpoint.get("tokenizer"))
    return LoadedRun(model, config, model_config, tokenizer, state["step"])


def run_tokenizer(config: RunConfig, run_dir: Path, recorded: str | None = None) -> Tokenizer:
    """The tokenizer a run trained with: the one its checkpoint records, else the one its config means."""
    if config.model.task != "lm":
        raise DepthgrowError(f"{run_dir} holds an image model ({config.model.family}): it has no tokenizer")
    name = tokenizer_name(config, recorded)
    if name == "byte":
        return Tokenizer("byte", lambda text: list(text.encode("utf-8")), _decode_bytes, 256, None)
    if name == "gpt2":
        encoding = gpt2_encoding(config.data.bpe_file)
        return Tokenizer(
            "gpt2",
            lambda text: encoding.encode(text, allowed_special={END_OF_TEXT}),
            lambda ids: encoding.decode(ids, errors="replace"),
            encoding.n_vocab,
            encoding.eot_token,
        )
    bpe = load_bpe(run_dir / TOKENIZER_NAME if (run_dir / TOKENIZER_NAME).is_file() else config.data.bpe_file or "")
    return Tokenizer(
        "bpe",
        lambda text: bpe.encode(text).ids,
        lambda ids: bpe.decode(ids, skip_special_tokens=False),
        bpe.get_vocab_size(),
        bpe.token_to_id(END_OF_TEXT),
    )


def tokenizer_name(config: RunConfig, recorded: str | None) -> str:
    """byte, gpt2 or bpe: what the checkpoint records having trained with, else what the config means
    (checkpoints written before they recorded it)."""
    return recorded or config.data.tokenizer_for(config.model.vocab_size)


def _decode_bytes(ids: list[int]) -> str:
    return bytes(ids).decode("utf-8", errors="replace")


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt: list[int],
    *,
    max_new_tokens: int,
    block_size: int,
    vocab_size: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int = 0,
    stop: int | None = None,
) -> Iterator[int]:
    """The next tokens after ``prompt``, one at a time: greedy at ``temperature`` 0, else sampled from the
    softmax at that temperature over the ``top_k`` most likely (all if None), with a generator seeded by
    ``seed``. Only the first ``vocab_size`` logits count (a model's vocabulary may be padded beyond its
    tokenizer's); the model sees at most the last ``block_size`` tokens; ``stop`` (end of text) ends the
    stream, unyielded."""
    if not prompt:
        raise DepthgrowError("the prompt must hold at least one token")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    tokens = torch.tensor([prompt], device=device)
    for _ in range(max_new_tokens):
        logits = model(tokens[:, -block_size:])[0, -1, :vocab_size].float()
        if temperature == 0.0:
            token = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k is not None and top_k < vocab_size:
                kth = torch.topk(logits, top_k).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            token = int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator))
        if token == stop:
            return
        yield token
        tokens = torch.cat([tokens, torch.tensor([[token]], device=device)], dim=1)


def stream_text(decode: Callable[[list[int]], str], tokens: Iterator[int]) -> Iterator[str]:
    """The text of ``tokens`` in pieces as they come; a character split across tokens (a multi-byte one)
    is held back until it is whole."""
    ids: list[int] = []
    shown = 0
    for token in tokens:
        ids.append(token)
        text = decode(ids)
        ready = len(text.rstrip("\ufffd"))
        if ready > shown:
            yield text[shown:ready]
            shown = ready
    text = decode(ids)
    if len(text) > shown:
        yield text[shown:]
