"""`LegRace`: the privacy engine that wraps a user's model, optimizer and data loader (like Opacus).

    engine = LegRace(mode="legrace", rank=8, target_epsilon=8.0, target_delta=1e-5)
    model, optimizer, loader = engine.make_private(module=model, optimizer=optimizer,
                                                   data_loader=loader, epochs=10)
    ... an ordinary training loop ...
    engine.get_epsilon(delta=1e-5)
"""

from __future__ import annotations

import contextlib
import math
import threading
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import torch
from torch import nn

from legrace.privacy.accountant import (ACCOUNTANTS, OUTSIDE_A_LOADER, PrivacyLedger, calibrate_noise_multiplier,
                                 check_delta, covers, epsilon)
from legrace.boundary.gateway import Boundary, Transport
from legrace.boundary.audit import AuditLog
from legrace.trusted.convert import UnsupportedModelError, check_modules, convert, probe_conv_inputs
from legrace.trusted.convert import conv_modules
from legrace.trusted.recompute import ConvOutputs
from legrace.trusted.decompose import METHODS, Rank, validate_rank
from legrace.trusted.freivalds import FreivaldsVerifier
from legrace.trusted.mechanism import GaussianMechanism
from legrace.trusted.split_conv import SPLIT_MODES, SplitConfig, SplitConv2d

MODES = ("legrace", "dp_only", "lowrank_only", "tee_only", "gpu_only")

# clip="auto": C = AUTO_NOISE_STD / z, so the noise std per coordinate is AUTO_NOISE_STD whatever
# epsilon is. Activations normalised to about unit RMS per coordinate (inputs scaled with fixed
# constants, conv inputs after BatchNorm) keep noise small beside the signal; the default uses no
# private data, so it costs no privacy (DESIGN section 9).
AUTO_NOISE_STD = 0.05

# The batch-mixing probe runs batches of 2; a model that cannot run on 2 samples (one that takes
# sample 3, or views the batch by 4 rows) is probed again at the loader's batch size, up to this
# many (the probe keeps every conv input of one batch: about 0.6 GB for VGG-16 at 224x224 and 16).
PROBE_MAX_BATCH = 16


class PrivateDataLoader:
    """Wraps a DataLoader of private data: records each pass in the ledger, moves batches."""

    def __init__(self, loader: Any, engine: "TrustedEngine", name: str, device: Optional[torch.device] = None) -> None:
        self.loader, self.engine, self.name, self.device = loader, engine, name, device

    @property
    def ledger(self) -> PrivacyLedger:
        return self.engine.ledger

    def __iter__(self) -> Iterator:
        opened = False
        engine = self.engine
        try:
            for i, batch in enumerate(self.loader):
                with engine._lock:  # another thread may be releasing (see SplitConfig.lock)
                    if i == 0:  # accounted before the first release of the pass
                        if engine._unchecked is not None or engine._refusal:
                            engine._check_first_batch(batch)  # before the use: a refused model spends nothing
                        engine._record_use(self.name)
                        engine._open_passes += 1
                        opened = True
                    engine._paid_rows += _rows(batch, self.loader)  # what the pass may release (_released)
                yield _to_device(batch, self.device) if self.device is not None else batch
        finally:
            if opened:
                with engine._lock:
                    engine._open_passes -= 1
                    if not engine._open_passes:
                        engine._pass_rows.clear()
                        engine._paid_rows = 0

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device) for b in batch)
    return batch


BASIS_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32,  # not float16: V could overflow it
                "float64": torch.float64}


def _basis_dtype(name: Optional[str]) -> Optional[torch.dtype]:
    if name is None:
        return None
    if name not in BASIS_DTYPES:
        raise ValueError(f"basis_dtype must be one of {', '.join(BASIS_DTYPES)} or None, got {name!r}")
    return BASIS_DTYPES[name]


def _wire_dtype(name: Optional[str]) -> Optional[torch.dtype]:
    if name in (None, "float32"):
        return None
    if name != "bfloat16":
        raise ValueError(f"wire_dtype must be 'bfloat16', 'float32' or None, got {name!r}")
    return torch.bfloat16


class TrustedEngine:
    """Trains a user's model with the trusted/untrusted split and accounts what it releases.

    mode: "legrace" (the method), "dp_only" (same mechanism on the whole activation),
    "lowrank_only" (residual dropped, nothing released), "tee_only" (all on the trusted side),
    "gpu_only" (plain training on the accelerator, no privacy).
    rank: R per decomposition point: an int, a list (one per Conv2d in forward order) or "auto".
    clip: C, the per-sample l2 bound of a residual; "auto" for the data-independent default; None
    for no clipping (only with noise_multiplier=0: exactness tests, epsilon infinite).
    noise_multiplier: z (noise std = z*C), or None to calibrate z from target_epsilon/target_delta.
    accelerator: "cpu" or a torch device such as "cuda" for the in-process accelerator;
    "process" (or "process:cuda") for a private worker process on this host (unix socket);
    "tcp://HOST:PORT" for a `legrace worker` elsewhere, which needs `secret` (default
    $LEGRACE_SECRET). `accelerator_timeout`: seconds to wait for one of its answers.
    verify: check every answer of the accelerator with a Freivalds test (legrace.trusted.freivalds).
    basis_dtype: the dtype the trusted side keeps V in for backward ("bfloat16" halves that
    memory and the split stays exact, since the rounding moves into the residual; in float32 the
    sums then round a little differently from the plain model's; None: the activations' dtype).
    rebuild_outputs: keep no conv output for backward (what a BatchNorm after a conv would keep):
    rebuild it from A, V and the accelerator's stored residual when backward needs it.
    keep_outputs_mb: with rebuild_outputs, keep conv outputs up to this many MiB per forward pass
    after all, those that cost most to rebuild per byte first (deep layers' small maps, where
    forming W' = A·W dominates the rebuild): memory traded back for trusted time. Planned from
    the previous forward, so the first rebuilds all; gradient accumulation over k forwards keeps
    up to k budgets until backward (legrace.trusted.recompute).
    wire_dtype: "bfloat16" sends the noised residuals (and gets Y_res back) in half the bytes.
    Rounding after the noise is post-processing, so it costs no privacy; its accuracy cost is
    measured in docs/performance.md. dL/dY and the gradients stay in the model's dtype.
    noise_ahead: draw the noise of this many upcoming releases in a background thread (default 0:
    inline, one generator per torch thread). Measured slower on both machines tried (a 16-core
    H200 host: VGG-16 step 3.36 s with 2 ahead, 2.22 s inline; docs/performance.md, "GPU runs"): with
    overlap the trusted side hardly waits, and the thread's one generator competes for cores.
    overlap: run the two legs of each conv concurrently: send the accelerator its request, compute
    the trusted part of the same layer, then collect the answer (the results are the same bits).
    Default: on, except with the in-process CPU accelerator, which would only take the trusted
    side's cores.
    pinned_memory: with an in-process CUDA accelerator, draw the noise into page-locked memory and
    move every request and answer through it (DMA at full bus speed; see
    legrace.accelerator.compute.Accelerator). Default: on there; it has no effect elsewhere.
    """

    def __init__(
        self,
        mode: str = "legrace",
        *,
        rank: Rank = 8,
        clip: Union[float, str, None] = "auto",
        noise_multiplier: Optional[float] = None,
        target_epsilon: Optional[float] = None,
        target_delta: float = 1e-5,
        accelerator: str = "cpu",
        secret: Optional[str] = None,
        accelerator_timeout: float = 120.0,
        verify: bool = False,
        decomposition: str = "light",
        power_iters: int = 2,
        max_rank: int = 16,
        accountant: str = "rdp",
        noise_seed: Optional[int] = None,
        noise_ahead: Optional[int] = None,
        overlap: Optional[bool] = None,
        pinned_memory: Optional[bool] = None,
        basis_dtype: Optional[str] = "bfloat16",
        rebuild_outputs: bool = True,
        keep_outputs_mb: float = 0.0,
        wire_dtype: Optional[str] = None,
        audit: Union[str, Path, None] = None,
        ledger_path: Union[str, Path, None] = None,
        device: torch.device,
        connect: Callable[[], Transport],
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        if decomposition not in METHODS:
            raise ValueError(f"unknown decomposition {decomposition!r}; choose one of {', '.join(METHODS)}")
        if not (0 < target_delta < 1):
            raise ValueError(f"target_delta must be in (0, 1), got {target_delta}")
        if clip is not None and clip != "auto" and not (isinstance(clip, (int, float)) and clip > 0 and math.isfinite(clip)):
            raise ValueError(f"clip must be a number > 0, 'auto' or None, got {clip!r}")
        if mode in ("legrace", "dp_only"):
            if (noise_multiplier is None) == (target_epsilon is None):
                raise ValueError("give exactly one of noise_multiplier and target_epsilon")
            if noise_multiplier is not None and not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
                raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier}")
            if clip is None and noise_multiplier != 0:
                raise ValueError("clip=None (no clipping) is only allowed with noise_multiplier=0")
        if isinstance(keep_outputs_mb, bool) or not isinstance(keep_outputs_mb, (int, float)) \
                or not (keep_outputs_mb >= 0 and math.isfinite(keep_outputs_mb)):
            raise ValueError(f"keep_outputs_mb must be a finite number of MiB >= 0, got {keep_outputs_mb!r}")
        if keep_outputs_mb and not rebuild_outputs:
            raise ValueError("keep_outputs_mb is a budget for outputs that would be rebuilt; with "
                             "rebuild_outputs=False every conv output is kept already")
        if isinstance(accelerator_timeout, bool) or not isinstance(accelerator_timeout, (int, float)) \
                or not (accelerator_timeout > 0 and math.isfinite(accelerator_timeout)):
            raise ValueError(f"accelerator_timeout must be a finite number of seconds > 0, got {accelerator_timeout!r}")
        if accountant not in ACCOUNTANTS:
            raise ValueError(f"unknown accountant {accountant!r}; choose one of {', '.join(ACCOUNTANTS)}")
        for name, value, least in (("power_iters", power_iters, 1), ("max_rank", max_rank, 1),
                                   ("noise_ahead", 0 if noise_ahead is None else noise_ahead, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
        self.mode = mode
        self.rank = validate_rank(rank)
        self._clip_arg = clip
        self._noise_arg = noise_multiplier
        self.target_epsilon = target_epsilon
        self.target_delta = target_delta
        self.decomposition, self.power_iters, self.max_rank = decomposition, power_iters, max_rank
        self.basis_dtype = _basis_dtype(basis_dtype)
        self.rebuild_outputs = rebuild_outputs
        self.keep_outputs_mb = float(keep_outputs_mb)
        self.wire_dtype = _wire_dtype(wire_dtype)
        self.accountant = accountant
        self.noise_seed = noise_seed
        self.noise_ahead = noise_ahead if noise_ahead is not None else 0
        self.overlap = overlap if overlap is not None else accelerator != "cpu"
        self.accelerator, self.secret, self.accelerator_timeout = accelerator, secret, accelerator_timeout
        self.verify = verify
        self.device, self._connect = device, connect
        self.pinned_memory = (pinned_memory is None or pinned_memory) and self.device.type == "cuda"
        self.ledger = PrivacyLedger(ledger_path)
        self.audit = AuditLog(audit) if audit is not None else None
        self.boundary: Optional[Boundary] = None
        self.mechanism: Optional[GaussianMechanism] = None
        self._releasing_points: Optional[int] = None
        self._config: Optional[SplitConfig] = None
        self._converted = False
        self._coupled_points = 0
        self.batch_size = 1
        # Held while accounting (each split conv holds it: SplitConfig.lock), so threads may share
        # the engine; `unaccounted` covers only the thread that opened it.
        self._lock = threading.RLock()
        self._per_thread = threading.local()
        self._open_passes = 0  # private loaders iterating now
        self._paid_rows = 0  # samples the open passes' uses pay for: those yielded, and those charged extra
        self._pass_rows: dict[int, int] = {}  # samples released per point while passes are open
        self._batchnorms: list[nn.Module] = []  # the converted model's BatchNorms (batch coupling)
        self._splits: list[tuple[SplitConv2d, bool]] = []  # each split conv, and whether it follows a BatchNorm
        self._unplanned: Optional[nn.Module] = None  # the user's model, until a loader plans its map sizes
        self._outside: dict[int, int] = {}  # releases per point made outside any of their passes
        self._outside_uses = 0  # forwards among them (the most releases at one point)
        self._coupled: set[int] = set()  # points after a BatchNorm
        self._warned: set[str] = set()
        self._unchecked: Optional[nn.Module] = None  # a model whose loader shows its samples only by iterating
        self._refusal: Optional[str] = None  # why that model was refused at its first batch

    # ---- wrapping the user's objects ----------------------------------------------------------

    def make_private(
        self, *, module: nn.Module, optimizer: torch.optim.Optimizer, data_loader: Any, epochs: Optional[int] = None
    ) -> tuple[nn.Module, torch.optim.Optimizer, PrivateDataLoader]:
        """Convert `module`, calibrate the noise for `epochs` uses of the data, wrap the loader.

        The returned model shares its Parameters with `module`, so `optimizer` works unchanged.
        """
        if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1):
            raise ValueError(f"epochs must be an int >= 1 (how many times each sample is used), got {epochs!r}")
        # The model is checked before it is converted: a refused model can be mended and given to
        # the same engine again.
        self._check_unused()
        sizes = self._probe_loader(module, data_loader) if self.mode in ("legrace", "dp_only") else None
        try:
            model = self._convert_once(module)
        except BaseException:
            self._unchecked = None  # a model refused here leaves no check pending for the next one
            raise
        if self._unplanned is not None:  # the map sizes, before calibrating
            self._plan(sizes)
        loader = self.private_loader(data_loader, name="train")
        # Releases after a BatchNorm in training mode are priced at the training batches (the noise is
        # calibrated for them); only a larger batch that crosses there in training mode raises it
        # (_released), so a validation loader of larger batches run in eval mode costs nothing more.
        self.batch_size = max(self.batch_size, _batch_size(data_loader))
        if self.target_epsilon is not None and self.releases_per_sample > 0 and self.mechanism is None:
            if epochs is None:
                raise ValueError("target_epsilon needs epochs (how many times each sample is used)")
            releases = [(s, n * epochs) for s, n in self.releases_per_use()]
            self._set_noise(calibrate_noise_multiplier(self.target_epsilon, self.target_delta, releases, self.accountant))
        return model, optimizer, loader

    def private_loader(self, data_loader: Any, name: str = "validation") -> PrivateDataLoader:
        """Wrap another loader of private data (e.g. validation): its passes are accounted too.

        Each name stands for one data set, and the ledger composes different names in parallel:
        give data that overlaps another loader's the same name. One forward per batch: a pass is
        one use of its samples (more forwards are charged as more uses, see _released), so a
        sampler that draws a sample more than once per pass is refused.
        """
        _check_sampling(data_loader)
        batch_size = _batch_size(data_loader)
        if batch_size is None:
            raise ValueError("cannot tell the loader's batch size (needed to account BatchNorm's batch coupling); "
                             "use a DataLoader with batch_size set")
        device = self.device if self.mode == "gpu_only" else None
        if self._unplanned is not None:  # the first loader's samples tell each conv's map size
            self._plan(self._probe_loader(self._unplanned, data_loader))
        return PrivateDataLoader(data_loader, self, name, device)

    def convert(self, module: nn.Module) -> nn.Module:
        """The split model for this engine's mode (the plain model on the accelerator for gpu_only).

        One engine wraps one model: its noise is calibrated for that model's releases and its
        ledger counts them, so a second model (or a second make_private) needs an engine of its own.
        An engine made with target_epsilon calibrates in make_private, which knows the epochs.
        """
        if self.target_epsilon is not None and self.mode in ("legrace", "dp_only") and not self._converted:
            raise ValueError("an engine with target_epsilon calibrates its noise in make_private (it needs the "
                             "epochs and the data loader): call make_private, or give noise_multiplier to convert")
        return self._convert_once(module)

    def _convert_once(self, module: nn.Module) -> nn.Module:
        self._check_unused()
        model = self._convert(module)
        self._converted = True  # (not before: a model refused can be mended and converted by the same engine)
        return model

    def _check_unused(self) -> None:
        if self._converted:
            raise ValueError("this LegRace engine already wraps a model (make_private or convert was called "
                             "before); its noise and privacy ledger belong to that model: make a new engine")

    def _convert(self, module: nn.Module) -> nn.Module:
        if self.mode == "gpu_only":
            self._releasing_points = 0
            return module.to(self.device)
        if self.mode == "tee_only":
            gm = convert(module)
            self._releasing_points = 0
            return gm
        config = SplitConfig(self.mode, self.rank, self.decomposition, self.power_iters, self.max_rank,
                             basis_dtype=self.basis_dtype, wire_dtype=self.wire_dtype, lock=self._lock)
        if config.releases:
            self.boundary = Boundary(self._connect(), audit=self.audit,
                                     verifier=FreivaldsVerifier() if self.verify else None, overlap=self.overlap)
            config.boundary = self.boundary
            config.on_release = self._released

        splits, after_bns = [], []

        def make_split(conv: nn.Conv2d, point: int, n_points: int, after_bn: bool,
                       same_as: Optional[int]) -> SplitConv2d:
            config.n_points = n_points
            split = SplitConv2d(conv, point, config, None if same_as is None else splits[same_as])
            splits.append(split)
            after_bns.append(after_bn)
            return split

        gm = convert(module, make_split)
        self._batchnorms = [m for m in gm.modules() if isinstance(m, nn.BatchNorm2d)]
        if self.rebuild_outputs:
            config.outputs = ConvOutputs(keep_bytes=int(self.keep_outputs_mb * 2**20))
            config.outputs.install(gm)
        self._splits = list(zip(splits, after_bns))
        self._unplanned = module if config.releases else None
        self._count_releases()
        self._config = config
        if self._noise_arg is not None and self.mechanism is None:
            self._set_noise(self._noise_arg)
        config.mechanism = self.mechanism
        return gm

    def _count_releases(self) -> None:
        # A conv that releases nothing of its own (silent, split exactly at its map size, or
        # reusing an earlier conv's release; see SplitConv2d) is not accounted.
        accounted = [(not split.releases_nothing, after_bn) for split, after_bn in self._splits]
        self._releasing_points = sum(a for a, _ in accounted)
        self._coupled_points = sum(a and bn for a, bn in accounted)
        self._coupled = {split.point for split, bn in self._splits if bn}

    def _probe_loader(self, module: nn.Module, data_loader: Any) -> Optional[list[tuple[int, ...]]]:
        """Each conv's input size, from the shape of the loader's samples; the same forwards refuse
        a model that mixes the batch before a conv (convert.probe_conv_inputs: seeded random
        inputs, eval mode, no private value is read). Called by make_private or private_loader.

        A loader that shows its samples only by iterating (an IterableDataset: peeking could use up
        a one-shot stream) has the model checked on its first batch instead (_check_first_batch),
        before that pass is accounted; until then the model releases nothing (_released). Its
        convs stay unplanned (priced as releasing, the conservative side)."""
        check_modules(module)  # first: a forward would initialise a lazy layer that convert refuses
        shape = _sample_shape(data_loader)
        if shape is None and _iterable_only(data_loader):
            self._unchecked = module
            return None
        return self._probe(module, shape, _batch_size(data_loader), stacklevel=4)

    def _check_first_batch(self, batch: Any) -> None:
        """The batch-mixing check of a model whose loader showed no sample before its first batch.
        A refusal stays: every later pass and release of this engine is refused the same way."""
        if self._unchecked is not None:
            try:
                self._probe(self._unchecked, _input_shape(batch, batched=True), _rows(batch), stacklevel=4)
            except UnsupportedModelError as err:
                self._refusal = (f"{err} (found at the first batch of a loader whose samples show only by iterating, "
                                 "before anything was released or accounted; give the mended model to a new LegRace "
                                 "engine)")
            self._unchecked = None
        if self._refusal:
            raise UnsupportedModelError(self._refusal)

    def _probe(self, module: nn.Module, shape: Optional[tuple[int, ...]], batch_size: Optional[int],
               stacklevel: int) -> Optional[list[tuple[int, ...]]]:
        """probe_conv_inputs on inputs of `shape` (a batch's), again at the batch size (up to
        PROBE_MAX_BATCH) for a model that cannot run on two samples; None, with a warning that
        points `stacklevel` frames up at the user's call, if the model cannot run on such inputs."""
        like = next((p for p in module.parameters() if p.is_floating_point()), None)  # the model's dtype and device
        try:
            if shape is None:
                raise ValueError("its samples are not image tensors (an image, a tuple that starts with one, or a "
                                 "dict holding one)")
            try:
                return probe_conv_inputs(module, shape[1:], like, conv_modules(module))
            except UnsupportedModelError:
                raise
            except Exception:  # a model that needs more samples (h[3], a view by 4 rows): try the loader's
                batch = min(batch_size or 0, PROBE_MAX_BATCH)
                if batch <= 2:
                    raise
                return probe_conv_inputs(module, shape[1:], like, conv_modules(module), batch_size=batch)
        except UnsupportedModelError:
            raise
        except Exception as err:  # the loader's samples are not the model's input
            why = (str(err).splitlines() or [type(err).__name__])[0][:200]
            warnings.warn(f"legrace could not run the model on inputs shaped like this loader's samples ({why}), so "
                          "it has not checked that the model keeps samples apart before each conv (a model that "
                          "mixes the batch would be under-accounted) nor found the convs that release nothing",
                          stacklevel=stacklevel)
            return None

    def _plan(self, sizes: Optional[list[tuple[int, ...]]]) -> None:
        """Tell each split conv its map size, so one whose map R covers (R >= h*w) is known to
        release nothing before the noise is calibrated. Done once: later loaders plan nothing."""
        self._unplanned = None
        if sizes is not None and len(sizes) == len(self._splits):
            for (split, _), hw in zip(self._splits, sizes):
                split.plan(hw)
            self._count_releases()

    @contextlib.contextmanager
    def unaccounted(self) -> Iterator[None]:
        """Forwards in this block release data that is not private (synthetic benchmark inputs,
        an attack's simulated victims): not accounted, and no warning. Grep for it to audit.
        It covers this thread's forwards only: another thread's, at the same time, are accounted."""
        self._per_thread.unaccounted = self._unaccounted + 1
        try:
            yield
        finally:
            self._per_thread.unaccounted -= 1

    @property
    def _unaccounted(self) -> int:
        """`unaccounted` blocks open now on this thread."""
        return getattr(self._per_thread, "unaccounted", 0)

    def _released(self, point: int, rows: int) -> None:
        """Account the release of `rows` samples' residuals at decomposition point `point`,
        before it crosses (an error here stops it).

        A pass over a private loader is one use of its samples while each sample it yields goes
        through the model once. Releases beyond that (more rows at a point than the open passes
        have yielded: a second forward of a batch, an eval forward beside the training one, data
        from elsewhere), and every forward outside all passes, are each charged as one use under
        OUTSIDE_A_LOADER, which adds to every data set's count (the worst case: the same samples
        every time), so `get_epsilon` never understates what crossed. After a BatchNorm in
        training mode a release's sensitivity is 2C*sqrt(B): a batch larger than make_private's
        loader's raises the B every use is priced at, or, when the noise was calibrated for a target
        epsilon, is refused. Eval-mode forwards couple nothing, whatever their batch (unless a
        BatchNorm keeps no running statistics, and normalises by the batch in eval mode too).
        Called by a split conv, which holds the engine's lock: one thread accounts at a time.
        """
        if self._unaccounted:
            return
        if self._refusal:
            raise UnsupportedModelError(self._refusal)
        if self._unchecked is not None:
            raise ValueError("this model is not yet checked for mixing samples of a batch: its loader shows its "
                             "samples only by iterating, and its first batch is checked before anything is "
                             "released. Iterate the private loader first (or run this forward in "
                             "engine.unaccounted() if its data is not private)")
        if rows > self.batch_size and point in self._coupled and any(map(_normalises_by_batch, self._batchnorms)):
            if self.target_epsilon is not None:  # the noise was calibrated for the smaller batch
                raise ValueError(
                    f"a batch of {rows} samples reached decomposition point {point}, which follows a BatchNorm that "
                    "normalises by the batch (training mode, or no running statistics), but the noise was calibrated "
                    f"for batches of at most {self.batch_size} (make_private's loader's batch size): one sample moves "
                    f"its whole batch there. Train on batches of at most {self.batch_size}, or run this forward in "
                    "eval mode (model.eval(), with BatchNorms that keep running statistics)")
            self.batch_size = rows  # every use is priced at the larger batch from now on (never less)
        if self._open_passes:
            n = self._pass_rows[point] = self._pass_rows.get(point, 0) + rows
            if n <= self._paid_rows:
                return
            self._paid_rows += rows  # this forward's rows, at every point, paid by one use below
            what = ("the model released more samples' residuals than the private loaders' open passes have yielded "
                    "(a second forward of a batch, or other data during a pass)")
        else:
            n = self._outside[point] = self._outside.get(point, 0) + 1
            if n <= self._outside_uses:  # not a forward's first release
                return
            self._outside_uses = n
            what = ("the model released residuals outside a pass over a private loader (make_private's or "
                    "private_loader's)")
        if what not in self._warned:
            self._warned.add(what)
            warnings.warn(f"{what}: each such forward is accounted as one more use of every data set's samples, "
                          "the worst case; feed each private sample through those loaders once per pass", stacklevel=5)
        self._record_use(OUTSIDE_A_LOADER)

    def _record_use(self, name: str) -> None:
        """One use of data set `name`, recorded before anything of it is released."""
        self._spending()
        self.ledger.record_pass(name)

    def _spending(self) -> None:
        """Check, before uses are spent, that this engine prices a use at least as dearly as the
        ledger's earlier uses were spent (a checkpoint or ledger file from another batch size or
        rank would otherwise be re-priced cheaper), and record its pricing."""
        if self._releasing_points is None or not self.releases_per_sample:
            return
        ours = self.releases_per_use()
        for spent in self.ledger.spent_at:
            if not covers(ours, spent):
                raise ValueError(
                    f"the privacy ledger holds uses that released {_pricing(spent)} each, and this engine would "
                    f"account a use as {_pricing(ours)}, less: make the engine with the same model, rank and batch "
                    "size as the run the ledger (or checkpoint) comes from")
        self.ledger.note_pricing(ours)

    def _set_noise(self, z: float) -> None:
        self.mechanism = GaussianMechanism(self._clip_for(z), z, seed=self.noise_seed)
        self.mechanism.pinned_output = self.pinned_memory
        if self.noise_ahead and self.noise_seed is None:  # a fixed seed needs the inline, ordered stream
            self.mechanism.start_pool(self.noise_ahead)
        if self._config is not None:
            self._config.mechanism = self.mechanism

    # ---- what was spent -----------------------------------------------------------------------

    @property
    def releases_per_sample(self) -> int:
        """Noised residuals released per use of one sample: one per decomposition point, except
        points whose fixed R covers all their input channels (split exactly, they send nothing)."""
        if self._releasing_points is None:
            raise RuntimeError("call make_private (or convert) first: the count depends on the model")
        return self._releasing_points if self.mode in ("legrace", "dp_only") else 0

    @property
    def batch_coupled_releases_per_sample(self) -> int:
        """Of releases_per_sample, those after a BatchNorm: sensitivity 2C*sqrt(batch size)."""
        return self._coupled_points if self.releases_per_sample else 0

    def releases_per_use(self) -> list[tuple[float, int]]:
        """(l2 sensitivity in units of C, count) of what one use of a sample releases."""
        coupled = self.batch_coupled_releases_per_sample
        return [(2.0, self.releases_per_sample - coupled), (2.0 * math.sqrt(self.batch_size), coupled)]

    @property
    def noise_multiplier(self) -> float:
        """z: noise std over the clipping bound C."""
        return self.mechanism.noise_multiplier if self.mechanism else 0.0

    @property
    def clip(self) -> Optional[float]:
        return self.mechanism.clip if self.mechanism else None

    @property
    def sigma(self) -> float:
        """Noise standard deviation z * C."""
        return self.mechanism.sigma if self.mechanism else 0.0

    @property
    def sensitivity(self) -> Optional[float]:
        """The largest l2 sensitivity of one release: 2C, or 2C*sqrt(batch size) if any release
        follows a BatchNorm in training mode (`releases_per_use` lists each kind)."""
        if self.mechanism is None or self.mechanism.sensitivity is None:
            return None
        return self.clip * self._largest_sensitivity()

    def _largest_sensitivity(self) -> float:
        """In units of C, over the kinds of release one use of a sample makes."""
        return max((s for s, n in self.releases_per_use() if n > 0), default=2.0)

    def get_epsilon(self, delta: Optional[float] = None) -> float:
        """Epsilon spent so far at `delta` (default target_delta), over every accounted pass."""
        delta = self.target_delta if delta is None else delta
        check_delta(delta)
        if self.mode == "gpu_only":
            return math.inf
        return self.epsilon_of_uses(self.ledger.max_uses, delta)

    def epsilon_of_uses(self, uses: int, delta: Optional[float] = None) -> float:
        """Epsilon at `delta` of `uses` passes over a data set (what one data set's passes cost)."""
        delta = self.target_delta if delta is None else delta
        if self.mode == "gpu_only":
            return math.inf if uses else 0.0
        if self._releasing_points is None or self.releases_per_sample == 0:
            return 0.0
        return epsilon(self.noise_multiplier, [(s, n * uses) for s, n in self.releases_per_use()], delta, self.accountant)

    def epsilon_per_release(self, delta: Optional[float] = None) -> float:
        """Epsilon at `delta` of the costliest single release (of sensitivity `sensitivity`)."""
        delta = self.target_delta if delta is None else delta
        if self.mode == "gpu_only":
            return math.inf
        if self._releasing_points is None or self.releases_per_sample == 0:
            return 0.0
        return epsilon(self.noise_multiplier, [(self._largest_sensitivity(), 1)], delta, self.accountant)

    def close(self) -> None:
        """Hang up on the accelerator (a private worker process exits), stop the noise thread and
        close the audit log."""
        if self.boundary is not None:
            self.boundary.close()
        if self.mechanism is not None:
            self.mechanism.close()
        if self.audit is not None:
            self.audit.close()

    def state_dict(self) -> dict:
        """What a checkpoint needs to resume without spending privacy twice (the ledger holds
        the uses and what one use released, see _spending)."""
        return {"mode": self.mode, "noise_multiplier": self.noise_multiplier, "clip": self.clip,
                "batch_size": self.batch_size, "ledger": self.ledger.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Take over a checkpoint's privacy ledger. The engine must release with the checkpoint's
        noise multiplier and clip: the uses already spent are accounted at this engine's noise."""
        if state["mode"] != self.mode:
            raise ValueError(f"checkpoint was trained in mode {state['mode']!r}, not {self.mode!r}")
        z, clip = self._noise_setting()
        saved_z, saved_clip = state["noise_multiplier"], state["clip"]
        same_clip = clip == saved_clip if None in (clip, saved_clip) else _same(clip, saved_clip)
        if z is None or not _same(z, saved_z) or not same_clip:
            have = "noise calibrated later from target_epsilon" if z is None else f"noise_multiplier={z}, clip={clip}"
            raise ValueError(f"checkpoint was trained with noise_multiplier={saved_z}, clip={saved_clip}, this engine "
                             f"has {have}: make the engine with the checkpoint's noise_multiplier and clip, so "
                             "the privacy already spent is accounted at the noise it was spent with")
        self.take_batch_size(state)
        self.ledger.load_state_dict(state["ledger"])
        if self.ledger.uses:
            self._spending()  # (checked again before each pass, once a loader has planned the model)

    def take_batch_size(self, state: dict, default: int = 1) -> None:
        """Price uses at the batch size a checkpoint's run priced them at (at least): a later
        loader with smaller batches (an evaluation) must not make the run's uses cheaper."""
        self.batch_size = max(self.batch_size, int(state.get("batch_size", default)))

    def _noise_setting(self) -> tuple[Optional[float], Optional[float]]:
        """(noise multiplier, clip) this engine releases with, as state_dict records them; z is
        None while it waits to calibrate from target_epsilon."""
        if self.mechanism is not None or self.mode not in ("legrace", "dp_only"):
            return self.noise_multiplier, self.clip
        if self._noise_arg is None:
            return None, None
        return self._noise_arg, self._clip_for(self._noise_arg)

    def _clip_for(self, z: float) -> Optional[float]:
        if self._clip_arg == "auto":
            return AUTO_NOISE_STD / z if z > 0 else None
        return self._clip_arg


def _same(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)


def _sample_shape(data_loader: Any) -> Optional[tuple[int, ...]]:
    """The shape of a batch of one input, from the loader's data set or first batch (None if
    neither tells)."""
    try:
        dataset = getattr(data_loader, "dataset", None)
        if dataset is None:
            shape = _input_shape(data_loader[0], batched=True)
            return None if shape is None else (1, *shape[1:])
        return _input_shape(dataset[0], batched=False)
    except Exception:  # an iterable-style data set, or samples of another form
        return None


def _input_shape(item: Any, batched: bool) -> Optional[tuple[int, ...]]:
    """The shape of a batch of inputs, from one sample (batched=False) or one batch: an image
    tensor, a tuple or list that starts with one, or a dict holding one floating-point image
    tensor ({"image": x, "label": y}); None for anything else."""
    rank = 4 if batched else 3
    if isinstance(item, dict):
        images = [v for v in item.values() if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() == rank]
        item = images[0] if len(images) == 1 else None
    x = item[0] if isinstance(item, (list, tuple)) and item else item
    if not isinstance(x, torch.Tensor) or x.dim() != rank:
        return None
    return tuple(x.shape) if batched else (1, *x.shape)


def _iterable_only(data_loader: Any) -> bool:
    """Whether the loader shows its samples only by iterating (an IterableDataset, or no data set
    and no indexing)."""
    dataset = getattr(data_loader, "dataset", None)
    if dataset is None:
        return not isinstance(data_loader, (list, tuple)) and not hasattr(data_loader, "__getitem__")
    return isinstance(dataset, torch.utils.data.IterableDataset)


def _normalises_by_batch(bn: nn.Module) -> bool:
    """Whether this BatchNorm normalises with the batch's own statistics now (so one sample moves
    its batch-mates' outputs): in training mode, and in eval mode too when it keeps no running
    statistics (track_running_stats=False), as torch's BatchNorm decides."""
    return bn.training or (bn.running_mean is None and bn.running_var is None)


def _batch_size(data_loader: Any) -> Optional[int]:
    """The most samples a batch of this loader holds: its batch_size (at most its data set's
    length), or a list of batches' longest; None if it cannot tell."""
    batch_size = getattr(data_loader, "batch_size", None)
    if batch_size is None:
        return max((_rows(b) for b in data_loader), default=1) if isinstance(data_loader, (list, tuple)) else None
    try:  # a batch never holds more than the data set (an empty one: 1, as for an empty list)
        return min(batch_size, len(data_loader.dataset)) or 1
    except (AttributeError, TypeError):  # no data set, or an iterable-style one (no length)
        return batch_size


def _rows(batch: Any, loader: Any = None) -> int:
    """Samples in a batch: the length of its first tensor (of a tuple, list or dict), else the
    loader's batch size."""
    while isinstance(batch, (list, tuple, dict)) and len(batch):
        batch = next(iter(batch.values())) if isinstance(batch, dict) else batch[0]
    if isinstance(batch, torch.Tensor) and batch.dim():
        return batch.shape[0]
    return getattr(loader, "batch_size", None) or 1


def _check_sampling(data_loader: Any) -> None:
    """Refuse loaders that yield a sample more than once per pass: the ledger counts a pass as
    one use of each sample (with replacement, one sample was drawn 14 times in a pass)."""
    sampler = getattr(data_loader, "sampler", None)
    dataset = getattr(data_loader, "dataset", None)
    if getattr(sampler, "replacement", False):
        raise ValueError(f"the loader's {type(sampler).__name__} draws with replacement, so a pass can use one sample "
                         "several times; legrace accounts a pass as one use of each sample: sample without replacement")
    num_samples = getattr(sampler, "num_samples", None)
    try:
        if isinstance(num_samples, int) and dataset is not None and num_samples > len(dataset):
            raise ValueError(f"the loader's {type(sampler).__name__} draws {num_samples} samples per pass from "
                             f"{len(dataset)}, so it repeats samples; legrace accounts a pass as one use of each sample")
    except TypeError:  # no length
        pass
    if isinstance(dataset, torch.utils.data.IterableDataset) and getattr(data_loader, "num_workers", 0) > 1:
        raise ValueError("an IterableDataset read by several workers yields every sample once per worker unless it "
                         "shards itself; legrace cannot tell, so use num_workers <= 1 (or a map-style dataset)")


def _pricing(releases) -> str:
    return ", ".join(f"{n} at sensitivity {s:g}C" for s, n in releases if n)


__all__ = ["AUTO_NOISE_STD", "TrustedEngine", "MODES", "PrivateDataLoader", "SPLIT_MODES"]
