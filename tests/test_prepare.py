"""Token shards: `depthgrow prepare` (text and Hugging Face datasets), the shard reader and its checks."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_data import write_ranks

from depthgrow import data as data_module
from depthgrow.checkpoint import load_checkpoint
from depthgrow.cli import main
from depthgrow.data import (
    SHARD_HEADER_BYTES,
    Batches,
    DataConfig,
    ShardedTokens,
    load_data,
    read_shard,
    write_shard,
)
from depthgrow.errors import DepthgrowError
from depthgrow.prepare import hf_documents, prepare, text_documents

TINY_TRAIN = [
    "--model", "gpt2-test", "--train.steps=5", "--train.batch_size=2", "--train.eval_every=5",
    "--train.eval_batches=1",
]  # fmt: skip


def corpus(folder: Path, documents: dict[str, str]) -> Path:
    folder.mkdir(exist_ok=True)
    for name, text in documents.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


def prepare_folder(folder: Path, out: Path, **options):
    documents, total = text_documents([folder])
    return prepare(documents, out, total=total, **options)


def as_bytes(tokens) -> bytes:
    return bytes(np.asarray(tokens).astype(np.uint8))  # shards hold uint16 tokens, bytes too


def shard_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ------------------------------------------------------------------------------------ text round trip


def test_prepared_shards_hold_exactly_the_tokens_of_the_text(tmp_path):
    text = corpus(tmp_path / "text", {"a.txt": "a" * 90 + "A" * 10, "b.txt": "b" * 45 + "B" * 5})
    summary = prepare_folder(text, tmp_path / "out", shard_tokens=40)
    data = load_data(DataConfig(path=str(tmp_path / "out")))
    # the tail of every document held out, as --data splits text: the same tokens as the text itself
    assert as_bytes(data.train) == b"a" * 90 + b"b" * 45
    assert as_bytes(data.val) == b"A" * 10 + b"B" * 5
    direct = load_data(DataConfig(path=str(text)))
    assert np.array_equal(np.asarray(data.train), direct.train) and np.array_equal(np.asarray(data.val), direct.val)
    assert data.vocab_size == 256
    assert (summary.documents, summary.tokens) == (2, {"train": 135, "val": 15})


def test_val_and_train_shards_are_named_and_sized(tmp_path):
    text = corpus(tmp_path / "text", {"a.txt": "x" * 1000})
    summary = prepare_folder(text, tmp_path / "out", shard_tokens=400, prefix="corpus")
    # 900 training tokens in shards of 400, 400, 100; validation numbered from 0, training from 1
    names = ["corpus_train_000001.bin", "corpus_train_000002.bin", "corpus_train_000003.bin", "corpus_val_000000.bin"]
    assert shard_names(tmp_path / "out") == [*names, "prepared.json"]
    assert [len(read_shard(f)) for f in summary.shards["train"]] == [400, 400, 100]
    assert [len(read_shard(f)) for f in summary.shards["val"]] == [100]
    assert read_shard(summary.shards["val"][0]).dtype == np.dtype("<u2")  # bytes too: uint16 shards


def test_prepared_gpt2_shards_end_every_document_with_end_of_text(tmp_path, monkeypatch):
    pytest.importorskip("tiktoken")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken-cache"))
    ranks = write_ranks(tmp_path / "tiny.tiktoken")  # 260 ranks: "the" is 258, "he" 257; <|endoftext|> is 260
    text = corpus(tmp_path / "text", {"1.txt": "the the the the", "2.txt": "hehe"})
    prepare_folder(text, tmp_path / "out", tokenizer="gpt2", bpe_file=str(ranks), val_fraction=0.5)
    data = load_data(DataConfig(path=str(tmp_path / "out"), tokenizer="gpt2"))
    direct = load_data(DataConfig(path=str(text), tokenizer="gpt2", bpe_file=str(ranks), val_fraction=0.5))
    assert list(np.asarray(data.train)) == [258, 32, 258, 32, 260, 257, 260] == list(direct.train)
    assert list(np.asarray(data.val)) == [258, 32, 258, 260, 257, 260] == list(direct.val)
    assert data.vocab_size == 50257


def test_prepared_with_the_real_gpt2_bpe(tmp_path, real_gpt2_bpe):
    prepare(["Hello world", "Hello"], tmp_path / "out", tokenizer="gpt2", val_fraction=0.5)
    data = load_data(DataConfig(path=str(tmp_path / "out"), tokenizer="gpt2"))
    # Hello | world, and none of "Hello" in train (round(0.5) = 0); <|endoftext|> after every part
    assert list(np.asarray(data.train)) == [15496, 50256, 50256]
    assert list(np.asarray(data.val)) == [995, 50256, 15496, 50256]


# ------------------------------------------------------------------------------------- output folder


def test_refuses_a_non_empty_output_folder_without_overwrite(tmp_path):
    text = corpus(tmp_path / "text", {"a.txt": "x" * 1000})
    prepare_folder(text, tmp_path / "out", shard_tokens=100)  # 9 training shards
    with pytest.raises(DepthgrowError, match="not empty; pass --overwrite"):
        prepare_folder(text, tmp_path / "out")
    (tmp_path / "out" / "notes.txt").write_text("mine")
    prepare_folder(text, tmp_path / "out", overwrite=True)  # one training shard now: the 9 old ones are gone
    kept = ["data_train_000001.bin", "data_val_000000.bin", "notes.txt", "prepared.json"]
    assert shard_names(tmp_path / "out") == kept
    assert len(load_data(DataConfig(path=str(tmp_path / "out"))).train) == 900


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"val_fraction": 1.0}, "--val-fraction must be in (0, 1)"),
        ({"shard_tokens": 0}, "--shard-tokens must be in [1, 2147483647]"),
        ({"shard_tokens": 2**31}, "--shard-tokens must be in [1, 2147483647]"),
        ({"prefix": "web_val_2"}, "--prefix must be a plain file name"),
        ({"prefix": "a/b"}, "--prefix must be a plain file name"),
        ({"tokenizer": "char"}, "tokenizer must be one of byte, gpt2"),
    ],
    ids=["val fraction", "no shard tokens", "int32 overflow", "prefix with _val_", "prefix with /", "tokenizer"],
)
def test_bad_options_fail_before_writing(tmp_path, options, message):
    with pytest.raises(DepthgrowError) as caught:
        prepare(["some text"], tmp_path / "out", **options)
    assert message in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_empty_splits_are_refused(tmp_path):
    with pytest.raises(DepthgrowError, match="no validation tokens"):
        prepare(["four", "byte"], tmp_path / "out")  # 90 % of 4 bytes rounds to 4
    with pytest.raises(DepthgrowError, match="hold no text"):
        prepare(["", ""], tmp_path / "empty")


# ---------------------------------------------------------------------------------------- shard reader


def shard_folder(folder: Path, train: list[list[int]], val: list[list[int]]) -> Path:
    folder.mkdir(exist_ok=True)
    for split, shards, first in (("train", train, 1), ("val", val, 0)):
        for index, tokens in enumerate(shards, start=first):
            write_shard(folder / f"web_{split}_{index:06d}.bin", np.asarray(tokens))
    return folder


def test_sharded_tokens_slices_cross_shard_boundaries():
    tokens = ShardedTokens([np.arange(0, 5), np.arange(5, 5), np.arange(5, 12), np.arange(12, 20)])
    assert len(tokens) == 20 and tokens.max() == 19
    for start, stop in [(0, 20), (3, 14), (4, 5), (5, 12), (11, 13), (19, 20), (7, 7)]:
        assert list(tokens[start:stop]) == list(range(start, stop)), (start, stop)
    assert list(tokens[15:]) == list(range(15, 20)) and list(tokens[:3]) == [0, 1, 2]
    assert list(np.asarray(tokens)) == list(range(20))


def test_batches_read_windows_across_shards(tmp_path):
    # consecutive ids in shards of 7 tokens: every window of 16 crosses a boundary, and must still count up
    train = np.arange(200)
    folder = shard_folder(tmp_path / "shards", np.array_split(train, range(7, 200, 7)), [np.arange(100, 150)])
    data = load_data(DataConfig(path=str(folder)))
    assert len(data.train) == 200 and len(data.train.shards) == 29
    batches = Batches(data, block_size=16, batch_size=8, eval_batches=2, seed=0)
    for x, y in [batches.train_batch(step) for step in range(5)] + batches.val_batches():
        assert torch.equal(y - x, torch.ones_like(x))
        assert torch.equal(x - x[:, :1], torch.arange(16).expand(8, 16))


def test_train_bin_folders_still_load_as_nanogpt_bins(tmp_path):
    folder = shard_folder(tmp_path / "both", [[1, 2, 3]], [[4, 5]])
    np.arange(10, dtype=np.uint16).tofile(folder / "train.bin")
    np.arange(5, dtype=np.uint16).tofile(folder / "val.bin")
    assert "nanoGPT bins" in load_data(DataConfig(path=str(folder))).source


def corrupt(file: Path, *, ints: dict[int, int] | None = None, size: int | None = None) -> None:
    raw = bytearray(file.read_bytes())
    for index, value in (ints or {}).items():
        raw[4 * index : 4 * index + 4] = np.int32(value).tobytes()
    file.write_bytes(bytes(raw[:size]))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"ints": {0: 12345}}, "starts with magic number 12345, expected 20240520"),
        ({"ints": {1: 7}}, "has version 7; only version 1 is supported"),
        ({"ints": {2: 11}}, "its header counts 11 tokens (22 bytes) but 20 bytes follow the header"),
        ({"ints": {2: -1}}, "its header counts -1 tokens"),
        ({"size": SHARD_HEADER_BYTES + 13}, "its header counts 10 tokens (20 bytes) but 13 bytes follow the header"),
        ({"size": 100}, "has 100 bytes, fewer than its 1024-byte header"),
    ],
    ids=["magic", "version", "count", "negative count", "truncated tokens", "truncated header"],
)
def test_bad_shard_headers_are_named(tmp_path, change, message):
    folder = shard_folder(tmp_path / "shards", [list(range(20)), list(range(10))], [list(range(10))])
    corrupt(folder / "web_train_000002.bin", **change)
    with pytest.raises(DepthgrowError) as caught:
        load_data(DataConfig(path=str(folder)))
    assert message in str(caught.value) and "web_train_000002.bin" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_split_without_shards_is_named(tmp_path):
    folder = shard_folder(tmp_path / "shards", [[1, 2, 3]], [])
    with pytest.raises(DepthgrowError, match=r"has train shards but no val shards \(\*_val_\*\.bin\)"):
        load_data(DataConfig(path=str(folder)))
    for file in folder.iterdir():
        file.rename(file.with_name(file.name.replace("train", "val")))
    with pytest.raises(DepthgrowError, match="has val shards but no train shards"):
        load_data(DataConfig(path=str(folder)))
    write_shard(folder / "web_train_000001.bin", np.zeros(0))
    with pytest.raises(DepthgrowError, match="the train shards in .* hold no tokens"):
        load_data(DataConfig(path=str(folder)))


def test_vocab_check_scans_all_of_val_and_the_head_of_train(tmp_path, monkeypatch):
    monkeypatch.setattr(data_module, "_VOCAB_CHECK_TOKENS", 8)  # as if 8 tokens were gigabytes
    folder = shard_folder(tmp_path / "shards", [[1] * 5, [2, 3, 4], [4] * 5, [999]], [[1], [2, 3], [400]])
    with pytest.raises(DepthgrowError) as caught:  # in the last val shard
        load_data(DataConfig(path=str(folder)))
    assert "token ids up to 400" in str(caught.value) and "--data.tokenizer=gpt2" in str(caught.value)
    write_shard(folder / "web_val_000002.bin", np.array([5]))
    # the 999 beyond the head of train is not scanned, by design: a full scan of a large corpus takes minutes
    assert load_data(DataConfig(path=str(folder))).train.max() == 999
    write_shard(folder / "web_train_000002.bin", np.array([2, 300, 3]))
    with pytest.raises(DepthgrowError, match="token ids up to 300"):  # in the head, across the first boundary
        load_data(DataConfig(path=str(folder)))


# ---------------------------------------------------------------------------------- Hugging Face datasets


@pytest.fixture
def hf_datasets(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    # offline, with the cache inside the test's folder
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    return datasets


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_hf_local_jsonl_round_trip(tmp_path, hf_datasets):
    rows = [{"id": 1, "text": "x" * 90 + "y" * 10}, {"id": 2, "text": "z" * 20}]
    file = jsonl(tmp_path / "docs.jsonl", rows)
    for name, files in ((str(file), ()), ("json", [str(file)])):  # a data file, or a builder and its files
        documents, total = hf_documents(name, data_files=files)
        assert total == 2
        prepare(documents, tmp_path / "out", overwrite=True)
        data = load_data(DataConfig(path=str(tmp_path / "out")))
        assert as_bytes(data.train) == b"x" * 90 + b"z" * 18
        assert as_bytes(data.val) == b"y" * 10 + b"z" * 2


def test_hf_errors_are_one_line(tmp_path, hf_datasets):
    file = jsonl(tmp_path / "docs.jsonl", [{"body": "some text"}])
    with pytest.raises(DepthgrowError, match=r"has no column 'text' \(its columns: body\); pass --hf-text-field"):
        hf_documents(str(file))
    with pytest.raises(DepthgrowError) as caught:
        hf_documents("json", data_files=[str(tmp_path / "missing.jsonl")])
    assert "cannot load Hugging Face dataset json" in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(DepthgrowError, match="split validation"):
        hf_documents(str(file), split="validation", text_field="body")
    documents, _ = hf_documents(str(jsonl(tmp_path / "nulls.jsonl", [{"text": "a"}, {"text": None}])))
    with pytest.raises(DepthgrowError, match="row 1 of the dataset has a NoneType 'text', not text"):
        list(documents)


def test_hf_without_datasets_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DepthgrowError, match=r"pip install 'depthgrow\[hf\]'"):
        hf_documents("json")


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_prepare_then_train_on_the_shards(tmp_path, capsys):
    text = corpus(tmp_path / "text", {f"{i}.txt": f"play {i}: to be or not to be, " * 40 for i in range(3)})
    out = tmp_path / "shards"
    assert main(["prepare", str(text), "--out", str(out), "--shard-tokens", "1000", "--prefix", "plays"]) == 0
    printed = capsys.readouterr()
    # 1120 bytes a play: 1008 train, 112 val
    summary = f"prepared 3 documents (byte tokens): 3,024 train tokens in 4 shards, 336 val tokens in 1 shard, in {out}"
    assert printed.out.splitlines()[0] == summary
    assert f"depthgrow train --data {out} (it records its tokenizer)" in printed.out
    assert printed.err.count("wrote ") == len(list(out.glob("*.bin")))  # a line per shard
    assert json.loads((out / "prepared.json").read_text()) == {
        "tokenizer": "byte", "vocab_size": 256, "documents": 3, "train": 3024, "val": 336
    }  # fmt: skip
    run = tmp_path / "run"
    assert main(["train", *TINY_TRAIN, "--data", str(out), "--out", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == 5 and summary["tokens"] == 5 * 2 * 32


def test_cli_prepare_gpt2_then_train_on_the_shards(tmp_path, capsys, monkeypatch):
    pytest.importorskip("tiktoken")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken-cache"))
    ranks = write_ranks(tmp_path / "tiny.tiktoken")
    text = corpus(tmp_path / "text", {f"{i}.txt": "the other theme, " * 100 for i in range(2)})
    out = tmp_path / "shards"
    assert main(["prepare", str(text), "--out", str(out), "--tokenizer", "gpt2", "--bpe-file", str(ranks)]) == 0
    assert f"depthgrow train --data {out} (it records its tokenizer)" in capsys.readouterr().out
    # the shards hold GPT-2 ids: the model needs GPT-2's vocabulary, not the byte presets' 256; the folder
    # says which tokenizer made them, so --data.tokenizer is not needed
    args = [*TINY_TRAIN, "--data", str(out), "--model.vocab_size=50304"]  # padded: auto alone would say bpe
    assert main(["train", *args, "--out", str(tmp_path / "run")]) == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["step"] == 5
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["tokenizer"] == "gpt2"
    capsys.readouterr()
    assert main(["train", *args, "--data.tokenizer=byte", "--out", str(tmp_path / "byte")]) == 2
    err = capsys.readouterr().err
    assert f"data {out} was prepared with the gpt2 tokenizer, but data.tokenizer is byte" in err
    assert err.count("\n") == 1 and not (tmp_path / "byte").exists()


def test_cli_prepare_from_a_hf_data_file(tmp_path, capsys, hf_datasets):
    file = jsonl(tmp_path / "docs.jsonl", [{"content": "to be or not to be " * 20}] * 3)
    args = ["prepare", "--hf-dataset", "json", "--hf-data-files", str(file), "--hf-text-field", "content"]
    assert main([*args, "--out", str(tmp_path / "out"), "--val-fraction", "0.5"]) == 0
    assert "prepared 3 documents" in capsys.readouterr().out
    assert len(load_data(DataConfig(path=str(tmp_path / "out"))).val) == 3 * 190


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--out", "OUT"], "prepare takes text files or folders, or --hf-dataset NAME"),
        (["TEXT", "--hf-dataset", "json", "--out", "OUT"], "prepare takes text files or folders, or --hf-dataset"),
        (["TEXT/missing.txt", "--out", "OUT"], "missing.txt does not exist"),
        (["TEXT", "--out", "OUT", "--data.tokenizer=gpt2"], "prepare takes no config options, got --data.tokenizer"),
        (["TEXT", "--out", "OUT", "--val-fraction", "0"], "--val-fraction must be in (0, 1), got 0.0"),
        (["TEXT", "--out", "TEXT"], "is not empty; pass --overwrite"),
    ],
    ids=["no source", "two sources", "missing file", "config option", "val fraction", "overwrite"],
)
def test_cli_prepare_mistakes_get_one_line_and_status_2(tmp_path, capsys, args, message):
    text = corpus(tmp_path / "text", {"a.txt": "some text " * 10})
    args = [arg.replace("TEXT", str(text)).replace("OUT", str(tmp_path / "out")) for arg in args]
    assert main(["prepare", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("depthgrow: error: ") and err.count("\n") == 1, err
    assert message in err
