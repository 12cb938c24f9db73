"""``depthgrow calibrate``: the paper's recipe for the expansion time, automated.

The paper chooses tau from a pilot: train the fixed-depth baseline and a progressive run expanded right
after warm-up, measure the mixing time t_mix (the steps after the expansion until the progressive run's
validation loss comes within a tolerance of the baseline's at the same step), and expand at
tau = T - t_mix, the latest step that still leaves time to mix. A pilot runs at a shorter horizon than
the target, so t_mix must be carried from the pilot's T to the target's: with two pilot horizons the rule
is measured, t_mix(T) = t_1 (T / T_1)^beta with beta from the two; with one, t_mix is taken proportional
to T (beta = 1), and the output says which. A pilot that never mixes gets no recommendation.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from depthgrow.analysis import closest_gap, eval_curve, last_growth_step, mixing_time
from depthgrow.compare import compute_fraction, fixed_depth
from depthgrow.config import RunConfig
from depthgrow.errors import DepthgrowError
from depthgrow.metrics import LOG_NAME, read_log
from depthgrow.trainer import run_or_reuse

CALIBRATION_NAME = "calibration.json"
DEFAULT_PILOTS = (500, 1000)
EVALUATIONS_PER_PILOT = 50  # t_mix is read to within T / 50 steps


def pilot_pair(base: RunConfig, steps: int) -> tuple[RunConfig, RunConfig]:
    """The pilot at ``steps``: the fixed-depth baseline and the progressive run expanded right after warm-up,
    both evaluated every steps / 50."""
    train = dataclasses.replace(base.train, steps=steps, eval_every=max(1, steps // EVALUATIONS_PER_PILOT))
    fixed = fixed_depth(dataclasses.replace(base, train=train), steps, Path())
    after_warmup = max(1, round(base.schedule.warmup * steps)) + 1
    grown = dataclasses.replace(base, train=train).with_overrides({"growth.at": str(after_warmup)})
    return fixed, grown


def calibrate(
    base: RunConfig,
    *,
    pilots: tuple[int, ...],
    tolerance: float,
    stored: Callable[[RunConfig, str], RunConfig],
    resume_hint: str,
) -> dict[str, Any]:
    """Run (or reuse) the pilots and recommend the expansion step for ``base.train.steps``."""
    if base.growth.source_depth is None:
        raise DepthgrowError("calibrate needs a progressive run: set growth.source_depth (0 or 1, the paper's)")
    if not pilots or any(not 0 < p for p in pilots) or len(set(pilots)) != len(pilots):
        raise DepthgrowError(f"--pilots must be distinct step counts > 0, got {','.join(map(str, pilots))}")
    target = base.train.steps
    measured = []
    for steps in sorted(pilots):
        fixed, grown = pilot_pair(base, steps)
        logs = {}
        for label, config in ((f"pilot-T{steps}-fixed", fixed), (f"pilot-T{steps}-grown", grown)):
            config = stored(config, label)
            if run_or_reuse(config, label=label, resume_hint=resume_hint) is None:
                raise KeyboardInterrupt
            logs[label] = (config.train.out_dir, read_log(Path(config.train.out_dir) / LOG_NAME))
        (fixed_dir, fixed_log), (grown_dir, grown_log) = logs.values()
        growth_step = last_growth_step(grown_log)
        curve, reference = eval_curve(grown_log), eval_curve(fixed_log)
        measured.append(
            {
                "steps": steps,
                "growth_step": growth_step,
                "mixing_steps": mixing_time(curve, reference, growth_step, tolerance),
                "closest_gap_pct": closest_gap(curve, reference, growth_step),
                "fixed_dir": fixed_dir,
                "run_dir": grown_dir,
            }
        )
    result: dict[str, Any] = {
        "source_depth": base.growth.source_depth,
        "target_steps": target,
        "tolerance": tolerance,
        "pilots": measured,
        "recommended_step": None,
    }
    never = [p for p in measured if p["mixing_steps"] is None]
    if never:
        result["reason"] = "; ".join(
            f"the pilot at T = {p['steps']} never came within {tolerance:.1%} of its baseline (closest "
            f"{p['closest_gap_pct']:+.2f} %)"
            for p in never
        )
        return result
    first, last = measured[0], measured[-1]
    if len(measured) >= 2 and first["mixing_steps"] > 0 and last["mixing_steps"] > 0:
        beta = math.log(last["mixing_steps"] / first["mixing_steps"]) / math.log(last["steps"] / first["steps"])
        rule = f"t_mix(T) = {first['mixing_steps']} (T / {first['steps']})^{beta:.3f}, measured from the two pilots"
    else:
        beta = 1.0
        rule = f"t_mix proportional to T (beta = 1, assumed: {len(measured)} pilot(s) with a positive t_mix)"
    t_mix = round(max(first["mixing_steps"], 1) * (target / first["steps"]) ** beta)
    warmup = round(base.schedule.warmup * target)
    result |= {"beta": beta, "rule": rule, "predicted_mixing_steps": t_mix}
    if target - t_mix <= warmup:
        result["reason"] = f"mixing would take {t_mix} of the {target} steps, the whole run after warm-up"
        return result
    recommended = target - t_mix
    grown = base.with_overrides({"growth.at": str(recommended)})
    result |= {"recommended_step": recommended, "compute_fraction": compute_fraction(grown)}
    return result


def calibration_lines(result: dict[str, Any]) -> list[str]:
    lines = [
        f"pilot T = {p['steps']}: expanded at step {p['growth_step']}, "
        + ("never mixed" if p["mixing_steps"] is None else f"mixed after {p['mixing_steps']} steps")
        + f" (within {result['tolerance']:.1%} of the baseline; closest {p['closest_gap_pct']:+.2f} %)"
        for p in result["pilots"]
    ]
    if result["recommended_step"] is None:
        lines.append(f"no recommendation: {result['reason']}")
        return lines
    target = result["target_steps"]
    lines += [
        f"rule: {result['rule']}; at T = {target}: t_mix = {result['predicted_mixing_steps']} steps",
        f"recommended: expand {result['source_depth']} -> L at step {result['recommended_step']} of {target} "
        f"(tau = {result['recommended_step'] / target:.3f} T), {result['compute_fraction']:.1%} of the fixed-depth "
        f"FLOPs; predicted to end within {result['tolerance']:.1%} of the fixed-depth run if the rule holds",
    ]
    return lines


def write_calibration(result: dict[str, Any], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CALIBRATION_NAME
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def calibrated_step(path: str | Path, *, source_depth: int | None, steps: int) -> int:
    """The step a calibration file recommends for a run of this source depth and T (growth.at=auto)."""
    path = Path(path)
    if not path.is_file():
        raise DepthgrowError(f"growth.at=auto reads {path}, which does not exist: run depthgrow calibrate first")
    try:
        result = json.loads(path.read_text())
        source, target, step = result["source_depth"], result["target_steps"], result["recommended_step"]
    except (ValueError, KeyError, TypeError) as error:
        raise DepthgrowError(f"{path} is not a calibration ({error}); run depthgrow calibrate again") from None
    if step is None:
        raise DepthgrowError(f"{path} recommends no expansion step: {result.get('reason', 'the pilot never mixed')}")
    if (source, target) != (source_depth, steps):
        raise DepthgrowError(
            f"{path} calibrates growth.source_depth={source} at train.steps={target}, not {source_depth} at "
            f"{steps}; calibrate these settings"
        )
    return step
