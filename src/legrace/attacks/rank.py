"""`legrace analyze rank`: how low-rank are a model's conv inputs, to choose R and C.

Per decomposition point, over a sample of images run through the model as in training:
  - the SVD-channel entropy mu of each sample's N x hw activation and the entropy rank
    ceil(2^mu) (paper, Theorem 1: about 97% of the energy when singular values decay
    geometrically);
  - the energy the best rank-R part keeps, for several R;
  - the norm of the residual the engine would release at the chosen R (before clipping),
    absolute and relative to the activation.
Run it on public data: a C read off the residual norms of private data is a choice made on that
data, which the accountant does not cover (DESIGN section 9).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch.utils.data import DataLoader

from legrace.options import add_threads, positive
from legrace.trusted.decompose import channel_entropy, decompose
from legrace.attacks.figures import rank_chart
from legrace.outputs import output_folder
from legrace.attacks.results import text_table, write_csv, write_json
from legrace.attacks.tap import ActivationTap
from legrace.attacks.target import AttackError, Target, load_target, take
from legrace.train import TrainConfig

COLUMNS = ["layer", "channels", "height", "width", "entropy_mean", "entropy_rank_median", "entropy_rank_p90",
           "energy_kept_at_rank", "activation_norm_median", "residual_norm_p10", "residual_norm_median",
           "residual_norm_p90", "residual_relative_median"]


def _quantile(values: torch.Tensor, q: float) -> float:
    return float(torch.quantile(values.double(), q))


@torch.no_grad()
def rank_profile(target: Target, *, samples: Optional[int] = None, rank: Optional[int] = None,
                 ranks: Sequence[int] = (1, 2, 4, 8, 16), batch_size: int = 64, source: str = "unused",
                 log=print) -> dict:
    """Per-layer statistics of the conv inputs of `samples` images (default: all the source has, up
    to 256; see the module docstring).

    source: 'unused' (the samples the run left out: public for the analysis), 'heldout' (its
    validation split), 'members' (its training samples), or 'auto': unused if the run left any
    out, else heldout, saying so (a C read off them is a choice made on private data).
    """
    if source == "auto":
        source = "unused" if target.unused or not target.held_out else "heldout"
        if source == "heldout":
            log(f"note: the run left no samples out, so the analysis reads its validation split: a C chosen from "
                f"these norms is a choice made on private data (--max-samples below {len(target.base)} leaves "
                "public samples)")
    pools = {"unused": target.unused, "heldout": target.held_out, "members": target.members}
    if source not in pools:
        raise AttackError(f"source must be auto, {', '.join(pools)}, not {source!r}")
    pool = pools[source]
    if samples is None:
        if not pool:
            raise AttackError(f"the run has no {source} samples to analyse: give --source members, or "
                              "--max-samples below the data's size")
        samples = min(256, len(pool))
    data = target.subset(take(pool, samples, f"{source} samples"))
    cfg_rank = target.config.rank
    if rank is None:
        if not isinstance(cfg_rank, int):
            raise AttackError("the run's rank is not a single int: pass --rank")
        rank = cfg_rank
    model = target.fresh_model().train()  # BatchNorm on batch statistics, as the releases during training
    stats: dict[int, dict[str, list]] = {}
    tap = ActivationTap(model, kinds=["inputs"])
    for x, _ in DataLoader(data, batch_size=batch_size):
        tap.view.clear()
        with tap:
            model(x)
        for layer, (act,) in tap.view.inputs.items():
            X = act.reshape(act.shape[0], act.shape[1], -1).double()
            s = torch.linalg.svdvals(X)
            energy = s.square()
            total = energy.sum(-1).clamp_min(1e-300)
            mu = channel_entropy(s)
            res = decompose(act, rank, method=target.config.decomposition).X_res.reshape(len(act), -1)
            norms = act.reshape(len(act), -1).norm(dim=1)
            st = stats.setdefault(layer, {"shape": tuple(act.shape[1:]), "mu": [], "erank": [], "res": [], "act": [],
                                          "kept": [], **{f"e{r}": [] for r in ranks}})
            st["kept"].append(energy[:, :rank].sum(-1) / total)
            st["mu"].append(mu)
            st["erank"].append(torch.ceil(torch.exp2(mu) - 1e-6))
            st["res"].append(res.norm(dim=1))
            st["act"].append(norms)
            for r in ranks:
                st[f"e{r}"].append(energy[:, :r].sum(-1) / total)
    layers = []
    for layer in sorted(stats):
        st = {k: (torch.cat(v) if isinstance(v, list) else v) for k, v in stats[layer].items()}
        n, h, w = st["shape"]
        rel = st["res"] / st["act"].clamp_min(1e-30)
        layers.append({
            "layer": layer, "channels": n, "height": h, "width": w, "rank": rank,
            "entropy_mean": float(st["mu"].mean()), "entropy_rank_median": _quantile(st["erank"], 0.5),
            "entropy_rank_p90": _quantile(st["erank"], 0.9),
            "energy_kept": {str(r): float(st[f"e{r}"].mean()) for r in ranks},
            "energy_kept_at_rank": float(st["kept"].mean()),
            "activation_norm_median": _quantile(st["act"], 0.5), "residual_norm_p10": _quantile(st["res"], 0.1),
            "residual_norm_median": _quantile(st["res"], 0.5), "residual_norm_p90": _quantile(st["res"], 0.9),
            "residual_relative_median": _quantile(rel, 0.5),
            "_entropy_rank": st["erank"].tolist(), "_residual_rel": rel.tolist(),
        })
    return {"budget": {"model": target.config.model, "data": target.config.data, "trained": target.trained,
                       "samples": samples, "source": source, "rank": rank,
                       "decomposition": target.config.decomposition}, "layers": layers, "ranks": list(ranks)}


def write_profile(result: dict, out: Path) -> list[Path]:
    out = output_folder(out)
    layers = result["layers"]
    public = [{k: v for k, v in layer.items() if not k.startswith("_")} for layer in layers]
    note = "budget: " + ", ".join(f"{k}={v}" for k, v in result["budget"].items())
    for ranks_row in public:
        for r, e in ranks_row["energy_kept"].items():
            ranks_row[f"energy_kept_R{r}"] = e
    cols = COLUMNS + [f"energy_kept_R{r}" for r in result["ranks"]]
    return [write_json(out / "rank.json", {"budget": result["budget"], "layers": public}),
            write_csv(out / "rank.csv", public, cols),
            rank_chart(out / "rank.png", layers, result["ranks"], note)]


def _rank(args) -> int:
    config = None
    if args.checkpoint is None:
        config = TrainConfig(model=args.model, data=args.data, max_samples=args.max_samples, seed=args.seed,
                             rank=args.rank or 8, progress=False)
    output_folder(args.out)  # before the work: a bad --out fails now
    target = load_target(args.checkpoint, config)
    try:
        ranks = tuple(int(r) for r in args.ranks.split(","))
    except ValueError:
        ranks = ()
    if not ranks or min(ranks) < 1:
        raise AttackError(f"--ranks must be comma-separated ints >= 1, not {args.ranks!r}")
    result = rank_profile(target, samples=args.samples, rank=args.rank, ranks=ranks, source=args.source,
                          log=lambda m: print(m, file=sys.stderr, flush=True))
    paths = write_profile(result, Path(args.out))
    print(text_table(result["layers"], COLUMNS))
    print("budget: " + ", ".join(f"{k}={v}" for k, v in result["budget"].items()))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def add_parser(subparsers) -> None:
    analyze = subparsers.add_parser("analyze", help="analyses that help choose the method's settings")
    sub = analyze.add_subparsers(dest="analysis", required=True)
    p = sub.add_parser("rank", help="per-layer SVD-channel entropy, energy kept by R, residual norms")
    p.add_argument("--checkpoint", help="checkpoint.pt of a `legrace train` run (default: a fresh model)")
    p.add_argument("--model", default="cnn", help="without --checkpoint: the model, at its initial weights")
    p.add_argument("--data", default="digits", help="without --checkpoint: digits | npz:PATH | cifar10:DIR | imagefolder:DIR")
    p.add_argument("--max-samples", type=positive(int), default=None,
                   help="samples a run would use; --source unused reads the others (public) (default: all)")
    p.add_argument("--seed", type=int, default=0, help="without --checkpoint: model init and data split")
    p.add_argument("--rank", type=positive(int), default=None, help="R of the residual norms (default: the run's, else 8)")
    p.add_argument("--ranks", default="1,2,4,8,16", help="R values of the energy-kept curve")
    p.add_argument("--samples", type=positive(int), default=None,
                   help="images whose activations are analysed (default: all --source has, up to 256)")
    p.add_argument("--source", choices=("auto", "unused", "heldout", "members"), default="auto",
                   help="read samples the run left out (unused: public), its validation split (heldout: "
                        "private) or its training samples (members: private); auto: unused if the run left any "
                        "out, else heldout")
    add_threads(p)
    p.add_argument("--out", default="runs/analyze-rank", help="output directory")
    p.set_defaults(func=_rank)


__all__ = ["rank_profile", "write_profile"]
