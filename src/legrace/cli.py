"""`legrace` command line: private training with a trusted side and an untrusted accelerator, and the tools that measure it."""

from __future__ import annotations

import argparse
import json
import math
import sys
from importlib import import_module
from typing import Optional, Sequence

from legrace.trusted.engine import MODES
from legrace.models import model_names
from legrace.options import (DefaultsHelpFormatter, add_threads, clip, mebibytes, model_name, positive, rank, seed,
                             use_threads)

DEFAULT_TARGET_EPSILON = 8.0  # unless --noise-multiplier fixes the noise

# Modules that add a subcommand: each defines add_parser(subparsers), setting func=handler(args) -> int.
COMMAND_MODULES: list[str] = ["legrace.bench.runner", "legrace.accelerator.worker", "legrace.attacks.commands", "legrace.attacks.study", "legrace.attacks.rank"]


def _accelerator_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--accelerator", default="cpu",
                   help="cpu or cuda (in this process), process[:DEVICE] (a private worker process), "
                        "or tcp://HOST:PORT (a `legrace worker`)")
    p.add_argument("--secret", default=None, help="the worker's shared secret (default: $LEGRACE_SECRET)")


def _train_options(t: argparse.ArgumentParser) -> None:
    """The options of `legrace train` (also parsed alone, to tell which ones a command line gave)."""
    t.add_argument("--model", type=model_name, default="cnn", help=f"one of {', '.join(model_names())}")
    t.add_argument("--data", default="digits", help="digits | npz:PATH | cifar10:DIR | imagefolder:DIR")
    t.add_argument("--epochs", type=positive(int), default=None,
                   help="passes over the training split (default: 10; with --resume, the checkpoint's)")
    t.add_argument("--batch-size", type=positive(int), default=64, help="samples per step")
    t.add_argument("--lr", type=positive(float), default=0.05, help="SGD learning rate, cosine-annealed over the epochs")
    t.add_argument("--mode", choices=MODES, default="legrace",
                   help="legrace (the split), dp_only (the same mechanism on whole activations), lowrank_only (the "
                        "residual dropped), tee_only (all trusted), gpu_only (no privacy)")
    t.add_argument("--rank", type=rank, default=8, help="R per conv: an int, a comma-separated list, or auto")
    t.add_argument("--clip", type=clip, default="auto",
                   help="C, per-sample l2 bound of a residual; 'auto' (a data-independent C) or 'none'")
    noise = t.add_mutually_exclusive_group()
    noise.add_argument("--target-epsilon", type=positive(float), default=None,
                       help="calibrate the noise for this epsilon over all epochs "
                            f"(default: {DEFAULT_TARGET_EPSILON:g}, unless --noise-multiplier)")
    noise.add_argument("--noise-multiplier", type=float, default=None,
                       help="z: noise std = z * C (default: calibrated for --target-epsilon)")
    t.add_argument("--delta", type=float, default=1e-5, help="the delta of (epsilon, delta)-DP")
    t.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of the training data held out for validation")
    t.add_argument("--val-inference", choices=("trusted", "split"), default="trusted",
                   help="how each epoch's validation accuracy is measured: trusted (every conv on the trusted side, "
                        "exact; nothing released or accounted) or split (as training runs, on noised residuals; "
                        "accounted as passes over the validation split)")
    t.add_argument("--allow-past-target", action="store_true",
                   help="let a --resume with more epochs spend past the target epsilon the noise was calibrated for "
                        "(refused otherwise, before anything is spent)")
    t.add_argument("--seed", type=seed, default=0, help="model init, data split and shuffling (noise stays secret)")
    t.add_argument("--noise-seed", type=seed, default=None, help="fix the noise generator: experiments only, insecure")
    t.add_argument("--max-samples", type=positive(int), default=None, help="use only this many samples (default: all)")
    t.add_argument("--image-size", type=positive(int), default=None,
                   help="resize images (default: the data's own size; imagefolder 32)")
    t.add_argument("--download", action="store_true", help="allow downloading cifar10 (needs network)")
    _accelerator_arguments(t)
    t.add_argument("--accelerator-timeout", type=positive(float), default=120.0,
                   help="seconds to wait for one answer of a worker before giving up")
    t.add_argument("--verify", action="store_true",
                   help="check every answer of the accelerator with a Freivalds test (a few %% more trusted work)")
    t.add_argument("--audit", default=None, metavar="FILE",
                   help="write a JSON line per message that crosses the trust boundary")
    t.add_argument("--decomposition", choices=("light", "deflation", "exact"), default="light",
                   help="how A and V are found: light (batched power iteration), deflation (the paper's rank-1 "
                        "steps) or exact (a full SVD)")
    t.add_argument("--wire-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="dtype of the noised residuals on the wire (bfloat16: half the bytes, no privacy cost)")
    t.add_argument("--keep-outputs-mb", type=mebibytes, default=0.0,
                   help="MiB of conv outputs (BatchNorm's inputs) kept per forward instead of rebuilt in "
                        "backward, those costliest to rebuild first: memory for speed")
    t.add_argument("--accountant", choices=("rdp", "prv"), default="rdp",
                   help="Opacus accountant for epsilon: rdp or prv")
    t.add_argument("--out", default="runs/legrace", help="output directory")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    t.add_argument("--no-progress", action="store_true",
                   help="no progress bar (there is one only when stderr is a terminal)")
    t.add_argument("--keep-heap", action=argparse.BooleanOptionalAction, default=True,
                   help="keep freed memory in the process for reuse, as an enclave's fixed heap does (glibc's "
                        "mallopt): each step's activations reuse the last step's pages; --no-keep-heap leaves glibc's "
                        "default, which hands large blocks back to the system and page-faults them again")
    add_threads(t)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="legrace", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model privately (default: a small CNN on scikit-learn's digits)")
    _train_options(t)
    t.set_defaults(func=_train)

    e = sub.add_parser("evaluate", help="accuracy of a checkpoint, by trusted inference (spends no privacy) or "
                                        "split inference (spends privacy)")
    e.add_argument("--checkpoint", required=True, help="a checkpoint.pt written by `legrace train`")
    e.add_argument("--data", required=True, help="digits | npz:PATH | cifar10:DIR (its test split) | imagefolder:DIR")
    e.add_argument("--split", choices=("all", "val"), default="all",
                   help="all samples of --data, or the validation split the run held out")
    e.add_argument("--inference", choices=("trusted", "split"), default="trusted",
                   help="trusted: every conv on the trusted side, the model as deployed in the TEE (exact, "
                        "noise-free; nothing released, the ledger untouched); split: served with the accelerator as "
                        "in training, on noised residuals, recorded in the run's privacy ledger (its cost is "
                        "printed first)")
    e.add_argument("--allow-past-target", action="store_true",
                   help="let --inference split spend even if that takes the run past its target epsilon "
                        "(refused otherwise)")
    _accelerator_arguments(e)
    add_threads(e)
    e.set_defaults(func=_evaluate)

    # Further commands live in their own modules: each has add_parser(subparsers) that sets func.
    for name in COMMAND_MODULES:
        import_module(name).add_parser(sub)
    for parser in _parsers(p):  # subparsers do not inherit formatter_class: every --help shows its defaults
        parser.formatter_class = DefaultsHelpFormatter
    return p


def _parsers(parser: argparse.ArgumentParser):
    """`parser` and every subcommand's parser below it."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def _train_options_given(argv: Sequence[str]) -> set[str]:
    """The `legrace train` options (dest names) that `argv`, the words after `train`, sets itself,
    whether or not to their default values: --resume refuses those that change the run."""
    given = argparse.ArgumentParser(add_help=False)
    _train_options(given)
    unset = object()  # not a str, so argparse never runs an option's type on it
    given.set_defaults(**dict.fromkeys(vars(given.parse_known_args([])[0]), unset))
    return {dest for dest, value in vars(given.parse_known_args(list(argv))[0]).items() if value is not unset}


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.command == "train":
        args.given = _train_options_given(argv[argv.index("train") + 1:])
    # Imported late so `legrace --help` is quick.
    from legrace.boundary.messages import BoundaryError
    from legrace.trusted.convert import UnsupportedModelError
    from legrace.data import DataError
    from legrace.models import ModelError
    from legrace.train import TrainError

    try:
        use_threads(args)  # before the command builds anything that sizes itself by torch's threads
        return args.func(args) or 0
    except (BoundaryError, DataError, ModelError, UnsupportedModelError, TrainError, ValueError) as err:
        print(f"legrace: error: {err}", file=sys.stderr)
        return 2


def _train(args: argparse.Namespace) -> int:
    from legrace.trusted.heap import keep_freed_memory
    from legrace.train import TrainConfig, run_training

    if args.keep_heap:
        keep_freed_memory()  # as an enclave's fixed heap: each step's activations reuse the last step's pages

    target = args.target_epsilon
    if target is None and args.noise_multiplier is None:
        target = DEFAULT_TARGET_EPSILON
    cfg = TrainConfig(
        model=args.model, data=args.data, epochs=args.epochs,  # None: 10, or the checkpoint's on --resume
        batch_size=args.batch_size, lr=args.lr,
        mode=args.mode, rank=args.rank, clip=args.clip, target_epsilon=target,
        noise_multiplier=args.noise_multiplier, delta=args.delta, val_fraction=args.val_fraction,
        seed=args.seed, noise_seed=args.noise_seed, max_samples=args.max_samples,
        image_size=args.image_size, download=args.download, accelerator=args.accelerator,
        accelerator_timeout=args.accelerator_timeout, verify=args.verify, audit=args.audit,
        decomposition=args.decomposition, wire_dtype=args.wire_dtype, keep_outputs_mb=args.keep_outputs_mb,
        accountant=args.accountant, out=args.out, val_inference=args.val_inference,
        allow_past_target=args.allow_past_target, progress=not args.no_progress,
    )
    summary = run_training(cfg, resume=args.resume, log=lambda m: print(m, file=sys.stderr), secret=args.secret,
                           given=getattr(args, "given", ()))
    print(describe(summary, cfg.out))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from legrace.train import jsonable, run_evaluation

    result = run_evaluation(args.checkpoint, args.data, args.split, log=lambda m: print(m, file=sys.stderr),
                            accelerator=args.accelerator, secret=args.secret, inference=args.inference,
                            allow_past_target=args.allow_past_target)
    print(json.dumps(jsonable(result), indent=2))
    return 0


def _count(n: int, one: str, many: Optional[str] = None) -> str:
    return f"{n} {one if n == 1 else many or one + 's'}"


def describe(s: dict, out: str) -> str:
    """What the run did, in words a newcomer can check against summary.json."""
    lines = [f"Trained {s['model']} on {s['data']} ({s['train_samples']} train / {s['val_samples']} validation "
             f"samples) for {s['epochs']} epochs ({s['steps']} steps) in mode {s['mode']}."]
    if s["val_acc"] is not None and not math.isnan(s["val_acc"]):
        how = {"trusted": ", measured by trusted inference: every conv on the trusted side, nothing released",
               "split": ", measured by split inference: on noised residuals, accounted"}.get(s.get("val_inference"), "")
        releasing = s["mode"] in ("legrace", "dp_only") and s["releases_per_sample"]
        lines.append(f"Validation accuracy {s['val_acc']:.1%} (train {s['train_acc']:.1%}){how if releasing else ''}.")
    if s["mode"] in ("legrace", "dp_only") and not s["releases_per_sample"]:
        lines.append("Privacy: nothing left the trusted side (R covers every conv's input: epsilon 0).")
    elif s["mode"] in ("legrace", "dp_only") and s["clip"] is None:
        lines.append(f"Privacy: none (no clipping and no noise: epsilon {s['epsilon']}); each sample's residual was "
                     f"released {s['releases_accounted']} times.")
    elif s["mode"] in ("legrace", "dp_only"):
        lines.append(
            f"Privacy: epsilon {s['epsilon']:.3g} at delta {s['delta']:g} ({s['accountant']} accountant): each sample's "
            f"residual was released {s['releases_accounted']} times ({_count(s['releases_per_sample'], 'conv input')} x "
            f"{_count(s['uses_per_sample'], 'pass', 'passes')}), clipped to C={s['clip']:.3g} with noise std {s['sigma']:.3g} "
            f"(z={s['noise_multiplier']:.3g})."
        )
        coupled, total, b = s["batch_coupled_releases_per_sample"], s["releases_per_sample"], s["accounted_batch_size"]
        if coupled:  # the costliest kind of release is what epsilon_per_release and sensitivity report
            which = "It follows" if total == 1 else f"All {total} follow" if coupled == total else \
                f"{coupled} of the {total} follow"
            lines.append(
                f"{which} a BatchNorm, where one sample moves its whole batch of {b}: sensitivity "
                f"2C*sqrt({b}) = {s['sensitivity']:.3g}, epsilon {s['epsilon_per_release']:.3g} for one such release.")
        else:
            lines.append(f"One release (sensitivity 2C) costs epsilon {s['epsilon_per_release']:.3g}.")
    elif s["mode"] == "gpu_only":
        lines.append("Privacy: none (gpu_only is the unprotected baseline).")
    else:
        lines.append("Privacy: nothing left the trusted side (epsilon 0).")
    lines.append(f"Wrote {out}/summary.json, {out}/metrics.jsonl and {out}/checkpoint.pt.")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
