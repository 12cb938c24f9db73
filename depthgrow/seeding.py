"""Random generators derived from a run seed and a key, so that every random draw is a pure function
of (seed, what it is for). Resuming, growing and re-running then give bit-identical numbers without
saving or restoring a global random state for them."""

import numpy as np
import torch


def derived_seed(seed: int, *keys: int) -> int:
    """A well-mixed 63-bit seed for the stream named by ``keys`` under the run seed ``seed``."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


def derived_generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator for the stream named by ``keys``; draws are made on the CPU and copied, so that a
    model initialised on a GPU gets the same numbers as on the CPU."""
    return torch.Generator().manual_seed(derived_seed(seed, *keys))
