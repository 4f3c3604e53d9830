"""Exactness report: split vs plain model, per architecture, size, dtype and train/eval mode.

    python benchmarks/exactness.py [--sizes 32,224] [--out exactness.json]

Noise and clipping are off; errors are |split - plain| / |plain| (gradients: the worst parameter,
see legrace.verify.grad_errors). Float32 errors are also shown for the plain model itself
against float64, the floor any float32 implementation has.
"""

import argparse
import json
import time

import torch
import torchvision

from bench_common import counts

from legrace.models import TORCHVISION_MODELS, ModelError, build_model
from legrace.verify import float32_vs_float64, split_vs_plain


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--archs", default=",".join(TORCHVISION_MODELS))
    p.add_argument("--sizes", type=counts, default=[32, 224])
    p.add_argument("--rank", default="8", help="an int >= 0 or auto")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    archs = a.archs.split(",")
    unknown = [name for name in archs if name not in TORCHVISION_MODELS]
    if unknown:
        p.error(f"--archs: unknown {unknown}; choose from {','.join(TORCHVISION_MODELS)}")
    if not (a.rank == "auto" or a.rank.isdigit()):
        p.error(f"--rank: an int >= 0 or auto, not {a.rank!r}")
    rank = a.rank if a.rank == "auto" else int(a.rank)
    try:  # every small size must suit every architecture's CIFAR variant: checked before the long run
        for name in archs:
            for size in [s for s in a.sizes if s <= 64]:
                build_model(name, num_classes=10, image_size=size)
    except ModelError as err:
        p.error(f"--sizes: {err}")
    rows = []
    for name in archs:
        for size in a.sizes:
            variants = {"torchvision": torchvision.models.get_model(name, weights=None, num_classes=10)}
            if size <= 64:
                variants["cifar"] = build_model(name, num_classes=10, image_size=size)
            for variant, model in variants.items():
                g = torch.Generator().manual_seed(0)
                batch = 2 if size >= 128 else 4
                x, y = torch.randn(batch, 3, size, size, generator=g), torch.randint(0, 10, (batch,), generator=g)
                for train in (True, False):
                    t0 = time.time()
                    r64 = split_vs_plain(model.double(), x.double(), y, rank=rank, train=train)
                    r32 = split_vs_plain(model.float(), x, y, rank=rank, train=train)
                    s32, p32 = float32_vs_float64(model, x, y, rank=rank, train=train)
                    row = dict(arch=name, variant=variant, size=size, train=train, rank=rank,
                               f64_logits=r64.logits, f64_grads=r64.worst_grad,
                               f32_logits=r32.logits, f32_grads=r32.worst_grad,
                               split_f32_vs_f64_logits=s32.logits, split_f32_vs_f64_grads=s32.worst_grad,
                               plain_f32_vs_f64_logits=p32.logits, plain_f32_vs_f64_grads=p32.worst_grad,
                               seconds=time.time() - t0)
                    rows.append(row)
                    print(f"{name:9s} {variant:11s} {size:3d} {'train' if train else 'eval ':5s} "
                          f"f64 logits {row['f64_logits']:.1e} grads {row['f64_grads']:.1e} | "
                          f"f32 logits {row['f32_logits']:.1e} grads {row['f32_grads']:.1e} | vs f64: split f32 "
                          f"{s32.logits:.1e} {s32.worst_grad:.1e}, plain f32 {p32.logits:.1e} {p32.worst_grad:.1e}"
                          f"  ({row['seconds']:.0f}s)",
                          flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
