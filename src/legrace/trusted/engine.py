"""The trusted side of the privacy engine, which wraps a user's model, optimizer and data loader
(like Opacus). `legrace.LegRace` (legrace.wiring) is this engine connected to its accelerator:

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
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from legrace.boundary.audit import AuditLog
from legrace.boundary.gateway import Boundary, Transport
from legrace.privacy.accountant import OUTSIDE_A_LOADER, PrivacyLedger, calibrate_noise_multiplier, check_delta, epsilon
from legrace.privacy import loaders
from legrace.privacy.loaders import PassBook, PrivateDataLoader
from legrace.trusted.convert import UnsupportedModelError, check_modules, conv_modules, convert, probe_conv_inputs
from legrace.trusted.freivalds import FreivaldsVerifier
from legrace.trusted.mechanism import GaussianMechanism
from legrace.trusted.recompute import ConvOutputs
from legrace.trusted.settings import AUTO_NOISE_STD, MODES, Settings
from legrace.trusted.split_conv import SPLIT_MODES, SplitConfig, SplitConv2d

# The batch-mixing probe runs batches of 2; a model that cannot run on 2 samples (one that takes
# sample 3, or views the batch by 4 rows) is probed again at the loader's batch size, up to this
# many (the probe keeps every conv input of one batch: about 0.6 GB for VGG-16 at 224x224 and 16).
PROBE_MAX_BATCH = 16


class TrustedEngine:
    """Wraps a user's model, optimizer and loaders (as Opacus's PrivacyEngine does), splits every
    conv between the trusted side and the accelerator, and accounts what it releases.

    Its settings are a frozen `legrace.trusted.settings.Settings` (`engine.settings`), whose
    docstring says what each does. Reading order: make_private and private_loader wrap the user's
    objects; _convert builds the split model; _released accounts each release before it crosses;
    get_epsilon and the properties after it say what was spent.
    """

    def __init__(self, settings: Settings, *, device: torch.device, connect: Callable[[], Transport]) -> None:
        """Use `legrace.LegRace(**settings)`, which builds `device` and `connect` from the
        accelerator setting; `connect()` opens the transport when a model first needs one."""
        self.settings = s = settings
        self.device, self._connect = device, connect
        self.pinned_memory = (s.pinned_memory is None or s.pinned_memory) and device.type == "cuda"
        self.noise_seed = s.noise_seed  # an evaluation may give its pass a stream of its own
        self.ledger = PrivacyLedger(s.ledger_path)
        self.audit = AuditLog(s.audit) if s.audit is not None else None
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
        self.passes = PassBook()  # which use each release belongs to (legrace.privacy.loaders)
        self._batchnorms: list[nn.Module] = []  # the converted model's BatchNorms (batch coupling)
        self._splits: list[tuple[SplitConv2d, bool]] = []  # each split conv, and whether it follows a BatchNorm
        self._unplanned: Optional[nn.Module] = None  # the user's model, until a loader plans its map sizes
        self._coupled: set[int] = set()  # points after a BatchNorm
        self._warned: set[str] = set()
        self._unchecked: Optional[nn.Module] = None  # a model whose loader shows its samples only by iterating
        self._refusal: Optional[str] = None  # why that model was refused at its first batch

    @property
    def mode(self) -> str:
        return self.settings.mode

    @property
    def target_epsilon(self) -> Optional[float]:
        return self.settings.target_epsilon

    @property
    def target_delta(self) -> float:
        return self.settings.target_delta

    @property
    def overlap(self) -> bool:
        return self.settings.overlap

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
        sizes = self._probe_loader(module, data_loader) if self.settings.releases else None
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
        self.batch_size = max(self.batch_size, loaders.batch_size(data_loader))
        if self.target_epsilon is not None and self.releases_per_sample > 0 and self.mechanism is None:
            if epochs is None:
                raise ValueError("target_epsilon needs epochs (how many times each sample is used)")
            releases = [(s, n * epochs) for s, n in self.releases_per_use()]
            z = calibrate_noise_multiplier(self.target_epsilon, self.target_delta, releases, self.settings.accountant)
            self._set_noise(z)
        return model, optimizer, loader

    def private_loader(self, data_loader: Any, name: str = "validation") -> PrivateDataLoader:
        """Wrap another loader of private data (e.g. validation): its passes are accounted too.

        Each name stands for one data set, and the ledger composes different names in parallel:
        give data that overlaps another loader's the same name. One forward per batch: a pass is
        one use of its samples (more forwards are charged as more uses, see _released), so a
        sampler that draws a sample more than once per pass is refused.
        """
        loaders.check_sampling(data_loader)
        if loaders.batch_size(data_loader) is None:
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
        if self.target_epsilon is not None and self.settings.releases and not self._converted:
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
        s = self.settings
        config = SplitConfig(s.mode, s.rank, s.decomposition, s.power_iters, s.max_rank,
                             basis_dtype=s.basis_torch_dtype, wire_dtype=s.wire_torch_dtype, lock=self._lock)
        if config.releases:
            self.boundary = Boundary(self._connect(), audit=self.audit,
                                     verifier=FreivaldsVerifier() if self.settings.verify else None, overlap=self.overlap)
            config.boundary = self.boundary
            config.on_release = self._released
            config.trusted_only = self._trusted_only

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
        if self.settings.rebuild_outputs:
            config.outputs = ConvOutputs(keep_bytes=int(self.settings.keep_outputs_mb * 2**20))
            config.outputs.install(gm)
        self._splits = list(zip(splits, after_bns))
        self._unplanned = module if config.releases else None
        self._count_releases()
        self._config = config
        if self.settings.noise_multiplier is not None and self.mechanism is None:
            self._set_noise(self.settings.noise_multiplier)
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
        shape = loaders.sample_shape(data_loader)
        if shape is None and loaders.iterable_only(data_loader):
            self._unchecked = module
            return None
        return self._probe(module, shape, loaders.batch_size(data_loader), stacklevel=4)

    def _check_first_batch(self, batch: Any) -> None:
        """The batch-mixing check of a model whose loader showed no sample before its first batch.
        A refusal stays: every later pass and release of this engine is refused the same way."""
        if self._unchecked is not None:
            try:
                self._probe(self._unchecked, loaders.input_shape(batch, batched=True), loaders.rows(batch), stacklevel=5)
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

    @contextlib.contextmanager
    def trusted_inference(self) -> Iterator[None]:
        """Forwards in this block run wholly on the trusted side: in legrace and dp_only every split
        conv computes the plain conv of its weight on its whole input, the unconverted model's
        output, exact and noise-free; nothing crosses and nothing is accounted. lowrank_only keeps
        its own forward (the low-rank model it trained as, which releases nothing anyway); tee_only
        and gpu_only have no split convs. A private loader's pass is recorded whatever the forward
        does: iterate a plain loader here. It covers this thread's forwards only, like `unaccounted`."""
        self._per_thread.trusted = self._trusted_only() + 1
        try:
            yield
        finally:
            self._per_thread.trusted -= 1

    def _trusted_only(self) -> int:
        """`trusted_inference` blocks open now on this thread (SplitConfig.trusted_only)."""
        return getattr(self._per_thread, "trusted", 0)

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
        what = self.passes.extra_use(point, rows)
        if what is None:
            return
        if what not in self._warned:
            self._warned.add(what)
            warnings.warn(f"{what}: each such forward is accounted as one more use of every data set's samples, "
                          "the worst case; feed each private sample through those loaders once per pass", stacklevel=5)
        self._record_use(OUTSIDE_A_LOADER)

    def _before_pass(self, name: str, batch: Any) -> None:
        """A private loader's first batch of a pass: check the model if its loader showed no
        sample before (a refused model spends nothing), then record the use before any release."""
        if self._unchecked is not None or self._refusal:
            self._check_first_batch(batch)
        self._record_use(name)

    def _record_use(self, name: str) -> None:
        """One use of data set `name`, recorded before anything of it is released."""
        self._spending()
        self.ledger.record_pass(name)

    def _spending(self) -> None:
        """Before uses are spent: the ledger checks this engine prices a use at least as dearly
        as its earlier uses were spent (PrivacyLedger.spend_at)."""
        if self._releasing_points is None or not self.releases_per_sample:
            return
        self.ledger.spend_at(self.releases_per_use())

    def _set_noise(self, z: float) -> None:
        self.mechanism = GaussianMechanism(self.settings.clip_for(z), z, seed=self.noise_seed)
        self.mechanism.pinned_output = self.pinned_memory
        if self.settings.noise_ahead and self.noise_seed is None:  # a fixed seed needs the inline, ordered stream
            self.mechanism.start_pool(self.settings.noise_ahead)
        if self._config is not None:
            self._config.mechanism = self.mechanism

    # ---- what was spent -----------------------------------------------------------------------

    @property
    def releases_per_sample(self) -> int:
        """Noised residuals released per use of one sample: one per decomposition point, except
        points whose fixed R covers all their input channels (split exactly, they send nothing)."""
        if self._releasing_points is None:
            raise RuntimeError("call make_private (or convert) first: the count depends on the model")
        return self._releasing_points if self.settings.releases else 0

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
        return epsilon(self.noise_multiplier, [(s, n * uses) for s, n in self.releases_per_use()], delta, self.settings.accountant)

    def epsilon_per_release(self, delta: Optional[float] = None) -> float:
        """Epsilon at `delta` of the costliest single release (of sensitivity `sensitivity`)."""
        delta = self.target_delta if delta is None else delta
        if self.mode == "gpu_only":
            return math.inf
        if self._releasing_points is None or self.releases_per_sample == 0:
            return 0.0
        return epsilon(self.noise_multiplier, [(self._largest_sensitivity(), 1)], delta, self.settings.accountant)

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
        if self.mechanism is not None or not self.settings.releases:
            return self.noise_multiplier, self.clip
        if self.settings.noise_multiplier is None:
            return None, None
        return self.settings.noise_multiplier, self.settings.clip_for(self.settings.noise_multiplier)


def _same(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)


def _normalises_by_batch(bn: nn.Module) -> bool:
    """Whether this BatchNorm normalises with the batch's own statistics now (so one sample moves
    its batch-mates' outputs): in training mode, and in eval mode too when it keeps no running
    statistics (track_running_stats=False), as torch's BatchNorm decides."""
    return bn.training or (bn.running_mean is None and bn.running_var is None)


__all__ = ["AUTO_NOISE_STD", "TrustedEngine", "MODES", "PrivateDataLoader", "SPLIT_MODES"]
