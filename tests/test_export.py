import dataclasses
import json
import re
import sys

import pytest
import torch

import depthgrow
from depthgrow import GPT2Config, RunConfig, build_model, preset
from depthgrow.bpe import END_OF_TEXT
from depthgrow.checkpoint import load_checkpoint, save_checkpoint
from depthgrow.cli import main
from depthgrow.data import GPT2_BPE_ENV, embedded_corpus_files, gpt2_encoding
from depthgrow.export import export_checkpoint, import_pretrained
from depthgrow.models import FAMILIES, MoEConfig

transformers = pytest.importorskip("transformers")
safetensors = pytest.importorskip("safetensors")


def perturbed_model(config, seed=0):
    """A depthgrow model whose every parameter is random: a fresh init has zero biases, unit norm gains and
    (MoE) a zero balancing bias, which would hide a bias, norm or routing left out or misplaced by the
    conversion."""
    model = build_model(config, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(0.1 * torch.randn(buffer.shape, generator=generator))
    return model.eval()


def write_checkpoint(path, config, model, *, step=7, bpe_file=None):
    run = RunConfig(model_preset=None, model=config)
    run.train.steps = 10
    run.data.bpe_file = bpe_file
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


def assert_imports_back(out, config, model, expected):
    """import_pretrained of an export gives the depthgrow config, bit-identical parameters and buffers, and
    the same logits."""
    imported_config, imported = import_pretrained(out)
    # how the weights were first drawn is no part of a Hugging Face config: an import has the default init
    assert imported_config == dataclasses.replace(config, weight_init=imported_config.weight_init)
    original = model.state_dict()
    assert imported.state_dict().keys() == original.keys()
    for name, tensor in imported.state_dict().items():
        assert torch.equal(tensor, original[name]), name
        assert tensor.is_contiguous(), name
    assert all(p.requires_grad for p in imported.parameters())
    # each its own storage: no views into a fused HF tensor (safetensors refuses to save shared storage)
    storages = {p.untyped_storage().data_ptr() for p in imported.parameters()}
    assert len(storages) == len(list(imported.parameters()))
    assert not any(b.is_meta for b in imported.buffers())
    assert torch.equal(depthgrow_logits(imported, TOKENS), expected)
    return imported


def exported_with_parity(tmp_path, config, *, seed):
    """Export a perturbed model of ``config`` and check that transformers computes its logits (O(1) ones,
    within 1e-4); the folder, the model and its logits on TOKENS."""
    model = perturbed_model(config, seed=seed)
    out = export_checkpoint(write_checkpoint(tmp_path / "checkpoint.pt", config, model), tmp_path / "hf")
    expected = depthgrow_logits(model, TOKENS)
    assert expected.abs().max().item() > 1.0
    difference = (hf_logits(out, TOKENS) - expected).abs().max().item()
    assert difference < 1e-4, difference
    return out, model, expected


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_exported_gpt2_matches_depthgrow_and_round_trips(tmp_path, depth):
    config = GPT2Config(
        n_layer=depth,
        n_embd=32,
        n_head=4,
        block_size=16,
        vocab_size=256,
        dropout=0.1,
        weight_init="standard",
        init_std=0.03,
    )
    model = perturbed_model(config, seed=depth)
    checkpoint = write_checkpoint(tmp_path / "checkpoint.pt", config, model)
    out = export_checkpoint(checkpoint, tmp_path / "hf")

    expected = depthgrow_logits(model, TOKENS)
    difference = (hf_logits(out, TOKENS) - expected).abs().max().item()
    assert difference < 1e-4, difference
    assert expected.abs().max().item() > 0.1  # the comparison is between non-trivial logits

    hf_config = json.loads((out / "config.json").read_text())
    # eight contexts of positions, so that a generation past the context does not index past the table
    assert hf_config["n_layer"] == depth and hf_config["n_positions"] == 8 * 16 and hf_config["n_ctx"] == 16
    assert hf_config["resid_pdrop"] == hf_config["attn_pdrop"] == hf_config["embd_pdrop"] == 0.1
    assert hf_config["bos_token_id"] is None  # the byte vocabulary has no <|endoftext|>
    with safetensors.safe_open(out / "model.safetensors", "pt") as stored:
        positions = stored.get_tensor("transformer.wpe.weight")
    trained = model.transformer.wpe.weight.detach()
    assert torch.equal(positions[:16], trained) and torch.equal(positions[16:], trained[15].expand(7 * 16, -1))

    assert_imports_back(out, config, model, expected)


def decoder_variants() -> list:
    """llama-test and moe-test as they are, and with the head tied the other way and (MoE) no shared expert;
    weights large enough (init_std 0.3) that attention is far from uniform and the logits are O(1)."""
    variants = []
    for name in ("llama-test", "moe-test"):
        config = dataclasses.replace(preset(name), weight_init="standard", init_std=0.3)
        other = {"tie_embeddings": not config.tie_embeddings}
        if isinstance(config, MoEConfig):
            other["n_shared_expert"] = 0
        variants += [config, dataclasses.replace(config, **other)]
    return variants


def decoder_id(config) -> str:
    shared = f"-shared{config.n_shared_expert}" if isinstance(config, MoEConfig) else ""
    return f"{config.family}-{'tied' if config.tie_embeddings else 'untied'}{shared}"


@pytest.mark.parametrize("depth", [0, 1, 3])
@pytest.mark.parametrize("variant", decoder_variants(), ids=decoder_id)
def test_exported_llama_and_moe_match_depthgrow_and_round_trip(tmp_path, variant, depth):
    config = variant.with_depth(depth)
    out, model, expected = exported_with_parity(tmp_path, config, seed=depth)

    hf_config = json.loads((out / "config.json").read_text())
    assert hf_config["num_hidden_layers"] == depth and hf_config["max_position_embeddings"] == 32
    assert hf_config["tie_word_embeddings"] == config.tie_embeddings
    assert hf_config["rope_parameters"]["rope_type"] == "default"
    assert hf_config["rope_parameters"]["rope_theta"] == config.rope_theta
    assert hf_config["bos_token_id"] is None and hf_config["eos_token_id"] is None
    if isinstance(config, MoEConfig):
        assert hf_config["architectures"] == ["Glm4MoeForCausalLM"]
        assert hf_config["rope_parameters"]["partial_rotary_factor"] == 1.0 and hf_config["first_k_dense_replace"] == 0
        assert (hf_config["n_routed_experts"], hf_config["num_experts_per_tok"]) == (4, 2)
        assert hf_config["n_shared_experts"] == config.n_shared_expert
    else:
        assert hf_config["architectures"] == ["LlamaForCausalLM"]
        assert (hf_config["intermediate_size"], hf_config["head_dim"]) == (96, 8)
    with safetensors.safe_open(out / "model.safetensors", "pt") as stored:
        assert ("lm_head.weight" in stored.keys()) != config.tie_embeddings  # HF ties a tied head itself

    imported = assert_imports_back(out, config, model, expected)
    if isinstance(config, MoEConfig) and depth:
        # the usage counts, not in any state dict, start from zero and count a training step
        imported.train()(TOKENS)
        imported.before_optimizer_step()
        assert all(b.mlp.tokens_per_expert.sum() == TOKENS.numel() * 2 for b in imported.model.layers)


def test_hugging_face_glm4_moe_chooses_the_same_experts(tmp_path):
    config = dataclasses.replace(preset("moe-test"), weight_init="standard", init_std=0.3, n_expert=8)
    model = perturbed_model(config)
    out = export_checkpoint(write_checkpoint(tmp_path / "checkpoint.pt", config, model), tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    x = torch.randn(256, config.n_embd, generator=torch.Generator().manual_seed(4))
    for ours, theirs in zip(model.model.layers, hf.model.layers, strict=True):
        with torch.no_grad():
            chosen, weights = ours.mlp.route(x)
            _, hf_weights, hf_chosen = theirs.mlp.gate(x)
            unbiased = torch.topk(torch.sigmoid(x @ ours.mlp.gate.weight.T), config.top_k).indices
        # HF does not sort its choice: compare the chosen sets, each expert with its weight
        chosen, order = chosen.sort(dim=-1)
        hf_chosen, hf_order = hf_chosen.sort(dim=-1)
        assert torch.equal(chosen, hf_chosen)
        torch.testing.assert_close(weights.gather(1, order), hf_weights.gather(1, hf_order), rtol=0, atol=1e-6)
        # the balancing bias changes the choice of some tokens: HF applies it as depthgrow does
        assert not torch.equal(unbiased.sort(dim=-1).values, chosen)


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


@pytest.mark.parametrize("name", ["gpt2-test", "llama-test", "moe-test"])
def test_export_of_a_trained_run_through_the_command_line(tmp_path, capsys, name):
    run_dir = tmp_path / "run"
    overrides = {"model.preset": name, "train.steps": "10", "train.batch_size": "2", "train.eval_every": "5"}
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
    assert {"config.json", "model.safetensors", "README.md", "loss.png"} <= {p.name for p in out.iterdir()}
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG" and (out / "loss.png").stat().st_size < 200_000

    card = (out / "README.md").read_text()
    assert "exported by depthgrow" in card and f"preset `{name}`) at depth 2" in card
    assert "after 10 of 10 training steps" in card and "0 -> 2 layers, growing at step 5" in card
    assert f"Final validation loss: {result.final_val_loss:.4f}." in card
    assert "raw UTF-8 bytes" in card and "has no end-of-text token" in card
    assert "## Training\n\n![validation loss against step and FLOPs](loss.png)" in card
    if name == "moe-test":
        assert "`balance_rate` (0.001) is not carried" in card and "`tokens_per_expert`" in card

    # the grown model from the checkpoint, against the export
    trained = build_model(preset(name), seed=0)
    trained.load_state_dict(torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"])
    assert (hf_logits(out, TOKENS) - depthgrow_logits(trained, TOKENS)).abs().max().item() < 1e-4

    # a non-empty folder is exported into only with --overwrite
    assert main(["export", str(run_dir / "checkpoint.pt"), str(out), "--overwrite"]) == 0


def train_tiny(run_dir, name, **overrides):
    """A 10-step run of preset ``name``, grown 0 -> 2 layers at step 5; its folder."""
    settings = {"model.preset": name, "train.steps": "10", "train.batch_size": "2", "train.eval_every": "5"}
    settings |= {"train.eval_batches": "1", "growth.source_depth": "0", "growth.at": "0.5"}
    depthgrow.train(depthgrow.load_config(None, {**settings, **overrides, "train.out_dir": str(run_dir)}))
    return run_dir


def perturb_checkpoint(run_dir, scale):
    """Random changes to the weights of a run's checkpoint: a 10-step model repeats a byte or two, which would
    not tell a wrong position past the context from a right one. The run's config and tokenizer stay."""
    checkpoint = load_checkpoint(run_dir / "checkpoint.pt")
    generator = torch.Generator().manual_seed(0)
    for tensor in checkpoint["model"].values():
        if tensor.is_floating_point():
            tensor.add_(scale * torch.randn(tensor.shape, generator=generator))
    save_checkpoint(run_dir / "checkpoint.pt", checkpoint)


def checkpoint_model(run_dir):
    checkpoint = load_checkpoint(run_dir / "checkpoint.pt")
    config = RunConfig.from_dict(checkpoint["config"]).model.with_depth(checkpoint["train_state"]["depth"])
    return config, checkpoint["model"]


def depthgrow_model(config, state, length=None):
    """The depthgrow model of a checkpoint, taking sequences of ``length`` tokens (default: its context). Past
    the context it computes what the export's card says: rotary positions go on; GPT-2's positions past the
    context read as its last one."""
    length = length or config.block_size
    if isinstance(config, GPT2Config):
        rows = torch.arange(length).clamp(max=config.block_size - 1)
        state = {**state, "transformer.wpe.weight": state["transformer.wpe.weight"][rows]}
    model = build_model(dataclasses.replace(config, block_size=length), seed=0)
    model.load_state_dict(state)
    return model.eval()


def depthgrow_greedy(model, prompt, new_tokens, end_of_text=None):
    """The prompt and its greedy continuation by depthgrow's model: the argmax of the last logits, token by
    token, ending after ``end_of_text``."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(new_tokens):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
            if ids[-1] == end_of_text:
                break
    return ids


def pipeline_ids(generate, prompt, **options):
    """The ids of the pipeline's greedy generation: prompt and continuation (for a list of prompts, a list)."""
    results = generate(prompt, do_sample=False, return_tensors=True, **options)
    if isinstance(prompt, list):
        return [result[0]["generated_token_ids"] for result in results]
    return results[0]["generated_token_ids"]


def run_card_code(out, monkeypatch, capsys):
    """Run the card's Python code from inside the folder, as the card says; what it printed."""
    code = re.search(r"```python\n(.*?)```", (out / "README.md").read_text(), re.DOTALL).group(1)
    monkeypatch.chdir(out)
    capsys.readouterr()
    exec(code, {})
    return capsys.readouterr().out


@pytest.mark.parametrize("name", ["gpt2-test", "llama-test", "moe-test"])
def test_the_exported_folder_generates_what_depthgrow_does_within_and_past_the_context(
    tmp_path, monkeypatch, capsys, name
):
    run_dir = train_tiny(tmp_path / "run", name)
    perturb_checkpoint(run_dir, 0.3)
    out = export_checkpoint(run_dir, tmp_path / "hf")
    config, state = checkpoint_model(run_dir)
    context, prompt = config.block_size, "ROMEO:"
    ids = list(prompt.encode("utf-8"))

    # the folder alone: the pipeline finds the model, its tokenizer and its generation settings there
    generate = transformers.pipeline("text-generation", model=str(out))
    # by default a generation stops where the text fills the context (the pipeline's own default is 256 tokens)
    within = pipeline_ids(generate, prompt)
    assert within == depthgrow_greedy(depthgrow_model(config, state), ids, context - len(ids))
    assert len(within) == context

    # past it: as many tokens as asked (the byte vocabulary has no end-of-text token to stop at), the ones past
    # the context as the card says
    past = pipeline_ids(generate, prompt, max_new_tokens=context + 8)
    assert len(past) == len(ids) + context + 8 and past[:context] == within
    assert past == depthgrow_greedy(depthgrow_model(config, state, len(past)), ids, context + 8)
    card = (out / "README.md").read_text()
    if name == "gpt2-test":
        assert f"rows {context} to {8 * context - 1} are copies of row {context - 1}" in card
        assert "every position past the context is read as the last position within it" in card
    else:
        assert "Rotary positions need no table" in card
    # a prompt that fills the context needs max_new_tokens, as the card says
    assert "a prompt that fills it already is refused" in card
    with pytest.raises(ValueError, match="setting `max_new_tokens`"):
        generate("x" * context, do_sample=False)
    # bytes have no padding token: a list of prompts goes one at a time, and padded batches are refused
    assert "not in padded batches" in card
    assert pipeline_ids(generate, [prompt, "JULIET:"])[0] == within
    with pytest.raises(ValueError, match="without pad_token cannot do batching"):
        generate([prompt, "JULIET:"], do_sample=False, batch_size=2)

    # the card's code, run from inside the folder (it names no path but "."), wherever the folder was written
    assert str(out) not in card
    printed = run_card_code(out, monkeypatch, capsys)
    assert printed.startswith("Once upon a time") and len(printed) > len("Once upon a time\n")


TEXTS = ["Now is the winter of our discontent", "naïve café, 東京, 𝄞 and Ā\x00\t\r\n", "<|endoftext|> 1234567", ""]


def test_the_byte_tokenizer_gives_the_utf8_bytes_and_has_no_special_tokens(tmp_path):
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, block_size=16, vocab_size=256)
    checkpoint = write_checkpoint(tmp_path / "checkpoint.pt", config, build_model(config, seed=0))
    out = export_checkpoint(checkpoint, tmp_path / "hf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    every_byte = list(range(256))
    assert len(tokenizer) == 256
    assert tokenizer.convert_tokens_to_ids(tokenizer.convert_ids_to_tokens(every_byte)) == every_byte
    for text in TEXTS:
        ids = tokenizer(text)["input_ids"]
        assert ids == list(text.encode("utf-8")), text
        assert tokenizer.decode(ids) == text == tokenizer.decode(ids, skip_special_tokens=True)
    assert tokenizer.decode([0xE6, 0x9D, 0xB1, 0xE6]) == "東\ufffd"  # a character cut short
    # no token marks the end of a text: none is the end-of-text or padding token
    assert (tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id) == (None, None, None)
    for name in ("config.json", "generation_config.json"):
        settings = json.loads((out / name).read_text())
        assert (settings.get("eos_token_id"), settings.get("pad_token_id")) == (None, None), name
    assert json.loads((out / "generation_config.json").read_text())["max_length"] == 16
    assert "has no end-of-text token" in (out / "README.md").read_text()


@pytest.mark.parametrize("where", ["environment", "run config"])
def test_the_gpt2_bpe_tokenizer_gives_tiktokens_ids(tmp_path, monkeypatch, real_gpt2_bpe, where):
    run_file = None
    if where == "run config":  # the run's data.bpe_file, still there at export time
        monkeypatch.delenv(GPT2_BPE_ENV)
        run_file = str(real_gpt2_bpe)
    config = GPT2Config(
        n_layer=1, n_embd=32, n_head=2, block_size=16, vocab_size=50257, weight_init="standard", init_std=0.3
    )
    model = perturbed_model(config)
    out = export_checkpoint(
        write_checkpoint(tmp_path / "checkpoint.pt", config, model, bpe_file=run_file), tmp_path / "hf"
    )

    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    encoding = gpt2_encoding(str(real_gpt2_bpe))
    plays = embedded_corpus_files()[0].read_text()[:20000]
    for text in [*TEXTS[:2], plays]:
        assert tokenizer(text)["input_ids"] == encoding.encode_ordinary(text)
        assert tokenizer.decode(encoding.encode_ordinary(text)) == text
    assert tokenizer(END_OF_TEXT)["input_ids"] == [50256]
    assert tokenizer.eos_token_id == tokenizer.bos_token_id == tokenizer.pad_token_id == 50256
    for name in ("config.json", "generation_config.json"):
        settings = json.loads((out / name).read_text())
        assert settings["eos_token_id"] == settings["bos_token_id"] == settings["pad_token_id"] == 50256, name
    assert "`<|endoftext|>` (id 50256)" in (out / "README.md").read_text()

    generate = transformers.pipeline("text-generation", model=str(out))
    prompt = encoding.encode_ordinary("ROMEO:")
    assert pipeline_ids(generate, "ROMEO:", max_new_tokens=4) == depthgrow_greedy(model, prompt, 4, 50256)


def test_a_trained_bpe_export_ends_its_generations_at_endoftext(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"{i} the cat sat on the mat; the dog ran to the cat." for i in range(200)))
    run_dir = train_tiny(tmp_path / "run", "gpt2-test", **{"model.vocab_size": "300", "data.path": str(corpus)})
    out = export_checkpoint(run_dir, tmp_path / "hf")
    config, state = checkpoint_model(run_dir)

    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    end_of_text = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    assert tokenizer.eos_token_id == tokenizer.bos_token_id == tokenizer.pad_token_id == end_of_text
    for name in ("config.json", "generation_config.json"):
        settings = json.loads((out / name).read_text())
        assert settings["eos_token_id"] == settings["pad_token_id"] == end_of_text, name
    assert f"`<|endoftext|>` (id {end_of_text}) ended every training document" in (out / "README.md").read_text()

    generate = transformers.pipeline("text-generation", model=str(out))
    prompt = tokenizer("the cat")["input_ids"]
    expected = depthgrow_greedy(depthgrow_model(config, state), prompt, config.block_size - len(prompt), end_of_text)
    assert pipeline_ids(generate, "the cat") == expected

    # a model that predicts <|endoftext|> everywhere (the final norm's output is its embedding, made the longest
    # of all, and the head is tied): the generation stops there, and the text leaves it out
    checkpoint = load_checkpoint(run_dir / "checkpoint.pt")
    state = checkpoint["model"]
    state["transformer.wte.weight"][end_of_text] *= 10
    state["transformer.ln_f.weight"].zero_()
    state["transformer.ln_f.bias"].copy_(state["transformer.wte.weight"][end_of_text])
    save_checkpoint(run_dir / "checkpoint.pt", checkpoint)
    generate = transformers.pipeline("text-generation", model=str(export_checkpoint(run_dir, tmp_path / "ends")))
    assert pipeline_ids(generate, "the cat") == [*prompt, end_of_text]
    assert depthgrow_greedy(depthgrow_model(config, state), prompt, 5, end_of_text) == [*prompt, end_of_text]
    assert generate("the cat", do_sample=False)[0]["generated_text"] == "the cat"


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
    "no gpt2.tiktoken": "the run's tokens are GPT-2's BPE, and the export writes its tokenizer from a gpt2.tiktoken "
    f"file: set {GPT2_BPE_ENV} to one",
    "moved gpt2.tiktoken": "gpt2.tiktoken file (the run's data.bpe_file /nowhere/gpt2.tiktoken and "
    f"{GPT2_BPE_ENV}=/elsewhere/gpt2.tiktoken: no such file): set {GPT2_BPE_ENV} to one",
    "other gpt2.tiktoken": "holds 3 tokens with <|endoftext|>, not GPT-2's 50257: not GPT-2's gpt2.tiktoken",
    "image model": "no Hugging Face export for model family 'resnet' yet",
}


@pytest.mark.parametrize("case", ERRORS, ids=list(ERRORS))
def test_export_errors_get_one_line_and_exit_status_2(tmp_path, capsys, monkeypatch, case):
    vocabulary = 50257 if "gpt2.tiktoken" in case else 256  # GPT-2's BPE, or bytes
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, block_size=16, vocab_size=vocabulary)
    if case == "image model":
        config = preset("resnet-test")
    run_file = {"moved gpt2.tiktoken": "/nowhere/gpt2.tiktoken", "other gpt2.tiktoken": f"{tmp_path}/other.tiktoken"}
    if case == "other gpt2.tiktoken":
        pytest.importorskip("tiktoken")
        (tmp_path / "other.tiktoken").write_text("YQ== 0\nYg== 1\n")  # the tokens a and b
    model = build_model(config, seed=0)
    source = write_checkpoint(tmp_path / "checkpoint.pt", config, model, bpe_file=run_file.get(case))
    out = tmp_path / "hf"
    monkeypatch.delenv(GPT2_BPE_ENV, raising=False)
    if case == "no adapter":
        monkeypatch.setitem(FAMILIES, "gpt2", dataclasses.replace(FAMILIES["gpt2"], hf=None))
    elif case == "missing checkpoint":
        source = tmp_path / "nowhere"
    elif case == "non-empty out_dir":
        out.mkdir()
        (out / "notes.txt").write_text("keep me")
    elif case == "moved gpt2.tiktoken":
        monkeypatch.setenv(GPT2_BPE_ENV, "/elsewhere/gpt2.tiktoken")
    elif case == "no transformers":
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


POSITIONS_REFUSED = {
    # an export's rows past n_ctx copy its last position; a GPT-2 with other rows there has more positions
    (16, 8): r"position embeddings past its context \(n_ctx 8\) differ from the last one within it",
    (8, 16): r"its context n_ctx \(16\) is longer than its position table \(n_positions 8\)",
}


@pytest.mark.parametrize("positions, context", POSITIONS_REFUSED)
def test_import_refuses_a_gpt2_whose_positions_are_not_its_contexts(tmp_path, positions, context):
    hf_config = transformers.GPT2Config(
        n_layer=1, n_embd=32, n_head=2, n_positions=positions, n_ctx=context, vocab_size=256
    )
    transformers.GPT2LMHeadModel(hf_config).save_pretrained(tmp_path)
    with pytest.raises(depthgrow.DepthgrowError, match=POSITIONS_REFUSED[positions, context]):
        import_pretrained(tmp_path)


SMALL = dict(vocab_size=256, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
REFUSED = {
    "llama": (
        lambda: transformers.LlamaConfig(
            **SMALL,
            hidden_act="gelu",
            rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
            attention_bias=True,
            mlp_bias=True,
        ),
        "this LLaMA differs from depthgrow's: hidden_act is 'gelu', not 'silu' .SwiGLU.; its rotary embedding is "
        "scaled .'linear'., not plain RoPE; its attention projections have biases; its feed-forward projections",
    ),
    # GLM-4.5's own settings: half of each head rotated, a dense first block, q/k norms, grouped routing
    "glm4_moe": (
        lambda: transformers.Glm4MoeConfig(
            **SMALL, n_routed_experts=4, use_qk_norm=True, n_group=2, routed_scaling_factor=2.5, norm_topk_prob=False
        ),
        "this Glm4Moe differs from depthgrow's: its rotary embedding turns 0.5 of each head, not all of it; its "
        "first 1 blocks have a dense feed-forward; it normalises queries and keys; it routes within the best 1 of 2 "
        "expert groups; the weights of the chosen experts are not normalised to sum to 1; the routed experts' "
        "output is scaled by 2.5",
    ),
}


@pytest.mark.parametrize("case", REFUSED)
def test_import_refuses_a_llama_or_moe_depthgrow_cannot_express(tmp_path, case):
    make_config, message = REFUSED[case]
    make_config().save_pretrained(tmp_path)  # refused from config.json alone, before any weight is read
    with pytest.raises(depthgrow.DepthgrowError, match=message):
        import_pretrained(tmp_path)


def test_llama_export_needs_transformers_5(tmp_path, monkeypatch):
    # transformers 4 would take the rotary base from rope_theta and silently ignore rope_parameters
    config = preset("llama-test")
    source = write_checkpoint(tmp_path / "checkpoint.pt", config, build_model(config, seed=0))
    # the module `import transformers` gives now: building some models makes transformers import itself anew
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "4.57.1")
    with pytest.raises(depthgrow.DepthgrowError, match="needs transformers >= 5, found 4.57.1"):
        export_checkpoint(source, tmp_path / "hf")
