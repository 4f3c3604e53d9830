"""Per-step cost of each transport to the accelerator, against the in-process accelerator.

Same model, same batch, same settings; only `accelerator` changes:
  in-process   the Accelerator is an object in the trusted process (no boundary in the OS sense)
  process      a private worker process on a unix socket (accelerator="process[:DEVICE]")
  tcp          a `legrace worker` process over TCP on 127.0.0.1 (accelerator="tcp://...")
One training step = zero_grad, forward, loss, backward, SGD step; medians of --steps steps.
Also the link itself: round-trip time of an empty request (Free of nothing) and the rate at
which a 64 MB SetWeight goes through (encode, send, receive, decode, answer).

    .venv/bin/python benchmarks/transports.py [--steps 10] [--device cpu]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from bench_common import add_process_arguments, apply_process_arguments, count

from legrace import LegRace
from legrace.boundary.messages import Free, SetWeight
from legrace.data import load_data
from legrace.models import build_model

SECRET = "benchmark-" + os.urandom(8).hex()


def start_worker(device: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "legrace.accelerator.worker", "--listen", "127.0.0.1:0", "--device", device],
                            env=dict(os.environ, LEGRACE_SECRET=SECRET), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    if "listening on" not in line:
        proc.kill()
        raise SystemExit(f"the worker did not start: {line!r}")
    return proc, line.split()[4]


def batch(name: str, size: int, image_size: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    if name == "cnn":
        data = load_data("digits", val_fraction=0.0)
        xs, ys = zip(*(data.train[i] for i in range(size)))
        x, y = torch.stack(xs), torch.stack(ys)
    else:
        x, y = torch.randn(size, 3, image_size, image_size), torch.randint(0, 10, (size,))
    model = build_model(name, num_classes=10, in_channels=x.shape[1], image_size=x.shape[-1])
    return model, x, y


def compare(backends: dict[str, str], model, x, y, steps: int, warmup: int = 2) -> dict[str, dict]:
    """Median step time per backend, steps interleaved so a busy machine slows all alike."""
    engines = {k: LegRace(rank=8, noise_multiplier=1.0, clip=1.0, accelerator=v, secret=SECRET)
               for k, v in backends.items()}
    nets = {k: e.convert(copy.deepcopy(model)) for k, e in engines.items()}
    opts = {k: torch.optim.SGD(net.parameters(), lr=0.01) for k, net in nets.items()}
    times = {k: [] for k in engines}
    traffic = {}
    for i in range(warmup + steps):
        for k, engine in engines.items():
            if i == warmup:
                traffic[k] = (engine.boundary.crossings, engine.boundary.bytes_out + engine.boundary.bytes_in)
            t0 = time.perf_counter()
            opts[k].zero_grad(set_to_none=True)
            with engine.unaccounted():  # synthetic inputs
                F.cross_entropy(nets[k](x), y).backward()
            opts[k].step()
            times[k].append(time.perf_counter() - t0)
    results = {}
    for k, engine in engines.items():
        b, (crossings, nbytes) = engine.boundary, traffic[k]
        results[k] = {"ms": 1000 * statistics.median(times[k][warmup:]), "round_trips": (b.crossings - crossings) / steps,
                      "mb": (b.bytes_out + b.bytes_in - nbytes) / steps / 1e6}
        engine.close()
    return results


def link(accelerator: str, model) -> tuple[float, float]:
    """(microseconds per empty round trip, GB/s of a 64 MB message) over one transport."""
    engine = LegRace(rank=8, noise_multiplier=1.0, clip=1.0, accelerator=accelerator, secret=SECRET)
    engine.convert(copy.deepcopy(model))
    transport, big = engine.boundary.transport, torch.randn(16 << 20)
    trips = []
    for _ in range(200):
        t0 = time.perf_counter()
        transport.request(Free(()))
        trips.append(time.perf_counter() - t0)
    sends = []
    for _ in range(5):
        t0 = time.perf_counter()
        transport.request(SetWeight(0, big))
        sends.append(time.perf_counter() - t0)
    engine.close()
    return 1e6 * statistics.median(trips), big.numel() * 4 / statistics.median(sends) / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=count, default=10)
    p.add_argument("--device", default="cpu", help="the accelerator's device (all three backends)")
    add_process_arguments(p)
    args = p.parse_args()
    apply_process_arguments(args)
    proc, address = start_worker(args.device)
    backends = {"in-process": args.device, "process": f"process:{args.device}", "tcp": address}
    configs = [("cnn", 64, 8), ("vgg11", 16, 32)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads per process, accelerator device "
          f"{args.device}; median of {args.steps} training steps")
    try:
        cnn = batch("cnn", 1, 8)[0]
        for k, v in backends.items():
            us, rate = link(v, cnn)
            print(f"link {k}: {us:.0f} us per empty round trip" + ("" if k == "in-process" else
                  f", a 64 MB message at {rate:.2f} GB/s"))
        print(f"{'model':<8}{'batch':>6}{'in-process ms':>15}{'process ms':>18}{'tcp ms':>18}{'MB/step':>10}"
              f"{'trips/step':>12}")
        for name, size, image in configs:
            model, x, y = batch(name, size, image)
            r = compare(backends, model, x, y, args.steps)
            base = r["in-process"]["ms"]
            cells = [f"{r[k]['ms']:8.1f} ({r[k]['ms'] / base - 1:+.0%})" for k in ("process", "tcp")]
            print(f"{name:<8}{size:>6}{base:>15.1f}{cells[0]:>18}{cells[1]:>18}{r['tcp']['mb']:>10.1f}"
                  f"{r['tcp']['round_trips']:>12.0f}")
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()
