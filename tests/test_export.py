import json
import sys

import pytest
import torch

import depthgrow
from depthgrow import GPT2Config, RunConfig, build_model
from depthgrow.checkpoint import save_checkpoint
from depthgrow.cli import main
from depthgrow.export import ADAPTERS, export_checkpoint, import_pretrained

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")


def perturbed_model(config, seed=0):
    """A depthgrow model whose every parameter is random: a fresh init has zero biases and unit LayerNorm
    gains, which would hide a bias or norm left out or misplaced by the conversion."""
    model = build_model(config, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return model.eval()


def write_checkpoint(path, config, model, *, step=7):
    run = RunConfig(model_preset=None, model=config)
    run.train.steps = 10
    save_checkpoint(
        path,
        {"model": model.state_dict(), "config": run.to_dict(), "train_state": {"step": step, "depth": config.n_layer}},
    )
    return path


def hf_logits(out_dir, tokens):
    hf = transformers.AutoModelForCausalLM.from_pretrained(out_dir, local_files_only=True)
    assert not hf.training
    with torch.no_grad():
        return hf(tokens).logits


def depthgrow_logits(model, tokens):
    with torch.no_grad():
        return model.eval()(tokens)


TOKENS = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_exported_gpt2_matches_depthgrow_and_round_trips(tmp_path, depth):
    config = GPT2Config(n_layer=depth, n_embd=32, n_head=4, block_size=16, vocab_size=256, dropout=0.1, init_std=0.03)
    model = perturbed_model(config, seed=depth)
    checkpoint = write_checkpoint(tmp_path / "checkpoint.pt", config, model)
    out = export_checkpoint(checkpoint, tmp_path / "hf")

    expected = depthgrow_logits(model, TOKENS)
    difference = (hf_logits(out, TOKENS) - expected).abs().max().item()
    assert difference < 1e-4, difference
    assert expected.abs().max().item() > 0.1  # the comparison is between non-trivial logits

    hf_config = json.loads((out / "config.json").read_text())
    assert hf_config["n_layer"] == depth and hf_config["n_positions"] == 16 and hf_config["n_ctx"] == 16
    assert hf_config["resid_pdrop"] == hf_config["attn_pdrop"] == hf_config["embd_pdrop"] == 0.1
    assert hf_config["bos_token_id"] is None  # the byte vocabulary has no <|endoftext|>

    imported_config, imported = import_pretrained(out)
    assert imported_config == config
    original = model.state_dict()
    assert imported.state_dict().keys() == original.keys()
    for name, tensor in imported.state_dict().items():
        assert torch.equal(tensor, original[name]), name
        assert tensor.is_contiguous(), name
    assert all(p.requires_grad for p in imported.parameters())
    assert torch.equal(depthgrow_logits(imported, TOKENS), expected)


def test_bias_free_gpt2_exports_with_zero_biases(tmp_path):
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, block_size=16, vocab_size=256, bias=False)
    model = perturbed_model(config)
    out = export_checkpoint(write_checkpoint(tmp_path / "checkpoint.pt", config, model), tmp_path / "hf")

    expected = depthgrow_logits(model, TOKENS)
    assert (hf_logits(out, TOKENS) - expected).abs().max().item() < 1e-4
    assert "every bias in this export is zero" in (out / "README.md").read_text()

    # HF's GPT-2 has biases, so the import has them too: all zero, the same function
    imported_config, imported = import_pretrained(out)
    assert imported_config.bias is True and imported_config.n_layer == 2
    biases = {name: p for name, p in imported.named_parameters() if name.endswith(".bias")}
    assert len(biases) == 2 * 6 + 1  # six per block, and ln_f
    assert all(not p.any() for p in biases.values())
    assert torch.equal(depthgrow_logits(imported, TOKENS), expected)


def test_export_of_a_trained_run_through_the_command_line(tmp_path, capsys):
    run_dir = tmp_path / "run"
    overrides = {"model.preset": "gpt2-test", "train.steps": "10", "train.batch_size": "2", "train.eval_every": "5"}
    overrides |= {
        "train.eval_batches": "1",
        "growth.source_depth": "0",
        "growth.at": "0.5",
        "train.out_dir": str(run_dir),
    }
    result = depthgrow.train(depthgrow.load_config(None, overrides))
    capsys.readouterr()

    out = tmp_path / "hf"
    assert main(["export", str(run_dir), str(out)]) == 0
    printed = capsys.readouterr().out
    assert f'AutoModelForCausalLM.from_pretrained("{out}")' in printed
    assert {"config.json", "model.safetensors", "README.md"} <= {p.name for p in out.iterdir()}

    card = (out / "README.md").read_text()
    assert "exported by depthgrow" in card and "preset `gpt2-test`) at depth 2" in card
    assert "after 10 of 10 training steps" in card and "0 -> 2 layers, growing at step 5" in card
    assert f"Final validation loss: {result.final_val_loss:.4f}." in card
    assert "raw UTF-8 bytes" in card and "no Hugging Face tokenizer" in card

    # the grown model from the checkpoint, against the export
    trained = build_model(GPT2Config(n_layer=2, n_embd=32, n_head=2, block_size=32, vocab_size=256), seed=0)
    trained.load_state_dict(torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"])
    assert (hf_logits(out, TOKENS) - depthgrow_logits(trained, TOKENS)).abs().max().item() < 1e-4

    # a non-empty folder is exported into only with --overwrite
    assert main(["export", str(run_dir / "checkpoint.pt"), str(out), "--overwrite"]) == 0


def test_an_unfinished_run_exports_at_its_current_depth(tmp_path):
    # stopped before its 0 -> 2 expansion: the checkpoint holds a zero-layer model
    config = GPT2Config(n_layer=0, n_embd=32, n_head=2, block_size=16, vocab_size=256)
    model = perturbed_model(config)
    run = RunConfig(model_preset=None, model=config.with_depth(2))
    run.growth.source_depth = 0
    run.train.steps = 10
    payload = {"model": model.state_dict(), "config": run.to_dict(), "train_state": {"step": 3, "depth": 0}}
    save_checkpoint(tmp_path / "checkpoint.pt", payload)
    out = export_checkpoint(tmp_path, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["n_layer"] == 0
    assert "had not finished" in (out / "README.md").read_text()
    assert (hf_logits(out, TOKENS) - depthgrow_logits(model, TOKENS)).abs().max().item() < 1e-4


ERRORS = {
    "no adapter": "no Hugging Face export for model family 'gpt2' yet",
    "missing checkpoint": "no checkpoint at",
    "non-empty out_dir": "is not empty; pass --overwrite",
    "no transformers": "export needs transformers and safetensors: pip install 'depthgrow[export]'",
}


@pytest.mark.parametrize("case", ERRORS, ids=list(ERRORS))
def test_export_errors_get_one_line_and_exit_status_2(tmp_path, capsys, monkeypatch, case):
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, block_size=16, vocab_size=256)
    source = write_checkpoint(tmp_path / "checkpoint.pt", config, build_model(config, seed=0))
    out = tmp_path / "hf"
    if case == "no adapter":
        monkeypatch.delitem(ADAPTERS, "gpt2")
    elif case == "missing checkpoint":
        source = tmp_path / "nowhere"
    elif case == "non-empty out_dir":
        out.mkdir()
        (out / "notes.txt").write_text("keep me")
    else:
        monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    assert main(["export", str(source), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("depthgrow: error: ") and err.count("\n") == 1
    assert ERRORS[case] in err
    if case == "non-empty out_dir":
        assert [p.name for p in out.iterdir()] == ["notes.txt"]
    else:
        assert not out.exists()


def test_import_refuses_a_gpt2_depthgrow_cannot_express(tmp_path):
    hf_config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=16, vocab_size=256)
    hf_config.tie_word_embeddings = False
    hf_config.activation_function = "relu"
    transformers.GPT2LMHeadModel(hf_config).save_pretrained(tmp_path)
    with pytest.raises(depthgrow.DepthgrowError, match="gelu_new.*; its LM head is not tied"):
        import_pretrained(tmp_path)
