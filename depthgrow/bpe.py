"""A subword vocabulary for any text: byte-level BPE trained on the training split, cached, recorded per run.

GPT-2 124M's 50,257-token vocabulary makes its embedding a third of the model, and a zero-layer GPT-2 an
embedding that needs many tokens to learn; a byte vocabulary (256) makes it a bigram table learnt in a few
hundred steps. To study the paper's regime on any corpus, ``data.tokenizer = "bpe"`` trains a byte-level
BPE (GPT-2's pre-tokenisation and byte alphabet, so every text round-trips) of ``model.vocab_size``
tokens on the *training* split only, with Hugging Face's ``tokenizers`` (made for this; deterministic for
a given input). The last id is ``<|endoftext|>``, put after every document.

Training takes seconds but is done once per (text, vocabulary size, library version): the result is cached
as ``<cache>/bpe/<sha256>.json`` (``$DEPTHGROW_CACHE``, else ``$XDG_CACHE_HOME/depthgrow``, else
``~/.cache/depthgrow``: the embedded corpus lives inside an installed package, where nothing may be
written). Each run copies the file it trained with into its folder as ``tokenizer.json``, and resuming,
exporting and generating read that copy, so a run never changes tokenizer under a cache change.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from depthgrow.errors import DepthgrowError

END_OF_TEXT = "<|endoftext|>"
TOKENIZER_NAME = "tokenizer.json"  # the run folder's copy
CACHE_ENV = "DEPTHGROW_CACHE"
# raised whenever the way a vocabulary is trained changes, so that no stale cached file is reused
RECIPE_VERSION = 1
BYTE_ALPHABET = 256


def _tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError:
        raise DepthgrowError("data.tokenizer=bpe needs the tokenizers package: pip install tokenizers") from None
    return tokenizers


def cache_root() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "depthgrow"


def vocabulary_key(texts: Sequence[str], vocab_size: int) -> str:
    """What a trained vocabulary depends on: the training texts in order, the size, the library and recipe."""
    digest = hashlib.sha256(f"bpe v{RECIPE_VERSION} {_tokenizers().__version__} {vocab_size}\n".encode())
    for text in texts:
        encoded = text.encode("utf-8")
        digest.update(len(encoded).to_bytes(8, "little"))
        digest.update(encoded)
    return digest.hexdigest()


def train_bpe(texts: Sequence[str], vocab_size: int) -> Any:
    """A byte-level BPE ``tokenizers.Tokenizer`` of at most ``vocab_size`` tokens (fewer when the text has
    fewer pairs to merge): the 256 byte symbols, the merges by frequency, and ``<|endoftext|>`` last."""
    if vocab_size <= BYTE_ALPHABET + 1:
        raise DepthgrowError(
            f"a BPE vocabulary needs more than {BYTE_ALPHABET + 1} tokens (the bytes and <|endoftext|>), got "
            f"model.vocab_size={vocab_size}; use data.tokenizer=byte for a byte vocabulary"
        )
    tk = _tokenizers()
    tokenizer = tk.Tokenizer(tk.models.BPE())
    tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size - 1,
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    # added after training, so that it takes the last id rather than id 0 among the bytes
    tokenizer.add_special_tokens([END_OF_TEXT])
    return tokenizer


def cached_bpe(texts: Sequence[str], vocab_size: int) -> tuple[Any, Path]:
    """The BPE vocabulary of ``texts``, from the cache or trained now (and cached); with its file."""
    tk = _tokenizers()
    path = cache_root() / "bpe" / f"{vocabulary_key(texts, vocab_size)}.json"
    if path.is_file():
        try:
            return tk.Tokenizer.from_file(str(path)), path
        except Exception:  # a damaged cache file (a killed write): train again below
            pass
    tokenizer = train_bpe(texts, vocab_size)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".tmp{os.getpid()}")
        temporary.write_text(tokenizer.to_str())
        temporary.replace(path)  # atomic: a concurrent reader sees the whole file or none
    except OSError as error:
        raise DepthgrowError(
            f"cannot write the BPE cache {path.parent}: {error.strerror}; set {CACHE_ENV} to a writable folder"
        ) from None
    return tokenizer, path


def load_bpe(path: str | Path) -> Any:
    """A ``tokenizers`` JSON file (a run's ``tokenizer.json``, or one given as ``data.bpe_file``)."""
    tk = _tokenizers()
    path = Path(path)
    if not path.is_file():
        raise DepthgrowError(f"BPE tokenizer file {path} does not exist")
    try:
        return tk.Tokenizer.from_file(str(path))
    except Exception as error:  # tokenizers raises a bare Exception for a malformed file
        raise DepthgrowError(f"BPE tokenizer file {path} is not a tokenizers JSON file: {error}") from None


def end_of_text_id(tokenizer: Any) -> int:
    token = tokenizer.token_to_id(END_OF_TEXT)
    if token is None:
        raise DepthgrowError(f"the BPE tokenizer has no {END_OF_TEXT} token to end documents with")
    return token
