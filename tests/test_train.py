import json

import pytest
import torch

import depthgrow.checkpoint as checkpoint_module
from depthgrow import DepthgrowError, load_config, train
from depthgrow.checkpoint import load_checkpoint
from depthgrow.flops import DEPTHGROW, plan_flops
from depthgrow.metrics import read_log
from depthgrow.train import plan_of

TINY = {
    "model.preset": "gpt2-test",
    "train.steps": "40",
    "train.batch_size": "4",
    "train.eval_every": "10",
    "train.eval_batches": "2",
    "train.checkpoint_every": "15",
    "growth.source_depth": "1",
    "growth.at": "0.5",
    "growth.init": "copy",
}


def tiny(tmp_path, name, **overrides):
    values = {**TINY, "train.out_dir": str(tmp_path / name), **{k.replace("__", "."): v for k, v in overrides.items()}}
    return load_config(None, values)


def records(run, event):
    return [r for r in read_log(run / "log.jsonl") if r["event"] == event]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("full")
    runs = {}
    for optimizer in ("adamw", "muon-nsgd"):
        result = train(tiny(root, optimizer, optim__name=optimizer), label=optimizer)
        runs[optimizer] = result.out_dir
    return runs


@pytest.mark.parametrize("optimizer", ["adamw", "muon-nsgd"])
@pytest.mark.parametrize("stop_at", [7, 20, 31], ids=["before-growth", "at-growth", "after-growth"])
def test_resume_repeats_the_uninterrupted_run_exactly(tmp_path, uninterrupted, optimizer, stop_at):
    config = tiny(tmp_path, "resumed", optim__name=optimizer)
    first = train(config, stop_at=stop_at)
    assert not first.finished and first.state.step == stop_at
    assert load_checkpoint(first.out_dir / "checkpoint.pt")["train_state"]["step"] == stop_at
    second = train(config, resume=True)
    assert second.finished
    full = uninterrupted[optimizer]
    for event in ("train", "eval", "growth"):
        expected = [{k: v for k, v in r.items() if k not in ("wall_s", "seconds")} for r in records(full, event)]
        got = [{k: v for k, v in r.items() if k not in ("wall_s", "seconds")} for r in records(first.out_dir, event)]
        assert got == expected, event
    final_full = load_checkpoint(full / "checkpoint.pt")["model"]
    final_resumed = load_checkpoint(second.out_dir / "checkpoint.pt")["model"]
    assert final_full.keys() == final_resumed.keys()
    assert all(torch.equal(final_full[k], final_resumed[k]) for k in final_full)


def test_log_holds_every_step_the_evaluations_around_growth_and_cumulative_flops(uninterrupted):
    run = uninterrupted["adamw"]
    train_records = records(run, "train")
    assert [r["step"] for r in train_records] == list(range(1, 41))
    assert {r["depth"] for r in train_records[:20]} == {1} and {r["depth"] for r in train_records[20:]} == {2}
    evals = records(run, "eval")
    assert [(r["step"], r.get("phase")) for r in evals] == [
        (10, None), (20, None), (20, "pre_growth"), (20, "post_growth"), (30, None), (40, None)
    ]  # fmt: skip
    assert evals[1]["val_loss"] == evals[2]["val_loss"]  # same model, same fixed validation batches
    assert evals[2]["depth"] == 1 and evals[3]["depth"] == 2
    # copy from one layer changes the function, so the loss right after growth differs
    assert evals[3]["val_loss"] != evals[2]["val_loss"]
    (growth,) = records(run, "growth")
    assert (growth["step"], growth["from_depth"], growth["to_depth"], growth["init"]) == (20, 1, 2, "copy")
    config = load_config(run / "config.toml")
    expected = plan_flops(config.model, plan_of(config), total_steps=40, tokens_per_step=4 * 32, counting=DEPTHGROW)
    assert train_records[-1]["flops"] == pytest.approx(expected)
    assert train_records[-1]["tokens"] == 40 * 4 * 32
    lrs = [r["lr"] for r in train_records]
    assert max(lrs) == pytest.approx(3e-3) and lrs[-1] < lrs[-5]  # WSD decays at the end
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_val_loss"] == evals[-1]["val_loss"]
    assert summary["depths"] == [1, 2] and summary["growth_steps"] == [20]


def test_a_kill_while_writing_a_checkpoint_leaves_the_previous_one_usable(tmp_path, monkeypatch):
    config = tiny(tmp_path, "run")
    train(config, stop_at=15)
    before = load_checkpoint(tmp_path / "run" / "checkpoint.pt")

    def killed_mid_write(payload, handle):
        handle.write(b"partial bytes")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_module.torch, "save", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        train(config, resume=True)  # the next checkpoint (step 30) dies half-written
    monkeypatch.undo()
    after = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert after["train_state"] == before["train_state"]
    assert train(config, resume=True).finished


def test_resuming_with_another_config_is_refused(tmp_path):
    train(tiny(tmp_path, "run"), stop_at=5)
    with pytest.raises(DepthgrowError, match="optim.lr"):
        train(tiny(tmp_path, "run", optim__lr="0.01"), resume=True)


def test_an_existing_run_is_never_overwritten_silently(tmp_path):
    train(tiny(tmp_path, "run"), stop_at=5)
    with pytest.raises(DepthgrowError, match="--resume"):
        train(tiny(tmp_path, "run"))
    assert train(tiny(tmp_path, "run"), overwrite=True, stop_at=3).state.step == 3


def test_resume_without_a_checkpoint_says_so(tmp_path):
    with pytest.raises(DepthgrowError, match="no checkpoint"):
        train(tiny(tmp_path, "nothing"), resume=True)


def test_model_vocabulary_smaller_than_the_tokenizer_is_refused(tmp_path):
    with pytest.raises(DepthgrowError, match="vocab_size"):
        train(tiny(tmp_path, "run", model__vocab_size="100"))
