"""Launching depthgrow train on 2 gloo processes (torchrun) or one, and comparing their losses."""

import os
import subprocess
import sys

import pytest

from depthgrow.metrics import read_log

# reductions over 2 ranks add in another order than one process, and torch's Muon orthogonalises in
# bfloat16: on a sharded matrix each rank's partial product is rounded to bfloat16 before the sum, so the
# updates differ by bfloat16 rounding (up to 6e-4 relative in the loss after 12 steps of moe-test; with
# the Newton-Schulz iteration patched to float32 the two agree to 1e-7)
RTOL = 1e-3


def launch_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(*args: str, command: str = "train") -> subprocess.CompletedProcess:
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return subprocess.run(
        [*launch, "-m", "depthgrow", command, *args], capture_output=True, text=True, env=launch_env(), timeout=300
    )


def single(*args: str, command: str = "train") -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "depthgrow", command, *args]
    return subprocess.run(command, capture_output=True, text=True, env=launch_env(), timeout=300)


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
