"""``depthgrow prepare``: text files, folders or a Hugging Face dataset, tokenised into token shards.

The shards are modded-nanogpt's (a 256 x int32 header, then uint16 tokens), named
``{prefix}_val_000000.bin``, ``{prefix}_val_000001.bin``, ... and ``{prefix}_train_000001.bin``, ...
(each split numbered on its own, validation from 0 and training from 1 as modded-nanogpt names FineWeb's),
and ``--data FOLDER`` trains on them. Every document is tokenised as ``--data`` tokenises text (UTF-8
bytes, or GPT-2 BPE followed by ``<|endoftext|>``) and split as ``--data`` splits it: the last
``val_fraction`` of each document is held out. So a folder of text trains on exactly the same tokens
whether it is read directly or prepared first, and a corpus of any size streams through one document
at a time: memory holds at most one shard per split.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from depthgrow.data import (
    PREPARED_NAME,
    SHARD_PATTERNS,
    SHARD_TOKEN_DTYPE,
    VOCAB_SIZES,
    DataConfig,
    read_text,
    split_document,
    text_encoder,
    text_files,
    write_shard,
)
from depthgrow.errors import DepthgrowError

DEFAULT_SHARD_TOKENS = 100_000_000  # modded-nanogpt's FineWeb shards: 200 MB each
MAX_SHARD_TOKENS = 2**31 - 1  # the header counts tokens in an int32
DEFAULT_PREFIX = "data"
FIRST_SHARD = {"val": 0, "train": 1}
# local data files a Hugging Face builder reads, by suffix: --hf-dataset corpus.jsonl needs no builder name
HF_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


@dataclass
class PrepareSummary:
    out_dir: Path
    tokenizer: str
    documents: int = 0
    tokens: dict[str, int] = field(default_factory=lambda: {"train": 0, "val": 0})
    shards: dict[str, list[Path]] = field(default_factory=lambda: {"train": [], "val": []})

    def lines(self) -> list[str]:
        counts = ", ".join(
            f"{self.tokens[split]:,} {split} tokens in {len(self.shards[split])} shard"
            + ("s" * (len(self.shards[split]) != 1))
            for split in ("train", "val")
        )
        return [
            f"prepared {self.documents:,} documents ({self.tokenizer} tokens): {counts}, in {self.out_dir}",
            f"train on them with: depthgrow train --data {self.out_dir} (it records its tokenizer)",
        ]


class _ShardWriter:
    """One split's tokens, written as shards of ``shard_tokens`` tokens (the last one shorter) as they come."""

    def __init__(self, stem: Path, first_index: int, shard_tokens: int) -> None:
        self.stem = stem
        self.index = first_index
        self.shard_tokens = shard_tokens
        self.files: list[Path] = []
        self.tokens = 0
        self._parts: list[np.ndarray] = []  # tokens not yet written, fewer than shard_tokens but for the last part
        self._pending = 0

    def add(self, tokens: np.ndarray) -> None:
        self._parts.append(tokens)
        self._pending += len(tokens)
        if self._pending < self.shard_tokens:
            return
        # concatenated once, so a document longer than many shards is not copied once per shard
        pending = np.concatenate(self._parts)
        full = len(pending) - len(pending) % self.shard_tokens
        for start in range(0, full, self.shard_tokens):
            self._write(pending[start : start + self.shard_tokens])
        self._parts = [pending[full:].copy()]  # a copy: a view would keep the whole block alive
        self._pending = len(self._parts[0])

    def close(self) -> None:
        if self._pending:
            self._write(np.concatenate(self._parts))
        self._parts, self._pending = [], 0

    def _write(self, tokens: np.ndarray) -> None:
        file = self.stem.with_name(f"{self.stem.name}_{self.index:06d}.bin")
        write_shard(file, tokens)
        tqdm.write(f"wrote {file} ({len(tokens):,} tokens)", file=sys.stderr)  # above the bar, if there is one
        self.files.append(file)
        self.tokens += len(tokens)
        self.index += 1


def prepare(
    documents: Iterable[str],
    out_dir: str | Path,
    *,
    tokenizer: str = "byte",
    bpe_file: str | None = None,
    val_fraction: float = 0.1,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    prefix: str = DEFAULT_PREFIX,
    overwrite: bool = False,
    total: int | None = None,
) -> PrepareSummary:
    """Tokenise ``documents`` into training and validation shards in ``out_dir``; ``total`` (the number of
    documents, if known) sizes the progress bar."""
    _check_options(tokenizer, val_fraction, shard_tokens, prefix)
    # the tokenizer is loaded before the output folder is touched, so a wrong BPE file deletes nothing
    encode, separator, vocab_size = text_encoder(DataConfig(tokenizer=tokenizer, bpe_file=bpe_file))
    if vocab_size > np.iinfo(SHARD_TOKEN_DTYPE).max + 1:
        raise DepthgrowError(f"the BPE file {bpe_file} has {vocab_size} tokens, too many for uint16 token shards")
    out = Path(out_dir).expanduser()
    _make_out_dir(out, overwrite)
    summary = PrepareSummary(out_dir=out, tokenizer=tokenizer)
    # a bar on a terminal only; elsewhere (logs, CI) the line each shard writes is the progress
    bar = tqdm(documents, total=total, desc="tokenising", unit="doc", file=sys.stderr, disable=not sys.stderr.isatty())
    writers = {
        split: _ShardWriter(out / f"{prefix}_{split}", first, shard_tokens) for split, first in FIRST_SHARD.items()
    }
    with bar:
        for text in bar:
            train, val = split_document(encode(text), val_fraction)
            writers["train"].add(np.concatenate([train, separator]))
            writers["val"].add(np.concatenate([val, separator]))
            summary.documents += 1
    for split, writer in writers.items():
        writer.close()
        summary.tokens[split], summary.shards[split] = writer.tokens, writer.files
    _check_splits(summary, val_fraction)
    # the shards' own record of their tokenizer: --data on this folder picks it up (and refuses another)
    record = {"tokenizer": tokenizer, "vocab_size": vocab_size, "documents": summary.documents, **summary.tokens}
    (out / PREPARED_NAME).write_text(json.dumps(record, indent=2) + "\n")
    return summary


def _check_options(tokenizer: str, val_fraction: float, shard_tokens: int, prefix: str) -> None:
    if tokenizer not in VOCAB_SIZES:
        raise DepthgrowError(f"tokenizer must be one of {', '.join(VOCAB_SIZES)}, got {tokenizer!r}")
    if not 0.0 < val_fraction < 1.0:  # also false for NaN
        raise DepthgrowError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    if not 1 <= shard_tokens <= MAX_SHARD_TOKENS:
        raise DepthgrowError(f"--shard-tokens must be in [1, {MAX_SHARD_TOKENS}] (an int32 count), got {shard_tokens}")
    # the loader tells the splits apart by _train_ and _val_ in the name: a prefix holding one would lie
    if not re.fullmatch(r"[\w.-]+", prefix) or any(f"_{split}_" in f"{prefix}_" for split in SHARD_PATTERNS):
        raise DepthgrowError(f"--prefix must be a plain file name without _train_ or _val_, got {prefix!r}")


def _make_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise DepthgrowError(f"output folder {out} is a file")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise DepthgrowError(f"output folder {out} is not empty; pass --overwrite to replace the shards in it")
        # only shards go: stale ones of a larger earlier run would otherwise join the new splits
        for pattern in SHARD_PATTERNS.values():
            for file in out.glob(pattern):
                file.unlink()
        (out / PREPARED_NAME).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def _check_splits(summary: PrepareSummary, val_fraction: float) -> None:
    if summary.tokens["train"] == 0:
        raise DepthgrowError(f"the {summary.documents} documents hold no text")
    if summary.tokens["val"] == 0:  # bytes only: with GPT-2 every document puts <|endoftext|> in val
        raise DepthgrowError(
            f"no validation tokens: the last {val_fraction} of every document rounds to nothing; "
            "raise --val-fraction or use longer documents"
        )


def text_documents(sources: Sequence[str | Path]) -> tuple[Iterator[str], int]:
    """The documents of text files and folders of text files (one per file, read as ``--data`` reads
    them), lazily, and their number."""
    files: list[Path] = []
    for source in map(Path, sources):
        source = source.expanduser()
        if not source.exists():
            raise DepthgrowError(f"data path {source} does not exist")
        files += text_files(source) if source.is_dir() else [source]
    return (read_text(file) for file in files), len(files)


def hf_documents(
    name: str,
    *,
    config_name: str | None = None,
    split: str = "train",
    data_files: Sequence[str] = (),
    text_field: str = "text",
) -> tuple[Iterator[str], int]:
    """The documents of one column of a Hugging Face dataset: a Hub name, a local dataset folder, a builder
    (``json``, ``parquet``, ``csv``, ``text``) with ``data_files``, or one local data file; and their number.
    Local files need no network (set ``HF_DATASETS_OFFLINE=1`` to be sure nothing is fetched)."""
    try:
        import datasets
    except ImportError:
        raise DepthgrowError("--hf-dataset needs the datasets package: pip install 'depthgrow[hf]'") from None
    files = list(data_files)
    suffix = Path(name).suffix.lower()
    if Path(name).is_file() and suffix in HF_FILE_BUILDERS:
        name, files = HF_FILE_BUILDERS[suffix], [name, *files]
    try:
        dataset = datasets.load_dataset(name, config_name, split=split, data_files=files or None)
    except Exception as error:  # the loader raises a dozen kinds (missing file, no network, unknown split...)
        message = " ".join(str(error).split()) or type(error).__name__  # one line, as every error here is
        raise DepthgrowError(f"cannot load Hugging Face dataset {name} (split {split}): {message}") from None
    if text_field not in dataset.column_names:
        raise DepthgrowError(
            f"Hugging Face dataset {name} has no column {text_field!r} (its columns: "
            f"{', '.join(dataset.column_names)}); pass --hf-text-field"
        )
    return _column(dataset.select_columns([text_field]), text_field), len(dataset)


def _column(dataset, text_field: str) -> Iterator[str]:
    row = 0
    for batch in dataset.iter(batch_size=1000):  # in batches: row by row would build a dict per row
        for text in batch[text_field]:
            if not isinstance(text, str):
                raise DepthgrowError(f"row {row} of the dataset has a {type(text).__name__} {text_field!r}, not text")
            row += 1
            yield text
