"""`legrace attack inversion|gradients|membership`: attacks on what the accelerator sees.

Each attack aims at a target run (`--checkpoint` of `legrace train`, or, without one, a fresh
model of --model on --data: the weights of a run's first step), takes the accelerator's view from
what crosses the boundary in a real run of the engine (`legrace.attacks.tap`), and writes a JSON table
with its budget, a CSV and PNG figures under --out.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from legrace.options import add_threads, positive
from legrace.attacks.figures import image_grid, roc_chart
from legrace.attacks.gradients import match_gradient, observed_gradient, trusted_gradient_part
from legrace.attacks.inversion import invert, quality
from legrace.attacks.membership import ClassGaussians, confidences, engine_for, roc, train_shadow
from legrace.outputs import output_folder
from legrace.attacks.results import text_table, write_csv, write_json
from legrace.trusted.split_conv import conv_padding
from legrace.trusted.convert import conv_modules
from legrace.attacks.target import AttackError, Target, auxiliary, images, load_target, take, to_unit
from legrace.train import TrainConfig
from legrace.attacks.views import RealRun, ViewSpec, own_view, parse_clip_rule, parse_views

INVERSION_COLUMNS = ["layer", "view", "crossed", "z", "clip", "sigma", "ssim", "ssim_std", "psnr"]
GRADIENT_COLUMNS = ["view", "layer", "batch_size", "attack", "ssim", "ssim_std", "psnr"]


def _views(target: Target, text: str, clip: str) -> list[ViewSpec]:
    specs = []
    for token in text.split(","):
        if token.strip() == "own":
            specs.append(own_view(target))
        elif token.strip():
            specs.extend(parse_views(token, clip))
    if not specs:
        raise AttackError(f"--views {text!r} names no view (e.g. gpu_only,legrace@8,own)")
    return specs


def _layers(text: Optional[str], n_points: int) -> list[int]:
    if text is None:
        return sorted({0, min(1, n_points - 1), n_points - 1})
    try:
        layers = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise AttackError(f"layers must be comma-separated decomposition points, not {text!r}") from None
    bad = [v for v in layers if not 0 <= v < n_points]
    if bad or not layers:
        raise AttackError(f"layer(s) {bad or text!r} do not exist: the model has {n_points} decomposition points "
                          f"(0-{n_points - 1})")
    return layers


def _non_negative(text: str) -> float:
    value = float(text)
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _budget(target: Target, **extra) -> dict:
    cfg = target.config
    return {"model": cfg.model, "data": cfg.data, "max_samples": cfg.max_samples, "train_samples": len(target.members),
            "trained": target.trained, "train_epochs": cfg.epochs if target.trained else 0, "mode_trained": cfg.mode,
            "rank": cfg.rank, "batch_size": cfg.batch_size, "torch_threads": torch.get_num_threads(), **extra}


def _note(budget: dict) -> str:
    return "budget: " + ", ".join(f"{k}={v}" for k, v in budget.items() if k != "torch_threads")


def _close(run: RealRun) -> None:
    close = getattr(run.engine, "close", None)
    if close is not None:
        close()


# ---- 1. inversion ------------------------------------------------------------------------------


def inversion_attack(target: Target, views: list[ViewSpec], layers: list[int], *, n_aux: Optional[int] = None,
                     n_victims: int = 128, decoder_epochs: int = 10, epsilon_epochs: Optional[int] = None,
                     device: str = "cpu", seed: int = 0, log=print) -> dict:
    """Decoder inversion of each view at each layer; returns rows, reconstructions and the budget.
    n_aux: the adversary's images (`auxiliary`; default: all not trained on, up to 2000)."""
    aux = target.subset(auxiliary(target, n_aux, 2000))
    victims = target.subset(take(target.members, n_victims, "victims (training samples)"))
    aux_images, victim_images = to_unit(images(aux)[0]), to_unit(images(victims)[0])
    epochs = epsilon_epochs or target.config.epochs
    rows, recons = [], {}
    for spec in views:
        run = RealRun(target, spec, epochs=epochs, batch_size=target.config.batch_size, device=device,
                      layers=layers, kinds=["inputs"])
        aux_view, victim_view = run.forward(aux), run.forward(victims)
        _close(run)
        for layer in layers:
            t0 = time.perf_counter()
            # nothing crosses in lowrank_only, nor at a point split exactly (R >= its channels)
            crossed = spec.crosses and layer in victim_view.inputs
            rec = invert(aux_view.stacked("inputs", layer) if crossed else None, aux_images,
                         victim_view.stacked("inputs", layer) if crossed else None, len(victim_images),
                         epochs=decoder_epochs, device=device, seed=seed)
            q = quality(rec, victim_images)
            row = {"layer": layer, "view": spec.label, "mode": spec.mode, "epsilon": spec.epsilon,
                   "crossed": "yes" if crossed else "nothing", "z": run.z if spec.mode in ("legrace", "dp_only") else None,
                   "clip": run.clip, "sigma": run.engine.sigma or None, **q}
            rows.append(row)
            recons[(layer, spec.label)] = rec
            log(f"inversion layer {layer} {spec.label}: SSIM {q['ssim']:.3f} PSNR {q['psnr']:.1f} dB "
                f"({time.perf_counter() - t0:.0f} s)")
    budget = _budget(target, auxiliary_samples=len(aux), victims=n_victims, decoder_epochs=decoder_epochs,
                     epsilon_over_epochs=epochs)
    return {"attack": "inversion", "budget": budget, "rows": rows, "victim_images": victim_images,
            "reconstructions": recons}


def write_inversion(result: dict, out: Path) -> list[Path]:
    out = output_folder(out)
    rows = result["rows"]
    paths = [write_json(out / "inversion.json", {"attack": "inversion", "budget": result["budget"], "rows": rows}),
             write_csv(out / "inversion.csv", rows, INVERSION_COLUMNS)]
    for layer in sorted({r["layer"] for r in rows}):
        grid_rows = [(f"{r['view']}\nSSIM {r['ssim']:.2f}", result["reconstructions"][(layer, r["view"])])
                     for r in rows if r["layer"] == layer]
        paths.append(image_grid(out / f"inversion_layer{layer}.png", result["victim_images"], grid_rows,
                                f"Decoder inversion from what crossed at decomposition point {layer}",
                                _note(result["budget"])))
    return paths


# ---- 2. gradients ------------------------------------------------------------------------------


def gradient_attack(target: Target, views: list[ViewSpec], layer: int = 0, *, n_aux: Optional[int] = None,
                    n_victims: int = 16,
                    batch_size: int = 1, lr: float = 0.01, iters: int = 400, tv: float = 0.2,
                    decoder_epochs: int = 10, epsilon_epochs: Optional[int] = None, device: str = "cpu",
                    seed: int = 0, log=print) -> dict:
    """Gradient matching and a dL/dY decoder against victims' training steps, per view.
    n_aux: the decoder's images (`auxiliary`; default: all not trained on, up to 1000)."""
    if batch_size > n_victims:  # the steps would hold fewer victims than the batch size reported
        raise ValueError(f"--batch-size {batch_size} is more than the {n_victims} victims (--victims): "
                         "a step cannot hold more victims than there are")
    aux = target.subset(auxiliary(target, n_aux, 1000))
    victims = target.subset(take(target.members, n_victims, "victims (training samples)"))
    aux_images, victim_images = to_unit(images(aux)[0]), to_unit(images(victims)[0])
    convs = conv_modules(target.model)
    if not 0 <= layer < len(convs):
        raise AttackError(f"layer {layer} does not exist: the model has {len(convs)} decomposition points "
                          f"(0-{len(convs) - 1})")
    conv = convs[layer]
    conv_args = {"stride": conv.stride, "padding": conv_padding(conv), "dilation": conv.dilation}
    epochs = epsilon_epochs or target.config.epochs
    prior = invert(None, aux_images, None, len(victim_images))
    rows = [{"view": "nothing crossed", "layer": layer, "batch_size": batch_size, "attack": "prior (mean image)",
             **quality(prior, victim_images)}]
    recons = {"prior": prior}
    for spec in views:
        if not spec.crosses:
            log(f"gradients {spec.label}: nothing crosses, the prior row stands for it")
            continue
        run = RealRun(target, spec, epochs=epochs, batch_size=batch_size, device=device, layers=[layer])
        if not run.crosses_at(layer):  # a silent conv: neither its dL/dY nor its weight crosses
            _close(run)
            log(f"gradients {spec.label}: nothing of layer {layer} crosses (R covers its input channels, so it "
                "runs wholly on the trusted side); the prior row stands for it")
            continue
        t0 = time.perf_counter()
        aux_view, _ = run.steps(aux, lr=0.0)  # the adversary's images: forward and backward, no update
        view, weights = run.steps(victims, lr=lr)
        _close(run)
        label = spec.label
        if layer == 0:  # at the first conv X is the image: the estimate needs no decoder
            estimates = []
            for k, (before, after) in enumerate(weights[layer]):
                grad_y, sent = view.grad_y[layer][k], view.inputs[layer][k]
                residual = sent if spec.mode != "gpu_only" else None  # gpu_only computed it all, on the GPU
                full = observed_gradient([before, after], 0, lr)
                g_main = trusted_gradient_part(full, residual, grad_y, **conv_args)
                if g_main.norm() <= 1e-4 * full.norm():  # only rounding is left: nothing private reached it
                    g_main = torch.zeros_like(g_main)
                x = match_gradient(grad_y, g_main, tuple(sent.shape), iters=iters, tv=tv, seed=seed + k, **conv_args)
                estimates.append(x + residual if residual is not None else x)
            matched = to_unit(torch.cat(estimates))
            rows.append({"view": label, "layer": layer, "batch_size": batch_size, "attack": "gradient matching",
                         **quality(matched, victim_images)})
            recons[f"{label}: matching"] = matched
        decoded = invert(aux_view.stacked("grad_y", layer), aux_images, view.stacked("grad_y", layer),
                         len(victim_images), epochs=decoder_epochs, per_sample=True, device=device, seed=seed)
        rows.append({"view": label, "layer": layer, "batch_size": batch_size, "attack": "dL/dY decoder",
                     **quality(decoded, victim_images)})
        recons[f"{label}: dL/dY decoder"] = decoded
        log("gradients " + "; ".join(f"{r['view']} {r['attack']}: SSIM {r['ssim']:.3f}" for r in rows
                                     if r["view"] == label) + f" ({time.perf_counter() - t0:.0f} s)")
    budget = _budget(target, auxiliary_samples=len(aux), victims=n_victims, attack_batch_size=batch_size, attack_lr=lr,
                     matching_iters=iters, tv=tv, decoder_epochs=decoder_epochs, epsilon_over_epochs=epochs)
    return {"attack": "gradients", "budget": budget, "rows": rows, "victim_images": victim_images,
            "reconstructions": recons}


def write_gradients(result: dict, out: Path) -> list[Path]:
    out = output_folder(out)
    rows = result["rows"]
    grid = [(f"{name}\nSSIM {quality(rec, result['victim_images'])['ssim']:.2f}", rec)
            for name, rec in result["reconstructions"].items()]
    return [write_json(out / "gradients.json", {"attack": "gradients", "budget": result["budget"], "rows": rows}),
            write_csv(out / "gradients.csv", rows, GRADIENT_COLUMNS),
            image_grid(out / "gradients.png", result["victim_images"], grid,
                       f"Gradient inversion at decomposition point {rows[0]['layer']} "
                       f"(batch of {result['budget']['attack_batch_size']})", _note(result["budget"]))]


# ---- 3. membership -----------------------------------------------------------------------------


def membership_attack(target: Target, *, n: Optional[int] = None, shadow: Optional[bool] = None,
                      shadow_samples: Optional[int] = None, log=print) -> dict:
    """Loss-threshold and shadow-model membership inference on the trained target.

    n: members and as many non-members (default: as many as the run has of both, up to 1000).
    shadow: True needs the samples for a shadow model, False skips it, None trains one when the
    samples left beyond the non-members allow (2 x 20 or more)."""
    if not target.trained:
        raise AttackError("membership inference needs a trained model: give --checkpoint")
    outsiders = target.held_out + target.unused
    if n is None:
        n = min(1000, len(target.members), len(outsiders))
        if n == 0:
            raise AttackError("the run held out no samples to compare its members with: attack a run trained "
                              "with a --val-fraction above 0 or --max-samples below the data's size")
    members = take(target.members, n, "members")
    nonmembers = take(outsiders, n, "non-members (validation and unused samples)")
    engine = engine_for(target)
    model = engine.convert(target.fresh_model())  # the target as trained, under its own engine
    with engine.unaccounted():  # the attack's own queries of the trained model
        loss_in, phi_in, y_in, right_in = confidences(model, target.subset(members))
        loss_out, phi_out, y_out, right_out = confidences(model, target.subset(nonmembers))
    attacks = {"loss threshold": roc(-loss_in, -loss_out)}
    budget = _budget(target, members=n, nonmembers=n)
    pool = outsiders[n:]
    m = shadow_samples or min(len(target.members), len(pool) // 2)
    if shadow is None and (m < 20 or 2 * m > len(pool)):
        log(f"no shadow model: {len(pool)} samples are left beyond the {n} non-members, it needs 2 x "
            f"{max(m, 20)} (lower --samples or the run's --max-samples)")
        shadow = False
    if shadow is not False:
        if m < 20 or 2 * m > len(pool):
            raise AttackError(f"a shadow model needs 2 x {max(m, 20)} unused samples, {len(pool)} are left "
                              "(lower the run's --max-samples, or pass --no-shadow)")
        shadow_in, shadow_out = target.subset(pool[:m]), target.subset(pool[m:2 * m])
        log(f"training a shadow model on {m} auxiliary samples like the target ({target.config.epochs} epochs)")
        shadow_model, shadow_engine = train_shadow(target, shadow_in, log=log)
        with shadow_engine.unaccounted():  # the adversary's own data
            _, s_phi_in, s_y_in, _ = confidences(shadow_model, shadow_in)
            _, s_phi_out, s_y_out, _ = confidences(shadow_model, shadow_out)
        fitted = ClassGaussians(s_phi_in, s_y_in, s_phi_out, s_y_out)
        attacks["shadow model (likelihood ratio)"] = roc(fitted.score(phi_in, y_in), fitted.score(phi_out, y_out))
        budget["shadow_samples"] = m
    rows = [{"attack": name, "auc": r["auc"], "tpr_at_1%_fpr": r["tpr_at_0.01_fpr"]} for name, r in attacks.items()]
    gap = {"train_loss": float(loss_in.mean()), "heldout_loss": float(loss_out.mean()),
           "member_acc": float(right_in.mean()), "nonmember_acc": float(right_out.mean())}
    for row in rows:
        log(f"membership {row['attack']}: AUC {row['auc']:.3f}, TPR at 1% FPR {row['tpr_at_1%_fpr']:.3f}")
    return {"attack": "membership", "budget": budget, "rows": rows, "generalisation": gap,
            "curves": [(name, r["fpr"], r["tpr"]) for name, r in attacks.items()]}


def write_membership(result: dict, out: Path) -> list[Path]:
    out = output_folder(out)
    return [write_json(out / "membership.json", {k: v for k, v in result.items() if k != "curves"}),
            write_csv(out / "membership.csv", result["rows"], ["attack", "auc", "tpr_at_1%_fpr"]),
            roc_chart(out / "membership_roc.png", [(f"{n} (AUC {r['auc']:.2f})", f, t) for (n, f, t), r in
                                                   zip(result["curves"], result["rows"])], _note(result["budget"]))]


# ---- command line ------------------------------------------------------------------------------


def _target_args(p: argparse.ArgumentParser, out: str) -> None:
    p.add_argument("--checkpoint", help="checkpoint.pt of a `legrace train` run (its model, data split and weights) "
                                        "(default: none, a fresh model of --model on --data)")
    p.add_argument("--model", default="cnn", help="without --checkpoint: the model, at its initial weights")
    p.add_argument("--data", default="digits", help="without --checkpoint: digits | npz:PATH | ...")
    p.add_argument("--max-samples", type=positive(int), default=None,
                   help="without --checkpoint: samples the 'run' uses; the rest is the adversary's auxiliary data "
                        "(default: all)")
    p.add_argument("--seed", type=int, default=0,
                   help="the attack's randomness (and without --checkpoint the model's and the split's)")
    p.add_argument("--device", default="cpu", help="where the accelerator and the attack's own training run")
    add_threads(p)
    p.add_argument("--out", default=out, help="output directory")


def _load(args) -> Target:
    config = None
    if args.checkpoint is None:
        config = TrainConfig(model=args.model, data=args.data, max_samples=args.max_samples, seed=args.seed,
                             epochs=getattr(args, "epochs", None) or 5, progress=False)
    return load_target(args.checkpoint, config)


def _start(args) -> None:
    output_folder(args.out)  # before the attack: a bad --out fails now, not after it


def _print(result: dict, columns: list[str], paths: list[Path]) -> None:
    print(text_table(result["rows"], columns))
    print("budget: " + ", ".join(f"{k}={v}" for k, v in result["budget"].items()))
    print("wrote " + ", ".join(str(p) for p in paths))


def _inversion(args) -> int:
    _start(args)
    target = _load(args)
    clip = parse_clip_rule(args.clip)
    result = inversion_attack(target, _views(target, args.views, clip), _layers(args.layers, len(conv_modules(target.model))),
                              n_aux=args.aux, n_victims=args.victims, decoder_epochs=args.decoder_epochs,
                              epsilon_epochs=args.epochs, device=args.device, seed=args.seed, log=_log)
    _print(result, INVERSION_COLUMNS, write_inversion(result, Path(args.out)))
    return 0


def _gradients(args) -> int:
    _start(args)
    target = _load(args)
    result = gradient_attack(target, _views(target, args.views, parse_clip_rule(args.clip)), args.layer,
                             n_aux=args.aux, n_victims=args.victims, batch_size=args.batch_size, lr=args.lr,
                             iters=args.iters, tv=args.tv, decoder_epochs=args.decoder_epochs,
                             epsilon_epochs=args.epochs, device=args.device, seed=args.seed, log=_log)
    _print(result, GRADIENT_COLUMNS, write_gradients(result, Path(args.out)))
    return 0


def _membership(args) -> int:
    _start(args)
    if args.checkpoint is None:
        raise AttackError("membership inference needs a trained model: give --checkpoint")
    result = membership_attack(load_target(args.checkpoint), n=args.samples, shadow=args.shadow,
                               shadow_samples=args.shadow_samples, log=_log)
    _print(result, ["attack", "auc", "tpr_at_1%_fpr"], write_membership(result, Path(args.out)))
    print("generalisation: " + ", ".join(f"{k}={v:.3g}" for k, v in result["generalisation"].items()))
    return 0


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def add_parser(subparsers) -> None:
    attack = subparsers.add_parser("attack", help="attacks on what the accelerator sees (privacy, measured)")
    sub = attack.add_subparsers(dest="attack", required=True)

    inv = sub.add_parser("inversion", help="train a decoder from what crossed at a layer back to the images")
    _target_args(inv, "runs/attack-inversion")
    inv.add_argument("--views", default="gpu_only,dp_only@8,legrace@1,legrace@8,legrace@1000,legrace@inf,lowrank_only",
                     help="comma-separated MODE or MODE@EPSILON (inf: no noise); 'own' = the checkpoint's run")
    inv.add_argument("--layers", default=None, help="decomposition points to attack (default: 0, 1 and the last)")
    inv.add_argument("--clip", default="auto", help="clip rule of the views: auto | std:S | a number")
    inv.add_argument("--epochs", type=positive(int), default=None,
                     help="passes the views' epsilon is spent over (default: the checkpoint's epochs, else 5)")
    inv.add_argument("--aux", type=positive(int), default=None,
                     help="the adversary's auxiliary images, none trained on: those --max-samples left out, then "
                          "the run's validation split (default: all of them, up to 2000)")
    inv.add_argument("--victims", type=positive(int), default=128, help="training images to reconstruct")
    inv.add_argument("--decoder-epochs", type=positive(int), default=10, help="training passes of the decoder")
    inv.set_defaults(func=_inversion)

    grad = sub.add_parser("gradients", help="gradient inversion from the weights, dL/dY and residuals")
    _target_args(grad, "runs/attack-gradients")
    grad.add_argument("--views", default="gpu_only,dp_only@8,legrace@8",
                      help="comma-separated MODE or MODE@EPSILON; 'own' = the checkpoint's run")
    grad.add_argument("--layer", type=int, default=0, help="decomposition point (0: the image itself)")
    grad.add_argument("--clip", default="auto", help="clip rule of the views: auto | std:S | a number")
    grad.add_argument("--epochs", type=positive(int), default=None,
                      help="passes the views' epsilon is spent over (default: the checkpoint's epochs, else 5)")
    grad.add_argument("--batch-size", type=positive(int), default=1, help="victims per training step")
    grad.add_argument("--lr", type=positive(float), default=0.01, help="learning rate of the victims' SGD steps")
    grad.add_argument("--iters", type=positive(int), default=400, help="gradient-matching iterations")
    grad.add_argument("--tv", type=_non_negative, default=0.2, help="total-variation weight of gradient matching")
    grad.add_argument("--aux", type=positive(int), default=None,
                      help="auxiliary images for the dL/dY decoder, none trained on: those --max-samples left out, "
                           "then the run's validation split (default: all of them, up to 1000)")
    grad.add_argument("--victims", type=positive(int), default=16, help="training images to reconstruct")
    grad.add_argument("--decoder-epochs", type=positive(int), default=10, help="training passes of the dL/dY decoder")
    grad.set_defaults(func=_gradients)

    mem = sub.add_parser("membership", help="membership inference on a trained model (loss threshold, shadow model)")
    _target_args(mem, "runs/attack-membership")
    mem.add_argument("--samples", type=positive(int), default=None,
                     help="members and as many non-members (default: as many as the run has of both, up to 1000)")
    mem.add_argument("--shadow", action=argparse.BooleanOptionalAction, default=None,
                     help="a shadow-model attack besides the loss threshold (default: when the samples left "
                          "beyond the non-members allow one); --no-shadow: loss threshold only")
    mem.add_argument("--shadow-samples", type=positive(int), default=None,
                     help="shadow training set size (default: the target's, as far as unused data allows)")
    mem.set_defaults(func=_membership)
