"""The divergence guard: a run whose loss became non-finite or exploded stops before another checkpoint.

A loss is said to have exploded when it is above ``factor`` times the best the run has reached and
above the run's first training loss (a model is never called diverged while it is no worse than at
initialisation: a classifier at loss 0.01 may wander to 0.05). The training loss is smoothed over ~10
steps first, so that one noisy batch is no divergence; a validation loss is compared as it is. A run's
own losses set the scale, so the same default holds for a language model at 3 nats and an image model
at 0.01. Measured on the embedded default (0 -> 4 layers), the smoothed training loss never rose above
1.011 times its best, the expansion included; a run at 3,000 times the recommended learning rate passes
3 times its best within a few steps.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

SMOOTHING = 0.9  # the training loss's exponential moving average keeps this much of its previous value


@dataclass
class DivergenceGuard:
    """What the run has reached so far; :meth:`train` and :meth:`validation` say what went wrong, or None."""

    factor: float | None  # None: only non-finite losses stop the run
    first_loss: float | None = None
    loss_ema: float | None = None
    best_loss_ema: float | None = None
    best_val_loss: float | None = None

    def train(self, step: int, loss: float) -> str | None:
        if not math.isfinite(loss):
            return f"the training loss became {loss} at step {step}"
        if self.first_loss is None:
            self.first_loss = loss
        self.loss_ema = loss if self.loss_ema is None else SMOOTHING * self.loss_ema + (1 - SMOOTHING) * loss
        self.best_loss_ema = self.loss_ema if self.best_loss_ema is None else min(self.best_loss_ema, self.loss_ema)
        if self._exploded(self.loss_ema, self.best_loss_ema):
            return (
                f"the training loss (smoothed over ~10 steps) reached {self.loss_ema:.4g} at step {step}, "
                f"{self.loss_ema / self.best_loss_ema:.1f} times its best {self.best_loss_ema:.4g}"
            )
        return None

    def validation(self, step: int, val_loss: float) -> str | None:
        if not math.isfinite(val_loss):
            return f"the validation loss became {val_loss} at step {step}"
        best = val_loss if self.best_val_loss is None else min(self.best_val_loss, val_loss)
        self.best_val_loss = best
        if self._exploded(val_loss, best):
            return (
                f"the validation loss reached {val_loss:.4g} at step {step}, "
                f"{val_loss / best:.1f} times its best {best:.4g}"
            )
        return None

    def _exploded(self, value: float, best: float) -> bool:
        return self.factor is not None and value > self.factor * best and value > (self.first_loss or 0.0)

    def state_dict(self) -> dict[str, Any]:
        """The observations (not the factor, which the config gives and a resume may change)."""
        return {key: value for key, value in dataclasses.asdict(self).items() if key != "factor"}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)
