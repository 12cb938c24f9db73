"""Memory per rank during an expansion and a checkpoint, and what an asynchronous checkpoint saves in time.

    python benchmarks/scale_out.py                          # GPT-2 width 768, 0 -> 12 blocks, 2 processes (~3 min here)
    python benchmarks/scale_out.py --width 512 --layers 8   # smaller and faster

It starts ``torchrun --nproc_per_node 2`` (gloo on the CPU, NCCL where each rank has a GPU) once per mode
and trains a zero-layer GPT-2 of the given width that grows to ``--layers`` blocks after its first step,
takes a checkpoint after every step, and reports, as the fuller rank measured them:

- **growth**: the peak memory above what the rank held just before the expansion (the trainer's own
  figure, the ``peak_bytes`` of the run's ``memory`` record: resident host memory on the CPU, the CUDA
  allocator's peak on a GPU), against the grown model's full weights;
- **checkpoint**: the same figure around each save of the grown model (a trainer subclass measures it),
  and the time the training loop waited for the save (with ``--train.async_checkpoint`` the shards are
  written in the background: the wait is the staging copy).

Modes: ``ddp`` (every rank holds the whole model), ``fsdp`` (FSDP2: a rank holds its shards; growth builds
the new blocks on the meta device and draws them a block at a time) and ``fsdp-async``. The ranks run
with glibc's mmap threshold fixed (``MALLOC_MMAP_THRESHOLD_=65536``), so that a freed block leaves the
resident set at once and the peak is what the rank held at once.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MODES = {
    "ddp": {"train.parallel": "ddp"},
    "fsdp": {"train.parallel": "fsdp"},
    "fsdp-async": {"train.parallel": "fsdp", "train.async_checkpoint": "true"},
}
REPORT = "scale-out figures: "


def worker(overrides: dict[str, str]) -> None:
    """One rank of one mode, under torchrun: train through a Trainer that measures its saves."""
    from depthgrow import load_config
    from depthgrow.distributed import world
    from depthgrow.memory import peak_memory
    from depthgrow.metrics import LOG_NAME, read_log
    from depthgrow.trainer import Trainer, resolve_device

    class MeasuredTrainer(Trainer):
        saves: list[tuple[int, float]] = []

        def save(self) -> None:
            with peak_memory(self.device) as memory:
                started = time.perf_counter()
                super().save()
                seconds = time.perf_counter() - started
            self.saves.append((memory.bytes or 0, seconds))

    config = load_config(None, overrides)
    with world(config.train.parallel, config.train.device, config.train.batch_size) as (ranks, device_name):
        device = resolve_device(device_name)
        torch.set_flush_denormal(True)
        trainer = MeasuredTrainer(config, ranks, device)
        trainer.open_outputs(resumed=False, changes={})
        trainer.fit()
        # the grown model's saves (the first is of the zero-layer model); the fuller rank's memory
        grown = trainer.saves[1:]
        memory = ranks.max(torch.tensor([max(m for m, _ in grown)], device=device)).item()
        wait = ranks.max(torch.tensor([sum(s for _, s in grown) / len(grown)], device=device)).item()
        if ranks.is_main:
            (growth,) = [r for r in read_log(Path(config.train.out_dir) / LOG_NAME) if r["event"] == "memory"]
            figures = {"growth_bytes": growth["peak_bytes"], "checkpoint_bytes": memory, "checkpoint_wait_s": wait}
            print(REPORT + json.dumps(figures), flush=True)


def run_mode(mode: str, base: dict[str, str], out: Path) -> dict[str, float]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__]
    overrides = {**base, **MODES[mode], "train.out_dir": str(out / mode)}
    # glibc raises its mmap threshold to the size of a freed block, after which blocks of that size come from
    # the heap and may stay resident once freed: a fixed threshold makes the peak what was held at once
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run([*command, "--worker", json.dumps(overrides)], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{done.stderr[-3000:]}")
    line = next(line for line in done.stdout.splitlines() if line.startswith(REPORT))
    return json.loads(line[len(REPORT) :])


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        worker(json.loads(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--steps", type=int, default=4)
    options = parser.parse_args()
    model = {"model.preset": "gpt2-test", "model.n_embd": str(options.width), "model.n_head": str(options.width // 64),
             "model.n_layer": str(options.layers)}  # fmt: skip
    steps = str(options.steps)
    base = {**model, "train.steps": steps, "train.batch_size": "2", "train.eval_every": steps,
            "train.eval_batches": "1", "train.checkpoint_every": "1", "growth.source_depth": "0",
            "growth.at": "1"}  # fmt: skip
    from depthgrow import load_config

    target = load_config(None, model).model
    weights = target.num_params() * 4
    print(f"GPT-2 width {options.width}, 0 -> {options.layers} blocks: the grown model's weights are "
          f"{target.num_params() / 1e6:.1f}M parameters, {weights / 2**20:.0f} MiB in fp32; 2 processes")  # fmt: skip
    print("| mode | growth: peak above before, per rank | share of the full weights | checkpoint: peak per rank "
          "| checkpoint: loop waits |")  # fmt: skip
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for mode in MODES:
            figures = run_mode(mode, base, Path(folder))
            print(
                f"| {mode} | {figures['growth_bytes'] / 2**20:.0f} MiB | {figures['growth_bytes'] / weights:.2f} "
                f"| {figures['checkpoint_bytes'] / 2**20:.0f} MiB | {figures['checkpoint_wait_s'] * 1e3:.0f} ms |",
                flush=True,
            )


if __name__ == "__main__":
    main()
