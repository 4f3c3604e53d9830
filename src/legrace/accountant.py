"""Honest privacy accounting with Opacus's accountants (no hand-written accountant math).

Every use of a sample releases one noised residual per decomposition point. One release is a
Gaussian mechanism with sensitivity 2C and noise std z*C, i.e. noise multiplier z/2 relative to
its sensitivity. We compose uses x releases_per_sample of them with sample rate 1: the
adversary sees every released tensor, so no amplification by subsampling is claimed.

Uses are counted per data set in a `PrivacyLedger`: a pass over a loader counts as a use of every
sample in it as soon as it starts. Disjoint data sets (train, validation) compose in parallel, so
the epsilon reported is that of the most-used one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

ACCOUNTANTS = {"rdp": RDPAccountant, "prv": PRVAccountant}


def _check(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {accountant!r}; choose one of {sorted(ACCOUNTANTS)}")


def epsilon(noise_multiplier: float, releases: int, delta: float, accountant: str = "rdp") -> float:
    """Epsilon of `releases` Gaussian releases with std noise_multiplier*C and sensitivity 2C."""
    _check(accountant)
    if releases <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    acc = ACCOUNTANTS[accountant]()
    acc.history = [(noise_multiplier / 2.0, 1.0, int(releases))]
    return float(acc.get_epsilon(delta=delta))


def calibrate_noise_multiplier(target_epsilon: float, delta: float, releases: int, accountant: str = "rdp") -> float:
    """The smallest z (to Opacus's tolerance) with epsilon(z, releases, delta) <= target_epsilon."""
    _check(accountant)
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise ValueError(f"target_epsilon must be a finite number > 0, got {target_epsilon}")
    if not (0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if releases <= 0:
        return 0.0
    return 2.0 * get_noise_multiplier(
        target_epsilon=target_epsilon, target_delta=delta, sample_rate=1.0, steps=int(releases), accountant=accountant
    )


class PrivacyLedger:
    """Counts passes (uses) over each private data set; optionally persisted before each pass.

    Persisting on disk *before* a pass releases anything means a crash mid-epoch is still
    accounted when training resumes.
    """

    def __init__(self, path: Optional[Path] = None) -> None:
        self.uses: dict[str, int] = {}
        self.path = Path(path) if path else None
        if self.path and self.path.exists():
            self.load_state_dict(json.loads(self.path.read_text()))

    def record_pass(self, name: str) -> None:
        self.uses[name] = self.uses.get(name, 0) + 1
        if self.path:
            self.path.write_text(json.dumps(self.state_dict()))

    @property
    def max_uses(self) -> int:
        return max(self.uses.values(), default=0)

    def state_dict(self) -> dict:
        return {"uses": dict(self.uses)}

    def load_state_dict(self, state: dict) -> None:
        # Never forget a use: merging takes the larger count of each data set.
        for name, n in state.get("uses", {}).items():
            self.uses[name] = max(self.uses.get(name, 0), int(n))
