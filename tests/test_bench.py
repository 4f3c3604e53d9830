"""A tiny benchmark run: the command works end to end (no timing is asserted)."""

import json

from legrace.cli import main


def test_bench_smoke(tmp_path):
    out = tmp_path / "bench"
    assert main(["bench", "--model", "cnn", "--input-size", "16", "--batch-size", "2", "--repeats", "1",
                 "--warmup", "0", "--modes", "tee_only,legrace,dp_only,lowrank_only,gpu_only", "--out", str(out)]) == 0
    report = json.loads((out / "bench.json").read_text())
    modes = {m["mode"]: m for m in report["modes"]}
    assert set(modes) == {"tee_only", "legrace", "dp_only", "lowrank_only", "gpu_only"}
    assert modes["legrace"]["trusted_macs"] < modes["tee_only"]["trusted_macs"]
    assert modes["legrace"]["accelerator_macs"] > 0 and modes["tee_only"]["accelerator_macs"] == 0
    assert modes["gpu_only"]["trusted_macs"] == 0
    assert 0 < modes["legrace"]["trusted_saved_bytes"] < modes["tee_only"]["trusted_saved_bytes"]
    assert len(modes["legrace"]["layers"]) == 3
    assert "tee_only_step / legrace_trusted" in report["ratios"]
    assert (out / "step_times.png").stat().st_size > 1000 and (out / "layers_legrace.png").exists()
