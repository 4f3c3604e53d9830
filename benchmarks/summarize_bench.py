"""One markdown table of every bench.json under a folder (the closing-note table of issue 4).

The ratios against TEE-only are the report's own: against the faster of the TEE-only runs for
time (legrace's tee_only or plain PyTorch in channels_last), the leaner for memory."""

import json
import sys
from pathlib import Path


def main(folder: str) -> None:
    rows = []
    found = sorted(Path(folder).glob("*/bench.json"))
    if not found:
        raise SystemExit(f"no bench runs to summarise: {folder!r} holds no */bench.json")
    for f in found:
        r = json.loads(f.read_text())
        modes = {m["mode"]: m for m in r["modes"]}
        tee, leg, gpu = modes.get("tee_only"), modes.get("legrace"), modes.get("gpu_only")
        tee_cl = modes.get("tee_only_channels_last")
        ratio = r["ratios"]
        rows.append([
            f.parent.name, f"{r['model']} {'train' if r['train'] else 'infer'}", str(r["batch_size"]),
            f"{tee['step_seconds']:.3f}" if tee else "",
            f"{tee_cl['step_seconds']:.3f}" if tee_cl else "",
            f"{leg['step_seconds']:.3f}" if leg else "", f"{leg['trusted_seconds']:.3f}" if leg else "",
            f"{gpu['step_seconds']:.4f}" if gpu else "",
            f"{ratio.get('tee_only_step / legrace_trusted', float('nan')):.2f}",
            f"{ratio.get('tee_only_step / legrace_step', float('nan')):.2f}",
            f"{ratio.get('legrace_step / gpu_only_step', float('nan')):.2f}",
            f"{ratio.get('tee_only_macs / legrace_trusted_macs', float('nan')):.1f}",
            f"{ratio.get('tee_only_memory / legrace_trusted_memory', float('nan')):.1f}",
            {True: "on", False: "off"}.get(r.get("overlap"), ""),
            str(r.get("threads", "")),
        ])
        machine = f"{r.get('cpu', '?')}, torch {r['torch']}, accelerator {r['accelerator']}"
    head = ["run", "model", "batch", "tee_only step s", "tee_only_channels_last step s", "legrace step s",
            "legrace trusted s", "gpu_only step s",
            "tee / legrace trusted", "tee / legrace step", "legrace / gpu_only step", "tee / legrace trusted MACs",
            "tee / legrace trusted memory", "overlap", "threads"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    if rows:
        print(f"\nmachine: {machine}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/cpu-bench")
