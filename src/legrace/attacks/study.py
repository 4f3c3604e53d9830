"""`legrace study privacy-utility`: accuracy and inversion leakage against epsilon, per mode.

The method's central claim (DESIGN sections 3 and 9): for the same epsilon, noise on the
decomposed residual (legrace) keeps far more accuracy than the same noise on the whole activation
(dp_only), and the release must not cost accuracy against dropping the residual (lowrank_only).
The study trains every (mode, epsilon, clip rule, seed) of a grid with `legrace.train`, attacks
each run's own release with the decoder inversion of `legrace.attacks.commands`, and writes a table
(JSON, CSV), a chart (PNG) and the findings, with the budget that produced them.

Clip rules are data-independent (`legrace.attacks.views.clip_from_rule`): C is never fitted to the
private data. Comparing several rules and keeping the best *is* a choice made on validation
data; the findings report each rule on its own and say so when they pick the best.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from legrace.attacks.commands import inversion_attack
from legrace import options
from legrace.data import load_data
from legrace.attacks.figures import privacy_utility_chart
from legrace.models import build_model, model_names
from legrace.outputs import output_folder
from legrace.attacks.results import text_table, write_csv, write_json
from legrace.trusted.convert import conv_modules
from legrace.attacks.target import AttackError, load_target
from legrace.train import TrainConfig, load_checkpoint, run_training
from legrace.attacks.views import calibrated_noise, clip_from_rule, own_view, parse_clip_rule

MODES = ("gpu_only", "lowrank_only", "legrace", "dp_only")
TARGETS = {"over_dp_only": 0.15, "below_lowrank_only": 0.01, "leg_adds": 0.02, "ssim_released": 0.15,
           "ssim_raw": 0.5}


@dataclass
class StudyConfig:
    model: str = "cnn"
    data: str = "digits"
    max_samples: Optional[int] = None
    epochs: int = 5
    batch_size: int = 64
    lr: float = 0.05
    rank: object = 8
    epsilons: tuple = (1.0, 8.0, 64.0, 1000.0)
    modes: tuple = MODES
    clip_rules: tuple = ("auto",)
    seeds: tuple = (0,)
    delta: float = 1e-5
    attack_layers: tuple = (0, 1)
    aux: Optional[int] = None  # None: every sample the runs did not train on, up to 2000
    victims: int = 128
    decoder_epochs: int = 10
    device: str = "cpu"
    out: str = "runs/study"


def _name(mode: str, eps: Optional[float], rule: Optional[str], seed: int) -> str:
    if eps is None:
        return f"{mode}_s{seed}"
    return f"{mode}_eps{eps:g}_{rule.replace(':', '')}_s{seed}"


def planned_runs(cfg: StudyConfig) -> list[dict]:
    """Every training run of the grid: modes without epsilon once per seed, the others per
    (epsilon, clip rule, seed)."""
    unknown = [m for m in cfg.modes if m not in MODES]
    if unknown:
        raise AttackError(f"unknown mode(s) {unknown}; the study compares {', '.join(MODES)}")
    runs = []
    for seed in cfg.seeds:
        for mode in cfg.modes:
            if mode in ("legrace", "dp_only"):
                runs += [{"mode": mode, "epsilon": float(e), "clip_rule": r, "seed": seed, "name": _name(mode, e, r, seed)}
                         for e in cfg.epsilons for r in cfg.clip_rules]
            else:
                runs.append({"mode": mode, "epsilon": None, "clip_rule": None, "seed": seed,
                             "name": _name(mode, None, None, seed)})
    if not cfg.seeds or not cfg.modes or (set(cfg.modes) & {"legrace", "dp_only"} and not (cfg.epsilons and cfg.clip_rules)):
        raise AttackError("the grid is empty: give at least one mode and seed, and for legrace or dp_only at "
                          "least one epsilon and clip rule")
    return runs


def _fresh_model(cfg: StudyConfig, seed: int) -> tuple[nn.Module, tuple[int, int, int]]:
    """The study's model at its initial weights, and the C x H x W of its inputs (from a few samples)."""
    data = load_data(cfg.data, max_samples=min(cfg.max_samples or 64, 64), seed=seed)
    model = build_model(cfg.model, num_classes=data.num_classes, in_channels=data.in_channels,
                        image_size=data.image_size)
    return model, (data.in_channels, data.image_size, data.image_size)


def _check_attack_layers(cfg: StudyConfig) -> None:
    """Before any run trains: every attacked layer exists."""
    n_points = len(conv_modules(_fresh_model(cfg, cfg.seeds[0])[0]))
    bad = [v for v in cfg.attack_layers if not 0 <= v < n_points]
    if bad:
        raise AttackError(f"--attack-layers {bad} do not exist: {cfg.model} has {n_points} decomposition points "
                          f"(0-{n_points - 1})")


def _train_config(cfg: StudyConfig, run: dict, out: Path) -> TrainConfig:
    base = TrainConfig(model=cfg.model, data=cfg.data, max_samples=cfg.max_samples, epochs=cfg.epochs,
                       batch_size=cfg.batch_size, lr=cfg.lr, mode=run["mode"], rank=cfg.rank, seed=run["seed"],
                       delta=cfg.delta, accelerator=cfg.device, out=str(out), progress=False,
                       val_inference="split")  # accuracy as the model is served, noise included (accounted)
    if run["epsilon"] is None:
        return base
    if run["clip_rule"] == "auto":
        base.clip, base.target_epsilon = "auto", run["epsilon"]
        return base
    model, input_shape = _fresh_model(cfg, run["seed"])
    z = calibrated_noise(model, run["mode"], cfg.rank, run["epsilon"], cfg.epochs, cfg.batch_size, cfg.delta,
                         input_shape)
    base.noise_multiplier, base.target_epsilon, base.clip = z, None, clip_from_rule(run["clip_rule"], z)
    return base


def _train(cfg: StudyConfig, run: dict, log) -> dict:
    out = Path(cfg.out) / "runs" / run["name"]
    planned = _train_config(cfg, run, out)
    if (out / "summary.json").exists():
        _, trained = load_checkpoint(out / "checkpoint.pt")
        where = ("out", "progress", "accelerator", "accelerator_timeout", "verify", "audit")  # not what is trained
        differ = [k for k, v in asdict(planned).items() if k not in where and getattr(trained, k) != v]
        if differ:
            raise AttackError(f"{out} holds a run trained with other settings ({', '.join(differ)}): give another "
                              "--out, or delete it to train it again")
        log(f"{run['name']}: reusing {out}/summary.json")
        return json.loads((out / "summary.json").read_text())
    if out.exists():
        raise AttackError(f"{out} holds an unfinished run: delete it to train it again")
    t0 = time.perf_counter()
    summary = run_training(planned, log=lambda m: None)
    log(f"{run['name']}: val_acc {summary['val_acc']:.3f}, epsilon {summary['epsilon']} "
        f"({time.perf_counter() - t0:.0f} s)")
    return summary


def _attack(cfg: StudyConfig, run: dict, log) -> dict:
    out = Path(cfg.out) / "runs" / run["name"]
    cached = out / "inversion.json"
    if cached.exists():
        result = json.loads(cached.read_text())
    else:
        target = load_target(str(out / "checkpoint.pt"))
        result = inversion_attack(target, [own_view(target)], list(cfg.attack_layers), n_aux=cfg.aux,
                                  n_victims=cfg.victims, decoder_epochs=cfg.decoder_epochs, device=cfg.device,
                                  seed=run["seed"], log=lambda m: log(f"{run['name']}: {m}"))
        write_json(cached, {"attack": "inversion", "budget": result["budget"], "rows": result["rows"]})
    return {f"ssim_layer{r['layer']}": r["ssim"] for r in result["rows"]} | \
           {f"psnr_layer{r['layer']}": r["psnr"] for r in result["rows"]} | \
           {"attack_aux": result["budget"].get("auxiliary_samples")}


def _aggregate(runs: list[dict]) -> list[dict]:
    """One row per (mode, epsilon, clip rule): accuracy mean and spread over seeds, the first seed's attack."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["mode"], r["epsilon"], r["clip_rule"]), []).append(r)
    rows = []
    for (mode, eps, rule), rs in groups.items():
        accs = [r["val_acc"] for r in rs]
        row = {"mode": mode, "epsilon": eps, "clip_rule": rule, "seeds": len(rs), "val_acc": statistics.mean(accs),
               "val_acc_std": statistics.stdev(accs) if len(accs) > 1 else None,
               "epsilon_spent": rs[0]["epsilon_spent"], "z": rs[0]["z"], "clip": rs[0]["clip"], "sigma": rs[0]["sigma"]}
        row.update({k: v for k, v in rs[0].items() if k.startswith(("ssim_layer", "psnr_layer"))})
        rows.append(row)
    order = {m: i for i, m in enumerate(MODES)}
    return sorted(rows, key=lambda r: (order[r["mode"]], r["clip_rule"] or "", r["epsilon"] or 0))


def findings(rows: list[dict], layers: tuple) -> dict:
    """The claims of the issue, checked on the measured rows (means over seeds)."""
    flat = {r["mode"]: r for r in rows if r["epsilon"] is None}
    out: dict = {"targets": TARGETS, "per_rule": {}}
    low = flat.get("lowrank_only")
    for rule in sorted({r["clip_rule"] for r in rows if r["clip_rule"]}):
        lg = {r["epsilon"]: r for r in rows if r["mode"] == "legrace" and r["clip_rule"] == rule}
        dp = {r["epsilon"]: r for r in rows if r["mode"] == "dp_only" and r["clip_rule"] == rule}
        res: dict = {"epsilons": sorted(lg)}
        if dp:
            res["legrace_minus_dp_only"] = {e: lg[e]["val_acc"] - dp[e]["val_acc"] for e in sorted(lg) if e in dp}
            res["at_least_15_points_over_dp_only"] = all(v >= TARGETS["over_dp_only"]
                                                         for v in res["legrace_minus_dp_only"].values())
        if low:
            diff = {e: lg[e]["val_acc"] - low["val_acc"] for e in sorted(lg)}
            res["legrace_minus_lowrank_only"] = diff
            res["never_more_than_1_point_below_lowrank_only"] = all(v >= -TARGETS["below_lowrank_only"]
                                                                   for v in diff.values())
            adds = [e for e in sorted(diff) if diff[e] >= TARGETS["leg_adds"]]
            res["epsilon_from_which_leg_adds_2_points"] = adds[0] if adds else None
        for layer in layers:
            key = f"ssim_layer{layer}"
            ssims = {e: lg[e][key] for e in sorted(lg) if key in lg[e]}
            if ssims:
                res[f"max_{key}_legrace"] = max(ssims.values())
        out["per_rule"][rule] = res
    for layer in layers:
        key = f"ssim_layer{layer}"
        if "gpu_only" in flat and key in flat["gpu_only"]:
            out[f"{key}_raw_view"] = flat["gpu_only"][key]
        if low and key in low:
            out[f"{key}_prior_only"] = low[key]
    if len(out["per_rule"]) > 1 and low:
        best = {}
        for r in rows:
            if r["mode"] == "legrace":
                best[r["epsilon"]] = max(best.get(r["epsilon"], -1), r["val_acc"])
        adds = [e for e in sorted(best) if best[e] - low["val_acc"] >= TARGETS["leg_adds"]]
        out["best_rule_per_epsilon_chosen_on_validation_data"] = {
            "epsilon_from_which_leg_adds_2_points": adds[0] if adds else None,
            "note": "the best clip rule per epsilon is picked by validation accuracy: a choice made on private "
                    "data that the accountant does not cover"}
    return out


def run_study(cfg: StudyConfig, log=print) -> dict:
    t0 = time.perf_counter()
    plan = planned_runs(cfg)
    _check_attack_layers(cfg)
    log(f"study: {len(plan)} training runs, inversion attacks at layer(s) {list(cfg.attack_layers)} "
        f"on the first seed's runs")
    runs, reused = [], 0
    for run in plan:
        reused += (Path(cfg.out) / "runs" / run["name"] / "summary.json").exists()
        s = _train(cfg, run, log)
        row = dict(run, val_acc=s["val_acc"], epsilon_spent=s["epsilon"], z=s["noise_multiplier"] or None,
                   clip=s["clip"], sigma=s["sigma"] or None, train_samples=s["train_samples"],
                   val_samples=s["val_samples"])
        if cfg.attack_layers and run["seed"] == cfg.seeds[0]:
            row.update(_attack(cfg, run, log))
        runs.append(row)
    rows = _aggregate(runs)
    budget = {"model": cfg.model, "data": cfg.data, "max_samples": cfg.max_samples,
              "train_samples": runs[0]["train_samples"], "val_samples": runs[0]["val_samples"], "epochs": cfg.epochs,
              "batch_size": cfg.batch_size, "lr": cfg.lr, "rank": cfg.rank, "seeds": list(cfg.seeds),
              "delta": cfg.delta, "clip_rules": list(cfg.clip_rules), "attack_layers": list(cfg.attack_layers),
              "attack_aux": next((r["attack_aux"] for r in runs if "attack_aux" in r), cfg.aux),
              "attack_victims": cfg.victims, "decoder_epochs": cfg.decoder_epochs,
              "device": cfg.device, "torch_threads": torch.get_num_threads(),
              "runs_reused": reused, "wall_seconds_this_invocation": round(time.perf_counter() - t0)}
    return {"budget": budget, "rows": rows, "runs": runs, "findings": findings(rows, tuple(cfg.attack_layers))}


def columns(layers) -> list[str]:
    return (["mode", "epsilon", "clip_rule", "epsilon_spent", "z", "clip", "val_acc", "val_acc_std"]
            + [f"ssim_layer{layer}" for layer in layers] + [f"psnr_layer{layer}" for layer in layers])


def write_study(result: dict, out: Path) -> list[Path]:
    out = output_folder(out)
    layers = result["budget"]["attack_layers"]
    note = "budget: " + ", ".join(f"{k}={v}" for k, v in result["budget"].items()
                                  if k not in ("torch_threads", "runs_reused", "wall_seconds_this_invocation"))
    return [write_json(out / "results.json", result), write_csv(out / "results.csv", result["rows"], columns(layers)),
            privacy_utility_chart(out / "privacy_utility.png", result["rows"], layers, note)]


# ---- command line ------------------------------------------------------------------------------


def _floats(text: str) -> tuple:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, not {text!r}") from None
    if not values or any(not (v > 0 and math.isfinite(v)) for v in values):
        raise argparse.ArgumentTypeError(f"epsilons must be finite numbers > 0, got {text!r}")
    return values


def _ints(text: str) -> tuple:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, not {text!r}") from None


def _study(args) -> int:
    cfg = StudyConfig(model=args.model, data=args.data, max_samples=args.max_samples, epochs=args.epochs,
                      batch_size=args.batch_size, lr=args.lr, rank=args.rank, epsilons=args.epsilons,
                      modes=tuple(m.strip() for m in args.modes.split(",") if m.strip()),
                      clip_rules=tuple(parse_clip_rule(r) for r in args.clip_rules.split(",") if r.strip()),
                      seeds=args.seeds, delta=args.delta, attack_layers=args.attack_layers, aux=args.aux,
                      victims=args.victims, decoder_epochs=args.decoder_epochs, device=args.device, out=args.out)
    output_folder(cfg.out)  # before the runs: a bad --out fails now, not after them
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    result = run_study(cfg, log)
    paths = write_study(result, Path(cfg.out))
    print(text_table(result["rows"], columns(cfg.attack_layers)))
    print("budget: " + ", ".join(f"{k}={v}" for k, v in result["budget"].items()))
    print("findings: " + json.dumps(result["findings"], default=str))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def add_parser(subparsers) -> None:
    study = subparsers.add_parser("study", help="privacy-utility study: accuracy and leakage against epsilon")
    sub = study.add_subparsers(dest="study", required=True)
    p = sub.add_parser("privacy-utility", help="train a grid of modes and epsilons, attack each, chart the result")
    p.add_argument("--model", default="cnn", help=f"one of {', '.join(model_names())}")
    p.add_argument("--data", default="digits", help="digits | npz:PATH | cifar10:DIR | imagefolder:DIR")
    p.add_argument("--max-samples", type=options.positive(int), default=None,
                   help="samples the runs use; the rest is the attacker's auxiliary data (default: all, the "
                        "attacks then take the runs' validation split)")
    p.add_argument("--epochs", type=options.positive(int), default=5, help="training passes of each run")
    p.add_argument("--batch-size", type=options.positive(int), default=64, help="samples per step")
    p.add_argument("--lr", type=options.positive(float), default=0.05, help="SGD learning rate of each run")
    p.add_argument("--rank", type=options.rank, default=8, help="R per conv: an int, a comma-separated list or auto")
    p.add_argument("--epsilons", type=_floats, default=(1.0, 8.0, 64.0, 1000.0),
                   help="comma-separated target epsilons of the releasing modes")
    p.add_argument("--modes", default=",".join(MODES), help=f"any of {', '.join(MODES)}")
    p.add_argument("--clip-rules", default="auto",
                   help="data-independent clip rules, comma-separated: auto (C = 0.05/z), std:S (C = S/z), or a fixed C")
    p.add_argument("--seeds", type=_ints, default=(0,), help="comma-separated seeds; accuracy is averaged over them")
    p.add_argument("--delta", type=float, default=1e-5, help="the delta of (epsilon, delta)-DP")
    p.add_argument("--attack-layers", type=_ints, default=(0, 1),
                   help="decomposition points to invert (empty string: no attacks)")
    p.add_argument("--aux", type=options.positive(int), default=None,
                   help="the attacker's auxiliary images, none trained on: those --max-samples left out, then the "
                        "runs' validation split (default: all of them, up to 2000)")
    p.add_argument("--victims", type=options.positive(int), default=128, help="training images each attack reconstructs")
    p.add_argument("--decoder-epochs", type=options.positive(int), default=10,
                   help="training passes of each attack's decoder")
    p.add_argument("--device", default="cpu", help="accelerator of the runs and device of the attacks")
    options.add_threads(p)
    p.add_argument("--out", default="runs/study", help="output directory")
    p.set_defaults(func=_study)


__all__ = ["StudyConfig", "findings", "planned_runs", "run_study", "write_study"]
