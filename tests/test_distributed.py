"""torchrun with 2 CPU processes (gloo): DDP and FSDP2 runs across an expansion against one process, and
checkpoints that change world size on resume."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from launch import RTOL, assert_same_losses, curve, launch_env, single, torchrun
from torch import nn

from depthgrow import DepthgrowError, load_config, train
from depthgrow.distributed import World, world
from depthgrow.flops import peak_tflops
from depthgrow.metrics import read_log
from depthgrow.trainer import evaluate

# 0 -> 2 blocks at step 5 of 12, Muon-NSGD (Muon on the sharded block matrices under FSDP2)
RUN = [
    "--model", "gpt2-test", "--train.steps", "12", "--train.batch_size", "8", "--train.eval_every", "4",
    "--train.eval_batches", "2", "--train.checkpoint_every", "3", "--growth.source_depth", "0", "--growth.at", "5",
]  # fmt: skip


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

    eager = run("eager", False)
    # two graphs per model (train and eval): a stale model's graphs left in dynamo's cache would pass
    # the limit at the expansion and (silently, by default) send the grown model back to eager
    with torch._dynamo.config.patch(recompile_limit=2, fail_on_recompile_limit_hit=True):
        compiled = run("compiled", True)
    expected, got = curve(eager.out_dir), curve(compiled.out_dir)
    assert [point[:2] for point in got] == [point[:2] for point in expected]
    for (_, step, loss), (_, _, reference) in zip(got, expected, strict=True):
        assert loss == pytest.approx(reference, rel=RTOL), f"step {step}"  # after the expansion too: no stale graph
    # the first step of each (re)compiled model is compile time, kept out of the training time
    assert compiled.state.compile_time_s > 0 and eager.state.compile_time_s == 0
    assert compiled.state.train_time_s < compiled.state.compile_time_s


def test_an_expert_idle_on_one_rank_but_not_the_other_trains_under_fsdp(tmp_path):
    # 32 experts for 8 tokens a rank: many get tokens on one rank only; the other still runs them (on no
    # token), so that FSDP2 reduce-scatters the same gradients on both (a size mismatch failed before)
    args = ["--model", "moe-test", "--model.n_expert", "32", "--model.block_size", "8", "--train.steps", "4",
            "--train.batch_size", "2", "--train.eval_every", "4", "--train.eval_batches", "1"]  # fmt: skip
    done = torchrun(*args, "--train.parallel", "fsdp", "--out", str(tmp_path / "fsdp"))
    assert done.returncode == 0, done.stderr[-3000:]
    reference = single(*args, "--out", str(tmp_path / "single"))
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert_same_losses(tmp_path / "fsdp", tmp_path / "single")


FAIL_ON_RANK_0 = """
import importlib, os, sys
from depthgrow import DepthgrowError
if os.environ["RANK"] == "0":
    def fail(*args, **kwargs):
        raise DepthgrowError("the tracker failed on rank 0")
    importlib.import_module("depthgrow.trainer").Trackers.open = staticmethod(fail)
from depthgrow.cli import main
sys.exit(main())
"""


def test_an_error_on_one_rank_ends_the_run_instead_of_hanging(tmp_path):
    script = tmp_path / "fail_on_rank_0.py"
    script.write_text(FAIL_ON_RANK_0)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    args = ["train", *RUN, "--train.parallel", "fsdp", "--out", str(tmp_path / "run")]
    process = subprocess.Popen(
        [*command, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=launch_env()
    )
    try:
        _, stderr = process.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        process.terminate()  # torchrun stops its workers
        process.communicate()
        pytest.fail("an error on rank 0 left the run hanging (rank 0 at a barrier, rank 1 in a forward)")
    assert process.returncode != 0
    assert "depthgrow: error: the tracker failed on rank 0" in stderr


def test_a_short_last_batch_leaves_a_rank_an_empty_slice_that_adds_nothing():
    rows = torch.arange(7)
    for size in (2, 3, 4, 8):
        slices = [World(rank=rank, size=size, parallel="ddp").shard(rows) for rank in range(size)]
        assert torch.equal(torch.cat(slices), rows)  # every rank has a slice, even where 7 < size
    model = nn.Linear(4, 3)
    x, y = torch.randn(3, 4), torch.tensor([0, 1, 2])
    # rank 1 of 2 (World.sum adds nothing here): the last row of the first batch, none of the second
    loss, accuracy = evaluate(model, [(x, y), (x[:1], y[:1])], torch.device("cpu"), world=World(rank=1, size=2))
    with torch.no_grad():
        assert loss == pytest.approx(F.cross_entropy(model(x[2:]), y[2:]).item())


def test_more_processes_on_a_node_than_gpus_is_refused_in_one_line(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "64")
    with pytest.raises(DepthgrowError, match="local rank 64 has no CUDA device of its own"):
        with world("ddp", "cuda", 8):
            pass


def test_compile_where_torch_cannot_compile_is_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(torch._dynamo, "is_dynamo_supported", lambda: False)
    config = load_config(None, {"model.preset": "gpt2-test", "train.compile": "true", "train.out_dir": str(tmp_path)})
    with pytest.raises(DepthgrowError, match="train without --train.compile"):
        train(config)


@pytest.mark.parametrize(
    ("name", "peak"),
    [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
     ("NVIDIA L40S", 362.0), ("NVIDIA L40", 181.0), ("NVIDIA L4", 121.0), ("Tesla T4", None)],
)  # fmt: skip
def test_the_mfu_peak_is_the_named_gpus_dense_bf16_figure(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_tflops(torch.device("cuda", 0), None, "auto") == peak
    assert peak_tflops(torch.device("cuda", 0), None, "fp32") is None
    assert peak_tflops(torch.device("cuda", 0), 100.0, "fp32") == 100.0
