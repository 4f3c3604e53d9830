"""PNG figures for attacks, the study and the rank analysis (matplotlib, no display needed).

Every figure carries its budget in a footnote, so a PNG copied into the docs still says how it
was made.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

from torch import Tensor


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _as_rgb(x: Tensor):
    x = x.detach().float().clamp(0, 1)
    return (x[0] if x.shape[0] == 1 else x.permute(1, 2, 0)).numpy()


def image_grid(path: Path, originals: Tensor, rows: Sequence[tuple[str, Tensor]], title: str, note: str,
               columns: int = 8) -> Path:
    """Originals in the first row, each (label, reconstructions) below it; images in [0, 1]."""
    plt = _pyplot()
    n = min(columns, len(originals))
    all_rows = [("original", originals)] + list(rows)
    fig, axes = plt.subplots(len(all_rows), n, figsize=(1.0 * n + 1.6, 1.0 * len(all_rows) + 0.7), squeeze=False)
    cmap = "gray" if originals.shape[1] == 1 else None
    for r, (label, imgs) in enumerate(all_rows):
        for c in range(n):
            ax = axes[r][c]
            ax.imshow(_as_rgb(imgs[c]), cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.text(0.01, 0.005, note, fontsize=6, va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def privacy_utility_chart(path: Path, rows: list[dict], layers: Sequence[int], note: str) -> Path:
    """Left: validation accuracy against epsilon; right: inversion SSIM against epsilon per layer.

    Modes without an epsilon (gpu_only: none, lowrank_only: 0) are drawn as horizontal lines.
    """
    plt = _pyplot()
    fig, (acc_ax, ssim_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    flat = {"gpu_only": ("non-private (gpu_only)", "k", "-"), "lowrank_only": ("lowrank_only (eps 0)", "tab:green", "--")}
    colours = {"legrace": "tab:blue", "dp_only": "tab:red"}
    styles = ["-", "--", ":", "-."]
    markers = ["o", "s", "^", "D"]
    curves: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        if row["mode"] in colours:
            curves.setdefault((row["mode"], row["clip_rule"]), []).append(row)
    rules = sorted({rule for _, rule in curves})
    for (mode, rule), pts in sorted(curves.items()):
        pts = sorted(pts, key=lambda r: r["epsilon"])
        eps = [r["epsilon"] for r in pts]
        style = styles[rules.index(rule) % len(styles)]
        acc_ax.errorbar(eps, [100 * r["val_acc"] for r in pts], yerr=[100 * (r.get("val_acc_std") or 0) for r in pts],
                        color=colours[mode], ls=style, marker=markers[rules.index(rule) % len(markers)], ms=4,
                        capsize=2, label=f"{mode} (C {rule})")
        for j, layer in enumerate(layers):
            key = f"ssim_layer{layer}"
            if all(key in r for r in pts):
                ssim_ax.plot(eps, [r[key] for r in pts], color=colours[mode], ls=styles[j % len(styles)],
                             marker=markers[rules.index(rule) % len(markers)], ms=4, mfc="none" if rules.index(rule) else None,
                             label=f"{mode} (C {rule}), layer {layer}")
    for row in rows:
        if row["mode"] in flat:
            label, colour, style = flat[row["mode"]]
            acc_ax.axhline(100 * row["val_acc"], color=colour, ls=style, label=label)
            for j, layer in enumerate(layers):
                key = f"ssim_layer{layer}"
                if key in row and (row["mode"] == "gpu_only" or j == 0):
                    ssim_ax.axhline(row[key], color=colour, ls=styles[j % len(styles)], lw=1,
                                    label=f"{label}, layer {layer}" if row["mode"] == "gpu_only" else
                                    f"{label}: prior only")
    for ax in (acc_ax, ssim_ax):
        ax.set_xscale("log")
        ax.set_xlabel("epsilon (delta 1e-5, whole training run)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    acc_ax.set_ylabel("validation accuracy (%)")
    ssim_ax.set_ylabel("inversion SSIM on the victims")
    acc_ax.set_title("Utility", fontsize=9)
    ssim_ax.set_title("Decoder inversion of what crossed", fontsize=9)
    fig.text(0.01, 0.01, note, fontsize=6, va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def rank_chart(path: Path, layers: list[dict], ranks: Sequence[int], note: str) -> Path:
    """Energy kept by R channels, entropy rank and residual norms per decomposition point."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    cmap = plt.get_cmap("viridis")
    for i, layer in enumerate(layers):
        colour = cmap(i / max(len(layers) - 1, 1))
        axes[0].plot(ranks, [layer["energy_kept"][str(r)] for r in ranks], marker="o", ms=3, color=colour,
                     label=f"{layer['layer']}: {layer['channels']}x{layer['height']}x{layer['width']}")
    axes[0].set_xscale("log", base=2)
    axes[0].set_xlabel("R (channels kept)")
    axes[0].set_ylabel("mean energy kept by the best rank-R part")
    axes[0].legend(fontsize=6, title="layer: N x h x w", title_fontsize=6)
    names = [str(layer["layer"]) for layer in layers]
    _boxplot(axes[1], [layer["_entropy_rank"] for layer in layers], names)
    axes[1].set_xlabel("decomposition point")
    axes[1].set_ylabel("entropy rank ceil(2^mu)")
    _boxplot(axes[2], [layer["_residual_rel"] for layer in layers], names)
    axes[2].set_xlabel("decomposition point")
    axes[2].set_ylabel(f"|X_res| / |X| at R = {layers[0]['rank']}" if layers else "|X_res| / |X|")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.text(0.01, 0.01, note, fontsize=6, va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def roc_chart(path: Path, curves: list[tuple[str, Sequence[float], Sequence[float]]], note: str) -> Path:
    """ROC curves (log axes, where the low-FPR regime shows) of membership attacks."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    for label, fpr, tpr in curves:
        ax.plot(fpr, tpr, label=label)
    ax.plot([1e-4, 1], [1e-4, 1], color="grey", ls=":", lw=1, label="chance")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(1e-3, 1)
    ax.set_ylim(1e-3, 1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.text(0.01, 0.01, note, fontsize=6, va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _boxplot(ax, data: list, names: list[str]) -> None:
    ax.boxplot(data, showfliers=False)  # tick labels set apart: the keyword was renamed in matplotlib 3.9
    ax.set_xticks(range(1, len(names) + 1))
    ax.set_xticklabels(names)


def fmt(v: Optional[float], digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}g}"


__all__ = ["fmt", "image_grid", "privacy_utility_chart", "rank_chart", "roc_chart"]
