import json

import pytest
import torch

import depthgrow.checkpoint as checkpoint_module
from depthgrow import DepthgrowError, load_config, train
from depthgrow.checkpoint import load_checkpoint
from depthgrow.flops import DEPTHGROW, plan_flops
from depthgrow.metrics import read_log

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
    # one evaluation per evaluated step, but two at the expansion: the model before and after it
    assert [(r["step"], r.get("phase")) for r in evals] == [
        (0, None), (10, None), (20, "pre_growth"), (20, "post_growth"), (30, None), (40, None)
    ]  # fmt: skip
    assert evals[0]["flops"] == 0 and evals[0]["tokens"] == 0
    assert all(0.0 < r["val_accuracy"] < 1.0 for r in evals[1:])
    assert evals[2]["depth"] == 1 and evals[3]["depth"] == 2
    # copy from one layer changes the function, so the loss right after growth differs
    assert evals[3]["val_loss"] != evals[2]["val_loss"]
    (growth,) = records(run, "growth")
    assert (growth["step"], growth["from_depth"], growth["to_depth"], growth["init"]) == (20, 1, 2, "copy")
    config = load_config(run / "config.toml")
    expected = plan_flops(config.model, config.plan(), total_steps=40, units_per_step=4 * 32, counting=DEPTHGROW)
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
    with pytest.raises(DepthgrowError, match=r"train.seed \(0 in the checkpoint, 1 now\)"):
        train(tiny(tmp_path, "run", train__seed="1"), resume=True)


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


def test_overwrite_removes_the_old_checkpoint_before_the_first_step(tmp_path):
    from depthgrow.trainer import _create_out_dir

    config = tiny(tmp_path, "run")
    train(config, stop_at=40)
    _create_out_dir(config, fresh=True)  # what an --overwrite does once data and model have passed
    assert not (tmp_path / "run" / "checkpoint.pt").exists() and not (tmp_path / "run" / "summary.json").exists()
    with pytest.raises(DepthgrowError, match="no checkpoint"):
        train(config, resume=True)  # a kill right after --overwrite must not resume the old run


def test_a_log_shorter_than_the_checkpoint_expects_is_refused(tmp_path):
    config = tiny(tmp_path, "run")
    train(config, stop_at=12)
    (tmp_path / "run" / "log.jsonl").unlink()
    with pytest.raises(DepthgrowError, match="cannot be resumed"):
        train(config, resume=True)


def test_a_diverging_run_stops_with_an_error_and_keeps_its_checkpoint(tmp_path):
    with pytest.raises(DepthgrowError, match="validation loss became nan at step 0"):  # the first evaluation
        train(tiny(tmp_path, "run", model__weight_init="standard", model__init_std="1e30"))
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_stop_at_must_lie_ahead(tmp_path):
    config = tiny(tmp_path, "run")
    with pytest.raises(DepthgrowError, match="stop-at"):
        train(config, stop_at=0)
    train(config, stop_at=10)
    with pytest.raises(DepthgrowError, match=r"\(10, 40\]"):
        train(config, resume=True, stop_at=10)


def test_a_checkpoint_before_the_first_step_holds_no_optimizer_state(tmp_path):
    from depthgrow import build_model, build_optimizer
    from depthgrow.checkpoint import restore_training_state, training_state

    config = tiny(tmp_path, "run", optim__name="muon-nsgd")
    model = build_model(config.model, seed=0)
    optimizer = build_optimizer(model, config.optim)
    payload = training_state(model, optimizer)
    assert payload["optimizer"] == {} and all(not opt.state for opt in optimizer.optimizers)
    restore_training_state(model, optimizer, payload)
    assert all(not opt.state for opt in optimizer.optimizers)


def test_an_image_model_trains_grows_and_resumes_exactly(tmp_path):
    def config(name):
        return load_config(
            None,
            {
                "model.preset": "resnet-test", "train.steps": "30", "train.batch_size": "16",
                "train.eval_every": "10", "train.eval_batches": "2", "growth.source_depth": "0",
                "growth.at": "0.5", "growth.init": "random", "train.out_dir": str(tmp_path / name),
            },
        )  # fmt: skip

    full = train(config("full"))
    assert full.finished and full.state.depth == 1
    evals = records(full.out_dir, "eval")
    assert evals[-1]["images"] == 30 * 16 and 0.0 <= evals[-1]["val_accuracy"] <= 1.0
    train(config("resumed"), stop_at=20)
    resumed = train(config("resumed"), resume=True)
    assert resumed.final_val_loss == full.final_val_loss  # BatchNorm running statistics included


def test_images_the_model_cannot_take_are_refused(tmp_path):
    with pytest.raises(DepthgrowError, match="1-channel 8x8 images"):
        train(load_config(None, {"model.preset": "resnet20", "train.out_dir": str(tmp_path)}))
