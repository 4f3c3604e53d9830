"""A tiny benchmark run: the command works end to end (no timing is asserted)."""

import json
import os
import sys

import numpy as np
import pytest
import torch

import legrace.trusted.kernels
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
    # the first conv's 3 channels are covered by R = 8: it stays inside, so legrace's accelerator
    # does less than dp_only's, which gets every conv (and, outputs rebuilt, each Y_res twice)
    assert 0 < modes["legrace"]["accelerator_macs"] < modes["dp_only"]["accelerator_macs"]
    assert 0 < modes["legrace"]["trusted_saved_bytes"] < modes["tee_only"]["trusted_saved_bytes"]
    assert len(modes["legrace"]["layers"]) == 3
    assert "tee_only_step / legrace_trusted" in report["ratios"]
    assert (out / "step_times.png").stat().st_size > 1000 and (out / "layers_legrace.png").exists()
    if sys.platform.startswith("linux"):  # each mode's page faults per step, as the OS counts them
        assert all(isinstance(m["minor_page_faults"], int) and m["minor_page_faults"] >= 0 for m in modes.values())


def test_page_faults_count_first_touches_of_fresh_memory():
    import mmap

    from legrace.bench.runner import minor_faults

    if minor_faults() is None:
        pytest.skip("this OS does not count page faults")
    size = 64 << 20
    fresh = mmap.mmap(-1, size)
    before = minor_faults()
    for offset in range(0, size, 4096):
        fresh[offset] = 1
    assert minor_faults() - before >= size // (2 << 20)  # one per page, or per 2 MiB huge page at least
    fresh.close()


def test_ratios_use_the_fastest_tee_only_for_time_and_the_leanest_for_memory(tmp_path, capsys):
    from legrace.bench.runner import _ratios, _tee_baselines

    def run(mode, step, trusted, saved):
        return {"mode": mode, "step_seconds": step, "trusted_seconds": trusted, "trusted_macs": 100,
                "trusted_saved_bytes": saved, "noise_thread_seconds": 0.0}

    results = [run("tee_only", 10.0, 10.0, 100), run("tee_only_channels_last", 8.0, 8.0, 400),
               run("legrace", 4.0, 2.0, 10)]
    assert _tee_baselines(results) == {"time": "tee_only_channels_last", "memory": "tee_only"}
    ratios = _ratios(results)
    assert ratios["tee_only_step / legrace_trusted"] == 4.0 and ratios["tee_only_step / legrace_step"] == 2.0
    assert ratios["tee_only_memory / legrace_trusted_memory"] == 10.0
    assert _tee_baselines(results[::-1][:2]) == {"time": "tee_only_channels_last", "memory": "tee_only_channels_last"}

    out = tmp_path / "bench"
    assert main(["bench", "--model", "cnn", "--input-size", "16", "--batch-size", "2", "--repeats", "1",
                 "--warmup", "0", "--modes", "tee_only,tee_only_channels_last,legrace", "--out", str(out)]) == 0
    report = json.loads((out / "bench.json").read_text())
    modes = {m["mode"]: m for m in report["modes"]}
    assert modes["tee_only_channels_last"]["trusted_macs"] == modes["tee_only"]["trusted_macs"]
    assert modes["tee_only_channels_last"]["accelerator_macs"] == 0
    # plain PyTorch keeps whole ReLU outputs where legrace's tee_only keeps bit-packed masks
    assert modes["tee_only_channels_last"]["trusted_saved_bytes"] > modes["tee_only"]["trusted_saved_bytes"]
    assert report["tee_only_baselines"]["memory"] == "tee_only"
    assert main(["bench", "--modes", "tee_only,fast", "--out", str(tmp_path / "x")]) != 0
    assert "unknown mode(s) ['fast']" in capsys.readouterr().err


@pytest.mark.parametrize("settle,planned,rounds,settled", [
    # tee_only, legrace per round: legrace's heap settles in the third round, before the settle cap
    (4, [5000, 5000, 0, 3000, 0, 10], 3, True),
    # still faulting when the cap is reached: the rounds stop there and the report says so
    (1, [5000, 5000, 0, 3000], 2, False),
    # --settle-rounds 0: --warmup alone, as before
    (0, [5000, 5000], 1, False),
])
def test_bench_warms_up_until_no_mode_faults_fresh_pages(monkeypatch, tmp_path, capsys, settle, planned, rounds,
                                                          settled):
    # modes sharing a process grew the kept heap for 1-3 rounds (VGG-16's legrace: 100 thousand pages a
    # step), and the medians of 3 timed steps sometimes held them
    from legrace.bench import runner as bench

    faults = {"total": 0, "calls": 0, "planned": list(planned)}

    def minor_faults():  # each step reads it before and after: the plan's next count lands in between
        faults["calls"] += 1
        if faults["calls"] % 2 == 0 and faults["planned"]:
            faults["total"] += faults["planned"].pop(0)
        return faults["total"]

    monkeypatch.setattr(bench, "minor_faults", minor_faults)
    out = tmp_path / "bench"
    assert main(["bench", "--model", "cnn", "--input-size", "16", "--batch-size", "2", "--repeats", "1",
                 "--warmup", "1", "--settle-rounds", str(settle), "--modes", "tee_only,legrace",
                 "--out", str(out)]) == 0
    report = json.loads((out / "bench.json").read_text())
    assert report["warmup_rounds"] == rounds and report["heap_settled"] is settled
    modes = {m["mode"]: m for m in report["modes"]}
    assert modes["tee_only"]["warmup_page_faults"] == planned[0::2]
    assert modes["legrace"]["warmup_page_faults"] == planned[1::2]
    assert modes["legrace"]["step_page_faults"] == [0] and modes["legrace"]["minor_page_faults"] == 0
    log = capsys.readouterr().out
    assert (f"warm-up: {rounds} rounds" in log) == (rounds > 1)
    assert ("still faulting" in log) == (rounds > 1 and not settled)


def test_bench_without_warmup_does_not_settle(tmp_path):
    out = tmp_path / "bench"
    assert main(["bench", "--model", "cnn", "--input-size", "16", "--batch-size", "2", "--repeats", "1",
                 "--warmup", "0", "--modes", "tee_only", "--out", str(out)]) == 0
    report = json.loads((out / "bench.json").read_text())
    assert report["warmup_rounds"] == 0 and report["heap_settled"] is None
    assert report["modes"][0]["warmup_page_faults"] == []


def test_summary_table_of_bench_runs(tmp_path, capsys):
    import runpy
    from pathlib import Path

    out = tmp_path / "runs" / "cnn-train"
    assert main(["bench", "--model", "cnn", "--input-size", "16", "--batch-size", "2", "--repeats", "1",
                 "--warmup", "0", "--modes", "tee_only,legrace", "--out", str(out)]) == 0
    report = json.loads((out / "bench.json").read_text())
    assert report["modes"][1]["noise_thread_seconds"] == 0.0 and "cpu" in report and "glibc_tunables" in report
    glibc = sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION") is not None
    assert report["heap_kept"] in (("mallopt", "GLIBC_TUNABLES") if glibc else (None,))  # the CLI kept it
    capsys.readouterr()
    script = Path(__file__).parents[1] / "benchmarks" / "summarize_bench.py"
    runpy.run_path(str(script), run_name="not_main")["main"](str(tmp_path / "runs"))
    table = capsys.readouterr().out
    ratio = report["ratios"]["tee_only_step / legrace_trusted"]
    assert f"| cnn train | 2 | {report['modes'][0]['step_seconds']:.3f} |" in table and f"{ratio:.2f}" in table
    assert "nan" not in table  # no gpu_only run: its ratio's cell is empty
    # the cnn has no time target; its memory is checked against the 1/8 target
    memory = report["ratios"]["tee_only_memory / legrace_trusted_memory"]
    met = "yes" if memory >= 8 else "no"
    assert f"| cnn-train | TEE-only memory / trusted memory >= 8x | {memory:.2f}x | {met} |" in table
    assert "trusted time >=" not in table
    with pytest.raises(SystemExit, match="holds no \\*/bench.json"):  # a wrong folder is said, not an empty table
        runpy.run_path(str(script), run_name="not_main")["main"](str(tmp_path / "nothing"))


def test_summary_says_how_many_warm_up_rounds_a_run_took():
    import runpy
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "summarize_bench.py"
    cell = runpy.run_path(str(script), run_name="not_main")["_warmup_cell"]
    assert cell({}) == ""  # a run from before bench counted them
    assert cell({"warmup_rounds": 3, "heap_settled": True}) == "3"
    assert cell({"warmup_rounds": 5, "heap_settled": False}) == "5 (heap still growing)"


def test_target_check_of_a_gpu_run():
    import runpy
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "summarize_bench.py"
    rows = runpy.run_path(str(script), run_name="not_main")["target_rows"]
    ratios = {"tee_only_step / legrace_trusted": 16.0, "tee_only_memory / legrace_trusted_memory": 7.9,
              "tee_only_step / legrace_step": 15.0, "legrace_step / gpu_only_step": 5.5}
    gpu_run = {"model": "vgg16", "train": True, "ratios": ratios, "accelerator": "cuda"}
    got = {row[1]: (row[2], row[3]) for row in rows("vgg16-train", gpu_run)}
    assert got == {"TEE-only step / trusted time >= 15x": ("16.00x", "yes"),
                   "TEE-only memory / trusted memory >= 8x": ("7.90x", "no"),
                   "TEE-only step / legrace step >= 15x": ("15.00x", "yes"),
                   "legrace step / GPU-only step <= 5x": ("5.50x", "no")}
    inference = rows("vgg19-infer", {"model": "vgg19", "train": False, "ratios": ratios, "accelerator": "process:cuda"})
    assert [row[1:] for row in inference] == [["inference: TEE-only step / legrace step (paper: 11.2x)", "15.00x", "yes",
                                               ""]]
    # gpu_only timed on the CPU (the default --modes without a GPU) is no GPU run: its targets are not checked
    cpu_run = {"model": "vgg16", "train": True, "ratios": ratios, "accelerator": "cpu"}
    assert [row[1] for row in rows("vgg16-train", cpu_run)] == ["TEE-only step / trusted time >= 15x",
                                                                "TEE-only memory / trusted memory >= 8x"]
    resnet = rows("r", {"model": "resnet34", "train": True, "ratios": {"tee_only_step / legrace_trusted": 9.99}})
    assert [row[1:] for row in resnet] == [["TEE-only step / trusted time >= 10x", "9.99x", "no", ""]]
    # with shared_work.py's cap for the run: shown beside every TEE-only time ratio, not beside memory or GPU-only
    capped = {row[1]: row[4] for row in rows("vgg16-train", gpu_run, 4.34)}
    assert capped == {"TEE-only step / trusted time >= 15x": "4.3x", "TEE-only memory / trusted memory >= 8x": "",
                      "TEE-only step / legrace step >= 15x": "4.3x", "legrace step / GPU-only step <= 5x": ""}


def test_summary_finds_shared_work_caps_of_the_same_setting(tmp_path):
    import runpy
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "summarize_bench.py"
    caps = runpy.run_path(str(script), run_name="not_main")["shared_work_caps"]
    result = {"model": "vgg16", "train": True, "input_size": 224, "batch_size": 32, "threads": 16, "bound": 5.4,
              "shared_seconds": 0.6}
    (tmp_path / "shared_work_vgg16.json").write_text(json.dumps({"results": [{**result, "bound_fastest": 4.3}]}))
    (tmp_path / "shared_work_old.json").write_text(json.dumps({"results": [{**result, "model": "vgg19"}]}))
    (tmp_path / "transfers.json").write_text(json.dumps({"results": [{"bytes": 1}]}))  # another kind of result
    (tmp_path / "noise_rate.json").write_text(json.dumps([1, 2]))  # not a results file
    (tmp_path / "broken.json").write_text("{")
    (tmp_path / "shared_work_before.json").write_text(json.dumps({"results": [{"model": "vgg16", "shared_seconds": 1.0,
                                                                              "bound": 9.0}]}))  # no setting: skipped
    (tmp_path / "empty.json").write_text(json.dumps({"results": None}))
    assert caps(tmp_path) == {("vgg16", True, 224, 32, 16): 4.3, ("vgg19", True, 224, 32, 16): 5.4}


def test_bench_keeps_conv_outputs_when_told(tmp_path):
    reports = {}
    for flag in ("--rebuild-outputs", "--no-rebuild-outputs"):
        out = tmp_path / flag
        assert main(["bench", "--model", "resnet18", "--input-size", "8", "--batch-size", "2", "--repeats", "1",
                     "--warmup", "0", "--modes", "legrace", flag, "--out", str(out)]) == 0
        reports[flag] = json.loads((out / "bench.json").read_text())
        assert reports[flag]["rebuild_outputs"] is (flag == "--rebuild-outputs")
    rebuilt, kept = (reports[f]["modes"][0] for f in ("--rebuild-outputs", "--no-rebuild-outputs"))
    # kept: each BatchNorm's input is held for backward; rebuilt: one more low-rank conv each instead
    assert kept["trusted_saved_bytes"] > 2 * rebuilt["trusted_saved_bytes"]
    assert kept["trusted_macs"] < rebuilt["trusted_macs"]


def test_bench_with_overlap_times_the_accelerator_on_its_own_thread_and_over_a_worker(tmp_path):
    for accelerator, flag in (("cpu", "--overlap"), ("process", "--no-overlap"), ("process", "--overlap")):
        out = tmp_path / f"{accelerator}{flag}"
        assert main(["bench", "--model", "cnn", "--input-size", "16", "--batch-size", "2", "--repeats", "1",
                     "--warmup", "0", "--modes", "legrace", "--accelerator", accelerator, flag, "--out", str(out)]) == 0
        report = json.loads((out / "bench.json").read_text())
        legrace = report["modes"][0]
        assert report["overlap"] is (flag == "--overlap")
        assert legrace["accelerator_seconds"] > 0 and 0 < legrace["trusted_seconds"] <= legrace["step_seconds"]
        assert len(legrace["layers"]) == 3


@pytest.mark.parametrize("rank,sending", [(2, 3), (3, 2)])  # R = 3 covers the first conv's channels
def test_micro_batch_experiment_computes_the_same_outputs(monkeypatch, rank, sending):
    import copy
    from pathlib import Path

    import torch

    from legrace import LegRace
    from legrace.models import SmallCNN

    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))
    import micro_batches

    engine = LegRace(rank=rank, clip=1e6, noise_multiplier=0.0, overlap=True)  # no noise, no clipping: comparable
    model = engine.convert(copy.deepcopy(SmallCNN(3, 4))).eval()
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        whole = model(x)
        with micro_batches.micro_batches(3):
            cut = model(x)
        sent_before = engine.boundary.crossings
        with micro_batches.micro_batches(3):
            model(x)
    engine.close()
    torch.testing.assert_close(cut, whole, rtol=1e-5, atol=1e-5)
    assert engine.boundary.crossings - sent_before == sending * (3 + 1)  # per conv that sends: W, 3 requests


@pytest.mark.parametrize("infer", [False, True])
def test_trusted_profile_runs_and_accounts_for_the_step(monkeypatch, capsys, infer):
    import re
    import runpy
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "profile_trusted.py"
    monkeypatch.syspath_prepend(str(script.parent))
    monkeypatch.setattr(sys, "argv", ["profile_trusted.py", "--model", "cnn", "--input-size", "16",
                                      "--batch-size", "2", "--steps", "2", "--replay", "2"] + ["--infer"] * infer)
    import legrace.trusted.split_conv

    decompose = legrace.trusted.split_conv.decompose
    runpy.run_path(str(script), run_name="not_main")["main"]()
    assert legrace.trusted.split_conv.decompose is decompose  # the timers are taken off again
    out = capsys.readouterr().out
    assert "trusted side" in out and "decomposition" in out and "noise and clipping" in out
    assert ("inference" if infer else "training") in out
    assert ("ReLU backward" in out) != infer  # inference keeps no masks: no backward to time
    # --replay: the last step's calls timed again outside it, on its inputs and on fresh copies
    replayed = out.split("replayed outside the step")[1]
    rows = {line.split("ms")[1].split("  ")[-1].strip(): [float(v) for v in line.split("ms")[0].split()]
            for line in replayed.splitlines() if line.endswith(("decomposition", "conv", "gradient"))}
    assert set(rows) == {"decomposition", "low-rank conv", "low-rank weight gradient"}
    assert all(v > 0 for v in rows["low-rank conv"])
    assert (rows["low-rank weight gradient"] == [0.0, 0.0, 0.0]) == infer
    assert re.search(r"minor page faults per step: \d+", out)


def test_keep_outputs_script_trades_memory_for_rebuilds(monkeypatch, capsys, tmp_path):
    import runpy
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "keep_outputs.py"
    monkeypatch.syspath_prepend(str(script.parent))
    monkeypatch.setattr(sys, "argv", ["keep_outputs.py", "--model", "resnet18", "--input-size", "8", "--batch-size",
                                      "2", "--steps", "1", "--budgets", "0,all", "--out", str(tmp_path / "k.json")])
    runpy.run_path(str(script), run_name="not_main")["main"]()
    rows = {r["budget_mib"]: r for r in json.loads((tmp_path / "k.json").read_text())["results"]}
    assert rows["all"]["trusted_saved_mib"] > 2 * rows["0"]["trusted_saved_mib"]
    assert rows["all"]["trusted_macs"] < rows["0"]["trusted_macs"]  # no output rebuilt
    assert "keep   all MiB: trusted" in capsys.readouterr().out
    for bad in ("0,-1", "some", "0,nan", "inf"):
        monkeypatch.setattr(sys, "argv", ["keep_outputs.py", "--budgets", bad])
        with pytest.raises(SystemExit):
            runpy.run_path(str(script), run_name="not_main")["main"]()
        assert "a budget must be a number of MiB >= 0, got" in capsys.readouterr().err


def test_bench_threads_apply_to_every_mode_and_bad_counts_are_refused(tmp_path, capsys):
    before = torch.get_num_threads()
    try:
        out = tmp_path / "bench"
        assert main(["bench", "--model", "cnn", "--input-size", "16", "--batch-size", "2", "--repeats", "1",
                     "--warmup", "0", "--modes", "tee_only,legrace", "--threads", "1", "--out", str(out)]) == 0
        report = json.loads((out / "bench.json").read_text())
        assert report["threads"] == 1 and report["fused_kernels"] == legrace.trusted.kernels.usable(np.float32)
        assert report["omp_wait_policy"] == os.environ.get("OMP_WAIT_POLICY")
        assert report["gomp_spincount"] == os.environ.get("GOMP_SPINCOUNT")
    finally:
        torch.set_num_threads(before)
    with pytest.raises(SystemExit) as stop:  # refused by argparse, before any model is built
        main(["bench", "--model", "cnn", "--threads", "0", "--out", str(tmp_path / "x")])
    assert stop.value.code == 2 and "--threads: must be > 0, got 0" in capsys.readouterr().err



@pytest.mark.parametrize("args,message", [
    (["--batch-size", "0"], "--batch-size: must be > 0, got 0"),
    (["--repeats", "0"], "--repeats: must be > 0, got 0"),
    (["--warmup", "-1"], "warm-up steps must be at least 0, got -1"),
    (["--settle-rounds", "-1"], "settle rounds must be at least 0, got -1"),
    (["--modes", "tee_only,legrace,tee_only"], "['tee_only'] listed more than once"),
    (["--modes", " , "], "no modes to time"),
    (["--power-iters", "0"], "power_iters must be an int >= 1, got 0"),
    (["--noise-ahead", "-2"], "noise_ahead must be an int >= 0, got -2"),
])
def test_bench_refuses_settings_that_would_time_nothing_or_something_else(tmp_path, capsys, args, message):
    out = tmp_path / "bench"
    try:  # counts are refused by argparse (exit 2), the rest by the command (returns 2)
        code = main(["bench", "--model", "cnn", "--input-size", "16", "--modes", "tee_only,legrace", *args,
                     "--out", str(out)])
    except SystemExit as stop:
        code = stop.code
    assert code == 2 and message in capsys.readouterr().err
    assert not out.exists()  # refused before the output folder was made


def test_bench_refuses_a_bad_output_folder_before_it_times_anything(tmp_path, capsys, monkeypatch):
    import legrace.bench.runner as bench

    def no_timing(*args, **kwargs):
        raise AssertionError("ran a step before checking --out")

    monkeypatch.setattr(bench.ModeRun, "step", no_timing)
    monkeypatch.setattr(bench.ModeRun, "timed_step", no_timing)
    afile = tmp_path / "a-file"
    afile.write_text("kept")
    for out, message in ((afile, "is a file"), (afile / "below", "cannot write in the output folder"),
                         ("", "the output folder is empty")):  # "" is refused, not taken as the working folder
        assert main(["bench", "--model", "cnn", "--input-size", "16", "--modes", "tee_only", "--out", str(out)]) == 2
        assert message in capsys.readouterr().err
    assert afile.read_text() == "kept"

    def read_only(**kwargs):  # a folder that exists but this user may not write in (root may write anywhere)
        raise PermissionError(13, "Permission denied")

    import legrace.outputs

    monkeypatch.setattr(legrace.outputs.tempfile, "NamedTemporaryFile", read_only)
    assert main(["bench", "--model", "cnn", "--input-size", "16", "--modes", "tee_only", "--out", str(tmp_path)]) == 2
    assert "cannot write in the output folder" in capsys.readouterr().err


def test_busy_thread_experiment_times_each_thread_count_alone_and_beside_a_busy_thread(tmp_path, monkeypatch):
    import runpy
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "busy_thread.py"
    monkeypatch.syspath_prepend(str(script.parent))
    out = tmp_path / "busy.json"
    monkeypatch.setattr(sys, "argv", ["busy_thread.py", "--model", "cnn", "--input-size", "8", "--batch-size", "2",
                                      "--steps", "1", "--out", str(out)])
    before = torch.get_num_threads()
    try:
        runpy.run_path(str(script), run_name="not_main")["main"]()
    finally:
        torch.set_num_threads(before)
    report = json.loads(out.read_text())
    threads = [r["torch_threads"] for r in report["rows"]]
    assert threads[0] == report["cores"] and threads == sorted(set(threads), reverse=True)
    assert all(r["alone_seconds"] > 0 and r["busy_seconds"] > 0 for r in report["rows"])


def test_noise_ceiling_times_the_noise_of_the_released_shapes(monkeypatch, capsys, tmp_path):
    import runpy
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "noise_ceiling.py"
    monkeypatch.syspath_prepend(str(script.parent))
    out = tmp_path / "ceiling.json"
    monkeypatch.setattr(sys, "argv", ["noise_ceiling.py", "--model", "cnn", "--input-size", "16",
                                      "--batch-size", "3", "--steps", "1", "--out", str(out)])
    runpy.run_path(str(script), run_name="not_main")["main"]()
    (result,) = json.loads(out.read_text())["results"]
    # every conv but the silent first releases a residual the size of its input
    from legrace.models import build_model

    sizes = []
    model = build_model("cnn", num_classes=10, image_size=16)
    for conv in [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)][1:]:
        conv.register_forward_hook(lambda m, inputs, output: sizes.append(inputs[0].numel()))
    model(torch.randn(3, 3, 16, 16))
    assert result["releases"] == len(sizes) == 2 and result["noise_values"] == sum(sizes)
    assert result["ceiling"] == result["tee_only_step_seconds"] / result["noise_seconds"]
    assert result["torch_sampler_ceiling"] == result["tee_only_step_seconds"] / result["torch_sampler_noise_seconds"]
    assert "ceiling on TEE-only" in capsys.readouterr().out


def test_noise_rate_times_each_sampler_and_thread_count_and_refuses_bad_sizes(monkeypatch, capsys, tmp_path):
    import runpy
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "noise_rate.py"
    monkeypatch.syspath_prepend(str(script.parent))
    out = tmp_path / "rate.json"
    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(sys, "argv", ["noise_rate.py", "--values", "1000", "--repeats", "1",
                                          "--threads", "3", "--out", str(out)])
        runpy.run_path(str(script), run_name="not_main")["main"]()
    finally:
        torch.set_num_threads(before)
    (result,) = json.loads(out.read_text())["results"]
    for sampler in ("ziggurat", "torch"):
        noise = [r for r in result["rows"] if r.get("sampler") == sampler and not r["pinned"]]
        assert [r["generators"] for r in noise] == [1, 2, 3]
    assert all(r["seconds"] > 0 and r["ns_per_value"] == r["seconds"] / 1000 * 1e9 for r in result["rows"])
    monkeypatch.setattr(sys, "argv", ["noise_rate.py", "--values", "0"])
    with pytest.raises(SystemExit):
        runpy.run_path(str(script), run_name="not_main")["main"]()
    assert "--values: must be > 0, got 0" in capsys.readouterr().err


def test_wgrad_scratch_times_both_ways_on_both_threads(monkeypatch, capsys, tmp_path):
    import runpy
    import sys
    from pathlib import Path

    from legrace.trusted import split_conv

    script = Path(__file__).parents[1] / "benchmarks" / "wgrad_scratch.py"
    monkeypatch.syspath_prepend(str(script.parent))
    out = tmp_path / "scratch.json"
    limit = split_conv.GROUPED_CHUNK_BYTES
    monkeypatch.setattr(sys, "argv", ["wgrad_scratch.py", "--batch-size", "2", "--rounds", "1", "--out", str(out)])
    runpy.run_path(str(script), run_name="not_main")["main"]()
    report = json.loads(out.read_text())
    (result,) = report["results"]
    assert report["heap_kept"] in ("mallopt", "GLIBC_TUNABLES", None)  # None: not glibc
    assert split_conv.GROUPED_CHUNK_BYTES == limit == result["chunk_bytes"]  # restored after each call
    assert [(r["N"], r["M"], r["side"]) for r in result["rows"]] == [(64, 64, 224), (64, 128, 112), (128, 128, 112)]
    for row in result["rows"]:
        assert isinstance(row["bit_identical"], bool)  # oneDNN may split the work differently per group count
        for where in ("main thread", "second thread"):
            for way in ("one call", "chunks"):
                assert row[f"{where}, {way} seconds"] > 0 and row[f"{where}, {way} minor faults"] >= 0
    assert capsys.readouterr().out.count("bit-identical") == 6


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
                    reason="compares glibc's malloc settings")
def test_heap_settings_runs_each_setting_in_its_own_process(monkeypatch, capsys, tmp_path):
    import runpy
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "heap_settings.py"
    monkeypatch.syspath_prepend(str(script.parent))
    out = tmp_path / "heap.json"
    monkeypatch.setattr(sys, "argv", ["heap_settings.py", "--model", "cnn", "--input-size", "16", "--batch-size", "4",
                                      "--modes", "tee_only,legrace", "--settings", "kept,trim-2gib",
                                      "--repeats", "1", "--out", str(out)])
    runpy.run_path(str(script), run_name="not_main")["main"]()
    report = json.loads(out.read_text())
    rows = report["results"][0]["rows"]
    assert [r["how_kept"] for r in rows] == ["mallopt", "mallopt, 2 GiB trim threshold"]  # set in each child
    assert report["heap_kept"].startswith("per row")  # not the parent's, which timed nothing
    for row in rows:
        assert row["tee_only step_seconds"] > 0 and row["legrace trusted_seconds"] > 0
        assert row["legrace minor_page_faults"] >= 0 and row["peak_rss_mib"] > 0
    assert "trim-2gib" in capsys.readouterr().out


@pytest.mark.parametrize("argv,kept", [([], True), (["--no-keep-heap"], False), (["--threads", "1"], True)])
def test_benchmark_scripts_keep_the_heap_as_legrace_bench_does_unless_told(monkeypatch, argv, kept):
    # the scripts once needed GLIBC_TUNABLES in the environment to time what `legrace bench` times
    import argparse
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))
    import bench_common

    calls = []
    monkeypatch.setattr(bench_common, "keep_freed_memory", lambda: calls.append(1))
    monkeypatch.setattr(bench_common.torch, "set_num_threads", lambda n: calls.append(("threads", n)))
    monkeypatch.setattr(bench_common.os, "environ", dict(bench_common.os.environ))
    parser = argparse.ArgumentParser()
    bench_common.add_rounds_arguments(parser, rounds=3)
    args = parser.parse_args(argv)
    bench_common.apply_process_arguments(args)
    assert args.rounds == 3 and (1 in calls) == kept
    assert (("threads", 1) in calls) == ("--threads" in argv)


@pytest.mark.parametrize("script,args", [
    ("profile_trusted.py", ["--steps", "0"]), ("profile_trusted.py", ["--batch-size", "0"]),
    ("shared_work.py", ["--steps", "0"]), ("noise_ceiling.py", ["--steps", "-1"]),
    ("overlap.py", ["--steps", "0"]), ("pool_kernels.py", ["--rounds", "0"]),
    ("lowrank_paths.py", ["--repeats", "0"]), ("lowrank_paths.py", ["--models", "vgg16:0:8"]),
    ("busy_thread.py", ["--steps", "x"]), ("transports.py", ["--steps", "0"]), ("verify.py", ["--steps", "0"]),
    ("micro_batches.py", ["--k", "2,0"]), ("exactness.py", ["--sizes", "32,x"]),
    ("keep_outputs.py", ["--steps", "0"]), ("noise_ceiling.py", ["--threads", "0"]),
    ("profile_trusted.py", ["--threads", "-1"]), ("wgrad_scratch.py", ["--rounds", "0"]),
    ("heap_settings.py", ["--rounds", "0"]), ("heap_settings.py", ["--settings", "kept,nope"]),
])
def test_benchmark_scripts_refuse_counts_below_one_before_any_work(monkeypatch, capsys, script, args):
    # --steps 0 once ended in an empty median or a division by zero after the model was built
    import runpy
    import sys
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / script
    monkeypatch.syspath_prepend(str(path.parent))
    import bench_common

    monkeypatch.setattr(bench_common, "build_model", lambda *a, **k: pytest.fail("built a model first"))
    monkeypatch.setattr(sys, "argv", [script, *args])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(path), run_name="not_main")["main"]()
    assert stop.value.code != 0
    said = capsys.readouterr().err + str(stop.value.code)
    assert "must be > 0" in said or "invalid int value" in said or "invalid counts value" in said \
        or "NAME:INPUT_SIZE:BATCH" in said or "no bench.json" in said or "unknown setting" in said


def test_trusted_profile_counts_the_step_less_its_waits_and_needs_cuda_for_cuda(monkeypatch, capsys):
    import re
    import runpy
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "profile_trusted.py"
    monkeypatch.syspath_prepend(str(script.parent))
    # big enough that the accelerator's waits show in the printed milliseconds (at 16x16, batch 2
    # both rounded to the same value once)
    monkeypatch.setattr(sys, "argv", ["profile_trusted.py", "--model", "cnn", "--input-size", "64",
                                      "--batch-size", "8", "--steps", "2"])
    runpy.run_path(str(script), run_name="not_main")["main"]()
    step, trusted = map(float, re.search(r"step ([\d.]+) s, trusted side ([\d.]+) s", capsys.readouterr().out).groups())
    assert 0 < trusted < step  # the CPU accelerator's convs are waits, not trusted work
    if not torch.cuda.is_available():
        monkeypatch.setattr(sys, "argv", ["profile_trusted.py", "--accelerator", "cuda"])
        with pytest.raises(SystemExit, match="no CUDA GPU"):
            runpy.run_path(str(script), run_name="not_main")["main"]()


def test_shared_work_counts_the_first_conv_as_shared_and_bounds_the_ratio(monkeypatch, capsys, tmp_path):
    import runpy
    import sys
    from pathlib import Path
    from types import SimpleNamespace

    script = Path(__file__).parents[1] / "benchmarks" / "shared_work.py"
    monkeypatch.syspath_prepend(str(script.parent))
    module = runpy.run_path(str(script), run_name="not_main")
    image = [4, 3, 16, 16]
    events = [SimpleNamespace(key="aten::mkldnn_convolution", self_cpu_time_total=1e6, input_shapes=[image, [8, 3, 3, 3]]),
              SimpleNamespace(key="aten::convolution_backward", self_cpu_time_total=2e6,
                              input_shapes=[[4, 8, 16, 16], image, [8, 3, 3, 3]]),
              SimpleNamespace(key="aten::mkldnn_convolution", self_cpu_time_total=5e6,
                              input_shapes=[[4, 8, 16, 16], [8, 8, 3, 3]]),
              SimpleNamespace(key="aten::relu", self_cpu_time_total=3e5, input_shapes=[[4, 8, 16, 16]])]
    assert module["split_step"](events, image) == {"split_conv_seconds": 5.0, "shared_seconds": pytest.approx(3.3)}

    out = tmp_path / "shared.json"
    monkeypatch.setattr(sys, "argv", ["shared_work.py", "--model", "cnn", "--input-size", "16", "--batch-size", "3",
                                      "--steps", "1", "--out", str(out)])
    module["main"]()
    (result,) = json.loads(out.read_text())["results"]
    assert result["split_conv_seconds"] > 0 and result["shared_seconds"] > 0
    assert result["profiled_step_seconds"] == pytest.approx(result["split_conv_seconds"] + result["shared_seconds"])
    assert result["bound"] == result["profiled_step_seconds"] / result["shared_seconds"]
    # against the faster TEE-only baseline: its step over the shared work in wall seconds
    fastest = min(result["tee_only_step_seconds"], result["tee_only_channels_last_step_seconds"])
    shared_wall = result["shared_seconds"] * result["tee_only_step_seconds"] / result["profiled_step_seconds"]
    assert result["tee_only_channels_last_step_seconds"] > 0
    assert result["bound_fastest"] == pytest.approx(fastest / shared_wall)
    assert result["train"] and "training" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", sys.argv + ["--infer"])
    module["main"]()
    (result,) = json.loads(out.read_text())["results"]
    assert not result["train"] and "inference" in capsys.readouterr().out and result["bound"] > 1
    assert 0 < result["bound_fastest"] and result["tee_only_channels_last_step_seconds"] > 0

    # of several profiled steps, the loosest cap is kept (a disturbed profile must not tighten it)
    profiles = iter([{"split_conv_seconds": 5.0, "shared_seconds": 1.0}, {"split_conv_seconds": 5.0, "shared_seconds": 0.5},
                     {"split_conv_seconds": 5.0, "shared_seconds": 2.0}])
    monkeypatch.setitem(module["main"].__globals__, "split_step", lambda events, image: next(profiles))
    monkeypatch.setattr(sys, "argv", [a for a in sys.argv if a != "--infer"][:-3] + ["3", "--out", str(out)])
    module["main"]()
    (result,) = json.loads(out.read_text())["results"]
    assert result["profiled_steps"] == 3 and result["bound"] == 11.0 and result["shared_seconds"] == 0.5


def test_macs_of_tee_only_are_those_torch_counts_for_a_step():
    # the first conv's input is the image: autograd computes no dL/dX for it, and the count has none
    from torch.utils.flop_counter import FlopCounterMode

    from legrace.bench.runner import count_macs
    from legrace.models import build_model

    torch.manual_seed(0)
    model = build_model("vgg11", num_classes=10, image_size=32)
    x = torch.randn(1, 3, 32, 32)
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.cross_entropy(model.train()(x), torch.tensor([3])).backward()
    counted = count_macs(model, x, "tee_only", 8, 2, True)["trusted_macs"]
    assert counted == counter.get_total_flops() // 2


@pytest.mark.parametrize("channels", [16, 128])  # through the Gram matrix, and a pass over X per half-iteration
def test_decomposition_macs_are_those_the_light_svd_computes(channels):
    from torch.utils.flop_counter import FlopCounterMode

    from legrace.bench.runner import _decomposition_macs
    from legrace.trusted.decompose import decompose

    x = torch.randn(2, channels, 32, 32)
    with FlopCounterMode(display=False) as counter:
        decompose(x, 4, iters=2)
    # the rest is Cholesky QR's R x R work, a few N·R^2
    assert counter.get_total_flops() // 2 == pytest.approx(2 * _decomposition_macs(channels, 32 * 32, 4, 2), rel=0.03)


def test_bench_refuses_a_keep_budget_that_would_keep_nothing_more(tmp_path, capsys):
    for args, message in ((["--infer"], "--infer has no backward"),
                          (["--no-rebuild-outputs"], "every conv output is kept already")):
        out = tmp_path / args[0]
        assert main(["bench", "--model", "cnn", "--input-size", "16", "--modes", "legrace", "--keep-outputs-mb", "5",
                     *args, "--out", str(out)]) == 2
        assert message in capsys.readouterr().err and not out.exists()


def _counted_step(run, monkeypatch) -> tuple[int, int]:
    """One timed step of `run`, with the MACs torch counts in it: (trusted side, in-process accelerator)."""
    from torch.utils.flop_counter import FlopCounterMode

    from legrace.accelerator.compute import Accelerator

    handle, accelerator = Accelerator.handle, [0]

    def counted(self, message):
        with FlopCounterMode(display=False) as inner:
            reply = handle(self, message)
        accelerator[0] += inner.get_total_flops() // 2
        return reply

    with monkeypatch.context() as patch, FlopCounterMode(display=False) as everything:
        patch.setattr(Accelerator, "handle", counted)
        run.timed_step()
    return everything.get_total_flops() // 2 - accelerator[0], accelerator[0]


@pytest.mark.parametrize("model,size,mode,rank,rebuild,trusted", [
    ("cnn", 16, "legrace", 8, True, None),  # (torch overcounts the grouped low-rank conv's dW)
    ("cnn", 16, "legrace", 8, False, None),  # outputs kept: no Y_res computed again
    ("cnn", 16, "dp_only", 8, True, "exact"),  # R = 0: no decomposition; every conv crosses
    ("cnn", 16, "legrace", 0, True, "exact"),  # --rank 0
    ("cnn", 8, "legrace", 8, True, "approx"),  # the last conv's 2x2 map is covered by R: nothing crosses
    ("resnet18", 8, "legrace", 8, True, None),  # shared releases and 1x1 maps
])
def test_macs_are_what_the_accelerator_and_the_trusted_side_compute(monkeypatch, model, size, mode, rank, rebuild,
                                                                     trusted):
    from legrace.bench.runner import ModeRun
    from legrace.models import build_model

    torch.manual_seed(0)
    run = ModeRun(mode, build_model(model, num_classes=10, image_size=size), torch.randn(2, 3, size, size),
                  torch.randint(0, 10, (2,)), train=True, rank=rank, accelerator="cpu", iters=2,
                  rebuild_outputs=rebuild)
    computed_trusted, computed_accelerator = _counted_step(run, monkeypatch)
    counted = run.result()
    assert counted["accelerator_macs"] == computed_accelerator > 0
    if trusted == "exact":
        assert counted["trusted_macs"] == computed_trusted
    elif trusted == "approx":  # the rest: Cholesky QR's R x R work and A·V where conv(A·V, W) is cheaper
        assert counted["trusted_macs"] == pytest.approx(computed_trusted, rel=0.05)


def test_bench_subtracts_the_time_weights_spend_in_transport_from_the_trusted_time():
    # SetWeight (sent each forward) and hold_weight count as transport time, not trusted work
    import time

    from legrace.bench.runner import ModeRun
    from legrace.boundary.messages import SetWeight
    from legrace.models import build_model

    class SlowWeights:
        def __init__(self, inner):
            self.inner = inner

        def request(self, message, reply_bytes=None):
            if isinstance(message, SetWeight):
                time.sleep(0.05)
            return self.inner.request(message, reply_bytes)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    torch.manual_seed(0)
    run = ModeRun("legrace", build_model("cnn", num_classes=10, image_size=16), torch.randn(2, 3, 16, 16),
                  torch.randint(0, 10, (2,)), train=True, rank=8, accelerator="cpu", iters=2, overlap=False)
    boundary = run.engine.boundary
    boundary.transport = SlowWeights(boundary.transport)
    before = boundary.seconds_waiting
    run.timed_step()
    waited = run.steps[-1] - run.trusted[-1]
    assert waited == pytest.approx(boundary.seconds_waiting - before) and waited >= 2 * 0.05  # two convs send
    layers = run.layers[-1]
    assert sum(v for (_, kind), v in layers.items() if kind.startswith("wait")) == pytest.approx(waited)
    for point in (1, 2):  # each layer's wait is within its own time: its trusted share stays >= 0
        assert 0.05 <= layers[point, "wait_fwd"] <= layers[point, "total_fwd"]
    assert all(layer["trusted_seconds"] >= 0 for layer in run.result()["layers"])


def test_layer_observers_hear_each_split_conv_until_removed():
    import torch.nn.functional as F

    from legrace import LegRace
    from legrace.models import build_model
    from legrace.trusted.split_conv import SplitConv2d, observe_layers

    torch.manual_seed(0)
    engine = LegRace(mode="legrace", rank=8, clip=None, noise_multiplier=0, rebuild_outputs=True, overlap=False)
    net = engine.convert(build_model("cnn", num_classes=10, image_size=16))
    x, y = torch.randn(2, 3, 16, 16), torch.randint(0, 10, (2,))
    plain = F.cross_entropy(net(x), y)
    events = []
    handle = observe_layers(net, lambda *event: events.append(event))
    assert torch.equal(F.cross_entropy(net(x), y), plain)  # observing changes nothing computed
    F.cross_entropy(net(x), y).backward()
    points = {m.point for m in net.modules() if isinstance(m, SplitConv2d)}
    crossing = {m.point for m in net.modules() if isinstance(m, SplitConv2d) and m.sends_at((16, 16))}
    assert {(p, phase) for p, phase, kind, _ in events if kind == "total"} == {
        (p, phase) for p in points for phase in ("fwd", "bwd")}
    assert {p for p, _, kind, _ in events if kind == "wait"} == crossing and crossing
    assert {p for p, _, kind, _ in events if kind == "rebuild"}  # outputs rebuilt in backward
    handle.remove()
    heard = len(events)
    F.cross_entropy(net(x), y).backward()
    assert len(events) == heard
    with pytest.raises(TypeError, match="layer_event"):
        observe_layers(net, 3)


def test_bench_refuses_batches_of_one_that_a_batchnorm_cannot_train_on(tmp_path, capsys):
    # refused before any engine starts, not by torch's "Expected more than 1 value per channel when training"
    from legrace.models import build_model, fails_on_one_sample

    out = tmp_path / "bench"
    assert main(["bench", "--model", "resnet18", "--input-size", "8", "--batch-size", "1",
                 "--modes", "tee_only,legrace", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "a BatchNorm would see one value per channel" in err and "--batch-size" in err and "--input-size" in err
    assert not out.exists()
    assert not fails_on_one_sample(build_model("cnn", num_classes=10, image_size=8), 3, 8)  # 2x2 maps: trains
    assert fails_on_one_sample(build_model("resnet18", num_classes=10, image_size=8), 3, 8)
    assert main(["bench", "--model", "cnn", "--input-size", "4", "--batch-size", "1", "--infer", "--repeats", "1",
                 "--warmup", "0", "--modes", "tee_only", "--out", str(out)]) == 0  # inference uses running stats


def test_bench_passes_its_accelerator_timeout_to_every_engine(tmp_path, capsys, monkeypatch):
    import legrace.bench.runner as bench

    timeouts = []

    class Recorded(bench.LegRace):
        def __init__(self, *args, **kwargs):
            timeouts.append(kwargs.get("accelerator_timeout"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(bench, "LegRace", Recorded)
    out = tmp_path / "bench"
    assert main(["bench", "--model", "cnn", "--input-size", "16", "--batch-size", "2", "--repeats", "1",
                 "--warmup", "0", "--modes", "tee_only,legrace", "--accelerator-timeout", "7.5",
                 "--out", str(out)]) == 0
    assert timeouts == [7.5, 7.5] and json.loads((out / "bench.json").read_text())["accelerator_timeout"] == 7.5
    with pytest.raises(SystemExit) as stop:  # refused by argparse, before any model is built
        main(["bench", "--model", "cnn", "--accelerator-timeout", "0", "--out", str(tmp_path / "x")])
    assert stop.value.code == 2 and "--accelerator-timeout: must be > 0, got 0" in capsys.readouterr().err
