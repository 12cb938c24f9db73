"""Schedules as pure functions of (step, T): the learning-rate multiplier and the depth plan.

Nothing here holds state, so the progressive run and the fixed-depth baseline see the same learning
rate at the same step (no re-warmup at growth), and resuming a run needs nothing but its step.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Literal

from depthgrow.docfield import doc_field
from depthgrow.errors import DepthgrowError

ScheduleName = Literal["wsd", "cosine", "constant"]
DecayShape = Literal["linear", "cosine", "sqrt"]


@dataclass(kw_only=True)
class ScheduleConfig:
    name: ScheduleName = doc_field(
        "wsd",
        "after the warmup: wsd (warmup-stable-decay: the peak, then the decay at the end), cosine (half a cosine "
        "to final_lr_frac at T) or constant (the peak)",
    )
    warmup: float = doc_field(0.02, "fraction of T spent warming up linearly from ~0 to the peak")
    decay: float = doc_field(0.1, "wsd: fraction of T, at the end, spent decaying to final_lr_frac")
    decay_shape: DecayShape = doc_field(
        "linear", "wsd: how the decay falls: linear, cosine (half a cosine) or sqrt (1 - sqrt of its progress)"
    )
    final_lr_frac: float = doc_field(0.0, "the multiplier of the peak learning rate reached at step T")

    def problems(self) -> list[str]:
        found = []
        for name in ("warmup", "decay", "final_lr_frac"):
            if not 0.0 <= getattr(self, name) <= 1.0:  # also false for NaN
                found.append(f"schedule.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.name == "wsd" and self.warmup + self.decay > 1.0:
            found.append(f"schedule.warmup + schedule.decay must be <= 1, got {self.warmup} + {self.decay}")
        return found


def lr_multiplier(step: int, total_steps: int, config: ScheduleConfig) -> float:
    """The learning rate at ``step`` (0-based) of ``total_steps``, as a fraction of the peak.

    - warmup (every schedule): ``(step + 1) / warmup_steps`` for the first ``round(warmup·T)`` steps;
    - ``wsd``: then 1 until the last ``round(decay·T)`` steps, which fall from 1 towards ``final_lr_frac``
      (reached at step T, one past the last step) along ``decay_shape``: linear, half a cosine, or
      ``1 - sqrt`` of the decay progress;
    - ``cosine``: then half a cosine from 1 to ``final_lr_frac`` at step T;
    - ``constant``: then 1.
    """
    warmup_steps = round(config.warmup * total_steps)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    final = config.final_lr_frac
    if config.name == "constant":
        return 1.0
    if config.name == "cosine":
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress))
    decay_steps = round(config.decay * total_steps)
    decay_start = total_steps - decay_steps
    if step < decay_start:
        return 1.0
    if step >= total_steps:
        return final
    progress = (step - decay_start) / decay_steps
    if config.decay_shape == "linear":
        remaining = 1.0 - progress
    elif config.decay_shape == "cosine":
        remaining = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        remaining = 1.0 - math.sqrt(progress)
    return final + (1.0 - final) * remaining


@dataclass(frozen=True)
class GrowthPlan:
    """Depth as a step function of the step: ``depths[i]`` from ``steps[i-1]`` (or 0) on; ``steps[i]``
    is the step at whose start the model grows from ``depths[i]`` to ``depths[i+1]``, filling the new
    slots by ``init``. A growth method (depthgrow.methods) may add a ramp (the new blocks' residual
    outputs scaled from 0 to 1 over ``ramp_steps`` steps after each expansion) and a learning rate that
    decays from the last expansion to the end of the run."""

    depths: tuple[int, ...]
    steps: tuple[int, ...]
    init: str = "random"
    ramp_steps: int = 0
    decay_from_growth: bool = False

    def depth_at(self, step: int) -> int:
        return self.depths[bisect.bisect_right(self.steps, step)]

    def ramp_at(self, step: int) -> tuple[int, float] | None:
        """During a ramp, the expansion it follows (its index in ``steps``) and the scale of the new blocks'
        outputs at ``step``: 0 at the expansion step, rising linearly to 1 ``ramp_steps`` steps later."""
        done = bisect.bisect_right(self.steps, step)
        if not self.ramp_steps or done == 0 or step - self.steps[done - 1] >= self.ramp_steps:
            return None
        return done - 1, (step - self.steps[done - 1]) / self.ramp_steps

    def lr_multiplier(self, step: int, total_steps: int, schedule: ScheduleConfig) -> float:
        """The schedule's multiplier at ``step``; with ``decay_from_growth``, from the last expansion on a
        linear decay from the multiplier there to ``final_lr_frac`` at T."""
        if not (self.decay_from_growth and self.steps and step >= self.steps[-1]):
            return lr_multiplier(step, total_steps, schedule)
        start = self.steps[-1]
        peak = lr_multiplier(start, total_steps, schedule)
        progress = (step - start) / (total_steps - start)
        return peak + (schedule.final_lr_frac - peak) * progress

    @property
    def initial_depth(self) -> int:
        return self.depths[0]

    @property
    def target_depth(self) -> int:
        return self.depths[-1]


def growth_plan(
    *,
    source_depth: int | None,
    via: list[int],
    at: list[float],
    target_depth: int,
    total_steps: int,
    init: str = "random",
) -> GrowthPlan:
    """Resolve a growth config into a plan, or raise :class:`DepthgrowError` saying what is wrong.

    ``source_depth=None`` is a fixed-depth run. Each ``at`` value below 1 is a fraction of T, one of 1 or
    more is a step; every expansion must fall strictly inside (0, T) and after the previous one. ``via``
    lists the intermediate depths of a multi-stage run (0 -> 2 -> 12 is ``source_depth=0, via=[2]``).
    """
    if source_depth is None:
        return GrowthPlan(depths=(target_depth,), steps=(), init=init)
    depths = (source_depth, *via, target_depth)
    if source_depth < 0:
        raise DepthgrowError(f"growth.source_depth must be >= 0, got {source_depth}")
    if any(a >= b for a, b in zip(depths, depths[1:], strict=False)):
        chain = " -> ".join(map(str, depths))
        raise DepthgrowError(
            f"growth depths must increase: source depth < via depths < target depth (model.n_layer), got {chain}"
        )
    if len(at) != len(depths) - 1:
        raise DepthgrowError(
            f"growth.at needs one expansion time per stage: {len(depths) - 1} for "
            f"{' -> '.join(map(str, depths))}, got {len(at)} ({at})"
        )
    steps = []
    for value in at:
        if value < 1.0:
            step = round(value * total_steps)
        elif float(value).is_integer():
            step = int(value)
        else:
            raise DepthgrowError(f"growth.at value {value} is neither a fraction of T (< 1) nor a whole step")
        if not 0 < step < total_steps:
            raise DepthgrowError(
                f"expansion at {value} falls at step {step}, outside (0, T={total_steps}); "
                "use a fraction in (0, 1) or a step between 1 and T-1"
            )
        steps.append(step)
    if any(a >= b for a, b in zip(steps, steps[1:], strict=False)):
        raise DepthgrowError(f"growth.at must give increasing steps, got steps {steps}")
    return GrowthPlan(depths=depths, steps=tuple(steps), init=init)


def extension_problem(
    schedule: ScheduleConfig,
    old_plan: GrowthPlan,
    new_plan: GrowthPlan,
    *,
    step: int,
    depth: int,
    old_total: int,
    new_total: int,
) -> str | None:
    """Why a run at ``step`` (and ``depth``) cannot honestly go on as a run of ``new_total`` steps, or None.

    Extending means that from ``step`` on the learning rate and the growth plan are those of the longer
    run. That is honest while the learning rate had not begun to fall (a WSD run before its decay, a
    constant one anywhere; a cosine one only within its warm-up): otherwise the longer schedule would
    lift the learning rate back towards its peak. Expansions already made must stay where they were.
    """
    if new_total < old_total:
        return f"a run can be extended, not shortened (train.steps {old_total} -> {new_total})"
    previous = old_plan.lr_multiplier(step - 1, old_total, schedule) if step > 0 else 0.0
    warmup_steps = round(schedule.warmup * old_total)
    if step > warmup_steps and previous < 1.0:
        return (
            f"its {schedule.name} learning rate had begun to fall (to {previous:.3g} of its peak at step {step}); "
            f"the longer schedule would lift it to {new_plan.lr_multiplier(step, new_total, schedule):.3g}. Extend a "
            f"run before its decay (stop it there with --stop-at), or start a new one"
        )
    done = old_plan.depths.index(depth)  # expansions made so far
    if old_plan.steps[:done] != new_plan.steps[:done]:
        kept = [*old_plan.steps[:done], *new_plan.steps[done:]]
        return (
            f"the expansions made at step {', '.join(map(str, old_plan.steps[:done]))} would move to step "
            f"{', '.join(map(str, new_plan.steps[:done]))} with T = {new_total}; keep them where they were with "
            f"--growth.at {','.join(map(str, kept))}"
        )
    if done < len(new_plan.steps) and new_plan.steps[done] < step:
        return f"the next expansion would fall at step {new_plan.steps[done]}, before the run's step {step}"
    if old_plan.ramp_at(step) is not None and new_plan.ramp_steps != old_plan.ramp_steps:
        return (
            f"the new blocks' ramp, under way, would change from {old_plan.ramp_steps} to {new_plan.ramp_steps} steps "
            f"with T = {new_total}; keep it with --growth.ramp {old_plan.ramp_steps}"
        )
    return None
