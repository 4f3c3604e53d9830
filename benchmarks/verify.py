"""verify=True: what the Freivalds checks cost and what they catch.

1. Overhead: median training-step time with verify off and on, same model, batch and accelerator.
2. Honest margin: the largest |answer - check| / (sqrt(n) * scale) seen on honest answers (n and
   scale as in legrace.trusted.freivalds), against the tolerance.
3. Detection: honest answers of one vgg11 step (every conv layer), tampered in several ways and
   sizes eps, each checked with fresh secret weights; the fraction of tampered answers caught.

    .venv/bin/python benchmarks/verify.py [--steps 5] [--trials 20] [--device cpu]
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time

import torch
import torch.nn.functional as F

from bench_common import add_process_arguments, apply_process_arguments, count

from legrace import LegRace
from legrace.boundary.messages import BoundaryError
from legrace.trusted.freivalds import TOLERANCE, FreivaldsVerifier
from legrace.models import build_model

EPS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)


class Recorder(FreivaldsVerifier):
    """Checks as usual; also keeps each check's arguments and the honest error it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, tuple]] = []
        self.worst: dict[str, float] = {}

    def conv_forward(self, *args) -> None:
        self.calls.append(("conv_forward", tuple(a.detach().cpu().clone() if torch.is_tensor(a) else a for a in args)))
        super().conv_forward(*args)

    def grad_input(self, *args) -> None:
        self.calls.append(("grad_input", tuple(a.detach().cpu().clone() if torch.is_tensor(a) else a for a in args)))
        super().grad_input(*args)

    def grad_weight(self, *args) -> None:
        self.calls.append(("grad_weight", tuple(a.detach().cpu().clone() if torch.is_tensor(a) else a for a in args)))
        super().grad_weight(*args)

    def compare(self, got, want, squares, terms, sent_dtype, what) -> None:
        kind = what.split(" of ")[0]
        scale = squares.clamp_min(0).sqrt() * math.sqrt(terms)
        ratio = float(((got - want).abs() / (scale + torch.finfo(got.dtype).tiny)).max())
        self.worst[kind] = max(self.worst.get(kind, 0.0), ratio)
        super().compare(got, want, squares, terms, sent_dtype, what)


def setup(name: str, size: int, channels: int, image: int):
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, in_channels=channels, image_size=image)
    return model, torch.randn(size, channels, image, image), torch.randint(0, 10, (size,))


def make_net(model, device: str, verifier=None):
    engine = LegRace(rank=8, noise_multiplier=1.0, clip=1.0, accelerator=device)
    net = engine.convert(copy.deepcopy(model))
    engine.boundary.verifier = verifier
    net.engine = engine
    return net


def step(net, x, y) -> float:
    t0 = time.perf_counter()
    net.zero_grad(set_to_none=True)
    with net.engine.unaccounted():  # synthetic inputs
        F.cross_entropy(net(x), y).backward()
    return time.perf_counter() - t0


def median_ms(nets, x, y, steps: int) -> list[float]:
    """Median step time of each net; steps interleaved so a busy machine slows all alike."""
    times = [[] for _ in nets]
    for i in range(steps + 1):  # the first step warms up
        for net, ts in zip(nets, times):
            t = step(net, x, y)
            if i:
                ts.append(t)
    return [1000 * statistics.median(ts) for ts in times]


# The answer is argument 3 of each check (conv_forward: y, grad_input: grad_x, grad_weight: grad_w).
def scaled(t, eps, g):
    return t * (1 + eps)


def one_value(t, eps, g):
    t = t.clone()
    t.view(-1)[int(torch.randint(0, t.numel(), (1,), generator=g))] += eps * float(t.abs().max())
    return t


def noise(t, eps, g):
    return t + eps * float(t.pow(2).mean().sqrt()) * torch.randn(t.shape, generator=g)


def two_channels(t, eps, g):
    """+d in one channel and -d in another: cancels for weights that happen to be equal."""
    t = t.clone()
    d = eps * float(t.abs().max())
    t[:, 0] += d
    t[:, 1] -= d
    return t


TAMPERS = {"scaled by 1+eps": scaled, "one value +eps*max": one_value, "noise eps*rms everywhere": noise,
           "two channels +-eps*max": two_channels}


def detection(calls, trials: int) -> dict:
    g = torch.Generator().manual_seed(0)
    verifier = FreivaldsVerifier()
    rates = {}
    for kind in ("conv_forward", "grad_input", "grad_weight"):
        mine = [args for k, args in calls if k == kind]
        for tname, tamper in TAMPERS.items():
            for eps in EPS:
                caught = total = 0
                for args in mine:
                    for _ in range(trials):
                        bad = list(args)
                        bad[3] = tamper(args[3], eps, g)
                        total += 1
                        try:
                            getattr(verifier, kind)(*bad)
                        except BoundaryError:
                            caught += 1
                rates[kind, tname, eps] = caught / total
    return rates


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=count, default=5)
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--device", default="cpu", help="the (in-process) accelerator's device")
    add_process_arguments(p)
    args = p.parse_args()
    apply_process_arguments(args)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, accelerator {args.device}, "
          f"tolerance {TOLERANCE:g}; median of {args.steps} steps")
    print(f"{'model':<10}{'batch':>6}{'verify off ms':>15}{'verify on ms':>14}{'overhead':>10}")
    calls, worst = None, {}
    for name, size, channels, image in (("cnn", 64, 1, 8), ("vgg11", 16, 3, 32), ("resnet18", 16, 3, 32)):
        model, x, y = setup(name, size, channels, image)
        off, on = median_ms([make_net(model, args.device), make_net(model, args.device, FreivaldsVerifier())],
                            x, y, args.steps)
        print(f"{name:<10}{size:>6}{off:>15.1f}{on:>14.1f}{on / off - 1:>10.1%}")
        recorder = Recorder()
        recorded = make_net(model, args.device, recorder)
        for _ in range(2):
            step(recorded, x, y)
        for k, v in recorder.worst.items():
            worst[k] = max(worst.get(k, 0.0), v)
        if name == "vgg11":
            calls = recorder.calls[:3 * 8 - 1]  # one step's checks: 8 convs (no dL/dX for the first)
    print("\nhonest answers, largest |answer - check| / (sqrt(n) scale): "
          + ", ".join(f"{k} {v:.2g}" for k, v in worst.items()) + f" (tolerance {TOLERANCE:g})")
    rates = detection(calls, args.trials)
    print(f"\ndetection rate, vgg11 (16x3x32x32), every conv layer, {args.trials} trials each")
    for kind in ("conv_forward", "grad_input", "grad_weight"):
        print(f"{kind:<28}" + "".join(f"{'eps=' + format(e, 'g'):>10}" for e in EPS))
        for tname in TAMPERS:
            print(f"  {tname:<26}" + "".join(f"{rates[kind, tname, e]:>10.0%}" for e in EPS))


if __name__ == "__main__":
    main()
