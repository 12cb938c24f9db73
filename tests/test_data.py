"""Token data: the embedded corpus, text files and folders, nanoGPT bins, GPT-2 BPE, and batches."""

import base64

import numpy as np
import pytest
import torch

from depthgrow.data import GPT2_BPE_ENV, Batches, DataConfig, TokenData, embedded_corpus_files, load_data
from depthgrow.errors import DepthgrowError

# ------------------------------------------------------------------------------------ embedded corpus


def test_embedded_corpus_files():
    files = embedded_corpus_files()
    assert len(files) >= 30
    assert all(f.suffix == ".md" and f.is_file() for f in files)
    assert files == sorted(files)


def test_embedded_corpus_loads_with_ten_percent_val():
    data = load_data(DataConfig())
    assert data.train.dtype == np.uint8
    assert data.val.dtype == np.uint8
    assert data.vocab_size == 256
    total = len(data.train) + len(data.val)
    assert total > 1_000_000  # 38 plays of Shakespeare
    assert abs(len(data.val) / total - 0.1) < 0.01
    again = load_data(DataConfig())
    assert np.array_equal(data.train, again.train)
    assert np.array_equal(data.val, again.val)


def test_embedded_corpus_is_utf8_of_the_plays():
    files = embedded_corpus_files()
    data = load_data(DataConfig())
    # byte tokens, no separator: train + val together hold exactly the bytes of every play
    assert len(data.train) + len(data.val) == sum(len(f.read_text(encoding="utf-8").encode()) for f in files)
    first = files[0].read_text(encoding="utf-8").encode()
    assert bytes(data.train[:100]) == first[:100]


# -------------------------------------------------------------------------------------------- batches


def arange_data(n_train=5000, n_val=1000):
    # distinct values, so a window's start can be read off its first token
    return TokenData(
        train=np.arange(n_train, dtype=np.int64),
        val=np.arange(10_000, 10_000 + n_val, dtype=np.int64),
        vocab_size=20_000,
        source="arange",
    )


def make_batches(data=None, *, block_size=16, batch_size=4, eval_batches=3, seed=0):
    return Batches(
        data or arange_data(), block_size=block_size, batch_size=batch_size, eval_batches=eval_batches, seed=seed
    )


def test_train_batch_shapes_and_dtype():
    x, y = make_batches(block_size=16, batch_size=4).train_batch(0)
    assert x.shape == (4, 16)
    assert y.shape == (4, 16)
    assert x.dtype == torch.int64 and y.dtype == torch.int64


def test_train_batch_is_contiguous_window_and_targets_shift_by_one():
    x, y = make_batches().train_batch(3)
    assert torch.equal(y[:, :-1], x[:, 1:])
    for row_x, row_y in zip(x, y, strict=True):
        start = int(row_x[0])
        assert torch.equal(row_x, torch.arange(start, start + 16))
        assert torch.equal(row_y, torch.arange(start + 1, start + 17))
        assert 0 <= start and start + 16 < 5000  # the target window stays inside the split


def test_train_batch_on_real_text_targets_shift():
    data = load_data(DataConfig())
    batches = Batches(data, block_size=64, batch_size=8, eval_batches=2, seed=1)
    x, y = batches.train_batch(5)
    assert x.shape == (8, 64)
    assert torch.equal(y[:, :-1], x[:, 1:])
    assert int(x.max()) < 256


def test_train_batch_is_a_function_of_seed_and_step():
    a = make_batches(seed=0)
    b = make_batches(seed=0)
    xa, ya = a.train_batch(7)
    xb, yb = b.train_batch(7)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # asking in another order gives the same batch
    b.train_batch(100)
    assert torch.equal(b.train_batch(7)[0], xa)


def test_train_batch_differs_by_step_and_seed():
    a = make_batches(seed=0)
    assert not torch.equal(a.train_batch(0)[0], a.train_batch(1)[0])
    assert not torch.equal(a.train_batch(0)[0], make_batches(seed=1).train_batch(0)[0])


def test_val_batches_fixed_and_spread_over_the_split():
    data = arange_data(n_val=1000)
    a = make_batches(data, block_size=16, batch_size=4, eval_batches=3).val_batches()
    b = make_batches(arange_data(n_val=1000), block_size=16, batch_size=4, eval_batches=3, seed=99).val_batches()
    assert len(a) == 3
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert xa.shape == (4, 16) and ya.shape == (4, 16)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert torch.equal(ya[:, :-1], xa[:, 1:])
    # windows spread evenly: the first starts at the split's first token, the last ends at its last token
    assert int(a[0][0][0, 0]) == 10_000
    assert int(a[-1][1][-1, -1]) == 10_000 + 999
    starts = [int(x[i, 0]) for x, _ in a for i in range(4)]
    assert starts == sorted(starts)
    assert len(set(starts)) == 12


def test_val_batches_count_follows_eval_batches():
    batches = make_batches(block_size=8, batch_size=2, eval_batches=5)
    val = batches.val_batches()
    assert len(val) == 5
    assert all(x.shape == (2, 8) for x, _ in val)


# -------------------------------------------------------------------------------- text files, folders


def test_text_file_split(tmp_path):
    text = "".join(chr(ord("a") + i % 26) for i in range(1000))
    path = tmp_path / "doc.txt"
    path.write_text(text, encoding="utf-8")
    data = load_data(DataConfig(path=str(path)))
    assert data.vocab_size == 256
    assert data.train.dtype == np.uint8
    assert bytes(data.train) == text[:900].encode()
    assert bytes(data.val) == text[900:].encode()


def test_text_file_utf8_bytes(tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text("é" * 50, encoding="utf-8")  # 100 bytes: c3 a9 repeated
    data = load_data(DataConfig(path=str(path), val_fraction=0.5))
    assert bytes(data.train) == b"\xc3\xa9" * 25
    assert bytes(data.val) == b"\xc3\xa9" * 25


def test_folder_split_holds_the_tail_of_every_document(tmp_path):
    (tmp_path / "a.txt").write_text("a" * 90 + "A" * 10, encoding="utf-8")
    (tmp_path / "b.txt").write_text("b" * 45 + "B" * 5, encoding="utf-8")
    data = load_data(DataConfig(path=str(tmp_path), val_fraction=0.1))
    # files in name order; the last 10 % of each document goes to val
    assert bytes(data.train) == b"a" * 90 + b"b" * 45
    assert bytes(data.val) == b"A" * 10 + b"B" * 5


def test_folder_val_fraction(tmp_path):
    (tmp_path / "a.txt").write_text("x" * 60 + "y" * 40, encoding="utf-8")
    data = load_data(DataConfig(path=str(tmp_path), val_fraction=0.4))
    assert bytes(data.train) == b"x" * 60
    assert bytes(data.val) == b"y" * 40


def test_folder_skips_hidden_files_and_reads_subfolders(tmp_path):
    (tmp_path / "a.txt").write_text("a" * 20, encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("c" * 10, encoding="utf-8")
    (tmp_path / ".hidden.txt").write_text("h" * 30, encoding="utf-8")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "config").write_text("g" * 40, encoding="utf-8")
    (tmp_path / ".git" / "junk.bin").write_bytes(b"\xff\xfe\x00")  # would fail as UTF-8 if read
    data = load_data(DataConfig(path=str(tmp_path), val_fraction=0.1))
    assert bytes(data.train) == b"a" * 18 + b"c" * 9
    assert bytes(data.val) == b"a" * 2 + b"c" * 1
    assert "2 text files" in data.source


# ------------------------------------------------------------------------------------------ nanoGPT bins


def write_bins(folder, train, val):
    folder.mkdir(exist_ok=True)
    np.asarray(train, dtype=np.uint16).tofile(folder / "train.bin")
    np.asarray(val, dtype=np.uint16).tofile(folder / "val.bin")
    return folder


def test_nanogpt_bins_load(tmp_path):
    folder = write_bins(tmp_path / "bins", np.arange(200) % 256, np.arange(50) + 100)
    data = load_data(DataConfig(path=str(folder)))
    assert data.vocab_size == 256
    assert np.array_equal(np.asarray(data.train), np.arange(200))
    assert np.array_equal(np.asarray(data.val), np.arange(100, 150))
    batches = Batches(data, block_size=8, batch_size=2, eval_batches=2, seed=0)
    x, y = batches.train_batch(0)
    assert torch.equal(y - x, torch.ones_like(x))  # consecutive ids in the file


def test_nanogpt_bins_beyond_byte_vocab(tmp_path):
    folder = write_bins(tmp_path / "bins", [1, 2, 300, 4], [5, 6])
    with pytest.raises(DepthgrowError) as caught:
        load_data(DataConfig(path=str(folder)))
    assert "gpt2" in str(caught.value)
    assert "300" in str(caught.value)


def test_nanogpt_bins_with_gpt2_tokenizer(tmp_path):
    folder = write_bins(tmp_path / "bins", [1, 2, 300, 50256], [5, 6, 40000])
    data = load_data(DataConfig(path=str(folder), tokenizer="gpt2"))
    assert data.vocab_size == 50257
    assert list(np.asarray(data.train)) == [1, 2, 300, 50256]
    assert list(np.asarray(data.val)) == [5, 6, 40000]


def test_nanogpt_bins_beyond_gpt2_vocab(tmp_path):
    folder = write_bins(tmp_path / "bins", [1, 2], [50257, 3])  # the largest id lies in val
    with pytest.raises(DepthgrowError, match="50257"):
        load_data(DataConfig(path=str(folder), tokenizer="gpt2"))


def test_nanogpt_missing_val(tmp_path):
    folder = write_bins(tmp_path / "bins", [1, 2, 3], [4])
    (folder / "val.bin").unlink()
    with pytest.raises(DepthgrowError, match="val.bin"):
        load_data(DataConfig(path=str(folder)))


def test_nanogpt_empty_file(tmp_path):
    folder = write_bins(tmp_path / "bins", [1, 2, 3], [4])
    (folder / "train.bin").write_bytes(b"")
    with pytest.raises(DepthgrowError, match="empty"):
        load_data(DataConfig(path=str(folder)))


def test_nanogpt_odd_byte_count(tmp_path):
    folder = write_bins(tmp_path / "bins", [1, 2, 3], [4])
    (folder / "val.bin").write_bytes(b"\x01\x00\x02")
    with pytest.raises(DepthgrowError, match="odd number of bytes"):
        load_data(DataConfig(path=str(folder)))


# ---------------------------------------------------------------------------------------------- errors


def test_missing_path(tmp_path):
    with pytest.raises(DepthgrowError, match="does not exist"):
        load_data(DataConfig(path=str(tmp_path / "nothing.txt")))


def test_empty_file(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("")
    with pytest.raises(DepthgrowError, match="empty"):
        load_data(DataConfig(path=str(path)))


def test_empty_folder(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / ".only-hidden").write_text("x" * 100)
    with pytest.raises(DepthgrowError, match="no files"):
        load_data(DataConfig(path=str(tmp_path / "data")))


def test_non_utf8_file(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café crème".encode("latin-1"))
    with pytest.raises(DepthgrowError) as caught:
        load_data(DataConfig(path=str(path)))
    assert "UTF-8" in str(caught.value)
    assert "latin1.txt" in str(caught.value)


def test_text_shorter_than_one_context(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("x" * 100, encoding="utf-8")  # 90 train tokens, 10 val tokens
    data = load_data(DataConfig(path=str(path)))
    with pytest.raises(DepthgrowError) as caught:
        Batches(data, block_size=128, batch_size=2, eval_batches=1, seed=0)
    assert "context" in str(caught.value)
    assert "training split has 90 tokens" in str(caught.value)
    # long enough for training, too short a validation split
    with pytest.raises(DepthgrowError, match="validation split has 10 tokens"):
        Batches(data, block_size=32, batch_size=2, eval_batches=1, seed=0)
    # exactly one context + 1 is enough
    ok = Batches(data, block_size=9, batch_size=2, eval_batches=1, seed=0)
    x, _ = ok.val_batches()[0]
    assert x.shape == (2, 9)


# ------------------------------------------------------------------------------------------ GPT-2 BPE

MERGES = [b"th", b"he", b"the", b" t"]  # ranks 256, 257, 258, 259


def write_ranks(path, merges=MERGES):
    """A tiktoken ranks file: the 256 single bytes in byte order, then the merges."""
    tokens = [bytes([i]) for i in range(256)] + list(merges)
    path.write_text("".join(f"{base64.b64encode(t).decode()} {rank}\n" for rank, t in enumerate(tokens)))
    return path


@pytest.fixture
def bpe_env(tmp_path, monkeypatch):
    # tiktoken caches "downloads" (local files too) by path; keep that cache inside the test's folder
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken-cache"))
    monkeypatch.delenv(GPT2_BPE_ENV, raising=False)
    return write_ranks(tmp_path / "tiny.tiktoken")


def test_bpe_encodes_with_merges(tmp_path, bpe_env):
    pytest.importorskip("tiktoken")
    (tmp_path / "doc.txt").write_text("the to", encoding="utf-8")
    data = load_data(
        DataConfig(path=str(tmp_path / "doc.txt"), tokenizer="gpt2", bpe_file=str(bpe_env), val_fraction=0.5)
    )
    eot = 260  # the special token appended after the 260 ranks
    assert data.vocab_size == 261  # len(ranks) + 1
    assert data.train.dtype == np.uint16
    # "the" -> t h e -> (th, e) -> the = 258; " to" -> " t" o = 259, 111; three tokens, cut at round(1.5) = 2
    assert list(data.train) == [258, 259, eot]
    assert list(data.val) == [ord("o"), eot]


def test_bpe_separates_documents_with_end_of_text(tmp_path, bpe_env):
    pytest.importorskip("tiktoken")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "1.txt").write_text("the the the the", encoding="utf-8")  # the, " ", the, ... -> 7 tokens
    (corpus / "2.txt").write_text("hehe", encoding="utf-8")  # he he -> 2 tokens
    data = load_data(DataConfig(path=str(corpus), tokenizer="gpt2", bpe_file=str(bpe_env), val_fraction=0.5))
    eot = 260
    # " the": pieces " ", "t", "h", "e"; th (256) merges first, then "the" (258); " the" is no token
    doc1 = [258, 32, 258, 32, 258, 32, 258]
    doc2 = [257, 257]
    cut1, cut2 = round(len(doc1) * 0.5), round(len(doc2) * 0.5)  # 4 (3.5 rounds to even) and 1
    assert list(data.train) == doc1[:cut1] + [eot] + doc2[:cut2] + [eot]
    assert list(data.val) == doc1[cut1:] + [eot] + doc2[cut2:] + [eot]


def test_bpe_file_from_environment(tmp_path, bpe_env, monkeypatch):
    pytest.importorskip("tiktoken")
    monkeypatch.setenv(GPT2_BPE_ENV, str(bpe_env))
    (tmp_path / "doc.txt").write_text("the" * 10, encoding="utf-8")
    data = load_data(DataConfig(path=str(tmp_path / "doc.txt"), tokenizer="gpt2"))
    assert data.vocab_size == 261
    # "thethe..." is a single letter run: t h e t h e ... -> th, e, th, e ... -> the, the ...
    assert list(data.train) + list(data.val) == [258] * 9 + [260] + [258] + [260]


def test_bpe_file_missing(tmp_path, monkeypatch):
    pytest.importorskip("tiktoken")
    monkeypatch.delenv(GPT2_BPE_ENV, raising=False)
    (tmp_path / "doc.txt").write_text("hello", encoding="utf-8")
    with pytest.raises(DepthgrowError) as caught:
        load_data(DataConfig(path=str(tmp_path / "doc.txt"), tokenizer="gpt2"))
    assert "gpt2.tiktoken" in str(caught.value)
    assert GPT2_BPE_ENV in str(caught.value)


def test_bpe_file_path_does_not_exist(tmp_path, monkeypatch):
    pytest.importorskip("tiktoken")
    monkeypatch.delenv(GPT2_BPE_ENV, raising=False)
    (tmp_path / "doc.txt").write_text("hello", encoding="utf-8")
    config = DataConfig(path=str(tmp_path / "doc.txt"), tokenizer="gpt2", bpe_file=str(tmp_path / "gpt2.tiktoken"))
    with pytest.raises(DepthgrowError, match="does not exist"):
        load_data(config)


def test_bpe_file_malformed(tmp_path, bpe_env):
    pytest.importorskip("tiktoken")
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("this is not a ranks file\n")
    (tmp_path / "doc.txt").write_text("hello", encoding="utf-8")
    with pytest.raises(DepthgrowError, match="unreadable"):
        load_data(DataConfig(path=str(tmp_path / "doc.txt"), tokenizer="gpt2", bpe_file=str(bad)))


def test_bpe_file_rewritten_in_place_is_reread(tmp_path, bpe_env):
    pytest.importorskip("tiktoken")
    (tmp_path / "doc.txt").write_text("the the", encoding="utf-8")
    config = DataConfig(path=str(tmp_path / "doc.txt"), tokenizer="gpt2", bpe_file=str(bpe_env), val_fraction=0.5)
    assert load_data(config).vocab_size == 261
    write_ranks(bpe_env, merges=[b"th"])  # the same path, now 257 ranks
    assert load_data(config).vocab_size == 258


def test_real_gpt2_bpe(tmp_path, real_gpt2_bpe):
    (tmp_path / "doc.txt").write_text("Hello world", encoding="utf-8")
    data = load_data(DataConfig(path=str(tmp_path / "doc.txt"), tokenizer="gpt2", val_fraction=0.5))
    assert data.vocab_size == 50257
    assert list(data.train) + list(data.val) == [15496, 50256, 995, 50256]  # Hello | world, <|endoftext|> after each
    assert list(data.train) == [15496, 50256]
