"""The benchmark scripts run (their figures are for the README, not for tests)."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_the_throughput_benchmark_prints_both_rates_and_the_growth_time():
    command = [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--models", "gpt2-test"]
    done = subprocess.run([*command, "--rounds", "1", "--steps", "8"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    row = r"^gpt2-test\s+(\d+)\s+([\d,]+)\s+([\d,]+)\s+([\d.]+)\s+-?[\d.]+ ms\s+-?[\d.]+%$"
    rows = re.findall(row, done.stdout, re.M)
    assert [int(depth) for depth, *_ in rows] == [0, 1, 2]
    assert all(float(ratio) > 0 for *_, ratio in rows)
    assert re.search(r"^gpt2-test\s+growth 1 -> 2: [\d.]+ ms; one plain step at depth 2: [\d.]+ ms", done.stdout, re.M)


def test_the_scale_out_benchmark_prints_memory_and_wait_for_each_mode():
    command = [sys.executable, str(ROOT / "benchmarks" / "scale_out.py"), "--width", "128", "--layers", "4"]
    done = subprocess.run([*command, "--steps", "3"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = re.findall(
        r"^\| (ddp|fsdp|fsdp-async) \| (\d+) MiB \| ([\d.]+) \| (\d+) MiB \| (\d+) ms \|$", done.stdout, re.M
    )
    assert [mode for mode, *_ in rows] == ["ddp", "fsdp", "fsdp-async"]
