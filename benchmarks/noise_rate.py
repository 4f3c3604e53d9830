"""How fast the trusted side draws Gaussian noise, against how many threads draw it.

Drawing the noise is one of the largest pieces of the trusted side's work (profile_trusted.py),
and in that profile on a 16-core GPU host it took as long as on 2 cores. This times the drawing
alone, side by side in one run, for one buffer of --values float32 values (medians of --repeats,
after one warm-up that starts the threads and fills the allocator's caches):
  - legrace's GaussianStreams on 1, 2, 4, ... threads, into pageable and, where CUDA is present,
    page-locked memory (as the mechanism draws for an in-process GPU), with legrace.trusted.gaussian's
    ziggurat (the default) and with torch's normal_ (one Mersenne Twister per thread; what legrace
    drew with before, and still does without numba);
  - the page-locked allocation alone (the CUDA host allocator caches freed blocks);
  - a fill and a copy of the same buffer on torch's threads: the memory-bandwidth floor.

    python benchmarks/noise_rate.py --values 25690112 --out noise_rate.json
"""

from __future__ import annotations

import argparse
import functools

import torch

from bench_common import add_process_arguments, apply_process_arguments, count, median_seconds, write_results

from legrace.trusted.mechanism import GaussianStreams


def generator_counts(threads: int) -> list[int]:
    counts, n = [], 1
    while n < threads:
        counts.append(n)
        n *= 2
    return counts + [threads]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--values", type=count, default=25_690_112, help="values per buffer (default: one 8x64x224x224 map)")
    p.add_argument("--repeats", type=count, default=5)
    p.add_argument("--out", default=None, help="also write the results to this JSON file")
    add_process_arguments(p)
    args = p.parse_args()
    apply_process_arguments(args)
    threads = torch.get_num_threads()
    shape = torch.Size((args.values,))
    pinned_options = [False, True] if torch.cuda.is_available() else [False]

    rows = []

    def record(name: str, seconds: float, **extra: object) -> None:
        rows.append({"work": name, "seconds": seconds, "ns_per_value": seconds / args.values * 1e9, **extra})
        print(f"{name:<42} {seconds * 1e3:8.1f} ms  {seconds / args.values * 1e9:6.2f} ns/value", flush=True)

    print(f"{args.values} float32 values, {threads} torch threads, medians of {args.repeats}")
    buffer = torch.empty(shape)
    record("fill (torch threads)", median_seconds(lambda: buffer.fill_(1.0), args.repeats))
    record("copy (torch threads)", median_seconds(functools.partial(buffer.copy_, torch.ones(shape)), args.repeats))
    if torch.cuda.is_available():
        record("page-locked allocation", median_seconds(lambda: torch.empty(shape, pin_memory=True), args.repeats))
    for sampler in ("ziggurat", "torch"):
        for pinned in pinned_options:
            for n in generator_counts(threads):
                streams = GaussianStreams(n, seed=0, sampler=sampler)
                seconds = median_seconds(lambda: streams.normal(shape, torch.float32, 1.0, pinned), args.repeats)
                streams.close()
                record(f"{sampler}, {n} thread{'s' if n > 1 else ''}{', page-locked' if pinned else ''}", seconds,
                       sampler=sampler, generators=n, pinned=pinned)
    if args.out:
        write_results(args.out, "cuda" if torch.cuda.is_available() else "cpu",
                      [{"values": args.values, "repeats": args.repeats, "rows": rows}])


if __name__ == "__main__":
    main()
