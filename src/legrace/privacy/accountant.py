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
over data that overlaps two of them is recorded under both. Uses under OUTSIDE_A_LOADER (forwards
on data the model was fed directly, which could be any of the sets) add to every set's count.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Iterator, Optional, Sequence

try:
    import fcntl  # POSIX file locks for a ledger shared between processes
except ImportError:  # pragma: no cover - Windows: one process per ledger
    fcntl = None

from opacus.accountants import PRVAccountant, RDPAccountant

ACCOUNTANTS = {"rdp": RDPAccountant, "prv": PRVAccountant}

# The ledger's name for forwards on data fed to the model directly (see LegRace._released): they
# may be any data set's samples, so they count as uses of every one.
OUTSIDE_A_LOADER = "outside a private loader"

# (l2 sensitivity in units of C, releases) pairs: what one use of a sample releases.
Releases = Sequence[tuple[float, int]]


def _check(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {accountant!r}; choose one of {sorted(ACCOUNTANTS)}")


def check_delta(delta: float) -> None:
    """delta is a probability of failure: outside (0, 1) an accountant's epsilon means nothing
    (delta 1.5 gives a negative epsilon)."""
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not (0 < delta < 1):
        raise ValueError(f"delta must be a number in (0, 1), got {delta!r}")


def epsilon(noise_multiplier: float, releases: Releases, delta: float, accountant: str = "rdp") -> float:
    """Epsilon of Gaussian releases with noise std noise_multiplier*C, composed.

    `releases` lists (sensitivity / C, count): (2, n) for n releases of sensitivity 2C.
    """
    _check(accountant)
    check_delta(delta)
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
    check_delta(delta)
    if not any(n > 0 for _, n in releases):
        return 0.0
    lo, hi = 0.0, 1.0
    while epsilon(hi, releases, delta, accountant) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e7:
            total = sum(n for _, n in releases)
            raise ValueError(f"target epsilon {target_epsilon} at delta {delta} is out of reach for {total} releases "
                             "per sample: raise the target epsilon or delta, or train fewer epochs")
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
        # What one use released when the uses were spent (`releases_per_use` of the engine), each
        # pricing met: an engine that would price them cheaper must not take them over (covers).
        self.spent_at: list[list[tuple[float, int]]] = []
        self.path = Path(path) if path else None
        if self.path and self.path.exists():
            self.load_state_dict(json.loads(self.path.read_text()))

    def record_pass(self, name: str) -> None:
        with self._file_locked():  # another process (an evaluation during training) may have added uses
            self._merge_file()
            self.uses[name] = self.uses.get(name, 0) + 1
            self._write()

    def save(self) -> None:
        """Write the counts to `path` (if any), replacing the file in one step, after taking in
        what another process wrote there (never forgetting a use)."""
        with self._file_locked():
            self._merge_file()
            self._write()

    def _merge_file(self) -> None:
        if self.path and self.path.exists():
            self.load_state_dict(json.loads(self.path.read_text()))

    def _write(self) -> None:
        if self.path:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.state_dict()))
            tmp.replace(self.path)

    @contextlib.contextmanager
    def _file_locked(self) -> Iterator[None]:
        """Hold an exclusive lock on the ledger file's lock file: processes sharing a ledger read,
        add and write one at a time (without it, two that each add one wrote the same count)."""
        if not self.path or fcntl is None:
            yield
            return
        with open(self.path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    @property
    def max_uses(self) -> int:
        """The most uses any one sample has had: the most-used named set's, plus every use
        outside a loader (which may have been that set's samples)."""
        named = [n for name, n in self.uses.items() if name != OUTSIDE_A_LOADER]
        return max(named, default=0) + self.uses.get(OUTSIDE_A_LOADER, 0)

    def spend_at(self, releases: Releases) -> None:
        """Check, before uses are spent, that pricing a use at `releases` accounts at least what
        each earlier use released (a checkpoint or ledger file from another batch size or rank
        would otherwise be re-priced cheaper), and record that pricing."""
        for spent in self.spent_at:
            if not covers(releases, spent):
                raise ValueError(
                    f"the privacy ledger holds uses that released {_pricing(spent)} each, and this engine would "
                    f"account a use as {_pricing(releases)}, less: make the engine with the same model, rank and "
                    "batch size as the run the ledger (or checkpoint) comes from")
        self.note_pricing(releases)

    def note_pricing(self, releases: Releases) -> None:
        """Record that uses are being spent at `releases` per use (saved with the counts)."""
        releases = _normal(releases)
        if releases not in self.spent_at:
            self.spent_at.append(releases)
            self.save()

    def state_dict(self) -> dict:
        return {"uses": dict(self.uses), "spent_at": [[list(r) for r in p] for p in self.spent_at]}

    def load_state_dict(self, state: dict) -> None:
        # Never forget a use: merging takes the larger count of each data set.
        for name, n in state.get("uses", {}).items():
            self.uses[name] = max(self.uses.get(name, 0), int(n))
        for pricing in state.get("spent_at", []):
            pricing = _normal(pricing)
            if pricing not in self.spent_at:
                self.spent_at.append(pricing)


def _pricing(releases: Releases) -> str:
    return ", ".join(f"{n} at sensitivity {s:g}C" for s, n in releases if n)


def _normal(releases: Releases) -> list[tuple[float, int]]:
    return sorted((float(s), int(n)) for s, n in releases if int(n) > 0)


def covers(releases: Releases, spent: Releases) -> bool:
    """Whether pricing a use at `releases` accounts at least what `spent` released: for every
    sensitivity, at least as many releases of it or more. Then epsilon of k uses priced at
    `releases` is never below what k uses released at `spent` cost."""
    ours, theirs = _normal(releases), _normal(spent)
    for threshold, _ in theirs:
        if sum(n for s, n in ours if s >= threshold * (1 - 1e-12)) < sum(n for s, n in theirs if s >= threshold):
            return False
    return True
