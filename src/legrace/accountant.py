"""Honest privacy accounting with Opacus's accountants (no hand-written accountant math).

Every use of a sample releases one noised residual per decomposition point. One release is a
Gaussian mechanism with sensitivity 2C and noise std z*C, i.e. noise multiplier z/2 relative to
its sensitivity. We compose uses x releases_per_sample of them with sample rate 1: the
adversary sees every released tensor, so no amplification by subsampling is claimed.

BatchNorm in training mode normalises with statistics of the whole batch, so one sample moves
every batch-mate's activation after it. At such "batch-coupled" decomposition points, replacing
one sample can change all B released residuals of its batch, each by at most 2C: the batch's
release there has l2 sensitivity 2C*sqrt(B), and is accounted so.

Uses are counted per data set in a `PrivacyLedger`: a pass over a loader counts as a use of every
sample in it as soon as it starts. Disjoint data sets (train, validation) compose in parallel, so
the epsilon reported is that of the most-used one: names must stand for disjoint data, and a pass
over data that overlaps two of them is recorded under both.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional, Sequence

from opacus.accountants import PRVAccountant, RDPAccountant

ACCOUNTANTS = {"rdp": RDPAccountant, "prv": PRVAccountant}

# (l2 sensitivity in units of C, releases) pairs: what one use of a sample releases.
Releases = Sequence[tuple[float, int]]


def _check(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {accountant!r}; choose one of {sorted(ACCOUNTANTS)}")


def epsilon(noise_multiplier: float, releases: Releases, delta: float, accountant: str = "rdp") -> float:
    """Epsilon of Gaussian releases with noise std noise_multiplier*C, composed.

    `releases` lists (sensitivity / C, count): (2, n) for n releases of sensitivity 2C.
    """
    _check(accountant)
    releases = [(s, int(n)) for s, n in releases if n > 0]
    if not releases:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    acc = ACCOUNTANTS[accountant]()
    acc.history = [(noise_multiplier / s, 1.0, n) for s, n in releases]
    return float(acc.get_epsilon(delta=delta))


def calibrate_noise_multiplier(target_epsilon: float, delta: float, releases: Releases, accountant: str = "rdp",
                               tolerance: float = 0.01) -> float:
    """The smallest z (to `tolerance` in epsilon) with epsilon(z, releases, delta) <= target_epsilon."""
    _check(accountant)
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise ValueError(f"target_epsilon must be a finite number > 0, got {target_epsilon}")
    if not (0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if not any(n > 0 for _, n in releases):
        return 0.0
    lo, hi = 0.0, 1.0
    while epsilon(hi, releases, delta, accountant) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e7:
            raise ValueError(f"epsilon {target_epsilon} is out of reach for {releases} releases")
    for _ in range(200):  # bisection on the accountant's own epsilon, no accountant math here
        mid = (lo + hi) / 2
        eps = epsilon(mid, releases, delta, accountant)
        if eps > target_epsilon:
            lo = mid
        else:
            hi = mid
            if target_epsilon - eps < tolerance:
                break
    return hi


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
        self.save()

    def save(self) -> None:
        """Write the counts to `path` (if any), replacing the file in one step."""
        if self.path:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.state_dict()))
            tmp.replace(self.path)

    @property
    def max_uses(self) -> int:
        return max(self.uses.values(), default=0)

    def state_dict(self) -> dict:
        return {"uses": dict(self.uses)}

    def load_state_dict(self, state: dict) -> None:
        # Never forget a use: merging takes the larger count of each data set.
        for name, n in state.get("uses", {}).items():
            self.uses[name] = max(self.uses.get(name, 0), int(n))
