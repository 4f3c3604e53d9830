"""`legrace bench`: time training (or inference) steps of each mode side by side, in one run.

For each mode it reports the median step time, the trusted side's share of it (the wall time the
trusted side works, not waiting for the accelerator), trusted and accelerator MACs, and the
memory the trusted side holds for backward; for split modes a per-layer breakdown of trusted
compute, accelerator compute and transfer/wait. Synthetic inputs: timing does not need data.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from legrace.trusted import kernels
from legrace.precision import full_float32
from legrace.options import add_threads, mebibytes, positive
from legrace.trusted.decompose import GRAM_MAX_CHANNELS
from legrace.trusted.engine import MODES
from legrace.wiring import LegRace
from legrace.trusted.heap import how_kept, keep_freed_memory
from legrace.models import build_model, fails_on_one_sample, model_names
from legrace.outputs import output_folder
from legrace.bench.timing import LayerTimings
from legrace.trusted.split_conv import SplitConv2d, direct_is_cheaper

try:
    import resource  # page-fault counts (Unix only)
except ImportError:
    resource = None

# A TEE-only baseline that only the benchmark runs: the user's model unconverted, in plain PyTorch with
# channels_last tensors, on the trusted side's CPU and threads. It can train faster than legrace's own
# tee_only (NCHW, with the bit-packed ReLU and pooling that save memory), so the headline ratios use
# whichever TEE-only is faster, and the memory ratio whichever keeps less (docs/performance.md).
TEE_CHANNELS_LAST = "tee_only_channels_last"
TEE_MODES = ("tee_only", TEE_CHANNELS_LAST)
BENCH_MODES = MODES + (TEE_CHANNELS_LAST,)

# Warm-up goes on (up to --settle-rounds more rounds) while a mode's last warm-up step still
# page-faulted more than this many pages: its heap was still growing into fresh pages. An enclave
# commits its heap once, so those first touches are not a cost of its steps. A heap can take a few
# rounds to settle (see _warm_up).
SETTLED_PAGES = 1024
SETTLE_ROUNDS = 4


class _TimedAccelerator:
    """Wraps an in-process accelerator to book its own time (compute and device copies), on
    whichever thread runs it (with overlap, its own)."""

    def __init__(self, inner) -> None:
        self.inner, self.device, self.seconds = inner, inner.device, 0.0

    def handle(self, message):
        t0 = time.perf_counter()
        reply = self.inner.handle(message)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds += time.perf_counter() - t0
        return reply


class _TimedTransport:
    """Wraps a worker's transport to book each request's round trip (for a request started
    ahead, from sending it until its reply was read: an upper bound on the worker's time)."""

    def __init__(self, inner) -> None:
        self.inner, self.seconds = inner, 0.0

    def request(self, message, reply_bytes=None):
        t0 = time.perf_counter()
        try:
            return self.inner.request(message, reply_bytes)
        finally:
            self.seconds += time.perf_counter() - t0

    def start(self, message, reply_bytes=None):
        t0, handle, timer = time.perf_counter(), self.inner.start(message, reply_bytes), self

        class Timed:
            def wait(self):
                try:
                    return handle.wait()
                finally:
                    timer.seconds += time.perf_counter() - t0

        return Timed()

    def close(self) -> None:
        close = getattr(self.inner, "close", None)
        if close is not None:
            close()


def _accelerator_timer(boundary):
    """Something whose `seconds` is the accelerator's time so far (in-process: its own work)."""
    transport = boundary.transport
    if getattr(transport, "accelerator", None) is not None:
        transport.accelerator = _TimedAccelerator(transport.accelerator)
        return transport.accelerator
    boundary.transport = _TimedTransport(transport)
    return boundary.transport


def _trusted_saved_bytes(model: nn.Module, step, outputs=None) -> int:
    """Bytes of activations the trusted side keeps for backward (distinct storages, no weights).

    `outputs`: the model's legrace.trusted.recompute.ConvOutputs, whose hooks shadow ours while the model
    runs; it then reports what it keeps for real (rebuilt conv outputs are not kept)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        if t.device.type == "cpu":
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params:
                seen[ptr] = t.untyped_storage().nbytes()
        return t

    if outputs is not None:
        outputs.observer = pack
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            step()
    finally:
        if outputs is not None:
            outputs.observer = None
    return sum(seen.values())


def _decomposition_macs(N: int, hw: int, R: int, iters: int) -> int:
    """One sample's light SVD and X_res = X - A·V, as `decompose._light` computes them: through
    the Gram matrix X·X^T with few channels, otherwise a pass over X per half-iteration. R = 0
    (dp_only, --rank 0): decompose returns at once."""
    if R <= 0:
        return 0
    if N <= GRAM_MAX_CHANNELS:
        return N * N * hw + max(iters - 1, 0) * N * N * R + 2 * N * hw * R
    return (2 * max(iters, 1) + 1) * N * hw * R


def _crosses(m: nn.Module, hw: tuple[int, int]) -> bool:
    """Whether a conv talks to the accelerator on an h x w map: not silent, not lowrank_only, and
    R below h·w (SplitConv2d.sends_at). One that does not runs wholly inside, its dL/dX too."""
    return isinstance(m, SplitConv2d) and m.sends_at(hw)


def count_macs(model: nn.Module, x: torch.Tensor, mode: str, rank, iters: int, train: bool,
               rebuilt: frozenset = frozenset(), engine: Optional[LegRace] = None) -> dict:
    """Trusted and accelerator multiply-accumulates of one step, counted from the layer shapes.
    `rebuilt`: decomposition points whose output backward rebuilt (one more low-rank conv each on
    the trusted side, and where the conv crosses, its Y_res again on the accelerator).
    A conv whose input is the model's input (the image) computes no dL/dX in backward."""
    shapes = []
    hooks = [m.register_forward_hook(
        lambda m, i, o: shapes.append((m, i[0].shape, o.shape, i[0].data_ptr() == x.data_ptr())))
        for m in model.modules() if isinstance(m, (nn.Conv2d, SplitConv2d, nn.Linear))]
    unaccounted = engine.unaccounted() if engine is not None else contextlib.nullcontext()
    with torch.no_grad(), unaccounted:  # synthetic inputs: nothing private
        model.eval()(x)
    for h in hooks:
        h.remove()
    trusted = accel = 0
    point = -1
    for m, xs, ys, on_image in shapes:
        bwd = (1 if on_image else 2) if train else 0  # dW, and dL/dX unless the input is the image
        if isinstance(m, nn.Linear):
            macs = xs[0] * m.in_features * m.out_features
            trusted += macs * (1 + bwd) if mode != "gpu_only" else 0
            accel += macs * (1 + bwd) if mode == "gpu_only" else 0
            continue
        point += 1
        B, N, h, w = xs
        M, k = ys[1], m.weight.shape[2] * m.weight.shape[3]
        full = B * N * M * ys[2] * ys[3] * k
        if mode in TEE_MODES + ("gpu_only",):
            macs = full * (1 + bwd)
            trusted, accel = (trusted, accel + macs) if mode == "gpu_only" else (trusted + macs, accel)
            continue
        wanted = 16 if rank == "auto" else int(rank if not isinstance(rank, list) else rank[point])
        R = 0 if mode == "dp_only" else min(wanted, N, h * w)
        lowrank = full * R // N + B * M * N * R * k  # conv(V, W') and W'
        if direct_is_cheaper(N, R, h * w):
            lowrank = full  # conv(A·V, W), see split_conv.lowrank_conv
        exact = rank != "auto" and R in (N, h * w)  # X_main = X: no decomposition
        crosses = _crosses(m, (h, w))
        reuses = crosses and getattr(m, "same_as", None) is not None  # an earlier conv's split of the same input
        rebuilds = 1 if train and getattr(m, "point", point) in rebuilt else 0
        decomposition = 0 if exact or reuses else B * _decomposition_macs(N, h * w, R, iters)
        trusted += lowrank * (1 + (1 if train else 0) + rebuilds) + decomposition
        if crosses:
            accel += full * (1 + bwd + rebuilds)  # a rebuilt output's Y_res is computed again (ResendOutput)
        else:
            trusted += full if train and not on_image else 0  # dL/dX stays inside
    return {"trusted_macs": trusted, "accelerator_macs": accel}


def minor_faults() -> Optional[int]:
    """The process's minor page faults so far (None where the OS does not say): how bench tells
    whether a step still touches fresh memory, which an enclave's committed heap would not."""
    return None if resource is None else resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class ModeRun:
    """One mode's model, engine and step, with its timings so far: what `legrace bench` runs in
    turn, and what benchmarks/ scripts build to time or instrument a step the same way.

    `step()` runs one untimed step, `timed_step()` a timed one (its total, trusted, accelerator and
    per-layer times appended to `steps`, `trusted`, `accel` and `layers`), `result()` the medians."""

    def __init__(self, mode: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, train: bool, rank,
                 accelerator: str, iters: int, noise_ahead: Optional[int] = None,
                 wire_dtype: Optional[str] = None, overlap: Optional[bool] = None,
                 pinned: Optional[bool] = None, rebuild_outputs: Optional[bool] = None,
                 keep_outputs_mb: float = 0.0, secret: Optional[str] = None,
                 accelerator_timeout: float = 120.0) -> None:
        releasing = mode in ("legrace", "dp_only")
        self.mode, self.train, self.rank, self.iters = mode, train, rank, iters
        self.engine = LegRace(mode="tee_only" if mode == TEE_CHANNELS_LAST else mode, rank=rank,
                              accelerator=accelerator, secret=secret, power_iters=iters,
                              accelerator_timeout=accelerator_timeout,
                              **({"noise_multiplier": 1.0, "clip": 1.0, "noise_ahead": noise_ahead,
                                  "wire_dtype": wire_dtype, "overlap": overlap, "pinned_memory": pinned,
                                  "keep_outputs_mb": keep_outputs_mb,
                                  **({} if rebuild_outputs is None else {"rebuild_outputs": rebuild_outputs})}
                                 if releasing else {}))
        if mode == TEE_CHANNELS_LAST:
            self.net = copy.deepcopy(model).to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        else:
            self.net = self.engine.convert(copy.deepcopy(model))
        self.mechanism = self.engine.mechanism
        self.device = self.engine.device if mode == "gpu_only" else torch.device("cpu")
        self.x, self.y = x.to(self.device), y.to(self.device)
        self.timer = _accelerator_timer(self.engine.boundary) if self.engine.boundary else None
        self.config = self.engine._config
        self.steps, self.trusted, self.accel, self.noise, self.layers = [], [], [], [], []
        self.faults: list[int] = []  # the process's minor page faults per timed step
        self.warmup_faults: list[int] = []  # and per warm-up step

    def step(self) -> None:
        # gpu_only's convs in full float32 like legrace's accelerator's (cuDNN would use TF32)
        precision = full_float32(self.device) if self.mode == "gpu_only" else contextlib.nullcontext()
        with self.engine.unaccounted(), precision:  # synthetic inputs: nothing private
            if self.train:
                self.net.train()
                self.net.zero_grad(set_to_none=True)
                F.cross_entropy(self.net(self.x), self.y).backward()
            else:
                with torch.no_grad():
                    self.net.eval()(self.x)
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def warm_step(self) -> None:
        """An untimed step, whose page faults are kept (they say whether the heap has settled)."""
        faults = minor_faults()
        self.step()
        if faults is not None:
            self.warmup_faults.append(minor_faults() - faults)

    def settled(self) -> bool:
        """Whether the last warm-up step touched (almost) no fresh memory, or faults are not counted here."""
        return not self.warmup_faults or self.warmup_faults[-1] <= SETTLED_PAGES

    def _waiting(self) -> float:
        """The boundary's transport time so far: every request of a step (weights included) counts."""
        return self.engine.boundary.seconds_waiting if self.engine.boundary is not None else 0.0

    def timed_step(self) -> None:
        timings = LayerTimings()
        observed = timings.attach(self.net) if self.config is not None else None
        before = self.timer.seconds if self.timer else 0.0
        noise_before = self.mechanism.noise_thread_seconds if self.mechanism else 0.0
        waiting = self._waiting()
        faults = minor_faults()
        t0 = time.perf_counter()
        try:
            self.step()
            total = time.perf_counter() - t0
        finally:
            if observed is not None:
                observed.remove()
        if faults is not None:
            self.faults.append(minor_faults() - faults)
        waited = self._waiting() - waiting
        if observed is not None:
            self.layers.append(timings.seconds)
        self.steps.append(total)
        self.noise.append(self.mechanism.noise_thread_seconds - noise_before if self.mechanism else 0.0)
        self.accel.append(self.timer.seconds - before if self.timer else (total if self.mode == "gpu_only" else 0.0))
        self.trusted.append(0.0 if self.mode == "gpu_only" else total - waited)

    def result(self) -> dict:
        r = {"mode": self.mode, "step_seconds": statistics.median(self.steps),
             "trusted_seconds": statistics.median(self.trusted), "accelerator_seconds": statistics.median(self.accel),
             "noise_thread_seconds": statistics.median(self.noise), "repeats": len(self.steps),
             "minor_page_faults": int(statistics.median(self.faults)) if self.faults else None,
             "step_page_faults": list(self.faults), "warmup_page_faults": list(self.warmup_faults)}
        rebuilt = frozenset(p for p, kind in (self.layers[-1] if self.layers else {}) if kind == "rebuilds")
        r.update({k: v * len(self.x) for k, v in
                  count_macs(self.net, self.x[:1], self.mode, self.rank, self.iters, self.train, rebuilt,
                             self.engine).items()})
        r["trusted_saved_bytes"] = 0 if self.mode == "gpu_only" or not self.train else \
            _trusted_saved_bytes(self.net, self.step, self.config.outputs if self.config else None)
        if self.layers:
            r["layers"] = _layer_breakdown(self.layers)
        return r


def _warm_up(runs: list[ModeRun], warmup: int, settle_rounds: int) -> int:
    """Untimed rounds of every mode in turn, as the timed ones go: `warmup` of them, then up to
    `settle_rounds` more while a mode's last step still faulted more than SETTLED_PAGES (modes that
    share a process shape each other's heap, so it settles in rounds, not per mode). Returns the
    rounds run."""
    rounds = 0
    while rounds < warmup or (warmup and rounds < warmup + settle_rounds and not all(r.settled() for r in runs)):
        for run in runs:
            run.warm_step()
        rounds += 1
    return rounds


def _layer_breakdown(runs: list[dict]) -> list[dict]:
    points = sorted({p for run in runs for p, _ in run})
    out = []
    for p in points:
        def med(kind):
            return statistics.median(run.get((p, kind), 0.0) for run in runs)
        wait = med("wait_fwd") + med("wait_bwd")
        out.append({"point": p, "trusted_seconds": med("total_fwd") + med("total_bwd") - wait, "wait_seconds": wait})
    return out


def run_bench(model_name: str, input_size: int, batch_size: int, modes: list[str], *, train: bool = True,
              rank=8, warmup: int = 1, repeats: int = 3, settle_rounds: int = SETTLE_ROUNDS,
              accelerator: str = "cpu", iters: int = 2,
              num_classes: int = 10, noise_ahead: Optional[int] = None, wire_dtype: Optional[str] = None,
              overlap: Optional[bool] = None, pinned: Optional[bool] = None,
              rebuild_outputs: Optional[bool] = None, keep_outputs_mb: float = 0.0,
              out: Union[str, Path, None] = None, secret: Optional[str] = None,
              accelerator_timeout: float = 120.0, log=print) -> dict:
    _check_settings(modes, batch_size, warmup, repeats, settle_rounds)
    if keep_outputs_mb and not train:
        raise ValueError("--keep-outputs-mb keeps conv outputs for backward; --infer has no backward")
    torch.manual_seed(0)
    model = build_model(model_name, num_classes=num_classes, image_size=input_size)
    if train and batch_size == 1 and fails_on_one_sample(model, 3, input_size):  # before any engine or worker starts
        raise ValueError(f"{model_name} cannot train on batches of one sample at {input_size}x{input_size}: a "
                         "BatchNorm would see one value per channel. Use --batch-size 2 or more, a larger "
                         "--input-size, or --infer")
    x = torch.randn(batch_size, 3, input_size, input_size)
    y = torch.randint(0, num_classes, (batch_size,))
    runs = [ModeRun(m, model, x, y, train=train, rank=rank, accelerator=accelerator, iters=iters,
                    noise_ahead=noise_ahead, wire_dtype=wire_dtype, overlap=overlap, pinned=pinned,
                    rebuild_outputs=rebuild_outputs, keep_outputs_mb=keep_outputs_mb, secret=secret,
                    accelerator_timeout=accelerator_timeout)
            for m in modes]
    if out is not None:  # made before the timing (the engines have checked their settings): a bad path
        out = output_folder(out)  # fails now, not after minutes of timing
    rounds = _warm_up(runs, warmup, settle_rounds)
    # None where no warm-up fault was counted (no warm-up, or an OS that does not say)
    settled = all(run.settled() for run in runs) if any(run.warmup_faults for run in runs) else None
    if rounds > warmup:
        log(f"warm-up: {rounds} rounds, {rounds - warmup} more than --warmup while a step still faulted fresh "
            f"pages" + ("" if settled else f"; still faulting after --settle-rounds {settle_rounds}"))
    for _ in range(repeats):  # round robin, so a change of machine load hits every mode alike
        for run in runs:
            run.timed_step()
    results = [run.result() for run in runs]
    for r in results:
        noise = f"  (+ noise thread {r['noise_thread_seconds']:.3f}s)" if r["noise_thread_seconds"] else ""
        log(f"{r['mode']:22s} step {r['step_seconds']:.3f}s  trusted {r['trusted_seconds']:.3f}s{noise}  "
            f"accelerator {r['accelerator_seconds']:.3f}s  trusted MACs {r['trusted_macs'] / 1e9:.2f}G  "
            f"trusted memory {r['trusted_saved_bytes'] / 2**20:.1f} MiB"
            + (f"  page faults {r['minor_page_faults']}" if r["minor_page_faults"] is not None else ""))
    tunables, kept = os.environ.get("GLIBC_TUNABLES"), how_kept()
    if not kept and sys.platform.startswith("linux"):
        log("note: glibc malloc returns large blocks to the OS, so every new activation is page-faulted "
            "again; for timings closer to an enclave's fixed heap, drop --no-keep-heap (from Python: call "
            "legrace.trusted.heap.keep_freed_memory() first)")
    report = {"model": model_name, "input_size": input_size, "batch_size": batch_size, "train": train,
              "rank": rank, "power_iters": iters, "accelerator": accelerator, "accelerator_timeout": accelerator_timeout,
              "wire_dtype": wire_dtype or "float32",
              "overlap": next((r.engine.overlap for r in runs if r.engine.boundary is not None), None),
              "pinned_memory": any(r.engine.pinned_memory for r in runs if r.engine.boundary is not None),
              "rebuild_outputs": next((r.engine.settings.rebuild_outputs for r in runs if r.engine.boundary is not None), None),
              "keep_outputs_mb": keep_outputs_mb,
              "threads": torch.get_num_threads(), "fused_kernels": kernels.usable(np.float32),
              "torch": torch.__version__, "glibc_tunables": tunables, "heap_kept": kept,
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"),
              "cpu": _cpu_name(),
              "warmup_rounds": rounds,
              "heap_settled": settled,
              "modes": results, "ratios": _ratios(results), "tee_only_baselines": _tee_baselines(results)}
    if sum(r["mode"] in TEE_MODES for r in results) > 1:
        log(f"ratios against TEE-only use {report['tee_only_baselines']['time']} for time and "
            f"{report['tee_only_baselines']['memory']} for memory")
    for k, v in report["ratios"].items():
        log(f"{k}: {v:.2f}")
    if out is not None:
        (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
        _charts(report, out)
    return report


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} logical CPUs)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _tee_baselines(results: list[dict]) -> dict:
    """Which TEE-only run the ratios compare with: the fastest for time, the leanest for memory."""
    tees = [r for r in results if r["mode"] in TEE_MODES]
    if not tees:
        return {}
    kept = [r for r in tees if r["trusted_saved_bytes"]]
    return {"time": min(tees, key=lambda r: r["step_seconds"])["mode"],
            "memory": min(kept, key=lambda r: r["trusted_saved_bytes"])["mode"] if kept else None}


def _ratios(results: list[dict]) -> dict:
    """legrace against TEE-only (the fastest TEE-only run for time, the leanest for memory: see
    `_tee_baselines`) and against GPU-only."""
    by = {r["mode"]: r for r in results}
    ratios = {}
    baselines = _tee_baselines(results)
    if baselines and "legrace" in by:
        tee, leg = by[baselines["time"]], by["legrace"]
        ratios["tee_only_step / legrace_trusted"] = tee["step_seconds"] / max(leg["trusted_seconds"], 1e-12)
        if leg["noise_thread_seconds"]:  # the same, counting the noise drawn ahead as trusted work too
            ratios["tee_only_step / (legrace_trusted + noise_thread)"] = tee["step_seconds"] / max(
                leg["trusted_seconds"] + leg["noise_thread_seconds"], 1e-12)
        ratios["tee_only_step / legrace_step"] = tee["step_seconds"] / leg["step_seconds"]
        ratios["tee_only_macs / legrace_trusted_macs"] = tee["trusted_macs"] / max(leg["trusted_macs"], 1)
        if baselines["memory"] and leg["trusted_saved_bytes"]:
            lean = by[baselines["memory"]]
            ratios["tee_only_memory / legrace_trusted_memory"] = lean["trusted_saved_bytes"] / leg["trusted_saved_bytes"]
    if "gpu_only" in by and "legrace" in by:
        ratios["legrace_step / gpu_only_step"] = by["legrace"]["step_seconds"] / by["gpu_only"]["step_seconds"]
    return ratios


def _charts(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    title = (f"{report['model']} {report['input_size']}x{report['input_size']} batch {report['batch_size']} "
             f"({'train' if report['train'] else 'inference'}, accelerator {report['accelerator']})")
    modes = report["modes"]
    fig, ax = plt.subplots(figsize=(7, 4))
    names = [m["mode"] for m in modes]
    trusted = [m["trusted_seconds"] for m in modes]
    other = [max(m["step_seconds"] - m["trusted_seconds"], 0.0) for m in modes]
    ax.bar(names, trusted, label="trusted side working")
    ax.bar(names, other, bottom=trusted, label="accelerator + transfer/wait")
    ax.set_ylabel("seconds per step (median)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "step_times.png", dpi=100)
    plt.close(fig)
    split = [m for m in modes if m.get("layers")]
    for m in split:
        fig, ax = plt.subplots(figsize=(8, 4))
        pts = [layer["point"] for layer in m["layers"]]
        ax.bar(pts, [layer["trusted_seconds"] for layer in m["layers"]], label="trusted compute")
        ax.bar(pts, [layer["wait_seconds"] for layer in m["layers"]],
               bottom=[layer["trusted_seconds"] for layer in m["layers"]], label="accelerator compute + transfer")
        ax.set_xlabel("decomposition point (conv layer, forward order)")
        ax.set_ylabel("seconds per step (median)")
        ax.set_title(f"{m['mode']}: per-layer breakdown, {title}", fontsize=8)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / f"layers_{m['mode']}.png", dpi=100)
        plt.close(fig)


def _check_settings(modes: list[str], batch_size: int, warmup: int, repeats: int, settle_rounds: int) -> None:
    """Refuse settings that would time nothing or time something else than asked, before the run."""
    if not modes:
        raise ValueError("no modes to time: give --modes, e.g. tee_only,legrace")
    twice = sorted({m for m in modes if modes.count(m) > 1})
    if twice:
        raise ValueError(f"mode(s) {twice} listed more than once")
    bad = [m for m in modes if m not in BENCH_MODES]
    if bad:
        raise ValueError(f"unknown mode(s) {bad}; choose from {', '.join(BENCH_MODES)}")
    for name, value, least in (("batch size", batch_size, 1), ("warm-up steps", warmup, 0), ("repeats", repeats, 1),
                               ("settle rounds", settle_rounds, 0)):
        if value < least:
            raise ValueError(f"{name} must be at least {least}, got {value}")


def add_parser(sub) -> None:
    b = sub.add_parser("bench", help="time steps of each mode side by side (JSON + PNG charts)")
    b.add_argument("--model", default="vgg16", help=f"one of {', '.join(model_names())}")
    b.add_argument("--input-size", type=int, default=224,
                   help="side of the synthetic square images in pixels (the paper's: 224)")
    b.add_argument("--batch-size", type=positive(int), default=8, help="samples per step (the paper's: 32)")
    b.add_argument("--modes", default=f"tee_only,{TEE_CHANNELS_LAST},legrace,gpu_only",
                   help=f"comma-separated, from {', '.join(BENCH_MODES)} ({TEE_CHANNELS_LAST}: the unconverted "
                        "model in plain PyTorch with channels_last tensors, a second TEE-only baseline; ratios "
                        "use the faster TEE-only run, and for memory the leaner)")
    group = b.add_mutually_exclusive_group()
    group.add_argument("--train", dest="train", action="store_true", default=True, help="forward + backward")
    group.add_argument("--infer", dest="train", action="store_false", help="forward only")
    b.add_argument("--rank", type=int, default=8, help="R, the rank kept on the trusted side per conv")
    b.add_argument("--power-iters", type=int, default=2, help="power iterations of the light SVD")
    b.add_argument("--warmup", type=int, default=1,
                   help="untimed rounds (a step of each mode in turn) before timing")
    b.add_argument("--settle-rounds", type=int, default=SETTLE_ROUNDS,
                   help=f"after --warmup (if not 0), up to this many more untimed rounds while a mode's last step "
                        f"still page-faulted over {SETTLED_PAGES} fresh pages, which an enclave's committed heap "
                        "would not")
    b.add_argument("--repeats", type=positive(int), default=3, help="timed steps per mode; medians are reported")
    b.add_argument("--accelerator", default="cpu",
                   help="where legrace's residual convs run: cpu or cuda (in this process), process[:DEVICE] "
                        "(a worker process) or tcp://HOST:PORT (a `legrace worker`; gpu_only needs a device of "
                        "this machine)")
    b.add_argument("--secret", default=None, help="a tcp:// worker's shared secret (default: $LEGRACE_SECRET)")
    b.add_argument("--accelerator-timeout", type=positive(float), default=120.0,
                   help="seconds to wait for one answer of a worker before giving up")
    b.add_argument("--wire-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="dtype of the noised residuals on the wire (bfloat16: half the bytes, no privacy cost)")
    b.add_argument("--noise-ahead", type=int, default=None,
                   help="noise buffers drawn ahead in a thread (default: the engine's, 0: inline)")
    b.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=None,
                   help="run the trusted side and the accelerator concurrently (default: on, except for "
                        "the in-process CPU accelerator, which shares the trusted side's cores)")
    b.add_argument("--pinned", action=argparse.BooleanOptionalAction, default=None,
                   help="an in-process CUDA accelerator moves requests and answers through page-locked "
                        "host memory (default: on)")
    b.add_argument("--rebuild-outputs", action=argparse.BooleanOptionalAction, default=None,
                   help="legrace keeps no conv output for backward (a BatchNorm's input) and rebuilds it from A, V "
                        "and the accelerator's residual (default: on); --no-rebuild-outputs keeps them, trading "
                        "trusted memory for time")
    b.add_argument("--keep-outputs-mb", type=mebibytes, default=0.0,
                   help="with rebuilt outputs, keep up to this many MiB of them per forward after all, those that "
                        "cost most to rebuild per byte first")
    add_threads(b, " for every mode (with an accelerator on its own thread, leaving cores free can pay: see "
                   "docs/performance.md)")
    b.add_argument("--keep-heap", action=argparse.BooleanOptionalAction, default=True,
                   help="keep freed memory in the process for reuse, as an enclave's fixed heap does (glibc's "
                        "mallopt, unless GLIBC_TUNABLES sets it). --no-keep-heap times glibc's "
                        "default, which page-faults every large block afresh")
    b.add_argument("--out", default="runs/bench", help="folder for bench.json and the charts")
    b.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if args.keep_heap:
        keep_freed_memory()
    run_bench(args.model, args.input_size, args.batch_size, modes, train=args.train, rank=args.rank,
              warmup=args.warmup, repeats=args.repeats, settle_rounds=args.settle_rounds,
              accelerator=args.accelerator, iters=args.power_iters,
              noise_ahead=args.noise_ahead, wire_dtype=args.wire_dtype, overlap=args.overlap, pinned=args.pinned,
              rebuild_outputs=args.rebuild_outputs, keep_outputs_mb=args.keep_outputs_mb, out=args.out,
              secret=args.secret, accelerator_timeout=args.accelerator_timeout)
    print(f"wrote {Path(args.out) / 'bench.json'} and charts")
    return 0
