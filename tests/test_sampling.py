"""Generating text from runs: any family, any depth, past the context, deterministic with a seed."""

import pytest
import torch
from tiny_runs import TINY, trained

from depthgrow import generate, load_run
from depthgrow.cli import main
from depthgrow.sampling import stream_text


def greedy_by_hand(run_dir: str, prompt: str, new_tokens: int) -> str:
    """Argmax over the last block_size tokens, one token at a time: what generation means."""
    run = load_run(run_dir)
    ids = run.tokenizer.encode(prompt)
    for _ in range(new_tokens):
        with torch.no_grad():
            logits = run.model(torch.tensor([ids[-run.model_config.block_size :]]))[0, -1, : run.tokenizer.vocab_size]
        ids.append(int(logits.argmax()))
    return run.tokenizer.decode(ids)


@pytest.mark.parametrize("preset", ["gpt2-test", "llama-test", "moe-test"])
def test_greedy_generation_past_the_context_equals_argmax_by_hand(tmp_path, capsys, preset):
    run = trained(tmp_path, preset)
    capsys.readouterr()
    new_tokens = 32 + 8  # past the 32-token context: the window slides
    args = ["generate", run, "--prompt", "To be", "--max-new-tokens", str(new_tokens), "--temperature", "0"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out == greedy_by_hand(run, "To be", new_tokens) + "\n"
    assert main(args) == 0 and capsys.readouterr().out == out


def test_sampling_is_a_function_of_the_seed(tmp_path, capsys):
    run = trained(tmp_path, "gpt2-test")
    capsys.readouterr()
    outputs = []
    for seed in (1, 1, 2):
        assert main(["generate", run, "--prompt", "KING", "--max-new-tokens", "60", "--seed", str(seed)]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] != outputs[2]
    assert all(out.startswith("KING") and len(out.encode()) >= 60 for out in outputs)


def test_a_run_stopped_before_its_expansion_generates_at_its_depth(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--model", "gpt2-test", *TINY, "--growth.source_depth=0", "--growth.at=6", "--out", str(run)]
    assert main([*args, "--stop-at", "3"]) == 0
    loaded = load_run(run)
    assert loaded.model_config.n_layer == 0 and loaded.step == 3 and loaded.tokenizer.name == "byte"
    tokens = list(generate(loaded.model, [65], max_new_tokens=5, block_size=32, vocab_size=256))
    assert len(tokens) == 5 and all(0 <= t < 256 for t in tokens)


def test_a_bpe_run_decodes_its_own_vocabulary_and_starts_a_document_from_an_empty_prompt(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog, naïvely. " * 400)
    run = trained(tmp_path, "gpt2-test", "--model.vocab_size=300", "--data", str(corpus))
    loaded = load_run(run)
    assert loaded.tokenizer.name == "bpe" and loaded.tokenizer.end_of_text == loaded.tokenizer.vocab_size - 1
    assert loaded.tokenizer.decode(loaded.tokenizer.encode("naïve fox")) == "naïve fox"
    capsys.readouterr()
    assert main(["generate", run, "--max-new-tokens", "20", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.strip()


def test_a_character_split_across_tokens_is_shown_whole():
    pieces = list(stream_text(lambda ids: bytes(ids).decode("utf-8", errors="replace"), iter("é!".encode())))
    assert pieces == ["é", "!"]


BAD = {
    "negative temperature": (["--temperature", "-1"], "--temperature must be a finite number >= 0"),
    "top-k of 0": (["--top-k", "0"], "--top-k must be >= 1"),
    "no new tokens": (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    "empty prompt, byte vocabulary": (["--prompt", ""], "a byte vocabulary has no end-of-text token"),
    "config option": (["--train.steps=3"], "generate takes no config options"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_generate_input_gets_one_line(tmp_path, capsys, case):
    run = trained(tmp_path, "gpt2-test")
    capsys.readouterr()
    args, message = BAD[case]
    assert main(["generate", run, *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_generate_refuses_what_is_not_a_language_model_run(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "nothing")]) == 2
    assert f"no run at {tmp_path / 'nothing'}" in capsys.readouterr().err
    images = tmp_path / "images"
    image_args = ["--model", "resnet-test", "--train.steps=2", "--train.batch_size=4", "--out", str(images)]
    assert main(["train", *image_args]) == 0
    capsys.readouterr()
    assert main(["generate", str(images), "--prompt", "x"]) == 2
    assert "holds an image model (resnet): it has no tokenizer" in capsys.readouterr().err
