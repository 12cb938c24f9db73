"""GPU benchmark: throughput and MFU of GPT-2 124M at depth 0, 1 and 12, the time growth takes, and a short
124M compare (fixed depth against a zero-layer run grown at 0.8 T).

    python benchmarks/gpu_bench.py --out OUT_DIR              # one H100/H200: about 6 minutes
    python benchmarks/gpu_bench.py --smoke --out OUT_DIR      # any machine, CPU included: seconds

Everything runs on the embedded Shakespeare corpus as bytes (no download; GPT-2's 50257-token head is
kept, so the cost per token is that of GPT-2 124M). Throughput is measured in bf16 autocast, with and
without ``torch.compile``, after warm-up steps; MFU counts depthgrow's FLOPs per token (6 x the block
and head weights plus attention) against the device's dense bf16 peak (``--peak-tflops`` for a device
that depthgrow does not know). Prints one table per part and writes ``bench.json`` beside the compare.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from depthgrow import build_model, build_optimizer, grow, load_config
from depthgrow.compare import compare
from depthgrow.data import make_batches
from depthgrow.distributed import World, plain_module, wrap
from depthgrow.flops import DEPTHGROW, peak_tflops
from depthgrow.trainer import loss_fn, resolve_device


def throughput(config, depth: int, *, compile_model: bool, steps: int, warmup: int, device, peak: float | None):
    """Tokens per second and MFU of training steps at ``depth`` (after ``warmup`` steps, compile included)."""
    model_config = config.model.with_depth(depth)
    model = wrap(build_model(model_config, seed=0, device=device), World(), compile_model=compile_model)
    optimizer = build_optimizer(plain_module(model), config.optim)
    batches = make_batches(config.model, config.data, batch_size=config.train.batch_size, eval_batches=1, seed=0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step(index: int) -> None:
        x, y = (t.to(device, non_blocking=True) for t in batches.train_batch(index))
        with autocast:
            loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    started = time.perf_counter()
    for index in range(warmup):
        step(index)
    _sync(device)
    warmup_s = time.perf_counter() - started
    started = time.perf_counter()
    for index in range(warmup, warmup + steps):
        step(index)
    _sync(device)
    seconds = time.perf_counter() - started
    tokens_per_s = steps * batches.units_per_step / seconds
    flops_per_s = tokens_per_s * DEPTHGROW.per_unit(model_config)
    return {
        "depth": depth,
        "compile": compile_model,
        "tokens_per_s": tokens_per_s,
        "tflops_per_s": flops_per_s / 1e12,
        "mfu": None if peak is None else flops_per_s / (peak * 1e12),
        "warmup_s": warmup_s,
    }


def growth_time(config, *, device, source: int = 0) -> dict[str, float]:
    """Seconds that ``grow`` takes for source -> target on a model and optimizer that have taken a step."""
    model = build_model(config.model.with_depth(source), seed=0, device=device)
    optimizer = build_optimizer(model, config.optim)
    x = torch.randint(0, 256, (2, config.model.block_size), device=device)
    loss_fn(model(x[:, :-1]), x[:, 1:]).backward()
    optimizer.step()
    _sync(device)
    started = time.perf_counter()
    grow(model, optimizer, config.model.n_layer, "random", seed=0)
    _sync(device)
    return {"from": source, "to": config.model.n_layer, "seconds": time.perf_counter() - started}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for the compare runs and bench.json")
    parser.add_argument("--smoke", action="store_true", help="a tiny model and a few steps: checks the script")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak")
    parser.add_argument("--compare-steps", type=int, default=1000, help="T of the short compare")
    args = parser.parse_args()

    smoke = args.smoke
    base = {
        "model.preset": "gpt2-test" if smoke else "gpt2-124m",
        "train.batch_size": "4" if smoke else "16",
        "optim.name": "muon-nsgd",
    }
    config = load_config(None, base)
    device = resolve_device("auto")
    if device.type == "cpu":
        torch.set_flush_denormal(True)
    peak = peak_tflops(device, args.peak_tflops, "bf16")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}; peak {peak or 'unknown'} TFLOP/s (bf16 dense); torch {torch.__version__}")
    tokens_per_step = config.train.batch_size * config.model.block_size
    print(f"model: {base['model.preset']}, {tokens_per_step} tokens per step")

    results: dict = {"device": name, "peak_tflops": peak, "throughput": []}
    steps, warmup = (3, 2) if smoke else (30, 10)
    print(f"\n{'depth':>5} {'compile':>7} {'tokens/s':>12} {'TFLOP/s':>9} {'MFU':>7} {'warm-up s':>9}")
    for compile_model in (False, True):
        for depth in (0, 1, config.model.n_layer):
            row = throughput(
                config, depth, compile_model=compile_model, steps=steps, warmup=warmup, device=device, peak=peak
            )
            results["throughput"].append(row)
            mfu = "-" if row["mfu"] is None else f"{row['mfu']:.1%}"
            print(
                f"{depth:>5} {str(compile_model):>7} {row['tokens_per_s']:>12,.0f} {row['tflops_per_s']:>9.1f} "
                f"{mfu:>7} {row['warmup_s']:>9.1f}"
            )
            if device.type == "cuda":
                torch.cuda.empty_cache()

    results["growth"] = growth_time(config, device=device)
    print(f"\ngrowth 0 -> {results['growth']['to']} (model and optimizer): {results['growth']['seconds']:.3f} s")

    compare_steps = 40 if smoke else args.compare_steps
    run = config.with_overrides(
        {
            "train.steps": str(compare_steps),
            "train.eval_every": str(max(compare_steps // 10, 1)),
            "train.eval_batches": "4" if smoke else "10",
            "train.compile": "true",
            "train.out_dir": str(Path(args.out) / "compare"),
        }
    )
    print(f"\ncompare: {base['model.preset']}, fixed against 0 -> L at 0.8 T, T = {compare_steps}, compiled")
    rows = compare(run, sources=[0], overwrite=True)
    results["compare"] = rows
    grown = next(row for row in rows if row["source_depth"] == 0)
    print(
        f"0-layer run: gap {grown['gap_pct']:+.2f} % at {grown['compute_fraction']:.1%} of the FLOPs and "
        f"{grown['wall_fraction']:.1%} of the wall clock"
    )
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "bench.json").write_text(json.dumps(results, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
