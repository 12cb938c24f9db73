"""torchrun with 2 CPU processes (gloo): DDP and FSDP2 runs across an expansion against one process, and
checkpoints that change world size on resume."""

import json
import os
import subprocess
import sys

import pytest

from depthgrow import DepthgrowError, load_config, train
from depthgrow.metrics import read_log

# 0 -> 2 blocks at step 5 of 12, Muon-NSGD (Muon on the sharded block matrices under FSDP2)
RUN = [
    "--model", "gpt2-test", "--train.steps", "12", "--train.batch_size", "8", "--train.eval_every", "4",
    "--train.eval_batches", "2", "--train.checkpoint_every", "3", "--growth.source_depth", "0", "--growth.at", "5",
]  # fmt: skip
# reductions over 2 ranks add in another order than one process: losses agree to float32 rounding
RTOL = 1e-4


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return subprocess.run(
        [*command, "-m", "depthgrow", "train", *args], capture_output=True, text=True, env=_env(), timeout=300
    )


def single(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "depthgrow", "train", *args]
    return subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=300)


def curve(run_dir) -> list[tuple[str, int, float]]:
    return [
        (r["event"], r["step"], r["loss"] if r["event"] == "train" else r["val_loss"])
        for r in read_log(run_dir / "log.jsonl")
        if r["event"] in ("train", "eval")
    ]


def assert_same_losses(run_dir, reference_dir) -> None:
    got, expected = curve(run_dir), curve(reference_dir)
    assert [point[:2] for point in got] == [point[:2] for point in expected]  # rank 0 alone logged, once
    for (_, step, loss), (_, _, reference) in zip(got, expected, strict=True):
        assert loss == pytest.approx(reference, rel=RTOL), f"step {step}"


@pytest.fixture(scope="module")
def single_runs(tmp_path_factory):
    """The single-process run of RUN for a model preset, trained once per module."""
    runs = {}

    def run(preset: str = "gpt2-test"):
        if preset not in runs:
            out = tmp_path_factory.mktemp("single") / preset
            done = single(*RUN, "--model", preset, "--out", str(out))
            assert done.returncode == 0, done.stderr
            runs[preset] = out
        return runs[preset]

    return run


@pytest.fixture
def reference(single_runs):
    return single_runs()


# the mixture of experts: experts without tokens on a rank have no gradient there, and the balancing
# bias follows the global load
@pytest.mark.parametrize("preset", ["gpt2-test", "moe-test"])
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_a_progressive_run_on_two_processes_repeats_the_single_process_losses(tmp_path, single_runs, parallel, preset):
    done = torchrun(*RUN, "--model", preset, "--train.parallel", parallel, "--out", str(tmp_path / parallel))
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_losses(tmp_path / parallel, single_runs(preset))
    growth = [r for r in read_log(tmp_path / parallel / "log.jsonl") if r["event"] == "growth"]
    assert [(g["step"], g["from_depth"], g["to_depth"]) for g in growth] == [(5, 0, 2)]
    assert done.stdout.count("final validation loss") == 1  # only rank 0 reports
    summary = json.loads((tmp_path / parallel / "summary.json").read_text())
    assert summary["tokens"] == 12 * 8 * 32  # the global batch, counted once


def test_a_checkpoint_of_two_fsdp_processes_resumes_in_one_after_the_expansion(tmp_path, reference):
    out = str(tmp_path / "run")
    stopped = torchrun(*RUN, "--train.parallel", "fsdp", "--out", out, "--stop-at", "7")
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    resumed = single("--resume", out, "--train.parallel", "none")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_losses(tmp_path / "run", reference)


def test_a_single_process_checkpoint_resumes_in_two_ddp_processes_before_the_expansion(tmp_path, reference):
    out = str(tmp_path / "run")
    stopped = single(*RUN, "--out", out, "--stop-at", "3")
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    resumed = torchrun("--resume", out, "--train.parallel", "ddp")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_losses(tmp_path / "run", reference)


def test_parallel_training_without_torchrun_is_refused_with_the_launch_command(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    config = load_config(None, {"model.preset": "gpt2-test", "train.parallel": "ddp", "train.out_dir": str(tmp_path)})
    with pytest.raises(DepthgrowError, match="torchrun --nproc_per_node N -m depthgrow train"):
        train(config)


def test_a_global_batch_that_does_not_split_evenly_is_refused(tmp_path):
    done = torchrun(*RUN, "--train.batch_size", "7", "--train.parallel", "ddp", "--out", str(tmp_path / "run"))
    assert done.returncode != 0
    assert "train.batch_size=7 must be a multiple of the world size 2" in done.stderr


def test_a_compiled_run_is_recompiled_at_the_expansion_and_matches_eager(tmp_path):
    def run(name, compile_model):
        config = load_config(
            None,
            {
                "model.preset": "gpt2-test", "train.steps": "8", "train.batch_size": "8", "train.eval_every": "4",
                "train.eval_batches": "2", "growth.source_depth": "1", "growth.at": "4", "growth.init": "copy",
                "train.compile": str(compile_model), "train.out_dir": str(tmp_path / name),
            },
        )  # fmt: skip
        return train(config)

    eager, compiled = run("eager", False), run("compiled", True)
    expected, got = curve(eager.out_dir), curve(compiled.out_dir)
    assert [point[:2] for point in got] == [point[:2] for point in expected]
    for (_, step, loss), (_, _, reference) in zip(got, expected, strict=True):
        assert loss == pytest.approx(reference, rel=RTOL), f"step {step}"  # after the expansion too: no stale graph
    # the first step of each (re)compiled model is compile time, kept out of the training time
    assert compiled.state.compile_time_s > 0 and eager.state.compile_time_s == 0
    assert compiled.state.train_time_s < compiled.state.compile_time_s
