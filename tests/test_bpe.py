"""The subword vocabulary: a byte-level BPE trained on the training split, cached, and the same one used by
a run, its resume and its export."""

import json

import numpy as np
import pytest
import tokenizers

import depthgrow.bpe
from depthgrow import load_config, train
from depthgrow.bpe import END_OF_TEXT, TOKENIZER_NAME, cached_bpe, train_bpe
from depthgrow.data import DataConfig, load_data
from depthgrow.errors import DepthgrowError

TEXTS = [
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer " * 20,
    "Now is the winter of our discontent made glorious summer by this sun of York. " * 20,
]


def test_training_is_deterministic_and_puts_end_of_text_last():
    first, second = train_bpe(TEXTS, 300), train_bpe(TEXTS, 300)
    assert first.to_str() == second.to_str()
    assert first.get_vocab_size() == 300
    assert first.token_to_id(END_OF_TEXT) == 299
    # the 256 byte symbols come first, then merges: frequent words become single tokens
    assert len(first.encode(TEXTS[0]).ids) < len(TEXTS[0].encode()) / 2


def test_any_text_round_trips_even_characters_never_seen():
    tokenizer = train_bpe(TEXTS, 300)
    for text in ("To be, or not", "Ünïcödé ✓ 日本語 and\ttabs\n\nnewlines", ""):
        assert tokenizer.decode(tokenizer.encode(text).ids) == text


def test_a_vocabulary_no_larger_than_the_bytes_is_refused():
    with pytest.raises(DepthgrowError, match="more than 257 tokens"):
        train_bpe(TEXTS, 257)


def test_the_cache_trains_once_and_survives_a_damaged_file(monkeypatch):
    tokenizer, path = cached_bpe(TEXTS, 320)
    assert path.is_file()

    def refuse(texts, vocab_size):
        raise AssertionError("trained again instead of reading the cache")

    monkeypatch.setattr(depthgrow.bpe, "train_bpe", refuse)
    again, same_path = cached_bpe(TEXTS, 320)
    assert same_path == path and again.to_str() == tokenizer.to_str()
    monkeypatch.undo()
    path.write_text("{ not json")  # a write killed half-way
    repaired, _ = cached_bpe(TEXTS, 320)
    assert repaired.to_str() == tokenizer.to_str()
    assert cached_bpe(TEXTS, 330)[1] != path  # another size is another vocabulary


def write_corpus(folder):
    folder.mkdir()
    for index, text in enumerate(TEXTS):
        (folder / f"doc{index}.txt").write_text(text)
    return folder


def test_data_is_split_by_characters_and_the_vocabulary_learns_the_training_part_only(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    data = load_data(DataConfig(path=str(corpus), tokenizer="bpe", val_fraction=0.2), vocab_size=300)
    assert data.tokenizer == "bpe" and data.vocab_size == 300 and data.train.dtype == np.uint16
    assert int((data.train == 299).sum()) == 2 and int((data.val == 299).sum()) == 2  # one per document
    tokenizer = tokenizers.Tokenizer.from_str(data.bpe_json)
    decoded = tokenizer.decode([int(t) for t in data.val if t != 299])
    assert decoded == "".join(text[round(len(text) * 0.8) :] for text in TEXTS)
    # other held-out text leaves the vocabulary as it was: it is trained on the training split alone
    (corpus / "doc0.txt").write_text(TEXTS[0][: round(len(TEXTS[0]) * 0.8)] + "x" * (len(TEXTS[0]) // 5))
    changed = load_data(DataConfig(path=str(corpus), tokenizer="bpe", val_fraction=0.2), vocab_size=300)
    assert changed.bpe_json == data.bpe_json


def test_auto_picks_the_tokenizer_from_the_models_vocabulary():
    assert DataConfig().tokenizer_for(256) == "byte"
    assert DataConfig().tokenizer_for(50257) == "gpt2"
    assert DataConfig().tokenizer_for(2048) == "bpe"
    assert DataConfig(tokenizer="byte").tokenizer_for(2048) == "byte"
    # resolved where the data is loaded: a config derived with another vocabulary gets its own tokenizer
    config = load_config(None, {"model.preset": "gpt2-test"})
    assert config.data.tokenizer == "auto" and config.data.tokenizer_for(config.model.vocab_size) == "byte"
    bigger = config.with_overrides({"model.vocab_size": "300"})
    assert bigger.data.tokenizer_for(bigger.model.vocab_size) == "bpe"


def test_a_run_keeps_its_vocabulary_resumes_with_it_and_exports_it(tmp_path, monkeypatch):
    corpus = write_corpus(tmp_path / "corpus")
    overrides = {
        "model.preset": "gpt2-test", "model.vocab_size": "300", "data.path": str(corpus), "train.steps": "12",
        "train.batch_size": "4", "train.eval_every": "6", "train.eval_batches": "2", "growth.source_depth": "0",
        "growth.at": "6", "train.out_dir": str(tmp_path / "run"),
    }  # fmt: skip
    config = load_config(None, overrides)
    uninterrupted = train(load_config(None, {**overrides, "train.out_dir": str(tmp_path / "whole")}))
    run_vocabulary = (tmp_path / "whole" / TOKENIZER_NAME).read_text()
    assert json.loads(run_vocabulary)["model"]["type"] == "BPE"
    train(config, stop_at=8)
    assert (tmp_path / "run" / TOKENIZER_NAME).read_text() == run_vocabulary

    def refuse(*args, **kwargs):
        raise AssertionError("the resumed run built a vocabulary instead of reading its own")

    monkeypatch.setattr(depthgrow.bpe, "cached_bpe", refuse)
    resumed = train(config, resume=True)
    assert resumed.final_val_loss == uninterrupted.final_val_loss

    transformers = pytest.importorskip("transformers")
    from depthgrow.export import export_checkpoint

    export_checkpoint(tmp_path / "run", tmp_path / "hf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    own = tokenizers.Tokenizer.from_str(run_vocabulary)
    text = "Now is the winter of our discontent"
    assert tokenizer(text)["input_ids"] == own.encode(text).ids
    assert tokenizer.eos_token == END_OF_TEXT and tokenizer.decode(own.encode(text).ids) == text
