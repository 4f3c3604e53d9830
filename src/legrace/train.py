"""The training job behind `legrace train` and `legrace evaluate`: an ordinary PyTorch loop
around `LegRace.make_private`, with metrics, a summary and resumable checkpoints."""

from __future__ import annotations

import json
import math
import os
import pickle
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from legrace.data import DataSplit, load_data, source_of
from legrace.wiring import LegRace
from legrace.privacy.accountant import PrivacyLedger
from legrace.trusted.mechanism import derive_seed
from legrace.models import build_model, fails_on_one_sample
from legrace.outputs import output_folder


@dataclass
class TrainConfig:
    model: str = "cnn"
    data: str = "digits"
    epochs: Optional[int] = None  # None: DEFAULT_EPOCHS, or on --resume the checkpoint's
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    mode: str = "legrace"
    rank: Union[int, str, list] = 8
    clip: Union[float, str, None] = "auto"
    target_epsilon: Optional[float] = 8.0
    noise_multiplier: Optional[float] = None
    delta: float = 1e-5
    val_fraction: float = 0.1
    seed: int = 0
    noise_seed: Optional[int] = None
    max_samples: Optional[int] = None
    image_size: Optional[int] = None
    download: bool = False
    accelerator: str = "cpu"  # cpu | cuda | process[:DEVICE] | tcp://HOST:PORT
    accelerator_timeout: float = 120.0
    verify: bool = False
    audit: Optional[str] = None
    decomposition: str = "light"
    wire_dtype: Optional[str] = None  # "bfloat16": noised residuals cross in half the bytes
    keep_outputs_mb: float = 0.0  # conv outputs kept per forward instead of rebuilt (LegRace)
    accountant: str = "rdp"
    out: str = "runs/legrace"
    progress: bool = True
    val_inference: str = "trusted"  # how validation is measured (INFERENCES); "split" releases and is accounted
    allow_past_target: bool = False  # a resume with more epochs may spend past target_epsilon


DEFAULT_EPOCHS = 10

# On --resume these come from the command, not the checkpoint: where and how to run, not what to train
# (epochs only when the command gives them).
RUN_SETTINGS = ("epochs", "out", "progress", "accelerator", "accelerator_timeout", "verify", "audit", "wire_dtype",
                "keep_outputs_mb", "download", "val_inference", "allow_past_target")

# How an accuracy is measured: "trusted" runs every conv on the trusted side (TrustedEngine.trusted_inference:
# nothing released, nothing accounted); "split" serves the model with the accelerator as training does
# (noised residuals released, each pass recorded in the privacy ledger).
INFERENCES = ("trusted", "split")


def measured_by(mode: str, inference: str, releases: bool = True) -> str:
    """In words, what an accuracy measured by `inference` in `mode` is the accuracy of (`releases`:
    whether the model has a conv that releases, see TrustedEngine.releases_per_sample)."""
    if mode == "gpu_only":
        return "the plain model, without privacy (gpu_only)"
    if mode in ("lowrank_only", "tee_only"):
        what = "the low-rank model it trained as" if mode == "lowrank_only" else "the model"
        return f"{what}, wholly on the trusted side ({mode}); nothing released"
    if inference == "split" and not releases:
        return "split inference, which releases nothing here (R covers every conv's input): noise-free"
    if inference == "trusted":
        return ("trusted inference: the model as deployed in the TEE, every conv on the trusted side; exact and "
                "noise-free, nothing released or accounted")
    return ("split inference: the model as served with the untrusted accelerator, on noised residuals (it varies "
            "with the noise); released and accounted")


class TrainError(RuntimeError):
    """A run that cannot start or resume; the message says why."""


def _engine(cfg: TrainConfig, noise_multiplier: Optional[float], clip, ledger_path: Optional[Path],
            secret: Optional[str] = None, audit=None) -> LegRace:
    releasing = cfg.mode in ("legrace", "dp_only")
    return LegRace(
        mode=cfg.mode, rank=cfg.rank, clip=clip,
        noise_multiplier=noise_multiplier if releasing else None,
        target_epsilon=cfg.target_epsilon if releasing and noise_multiplier is None else None,
        target_delta=cfg.delta, accelerator=cfg.accelerator, secret=secret,
        accelerator_timeout=cfg.accelerator_timeout, verify=cfg.verify, decomposition=cfg.decomposition,
        wire_dtype=cfg.wire_dtype, keep_outputs_mb=cfg.keep_outputs_mb, accountant=cfg.accountant,
        noise_seed=cfg.noise_seed, audit=audit, ledger_path=ledger_path,
    )


def _loader(ds, cfg: TrainConfig, train: bool, generator: Optional[torch.Generator] = None) -> DataLoader:
    """Training shuffles with `generator` (its state is checkpointed, so a resumed epoch draws the
    order an unbroken run would). Only a last batch of one sample is dropped: BatchNorm cannot
    train on it; every other sample is used every epoch."""
    g = generator if generator is not None else torch.Generator().manual_seed(cfg.seed)
    return DataLoader(ds, batch_size=cfg.batch_size, shuffle=train, generator=g,
                      drop_last=train and len(ds) > cfg.batch_size and len(ds) % cfg.batch_size == 1)


def _check_one_sample_batches(model: nn.Module, data: DataSplit, cfg: TrainConfig) -> None:
    """Refuse, before anything is written or released, a run whose batches of one sample a
    BatchNorm cannot train on (one value per channel on its 1x1 maps): it would fail in its first
    step, with the output folder taken and a pass spent at each --resume."""
    if min(cfg.batch_size, len(data.train)) == 1 and fails_on_one_sample(model, data.in_channels, data.image_size):
        raise TrainError(f"{cfg.model} cannot train on batches of one sample at {data.image_size}x{data.image_size}: "
                         "a BatchNorm would see one value per channel. Use --batch-size 2 or more (and at least 2 "
                         "training samples)")


def check_same_data(state: dict, data: DataSplit, use: str) -> None:
    """Refuse data whose content differs from what the checkpoint's run read: its seeded split
    would then move samples the run trained on into the validation split."""
    saved = state.get("data_fingerprint")
    if saved and data.fingerprint and not data.matches(saved):
        raise TrainError(f"{use}: the data at {data.spec} is not what the run read (its content changed since), so "
                         "the run's validation split would no longer be held out; use the original data or start a "
                         "new run")


def class_map(state: dict, data: DataSplit) -> Optional[list[int]]:
    """For each class of `data`, the checkpoint's output of that class, matched by name (None: the
    same classes in the same order, or either side names its classes only by their numbers)."""
    trained = state.get("classes")

    def numbered(names: list[str]) -> bool:
        return names == [str(i) for i in range(len(names))]

    if not trained or numbered(trained) or numbered(data.classes) or trained == data.classes:
        return None
    unknown = [c for c in data.classes if c not in trained]
    if unknown:
        raise TrainError(f"{data.spec} has classes the model was not trained on: {', '.join(unknown[:5])}"
                         f"{' ...' if len(unknown) > 5 else ''} (trained on {', '.join(trained[:10])})")
    return [trained.index(c) for c in data.classes]


def _evaluate(model, loader, classes: Optional[list[int]] = None,
              device: Optional[torch.device] = None) -> tuple[float, float]:
    """Mean loss and accuracy; `classes` maps the data's labels to the model's outputs (class_map);
    `device`: where to move each batch (a private loader moves them itself)."""
    model.eval()
    total = correct = 0
    loss = 0.0
    to_output = torch.tensor(classes) if classes is not None else None
    with torch.no_grad():
        for x, y in loader:
            if to_output is not None:
                y = to_output[y]
            if device is not None:
                x, y = x.to(device), y.to(device)
            out = model(x)
            loss += float(F.cross_entropy(out, y, reduction="sum"))
            correct += int((out.argmax(1) == y).sum())
            total += len(y)
    return loss / max(total, 1), correct / max(total, 1)


def _save(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def run_training(cfg: TrainConfig, resume: bool = False, log=print, secret: Optional[str] = None,
                 given: Iterable[str] = ()) -> dict:
    """Train as `cfg` says; returns the summary also written to OUT/summary.json.

    `secret`: the worker's shared secret for accelerator tcp://... (default $LEGRACE_SECRET); it
    is never written to the checkpoint or the summary. `given`: the fields of `cfg` its maker set
    on purpose (the CLI: the options on the command line). A resumed run trains what its
    checkpoint says, so one of them that is not a RUN_SETTING and differs from the checkpoint's
    is refused rather than ignored.
    """
    out = output_folder(cfg.out)
    ckpt_path, ledger_path = out / "checkpoint.pt", out / "privacy_ledger.json"
    state = None
    if resume:
        if not ckpt_path.exists():
            raise TrainError(f"--resume: no checkpoint at {ckpt_path}")
        state, saved = load_checkpoint(ckpt_path)
        lacking = {"optimizer", "scheduler", "history", "step_times", "rng"} - set(state)
        if lacking:  # evaluate needs less; resuming needs these too
            raise TrainError(f"--resume: {ckpt_path} cannot be resumed: it holds no {', '.join(sorted(lacking))}")
        changed = [name for name in given if name not in RUN_SETTINGS and hasattr(saved, name)
                   and getattr(cfg, name) != getattr(saved, name)]
        if changed:
            raise TrainError("--resume continues the run as its checkpoint says, but this command changes "
                             + ", ".join(f"--{n.replace('_', '-')} (checkpoint: {getattr(saved, n)!r}, here: "
                                         f"{getattr(cfg, n)!r})" for n in changed)
                             + f"; drop {'it' if len(changed) == 1 else 'them'}, or start a new run in another --out")
        for name in RUN_SETTINGS:
            if name != "epochs" or cfg.epochs is not None:
                setattr(saved, name, getattr(cfg, name))
        cfg = saved
        log(f"resuming {cfg.mode} run from epoch {state['epoch']} of {ckpt_path}; training settings come from the "
            f"checkpoint, {', '.join(RUN_SETTINGS)} from this command")
    elif ckpt_path.exists() or ledger_path.exists():
        raise TrainError(f"{out} already holds a run: pass --resume to continue it or choose another --out")
    if cfg.epochs is None:
        cfg.epochs = DEFAULT_EPOCHS
    if cfg.val_inference not in INFERENCES:
        raise TrainError(f"--val-inference must be one of {', '.join(INFERENCES)}, not {cfg.val_inference!r}")

    torch.manual_seed(cfg.seed)
    data: DataSplit = load_data(cfg.data, val_fraction=cfg.val_fraction, seed=cfg.seed, max_samples=cfg.max_samples,
                                image_size=cfg.image_size, download=cfg.download)
    if data.num_classes < 2:
        raise TrainError(f"{cfg.data} has {data.num_classes} class: a classifier needs at least 2")
    if state is not None:
        check_same_data(state, data, "--resume")
    model = build_model(cfg.model, num_classes=data.num_classes, in_channels=data.in_channels,
                        image_size=data.image_size)
    _check_one_sample_batches(model, data, cfg)
    if cfg.mode in ("legrace", "dp_only") and cfg.delta >= 1 / len(data.train):
        warnings.warn(f"--delta {cfg.delta:g} is at least 1/n for {len(data.train)} training samples: a mechanism "
                      "that publishes one sample outright meets such a delta; use delta well below 1/n", stacklevel=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    try:
        audit = open(cfg.audit, "a" if state is not None else "w") if cfg.audit else None
    except OSError as err:
        raise TrainError(f"--audit {cfg.audit}: cannot write the audit log ({err.strerror})") from err
    if state is not None:
        engine = _engine(cfg, state["engine"]["noise_multiplier"], state["engine"]["clip"], ledger_path, secret, audit)
        engine.load_state_dict(state["engine"])
        if cfg.noise_seed is not None:  # never replay the same noise stream after a resume
            engine.noise_seed = derive_seed(cfg.noise_seed, "resume", engine.ledger.max_uses)
    else:
        engine = _engine(cfg, cfg.noise_multiplier, cfg.clip, ledger_path, secret, audit)
    shuffle = torch.Generator().manual_seed(cfg.seed)
    # Trusted validation reads a plain loader: nothing released, nothing in the ledger. Split validation
    # is accounted as passes over "validation", a data set apart from "train": its one pass per epoch
    # (in eval mode, coupling no batch) fits in the calibration for `epochs` uses of each sample.
    val_loader = _loader(data.val, cfg, False) if data.val is not None else None
    if val_loader is not None and cfg.val_inference == "split":
        val_loader = engine.private_loader(val_loader, "validation")
    model, optimizer, train_loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=_loader(data.train, cfg, True, shuffle), epochs=cfg.epochs
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(cfg.epochs, 1))
    start_epoch, history, step_times = 0, [], []
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scheduler.T_max = max(cfg.epochs, 1)
        start_epoch, history, step_times = state["epoch"], state["history"], state["step_times"]
        torch.set_rng_state(state["rng"])
        if "shuffle_rng" in state:  # older checkpoints: the resumed epochs reshuffle from the seed
            shuffle.set_state(state["shuffle_rng"])
    if start_epoch >= cfg.epochs:
        log(f"nothing to do: the checkpoint already has {start_epoch} epochs (pass a larger --epochs)")
    elif state is not None and cfg.target_epsilon is not None and engine.releases_per_sample:
        projected = engine.epsilon_of_uses(engine.ledger.max_uses + cfg.epochs - start_epoch, cfg.delta)
        if projected > cfg.target_epsilon * 1.001:
            past = (f"{cfg.epochs} epochs would spend epsilon {projected:.3g}, past the target {cfg.target_epsilon:g} "
                    "the noise was calibrated for")
            if not cfg.allow_past_target:
                raise TrainError(f"{past}; nothing was spent: pass --allow-past-target to spend it, or give "
                                 f"--epochs {start_epoch + _epochs_within(engine, cfg)} or fewer")
            log(f"warning: {past} (--allow-past-target)")

    def save(epoch: int) -> None:
        _save(ckpt_path, {"config": asdict(cfg), "epoch": epoch, "model": model.state_dict(),
                          "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                          "engine": engine.state_dict(), "history": history, "step_times": step_times,
                          "rng": torch.get_rng_state(), "shuffle_rng": shuffle.get_state(),
                          "num_classes": data.num_classes, "classes": data.classes,
                          "data_fingerprint": data.fingerprint, "data_source": source_of(cfg.data),
                          "in_channels": data.in_channels, "image_size": data.image_size})

    if state is None:  # before the first release: a crash in epoch 1 can then be resumed, its pass accounted
        save(0)

    def validate() -> tuple[float, float]:
        if val_loader is None:
            return math.nan, math.nan
        if cfg.val_inference == "split":
            return _evaluate(model, val_loader)
        with engine.trusted_inference():
            return _evaluate(model, val_loader, device=engine.device if cfg.mode == "gpu_only" else None)

    metrics_file = open(out / "metrics.jsonl", "w")
    for row in history:  # the checkpoint's epochs, and no row of an epoch it did not save
        metrics_file.write(json.dumps(jsonable(row), allow_nan=False) + "\n")
    metrics_file.flush()
    try:
        for epoch in range(start_epoch, cfg.epochs):
            model.train()
            seen = correct = 0
            loss_sum = 0.0
            bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                       disable=not (cfg.progress and sys.stderr.isatty()))  # a bar on a terminal, not in a log
            for x, y in bar:
                t0 = time.perf_counter()
                optimizer.zero_grad(set_to_none=True)
                logits = model(x)
                loss = F.cross_entropy(logits, y)
                loss.backward()
                optimizer.step()
                step_times.append(time.perf_counter() - t0)
                loss_sum += float(loss.detach()) * len(y)
                correct += int((logits.argmax(1) == y).sum())
                seen += len(y)
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
            scheduler.step()
            val_loss, val_acc = validate()
            row = {"epoch": epoch + 1, "steps": len(step_times), "train_loss": loss_sum / max(seen, 1),
                   "train_acc": correct / max(seen, 1), "val_loss": val_loss, "val_acc": val_acc,
                   "val_inference": cfg.val_inference if val_loader is not None else None,
                   "epsilon": engine.get_epsilon(cfg.delta), "seconds_per_step": statistics.median(step_times)}
            history.append(row)
            save(epoch + 1)  # first: a row in metrics.jsonl is an epoch the checkpoint holds
            metrics_file.write(json.dumps(jsonable(row), allow_nan=False) + "\n")
            metrics_file.flush()
            log(f"epoch {epoch + 1}/{cfg.epochs}: train_acc {row['train_acc']:.3f}  val_acc {val_acc:.3f}  "
                f"epsilon {row['epsilon']:.3g}")
    finally:
        metrics_file.close()
        engine.close()  # hang up on the accelerator even when it failed

    last = history[-1] if history else {}
    summary = {
        "mode": cfg.mode, "model": cfg.model, "data": cfg.data, "epochs": len(history), "steps": len(step_times),
        "train_samples": len(data.train), "val_samples": len(data.val) if data.val is not None else 0,
        "max_samples": cfg.max_samples, "val_fraction": cfg.val_fraction,
        "train_acc": last.get("train_acc"), "val_acc": last.get("val_acc"),
        # which inference measured val_acc (rows from before the option: split inference)
        "val_inference": last.get("val_inference", "split") if last and val_loader is not None else None,
        "epsilon": engine.get_epsilon(cfg.delta), "epsilon_per_release": engine.epsilon_per_release(cfg.delta),
        "delta": cfg.delta, "target_epsilon": cfg.target_epsilon if engine.releases_per_sample else None,
        "noise_multiplier": engine.noise_multiplier, "sigma": engine.sigma, "clip": engine.clip,
        "rank": cfg.rank, "releases_per_sample": engine.releases_per_sample, "sensitivity": engine.sensitivity,
        "batch_coupled_releases_per_sample": engine.batch_coupled_releases_per_sample,
        "uses_per_sample": engine.ledger.max_uses,
        "releases_accounted": engine.ledger.max_uses * engine.releases_per_sample,
        # what the accountant composed, so anyone can recompute epsilon with another accountant:
        # Gaussian mechanisms of noise std / l2 sensitivity `noise_multiplier`, `count` times each
        "compositions": [{"sensitivity": sens * engine.clip if engine.clip else None,
                          "noise_multiplier": engine.noise_multiplier / sens, "count": n * engine.ledger.max_uses}
                         for sens, n in engine.releases_per_use() if n > 0],
        "accountant": cfg.accountant, "sample_rate": 1.0,
        # the noise's sampler: "torch" means Gaussians truncated at 5.77 sigma (legrace.trusted.gaussian)
        "noise_sampler": engine.mechanism.sampler if engine.mechanism is not None else None,
        "seconds_per_step": statistics.median(step_times) if step_times else None,
        "batch_size": cfg.batch_size, "accounted_batch_size": engine.batch_size, "lr": cfg.lr, "seed": cfg.seed, "accelerator": cfg.accelerator,
        "decomposition": cfg.decomposition, "wire_dtype": cfg.wire_dtype or "float32",
        "keep_outputs_mb": cfg.keep_outputs_mb,
    }
    (out / "summary.json").write_text(json.dumps(jsonable(summary), indent=2, allow_nan=False) + "\n")
    return summary


def jsonable(o):
    """Standard JSON: infinite epsilon becomes "inf", an undefined number null."""
    if isinstance(o, float) and not math.isfinite(o):
        return None if math.isnan(o) else ("inf" if o > 0 else "-inf")
    if isinstance(o, dict):
        return {k: jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [jsonable(v) for v in o]
    return o


def load_checkpoint(path: Union[str, Path]) -> tuple[dict, TrainConfig]:
    """A `legrace train` checkpoint and the config it was trained with; TrainError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise TrainError(f"no checkpoint at {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on the pickle protocol of a file it then refuses
            state = torch.load(path, map_location="cpu", weights_only=True)  # never unpickles code
    except Exception as err:  # torch's own messages advise weights_only=False: never repeat them, nor chain them
        raise TrainError(_not_a_checkpoint(path, _unloadable(err))) from None
    try:
        missing = {"epoch", "model", "engine", "num_classes", "in_channels", "image_size"} - set(state)
        if missing:
            raise KeyError(f"no {', '.join(sorted(missing))}")
        return state, TrainConfig(**state["config"])
    except Exception as err:  # old configs and other files torch reads fail in many ways; one message for all
        raise TrainError(_not_a_checkpoint(path, f"{type(err).__name__}: {err}")) from err


def _not_a_checkpoint(path: Path, why: str) -> str:
    return f"{path} is not a legrace checkpoint ({why}): give the checkpoint.pt that `legrace train` wrote"


def _unloadable(err: Exception) -> str:
    """Why torch.load refused a file, in words of our own."""
    if isinstance(err, pickle.UnpicklingError) and any(w in str(err).lower() for w in ("unsupported global",
                                                                                       "unsupported class")):
        return "it holds objects other than tensors and plain values, which legrace never unpickles"
    if isinstance(err, EOFError):
        return "the file is empty or cut short"
    return f"not a file torch.save wrote, or a damaged one: {type(err).__name__}"


def _epochs_within(engine, cfg: TrainConfig) -> int:
    """How many more epochs keep a resumed run within its target epsilon (0 if none do): epsilon
    grows with every use, so the most is found by doubling, then bisecting."""
    def within(more: int) -> bool:
        return engine.epsilon_of_uses(engine.ledger.max_uses + more, cfg.delta) <= cfg.target_epsilon * 1.001

    lo, hi = 0, 1
    while within(hi):
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if within(mid) else (lo, mid)
    return lo


def run_evaluation(checkpoint: Union[str, Path], data_spec: str, split: str = "all", log=print,
                   accelerator: str = "cpu", secret: Optional[str] = None, inference: str = "trusted",
                   allow_past_target: bool = False) -> dict:
    """Accuracy of a trained checkpoint on `data_spec`, by trusted or split inference (INFERENCES).

    inference="trusted" (the default) runs every conv on the trusted side: the model as deployed
    in the TEE, exact and noise-free. Nothing is released, and the run's ledger
    (privacy_ledger.json beside the checkpoint) is not touched.

    inference="split" serves the model as training did: the pass releases residuals, served by
    `accelerator` (not the checkpoint's, whose worker may be gone), and is recorded in the ledger
    as a use of the data it reads: `split="val"`, the run's held-out validation split;
    `split="all"` on the run's own --data (the same content anywhere, or the run's file or folder
    even after its content changed), its train and validation samples (CIFAR-10's test split
    excepted); any other data, a data set of its own, taken to be disjoint from the training data.
    Before it spends, it logs epsilon now and after the pass, and it refuses (TrainError, nothing
    spent) a pass that would take a run calibrated for a target epsilon past it, unless
    `allow_past_target`.
    """
    if inference not in INFERENCES:
        raise TrainError(f"--inference must be one of {', '.join(INFERENCES)}, not {inference!r}")
    if inference == "trusted" and accelerator != "cpu":
        raise TrainError("--accelerator serves the residuals that split inference releases; trusted inference runs "
                         "wholly on this machine: drop --accelerator, or pass --inference split")
    if inference == "trusted" and allow_past_target:
        raise TrainError("--allow-past-target lets split inference spend past the run's target epsilon; trusted "
                         "inference spends nothing: drop it, or pass --inference split")
    path = Path(checkpoint)
    state, cfg = load_checkpoint(path)
    cfg.accelerator = accelerator
    if split not in ("all", "val"):
        raise TrainError(f"--split must be 'all' or 'val', not {split!r}")
    if split == "val" and data_spec != cfg.data:
        raise TrainError(f"--split val evaluates the validation split the run held out of its own data: give "
                         f"--data {cfg.data}")
    if split == "val":  # drawn from the training source exactly as the run drew it
        data = load_data(data_spec, val_fraction=cfg.val_fraction, seed=cfg.seed, max_samples=cfg.max_samples,
                         image_size=state["image_size"])
        if data.val is None:
            raise TrainError("--split val: the run held out no validation split (it trained with --val-fraction 0)")
        check_same_data(state, data, "--split val")
        ds, names = data.val, ("validation",)
    else:
        data = load_data(data_spec, val_fraction=0.0, image_size=state["image_size"], split="test")
        ds = data.train
        saved = state.get("data_fingerprint")
        # The run's own samples: the same content, wherever it is, or the run's own file or folder
        # even if it changed since (most of its samples may still be there; the worst case is
        # that they all are, so the pass is composed with the run's uses).
        # (A checkpoint from before data_source: its --data resolved from here.)
        same = bool(saved and data.fingerprint and data.matches(saved)) or \
            source_of(data_spec) == state.get("data_source", source_of(cfg.data))
        if same and not data_spec.startswith("cifar10:"):
            names = ("train", "validation")
        else:
            names = (f"evaluate {data_spec}",)
    classes = class_map(state, data)
    if data.in_channels != state["in_channels"] or (classes is None and data.num_classes > state["num_classes"]):
        raise TrainError(
            f"{data_spec} has {data.in_channels} channels and {data.num_classes} classes; the checkpoint "
            f"was trained on {state['in_channels']} channels and {state['num_classes']} classes"
        )
    model = build_model(cfg.model, num_classes=state["num_classes"], in_channels=state["in_channels"],
                        image_size=state["image_size"])
    ledger_path = path.parent / "privacy_ledger.json"
    split_inference = inference == "split"
    engine = _engine(cfg, state["engine"]["noise_multiplier"], state["engine"]["clip"], ledger_path, secret)
    # the run's target, if its noise was calibrated for one (a run given --noise-multiplier has none)
    target = cfg.target_epsilon if cfg.noise_multiplier is None and cfg.mode in ("legrace", "dp_only") else None
    try:  # the engine is closed however this ends (a private worker process exits with it)
        engine.ledger.load_state_dict(state["engine"]["ledger"])  # (in memory: never forgets a use either way)
        engine.take_batch_size(state["engine"], cfg.batch_size)  # the run's uses keep the price they were spent at
        if split_inference and cfg.noise_seed is not None:  # a stream of its own: replayed noise would cancel
            engine.noise_seed = derive_seed(cfg.noise_seed, "evaluate", sum(engine.ledger.uses.values()))
        model = engine.convert(model)
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as err:
            raise TrainError(f"{path}: its weights do not fit its own model {cfg.model!r} (a damaged checkpoint?)") \
                from err
        plain = DataLoader(ds, batch_size=cfg.batch_size)
        loader = engine.private_loader(plain, names[0])  # (plans each conv's map size; records at its first batch)
        before = engine.get_epsilon(cfg.delta)
        if split_inference:
            after = _epsilon_after(engine, names, cfg.delta)
            log(_split_cost(cfg.mode, engine.releases_per_sample, len(ds), names, before, after, cfg.delta, target))
            if target is not None and after > target and after > before and not allow_past_target:
                raise TrainError(f"--inference split would take the run from epsilon {before:.4g} to {after:.4g}, past "
                                 f"its target {target:g}; nothing was spent: pass --allow-past-target to spend it "
                                 "anyway, or use --inference trusted (spends nothing)")
            try:
                engine.ledger.save()  # the checkpoint's uses too, before anything is released
            except OSError as err:
                raise TrainError(f"cannot record this evaluation's privacy cost in {ledger_path}: {err}") from err
            for name in names[1:]:
                engine.ledger.record_pass(name)
            loss, acc = _evaluate(model, loader, classes)
        else:
            with engine.trusted_inference():
                loss, acc = _evaluate(model, plain, classes)
    finally:
        engine.close()
    return {"checkpoint": str(path), "data": data_spec, "split": split, "samples": len(ds), "mode": cfg.mode,
            "inference": inference, "measured": measured_by(cfg.mode, inference, bool(engine.releases_per_sample)),
            "accuracy": acc, "loss": loss,
            "epsilon_of_this_pass": engine.epsilon_of_uses(1, cfg.delta) if split_inference else 0.0,
            "accounted_as": list(names) if split_inference else [], "uses": dict(engine.ledger.uses),
            "epsilon_before": before, "epsilon": engine.get_epsilon(cfg.delta), "target_epsilon": target,
            "ledger": str(ledger_path), "delta": cfg.delta}


def _epsilon_after(engine: LegRace, names: Iterable[str], delta: float) -> float:
    """Epsilon once the pass has recorded one more use of each data set in `names`."""
    ledger = PrivacyLedger()  # a copy in memory: nothing is written
    ledger.load_state_dict(engine.ledger.state_dict())
    for name in names:
        ledger.record_pass(name)
    return engine.epsilon_of_uses(ledger.max_uses, delta)


def _split_cost(mode: str, releases: int, samples: int, names, before: float, after: float, delta: float,
                target: Optional[float]) -> str:
    """The line split inference logs before it spends."""
    if mode == "gpu_only":
        what = "runs the plain model on the accelerator (gpu_only: no privacy)"
    elif releases:
        what = (f"releases the noised residuals of {samples} samples, recorded as one more use of "
                f"{' and '.join(names)}")
    else:
        what = f"releases nothing ({mode})"
    goal = f"the run's target {target:g}" if target is not None else "the run has no target epsilon"
    line = f"split inference {what}: epsilon {before:.4g} -> {after:.4g} at delta {delta:g} ({goal})"
    if releases and after == before:  # the ledger composes data sets in parallel (PrivacyLedger.max_uses)
        line += "; epsilon does not grow while those samples have had no more uses than the most-used data set's"
    return line
