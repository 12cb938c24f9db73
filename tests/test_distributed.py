"""torchrun with 2 CPU processes (gloo): DDP and FSDP2 runs across an expansion against one process, and
checkpoints that change world size on resume."""

import gc
import json
import shutil
import socket
import subprocess
import sys
import weakref

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from launch import RTOL, assert_same_losses, curve, launch_env, single, torchrun
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from depthgrow import DepthgrowError, load_config, train
from depthgrow.checkpoint import CHECKPOINT_NAME, load_checkpoint
from depthgrow.cli import main
from depthgrow.distributed import World, plain_module, world
from depthgrow.flops import peak_tflops
from depthgrow.metrics import read_log
from depthgrow.trainer import Trainer, evaluate

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


def torchrun_script(tmp_path, source: str, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """Run ``source`` (a script standing for ``python -m depthgrow``) on 2 processes; fail the test if the
    run is still going after ``timeout`` seconds (a rank left waiting for another)."""
    script = tmp_path / "script.py"
    script.write_text(source)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    process = subprocess.Popen(
        [*command, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=launch_env()
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.terminate()  # torchrun stops its workers
        process.communicate()
        pytest.fail(f"the run was still going after {timeout} s: a rank was left waiting")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


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
    # rank 0 fails before the barrier after its outputs; rank 1 waits there (or in the first evaluation)
    args = ["train", *RUN, "--train.parallel", "fsdp", "--out", str(tmp_path / "run")]
    done = torchrun_script(tmp_path, FAIL_ON_RANK_0, *args, timeout=90)
    assert done.returncode != 0
    assert "depthgrow: error: the tracker failed on rank 0" in done.stderr


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


def test_fit_lets_the_ddp_wrapper_go_while_the_process_group_lives(tmp_path, monkeypatch):
    # a wrapper dropped after the group is destroyed can deadlock gloo's teardown (seen in CI): fit must
    # free it by reference counting alone, before the world is left
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for key, value in dict(WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1").items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MASTER_PORT", str(port))
    overrides = {"model.preset": "gpt2-test", "train.steps": "6", "train.batch_size": "4", "train.eval_every": "3",
                 "train.eval_batches": "1", "growth.source_depth": "0", "growth.at": "5", "train.parallel": "ddp",
                 "train.out_dir": str(tmp_path / "run")}  # fmt: skip
    config = load_config(None, overrides)
    gc.disable()
    try:
        with world("ddp", "cpu", 4) as (ranks, _):
            trainer = Trainer(config, ranks, torch.device("cpu"))
            trainer.open_outputs(resumed=False, changes={})
            assert isinstance(trainer.model, DistributedDataParallel)
            wrapper = weakref.ref(trainer.model)
            trainer.fit(stop_at=4)
            assert wrapper() is None
            assert trainer.model is plain_module(trainer.model) and dist.is_initialized()
            with pytest.raises(DepthgrowError, match="fit ends a run"):
                trainer.fit()
    finally:
        gc.enable()
    assert not dist.is_initialized()


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


def test_growth_under_fsdp_copying_blocks_and_their_state_repeats_the_single_process_losses(tmp_path):
    # a one-layer source copied into both slots (the second's outputs zeroed) with its optimizer state:
    # surviving, copied and zeroed shards, each taken from the source's shards on the rank
    args = [*RUN, "--growth.source_depth", "1", "--growth.init", "copy_zero", "--growth.copy_optimizer_state", "true"]
    done = torchrun(*args, "--train.parallel", "fsdp", "--out", str(tmp_path / "fsdp"))
    assert done.returncode == 0, done.stderr[-3000:]
    reference = single(*args, "--out", str(tmp_path / "single"))
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert_same_losses(tmp_path / "fsdp", tmp_path / "single")


# 0 -> 8 blocks of width 512 at step 1: the grown model's weights are 26.4M parameters (105 MB)
WIDE = ["--model", "gpt2-test", "--model.n_embd", "512", "--model.n_head", "8", "--model.n_layer", "8",
        "--train.steps", "2", "--train.batch_size", "2", "--train.eval_every", "2", "--train.eval_batches", "1",
        "--growth.source_depth", "0", "--growth.at", "1"]  # fmt: skip


def test_growth_under_fsdp_never_holds_the_full_target_model_on_a_rank(tmp_path, monkeypatch):
    # glibc raises its mmap threshold to the size of a freed block, so that later blocks of that size come
    # from the heap and may stay resident after they are freed (the figure varied 0.70-0.87 of the target's
    # weights): a fixed threshold returns each freed block, and the figure measures what growth holds at once
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    wide = {"model.preset": "gpt2-test", "model.n_embd": "512", "model.n_head": "8", "model.n_layer": "8"}
    target_bytes = load_config(None, wide).model.num_params() * 4
    memory = {}
    for parallel in ("fsdp", "ddp"):
        done = torchrun(*WIDE, "--train.parallel", parallel, "--out", str(tmp_path / parallel))
        assert done.returncode == 0, done.stderr[-3000:]
        (growth,) = [r for r in read_log(tmp_path / parallel / "log.jsonl") if r["event"] == "memory"]
        memory[parallel] = growth["peak_bytes"]  # the fuller rank's peak above what it held before growth
    # each rank holds its half of the grown model and one fresh block drawn whole at a time: 0.62 of the
    # target's weights; DDP's ranks hold all of them and DDP's gradient buckets as much again (2.1), which
    # shows that the figure measures what it says
    assert memory["fsdp"] < 0.75 * target_bytes, (memory, target_bytes)
    assert memory["ddp"] > 1.5 * target_bytes, (memory, target_bytes)


BUILD = """
import dataclasses, json, sys
import torch
from torch.distributed.tensor import DTensor
from depthgrow import load_config
from depthgrow.distributed import build_wrapped, world
from depthgrow.memory import peak_memory
from depthgrow.models import build_model
config = load_config(None, dict(arg.split("=", 1) for arg in sys.argv[1:])).model
cpu = torch.device("cpu")
with world("fsdp", "cpu", 2) as (ranks, _):
    peaks = {}
    build_wrapped(config.with_depth(0), ranks, seed=3, device=cpu, compile_model=False)  # FSDP's first use: 40 MB
    for parallel in ("fsdp", "ddp"):
        with peak_memory(cpu) as memory:
            model = build_wrapped(config, dataclasses.replace(ranks, parallel=parallel), seed=3, device=cpu,
                                  compile_model=False)
        gathered = [None, None]
        torch.distributed.all_gather_object(gathered, memory.bytes)
        peaks[parallel] = max(gathered)
        if parallel == "fsdp":
            held = {n: v.full_tensor() if isinstance(v, DTensor) else v for n, v in model.state_dict().items()}
        del model
    whole = build_model(config, seed=3).state_dict()
    if ranks.is_main:
        same = held.keys() == whole.keys() and all(torch.equal(held[n], v) for n, v in whole.items())
        print(json.dumps({**peaks, "same": same}))
"""


def test_an_fsdp_model_is_built_shard_by_shard_with_the_values_one_process_draws(tmp_path, monkeypatch):
    # a run that starts at full depth (a fixed-depth baseline) or resumes a grown run builds its model at
    # that depth: under FSDP2 no rank may hold it whole, and every value must be build_model's
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")  # see the growth test above
    wide = {"model.preset": "gpt2-test", "model.n_embd": "512", "model.n_head": "8", "model.n_layer": "8"}
    target_bytes = load_config(None, wide).model.num_params() * 4
    done = torchrun_script(tmp_path, BUILD, *(f"{key}={value}" for key, value in wide.items()))
    assert done.returncode == 0, done.stderr[-3000:]
    built = json.loads(done.stdout.strip().splitlines()[-1])
    assert built["same"]
    # each rank: its half and one block drawn whole at a time; DDP's ranks hold the whole model
    assert built["fsdp"] < 0.75 * target_bytes, (built, target_bytes)
    assert built["ddp"] > 0.95 * target_bytes, (built, target_bytes)


def shard_folder(run_dir) -> str:
    return load_checkpoint(run_dir / CHECKPOINT_NAME)["shards"]


@pytest.mark.parametrize(
    ("writer", "stop_at", "reader"),
    [("ddp", "3", "fsdp"), ("fsdp", "3", "none"), ("none", "7", "fsdp")],
)
def test_a_checkpoint_resumes_at_another_world_size_or_parallel_mode_on_either_side_of_the_expansion(
    tmp_path, reference, writer, stop_at, reader
):
    out = str(tmp_path / "run")
    launch = single if writer == "none" else torchrun
    stopped = launch(*RUN, "--train.parallel", writer, "--out", out, "--stop-at", stop_at)
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    checkpoint = load_checkpoint(tmp_path / "run" / CHECKPOINT_NAME)
    # several processes write shards, every rank its own; one process the single file
    assert ("shards" in checkpoint) == (writer != "none") and ("model" in checkpoint) == (writer == "none")
    if writer != "none":
        assert sorted(p.name for p in (tmp_path / "run" / checkpoint["shards"]).iterdir()) == [
            ".metadata", "__0_0.distcp", "__1_0.distcp"
        ]  # fmt: skip
    resumed = (single if reader == "none" else torchrun)("--resume", out, "--train.parallel", reader)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_losses(tmp_path / "run", reference)


KILL_IN_SAVE = """
import os, sys
from torch.distributed.checkpoint.filesystem import FileSystemWriter
write_data = FileSystemWriter.write_data
def killed_in_the_second_save(self, plan, planner):
    if os.environ["RANK"] == "1" and str(self.path).endswith("step-00000006"):
        os._exit(9)  # as a kill -9 of one rank half-way through the save: rank 0 has written its shard
    return write_data(self, plan, planner)
FileSystemWriter.write_data = killed_in_the_second_save
from depthgrow.cli import main
sys.exit(main())
"""


def test_a_kill_during_a_sharded_save_leaves_the_previous_checkpoint_to_resume_from(tmp_path, reference):
    run = tmp_path / "run"
    killed = torchrun_script(tmp_path, KILL_IN_SAVE, "train", *RUN, "--train.parallel", "fsdp", "--out", str(run))
    assert killed.returncode != 0
    assert load_checkpoint(run / CHECKPOINT_NAME)["train_state"]["step"] == 3
    assert shard_folder(run) == "checkpoint-shards/step-00000003"
    assert (run / "checkpoint-shards" / "step-00000006").is_dir()  # what the killed save left
    resumed = single("--resume", str(run), "--train.parallel", "none")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_losses(run, reference)
    assert not (run / "checkpoint-shards").exists()  # one process writes one file; the shards are stale


def test_an_asynchronous_sharded_save_resumes_exactly(tmp_path, reference):
    out = str(tmp_path / "run")
    asynchronous = ["--train.parallel", "fsdp", "--train.async_checkpoint", "true"]
    stopped = torchrun(*RUN, *asynchronous, "--out", out, "--stop-at", "7")
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert load_checkpoint(tmp_path / "run" / CHECKPOINT_NAME)["train_state"]["step"] == 7
    resumed = torchrun("--resume", out, *asynchronous)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_losses(tmp_path / "run", reference)


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    """An FSDP run stopped after its expansion, with a sharded checkpoint of step 7."""
    run = tmp_path_factory.mktemp("sharded") / "run"
    done = torchrun(*RUN, "--train.parallel", "fsdp", "--out", str(run), "--stop-at", "7")
    assert done.returncode == 0, done.stderr[-3000:]
    return run


def test_export_and_generate_read_a_sharded_checkpoint(tmp_path, sharded_run):
    from depthgrow.sampling import load_run

    loaded = load_run(sharded_run)
    assert loaded.step == 7 and loaded.model_config.n_layer == 2
    exported = main(["export", str(sharded_run), str(tmp_path / "hf")])
    assert exported == 0
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "hf" / "model.safetensors")
    ours = loaded.model.state_dict()
    assert torch.equal(weights["transformer.h.1.mlp.c_fc.weight"], ours["transformer.h.1.mlp.c_fc.weight"].T)


def test_a_run_that_names_newer_shards_while_they_are_read_is_read_again(tmp_path, sharded_run, monkeypatch):
    # generate or export beside a run still training: rank 0 may name newer shards and remove the ones
    # being read; the reader starts again from the newer checkpoint.pt instead of failing
    import depthgrow.checkpoint as checkpoint_module
    from depthgrow.sampling import load_run

    run = copy_run(sharded_run, tmp_path / "run")
    old = shard_folder(run)
    newer = old.replace("step-00000007", "step-00000008")
    read_shards, reads = checkpoint_module.read_shards, []

    def training_moves_on(folder, state, **kwargs):
        reads.append(folder.name)
        if len(reads) == 1:  # as a commit of the run would: the newer folder named, then the older removed
            shutil.copytree(folder, run / newer)
            checkpoint = load_checkpoint(run / CHECKPOINT_NAME)
            checkpoint_module.save_checkpoint(run / CHECKPOINT_NAME, {**checkpoint, "shards": newer})
            shutil.rmtree(folder)
        return read_shards(folder, state, **kwargs)

    monkeypatch.setattr(checkpoint_module, "read_shards", training_moves_on)
    loaded = load_run(run)
    assert reads == ["step-00000007", "step-00000008"] and loaded.step == 7
    expected = load_run(sharded_run).model.state_dict()
    assert all(torch.equal(value, expected[name]) for name, value in loaded.model.state_dict().items())


def worker_traceback(stderr: str) -> bool:
    """Whether a depthgrow process printed a traceback (torchrun prints one of its own when a worker fails)."""
    return stderr.count("Traceback") > ("ChildFailedError" in stderr)


def copy_run(source, destination):
    shutil.copytree(source, destination)
    return destination


def test_a_half_written_shard_folder_is_refused_in_one_line_on_every_rank(tmp_path, sharded_run):
    run = copy_run(sharded_run, tmp_path / "run")
    (run / shard_folder(run) / ".metadata").unlink()
    for launch in (single, torchrun):
        done = launch("--resume", str(run), "--train.parallel", "none" if launch is single else "fsdp")
        assert done.returncode == (2 if launch is single else 1), done.stderr[-3000:]  # torchrun's own status
        assert "are missing or half written (no .metadata)" in done.stderr
        assert not worker_traceback(done.stderr)


def test_shards_of_another_model_are_refused_in_one_line(tmp_path, sharded_run):
    other = tmp_path / "other"
    done = torchrun(*RUN, "--model.n_embd", "16", "--train.parallel", "fsdp", "--out", str(other), "--stop-at", "7")
    assert done.returncode == 0, done.stderr[-3000:]
    run = copy_run(sharded_run, tmp_path / "run")
    shutil.rmtree(run / shard_folder(run))
    shutil.copytree(other / shard_folder(other), run / shard_folder(run))
    done = torchrun("--resume", str(run), "--train.parallel", "fsdp")
    assert done.returncode == 1, done.stderr[-3000:]
    assert "do not fit this run's model" in done.stderr and not worker_traceback(done.stderr)


FAIL_ON_RANK_1_AFTER_GROWTH = """
import importlib, os, sys
trainer = importlib.import_module("depthgrow.trainer").Trainer
train_step = trainer.train_step
def failing(self, stop):
    if os.environ["RANK"] == "1" and self.state.step == 6:
        raise RuntimeError("rank 1 failed in step 7")
    return train_step(self, stop)
trainer.train_step = failing
from depthgrow.cli import main
sys.exit(main())
"""


def test_a_rank_failing_in_a_step_ends_the_run_instead_of_hanging(tmp_path):
    # rank 0 is left in the step's all-reduce, waiting for rank 1: torchrun must stop it
    done = torchrun_script(
        tmp_path, FAIL_ON_RANK_1_AFTER_GROWTH, "train", *RUN, "--train.parallel", "fsdp", "--out", str(tmp_path / "r"),
        timeout=90,
    )  # fmt: skip
    assert done.returncode != 0
    assert "rank 1 failed in step 7" in done.stderr
    assert load_checkpoint(tmp_path / "r" / CHECKPOINT_NAME)["train_state"]["step"] == 6  # the last whole one


def test_compare_under_torchrun_trains_every_run_on_both_processes_and_reports_once(tmp_path):
    args = ["--model", "gpt2-test", "--train.steps", "12", "--train.batch_size", "8", "--train.eval_every", "4",
            "--train.eval_batches", "2", "--growth.at", "5", "--sources", "0"]  # fmt: skip
    done = torchrun(*args, "--train.parallel", "fsdp", "--out", str(tmp_path / "fsdp"), command="compare")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("summary: ") == 1  # rank 0 reports
    reference = single(*args, "--out", str(tmp_path / "single"), command="compare")
    assert reference.returncode == 0, reference.stderr[-3000:]
    got, expected = (json.loads((tmp_path / name / "summary.json").read_text())["runs"] for name in ("fsdp", "single"))
    assert [row["name"] for row in got] == [row["name"] for row in expected]
    for row, same in zip(got, expected, strict=True):
        assert row["final_val_loss"] == pytest.approx(same["final_val_loss"], rel=RTOL), row["name"]
        growth = [r for r in read_log(tmp_path / "fsdp" / row["name"] / "log.jsonl") if r["event"] == "growth"]
        assert len(growth) == (row["name"] != "fixed" and not row["name"].startswith("fixed-"))


def test_a_checkpoint_pt_that_could_not_be_written_keeps_the_shards_it_still_names(tmp_path, monkeypatch):
    # rank 0 names the new shards in checkpoint.pt; if that write fails, the old checkpoint.pt still names the
    # previous folder, which must then stay the one kept (the next save's cleanup spares only the committed
    # folder) until a checkpoint.pt naming another is written
    import depthgrow.checkpoint as checkpoint_module

    previous, new = "checkpoint-shards/step-00000003", "checkpoint-shards/step-00000006"
    for folder in (previous, new):
        (tmp_path / folder).mkdir(parents=True)
    shards = checkpoint_module.ShardedCheckpoints(tmp_path, is_main=True, asynchronous=False, committed=previous)

    def disk_full(path, payload):
        raise checkpoint_module.OutputWriteError(f"cannot write {path}: No space left on device")

    monkeypatch.setattr(checkpoint_module, "save_checkpoint", disk_full)
    with pytest.raises(DepthgrowError, match="No space left"):
        shards._commit(new, {})
    assert shards.committed == previous and (tmp_path / previous).is_dir()
    monkeypatch.undo()
    shards._commit(new, {"train_state": {"step": 6}})
    assert shards.committed == new and not (tmp_path / previous).exists()
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME)["shards"] == new
