"""The command line as a new user runs it."""

import argparse
import json
import subprocess
import sys

import numpy as np
import pytest

from legrace.trusted import gaussian
from legrace.privacy.accountant import epsilon
from legrace.cli import build_parser, main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "legrace.cli", *args], capture_output=True, text=True, timeout=600)


def test_default_job_on_digits_learns_and_reports(tmp_path):
    out = tmp_path / "run"
    r = run_cli("train", "--epochs", "3", "--out", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "Validation accuracy" in r.stdout and "epsilon" in r.stdout
    summary = json.loads((out / "summary.json").read_text())
    for key in ("mode", "model", "data", "epochs", "steps", "train_acc", "val_acc", "epsilon", "epsilon_per_release",
                "delta", "noise_multiplier", "sigma", "clip", "rank", "releases_per_sample", "sensitivity",
                "seconds_per_step"):
        assert key in summary, key
    assert summary["mode"] == "legrace" and summary["data"] == "digits" and summary["epochs"] == 3
    assert summary["val_acc"] > 0.8  # it learns for real
    assert 7.5 < summary["epsilon"] <= 8.0
    # an independent recomputation from what summary.json says was composed
    recomputed = epsilon(1.0, [(1.0 / c["noise_multiplier"], c["count"]) for c in summary["compositions"]],
                         summary["delta"], "prv")
    assert recomputed == pytest.approx(summary["epsilon"], rel=0.15)
    assert sum(c["count"] for c in summary["compositions"]) == 3 * summary["releases_per_sample"]
    assert summary["noise_sampler"] == ("ziggurat" if gaussian.numba is not None else "torch")
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[-1])["epoch"] == 3


def test_resume_continues_without_spending_twice(tmp_path):
    out = str(tmp_path / "run")
    common = ["train", "--noise-multiplier", "20", "--out", out, "--no-progress", "--lr", "0.02"]
    assert main(common + ["--epochs", "1"]) == 0
    first = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert main(common + ["--epochs", "2", "--resume"]) == 0
    second = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert second["epochs"] == 2 and second["uses_per_sample"] == 2 and second["steps"] == 2 * first["steps"]
    assert second["noise_multiplier"] == first["noise_multiplier"]
    assert second["epsilon"] > first["epsilon"]
    # two epochs in one go cost exactly what 1 + 1 resumed epochs cost
    assert main(["train", "--noise-multiplier", "20", "--out", str(tmp_path / "direct"), "--no-progress",
                 "--epochs", "2", "--lr", "0.02"]) == 0
    direct = json.loads((tmp_path / "direct" / "summary.json").read_text())
    assert second["epsilon"] == pytest.approx(direct["epsilon"])
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2


def test_crash_mid_epoch_is_still_accounted(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--noise-multiplier", "20", "--out", str(out), "--no-progress", "--epochs", "1"]) == 0
    ledger = json.loads((out / "privacy_ledger.json").read_text())
    ledger["uses"]["train"] += 1  # a pass that started and crashed before its checkpoint
    (out / "privacy_ledger.json").write_text(json.dumps(ledger))
    assert main(["train", "--out", str(out), "--no-progress", "--epochs", "2", "--resume"]) == 0
    assert json.loads((out / "summary.json").read_text())["uses_per_sample"] == 3


def test_a_crash_in_the_first_epoch_can_be_resumed_and_its_pass_is_accounted(tmp_path, monkeypatch):
    import legrace.train

    real, calls = legrace.train.F.cross_entropy, []

    def crashes_on_the_second_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("the machine went down")
        return real(*args, **kwargs)

    out = tmp_path / "run"
    common = ["train", "--noise-multiplier", "20", "--out", str(out), "--no-progress", "--epochs", "1"]
    monkeypatch.setattr(legrace.train.F, "cross_entropy", crashes_on_the_second_step)
    with pytest.raises(RuntimeError, match="went down"):
        main(common)
    monkeypatch.setattr(legrace.train.F, "cross_entropy", real)
    assert json.loads((out / "privacy_ledger.json").read_text())["uses"] == {"train": 1}
    assert main(common + ["--resume"]) == 0  # from the checkpoint saved before the first release
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 1 and summary["uses_per_sample"] == 2  # the crashed pass counts


def test_evaluate_runs_split_inference(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--epochs", "2", "--out", str(out), "--no-progress", "--val-inference", "split"]) == 0
    capsys.readouterr()
    trained = json.loads((out / "summary.json").read_text())
    assert json.loads((out / "privacy_ledger.json").read_text())["uses"] == {"train": 2, "validation": 2}
    split = ["--inference", "split", "--allow-past-target"]  # (the default, trusted inference, spends nothing)
    assert main(["evaluate", "--checkpoint", str(out / "checkpoint.pt"), "--data", "digits", "--split", "val",
                 *split]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["samples"] == 180 and result["accuracy"] > 0.7 and result["epsilon_of_this_pass"] > 0
    # the pass released the validation samples' residuals a third time: the run's ledger says so
    assert result["uses"] == {"train": 2, "validation": 3} == json.loads((out / "privacy_ledger.json").read_text())["uses"]
    assert result["epsilon"] > trained["epsilon"] > result["epsilon_of_this_pass"]
    # all of digits holds the run's train and validation samples: a use of both
    assert main(["evaluate", "--checkpoint", str(out / "checkpoint.pt"), "--data", "digits", *split]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["samples"] == 1797 and result["uses"] == {"train": 3, "validation": 4}
    # the validation split of other data is not this run's
    assert main(["evaluate", "--checkpoint", str(out / "checkpoint.pt"), "--data", "npz:x.npz", "--split", "val",
                 *split]) == 2
    assert "--data digits" in capsys.readouterr().err


def test_npz_data_and_other_modes(tmp_path):
    g = np.random.default_rng(0)
    x = g.integers(0, 256, size=(60, 12, 12, 3), dtype=np.uint8)
    y = g.integers(0, 2, size=60)
    path = tmp_path / "tiny.npz"
    np.savez(path, x=x, y=y)
    for mode in ("gpu_only", "tee_only", "lowrank_only", "dp_only"):
        out = tmp_path / mode
        assert main(["train", "--data", f"npz:{path}", "--mode", mode, "--epochs", "1", "--batch-size", "16",
                     "--out", str(out), "--no-progress"]) == 0
        s = json.loads((out / "summary.json").read_text())
        assert s["mode"] == mode
        expected_eps = {"gpu_only": "inf", "tee_only": 0.0, "lowrank_only": 0.0}.get(mode)
        if expected_eps is not None:
            assert s["epsilon"] == expected_eps
        else:
            assert 0 < s["epsilon"] <= 8.0


def test_train_keeps_conv_outputs_up_to_a_budget(tmp_path, monkeypatch):
    import legrace.train

    budgets = []  # what each engine the run builds is given
    engine = legrace.train.LegRace
    monkeypatch.setattr(legrace.train, "LegRace", lambda **kw: budgets.append(kw["keep_outputs_mb"]) or engine(**kw))
    g = np.random.default_rng(0)
    path = tmp_path / "tiny.npz"
    np.savez(path, x=g.integers(0, 256, size=(40, 8, 8, 3), dtype=np.uint8), y=g.integers(0, 2, size=40))
    common = ["train", "--model", "resnet18", "--data", f"npz:{path}", "--batch-size", "8", "--no-progress",
              "--noise-multiplier", "20"]
    out = tmp_path / "run"
    assert main(common + ["--epochs", "1", "--keep-outputs-mb", "0.5", "--out", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["keep_outputs_mb"] == 0.5 and set(budgets) == {0.5}
    # how to run, not what to train: a resumed run takes the budget from its command
    assert main(common + ["--epochs", "2", "--resume", "--out", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["keep_outputs_mb"] == 0.0 and budgets[-1] == 0.0
    for bad in ("-1", "nan", "lots"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(common + ["--keep-outputs-mb", bad])


@pytest.mark.parametrize("args,message", [
    (["--data", "mnist"], "digits, npz:PATH"),
    (["--data", "npz:/no/such/file.npz"], "/no/such/file.npz"),
    (["--model", "alexnet"], "unknown model"),
    (["--rank", "1,2"], "2 entries but the model has 3"),
    (["--data", "cifar10:/nonexistent"], "--download"),
])
def test_bad_input_gets_a_clear_message(tmp_path, args, message):
    r = run_cli("train", "--epochs", "1", "--out", str(tmp_path / "r"), "--no-progress", *args)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr


def test_an_output_folder_that_is_a_file_or_cannot_be_made_is_refused_before_training(tmp_path):
    afile = tmp_path / "a-file"
    afile.write_text("kept")
    for out, message in ((afile, "is a file"), (afile / "below", "cannot write in the output folder")):
        r = run_cli("train", "--epochs", "1", "--out", str(out), "--no-progress")
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
        assert "epoch" not in r.stderr  # refused before any training
    assert afile.read_text() == "kept"


def test_refuses_to_overwrite_a_run(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--out", str(out), "--no-progress"]) == 0
    assert main(["train", "--epochs", "1", "--out", str(out), "--no-progress"]) == 2
    assert main(["evaluate", "--checkpoint", str(tmp_path / "nope.pt"), "--data", "digits"]) == 2


def test_a_bare_resume_keeps_the_runs_epochs_and_more_epochs_past_the_target_need_a_flag(tmp_path, capsys):
    out = str(tmp_path / "run")
    common = ["train", "--max-samples", "200", "--out", out, "--no-progress"]
    assert main(common + ["--epochs", "1"]) == 0
    first = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert main(common + ["--resume"]) == 0  # not the default 10 epochs: nothing to do
    assert "nothing to do" in capsys.readouterr().err
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["epsilon"] == first["epsilon"] <= 8
    ledger = (tmp_path / "run" / "privacy_ledger.json").read_bytes()
    assert main(common + ["--resume", "--epochs", "2"]) == 2  # past the target: refused, nothing spent
    err = capsys.readouterr().err
    assert "past the target 8" in err and "--allow-past-target" in err and "--epochs 1 or fewer" in err
    assert err.splitlines()[-1].startswith("legrace: error: ") and "past the target" in err.splitlines()[-1]
    assert (tmp_path / "run" / "privacy_ledger.json").read_bytes() == ledger
    assert main(common + ["--resume", "--epochs", "2", "--allow-past-target"]) == 0
    assert "past the target 8" in capsys.readouterr().err
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["epsilon"] > 8


def test_resume_refuses_options_that_would_change_what_the_run_trains(tmp_path, capsys):
    out = str(tmp_path / "run")
    common = ["train", "--max-samples", "200", "--out", out, "--no-progress"]
    assert main(common + ["--epochs", "1"]) == 0
    ledger = (tmp_path / "run" / "privacy_ledger.json").read_text()
    capsys.readouterr()
    # a resume that changes --model or --noise-multiplier is refused, not ignored
    assert main(common + ["--resume", "--epochs", "2", "--model", "vgg11", "--noise-multiplier", "2"]) == 2
    err = capsys.readouterr().err
    assert "--model (checkpoint: 'cnn', here: 'vgg11')" in err and "--noise-multiplier" in err
    assert (tmp_path / "run" / "privacy_ledger.json").read_text() == ledger  # nothing ran
    # the command that started the run, repeated with --resume, is fine; so are run settings
    assert main(common + ["--resume", "--epochs", "2", "--model", "cnn", "--rank", "8", "--lr", "0.05",
                          "--wire-dtype", "bfloat16", "--allow-past-target"]) == 0


def test_a_checkpoint_never_runs_code_when_loaded(tmp_path):
    import torch

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (marker.write_text, ("the payload ran",))

    torch.save({"config": Payload()}, tmp_path / "evil.pt")
    assert main(["evaluate", "--checkpoint", str(tmp_path / "evil.pt"), "--data", "digits"]) == 2
    assert not marker.exists()


@pytest.mark.parametrize("args,line", [
    (["--noise-multiplier", "0"], "Privacy: none (no clipping and no noise"),  # clip auto = 0.05 / 0: none
    (["--rank", "64"], "nothing left the trusted side"),  # R covers every conv's input
    (["--val-fraction", "0"], "Trained cnn"),
])
def test_every_run_is_described_in_words(tmp_path, capsys, args, line):
    assert main(["train", "--epochs", "1", "--max-samples", "200", "--out", str(tmp_path / "r"), "--no-progress",
                 *args]) == 0
    said = capsys.readouterr().out
    assert line in said and "nan" not in said


def test_the_batch_accounted_is_never_larger_than_the_data(tmp_path):
    out = tmp_path / "r"
    assert main(["train", "--epochs", "1", "--max-samples", "100", "--batch-size", "1000", "--out", str(out),
                 "--no-progress"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["accounted_batch_size"] == s["train_samples"] == 90


@pytest.mark.parametrize("args,message", [
    (["--accelerator-timeout", "inf"], "must be finite"),
    (["--lr", "nan"], "must be > 0"),
    (["--audit", "/no/such/dir/audit.jsonl"], "cannot write the audit log"),
])
def test_bad_run_settings_get_a_clear_message(tmp_path, args, message):
    r = run_cli("train", "--epochs", "1", "--max-samples", "100", "--out", str(tmp_path / "r"), "--no-progress", *args)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


def test_resume_with_a_fixed_noise_seed_draws_new_noise(tmp_path, monkeypatch):
    import legrace.trusted.engine

    seeds = []
    real = legrace.trusted.engine.GaussianMechanism

    def recording(clip, z, seed=None):
        seeds.append(seed)
        return real(clip, z, seed=seed)

    monkeypatch.setattr(legrace.trusted.engine, "GaussianMechanism", recording)
    out = str(tmp_path / "run")
    common = ["train", "--noise-multiplier", "20", "--noise-seed", "7", "--out", out, "--no-progress"]
    assert main(common + ["--epochs", "1"]) == 0
    assert main(common + ["--epochs", "2", "--resume"]) == 0
    assert seeds[0] == 7 and seeds[1] != 7  # the resumed run never replays the first run's noise
    for _ in range(2):  # nor does a split evaluation (its noise would cancel against training's), twice
        assert main(["evaluate", "--checkpoint", f"{out}/checkpoint.pt", "--data", "digits", "--split", "val",
                     "--inference", "split"]) == 0
    assert len(set(seeds)) == 4


def _commands(parser, prefix=()):
    """(command path, parser) for every command and nested subcommand."""
    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, prefix + (name,))


def test_every_option_of_every_command_says_what_it_does():
    undocumented = [f"legrace {' '.join(path)} {action.option_strings[-1]}"
                    for path, parser in _commands(build_parser())
                    for action in parser._actions
                    if action.option_strings and not isinstance(action, argparse._HelpAction) and not action.help]
    assert undocumented == []


def _npz(path, x, y, classes=None):
    np.savez(path, x=x, y=y, **({} if classes is None else {"classes": np.array(classes)}))
    return f"npz:{path}"


def test_evaluate_matches_classes_by_name(tmp_path, capsys):
    # a test set without class b: its label 1 is c, the model's output 2 (was: scored as b)
    colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)
    y = np.arange(90) % 3
    x = (colours[y][:, None, None, :] * np.ones((1, 8, 8, 1), np.uint8)).astype(np.uint8)
    out = tmp_path / "run"
    assert main(["train", "--data", _npz(tmp_path / "abc.npz", x, y, ["a", "b", "c"]), "--mode", "tee_only",
                 "--epochs", "3", "--batch-size", "16", "--out", str(out), "--no-progress"]) == 0
    ac = y != 1
    full = _npz(tmp_path / "ac-full.npz", x[ac], y[ac], ["a", "b", "c"])
    named = _npz(tmp_path / "ac.npz", x[ac], (y[ac] == 2).astype(np.int64), ["a", "c"])
    capsys.readouterr()
    accuracy = []
    for spec in (full, named):
        assert main(["evaluate", "--checkpoint", str(out / "checkpoint.pt"), "--data", spec]) == 0
        accuracy.append(json.loads(capsys.readouterr().out)["accuracy"])
    assert accuracy[0] == accuracy[1] and accuracy[0] > 0.9
    other = _npz(tmp_path / "ad.npz", x[:4], np.array([0, 1, 0, 1]), ["a", "d"])
    assert main(["evaluate", "--checkpoint", str(out / "checkpoint.pt"), "--data", other]) == 2
    assert "classes the model was not trained on: d" in capsys.readouterr().err


def test_every_training_sample_is_used_every_epoch(tmp_path):
    # 180 training samples in batches of 100: was 1 step (80 samples dropped each epoch)
    out = tmp_path / "run"
    assert main(["train", "--max-samples", "200", "--batch-size", "100", "--epochs", "1", "--out", str(out),
                 "--no-progress"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["train_samples"] == 180 and s["steps"] == 2 and s["max_samples"] == 200


def test_a_single_class_and_changed_data_on_resume_are_refused(tmp_path, capsys):
    x = np.random.default_rng(0).integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    assert main(["train", "--data", _npz(tmp_path / "one.npz", x, np.zeros(40, np.int64)), "--epochs", "1",
                 "--out", str(tmp_path / "one"), "--no-progress"]) == 2
    assert "a classifier needs at least 2" in capsys.readouterr().err
    spec = _npz(tmp_path / "d.npz", x, np.arange(40) % 2)
    out = tmp_path / "run"
    assert main(["train", "--data", spec, "--epochs", "1", "--batch-size", "8", "--out", str(out), "--no-progress"]) == 0
    _npz(tmp_path / "d.npz", np.concatenate([x, x[:4]]), np.arange(44) % 2)  # 4 samples more: the split moves
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--epochs", "2", "--no-progress"]) == 2
    assert "is not what the run read" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", str(out / "checkpoint.pt"), "--data", spec, "--split", "val"]) == 2
    assert "is not what the run read" in capsys.readouterr().err


def test_a_resumed_run_trains_as_an_unbroken_one_and_keeps_one_row_per_epoch(tmp_path, monkeypatch):
    import legrace.train

    common = ["train", "--max-samples", "300", "--mode", "tee_only", "--no-progress", "--epochs", "2"]
    assert main(common + ["--out", str(tmp_path / "whole")]) == 0
    real, calls = legrace.train.F.cross_entropy, []

    def crashes_in_the_second_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 7:  # epoch 1: 5 training steps (270 samples) and 1 validation batch
            raise RuntimeError("the machine went down")
        return real(*args, **kwargs)

    part = tmp_path / "part"
    monkeypatch.setattr(legrace.train.F, "cross_entropy", crashes_in_the_second_epoch)
    with pytest.raises(RuntimeError, match="went down"):
        main(common + ["--out", str(part)])
    monkeypatch.setattr(legrace.train.F, "cross_entropy", real)
    with open(part / "metrics.jsonl", "a") as f:  # as if epoch 2 had ended but crashed before its checkpoint
        f.write(json.dumps({"epoch": 2, "train_loss": 0.0}) + "\n")
    assert main(common + ["--out", str(part), "--resume"]) == 0
    rows = [json.loads(line) for line in (part / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    whole = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    # the same shuffle in epoch 2 (was: epoch 1's order again), so the same losses
    assert [r["train_loss"] for r in rows] == [r["train_loss"] for r in whole]


def test_evaluate_prices_the_runs_uses_as_the_run_did_and_knows_its_data_by_content(tmp_path, capsys, monkeypatch):
    digits = __import__("sklearn.datasets", fromlist=["load_digits"]).load_digits()
    x = np.repeat((digits.images[:200] * 16).astype(np.uint8)[..., None], 3, axis=-1)[:, :8, :8]
    spec = _npz(tmp_path / "d.npz", x, digits.target[:200])
    out = tmp_path / "run"
    monkeypatch.chdir(tmp_path)  # the run reads its data by a relative path
    assert main(["train", "--data", "npz:./d.npz", "--epochs", "1", "--batch-size", "64", "--out", str(out),
                 "--no-progress", "--val-inference", "split"]) == 0
    trained = json.loads((out / "summary.json").read_text())
    capsys.readouterr()
    split = ["--inference", "split", "--allow-past-target"]  # (the default, trusted inference, spends nothing)
    # the validation split (20 samples) is smaller than the run's batches: its pass must not make the
    # run's batch-coupled releases (priced at 64) cheaper, nor be refused for it
    assert main(["evaluate", "--checkpoint", str(out / "checkpoint.pt"), "--data", "npz:./d.npz", "--split", "val",
                 *split]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["samples"] == 20 and result["epsilon"] >= trained["epsilon"]
    # the same file under another spelling of its path is the run's own data: a use of both sets
    assert main(["evaluate", "--checkpoint", str(out / "checkpoint.pt"), "--data", spec, *split]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["accounted_as"] == ["train", "validation"] and result["uses"] == {"train": 2, "validation": 3}
    # the run's own file after its content changed (a few samples replaced), from another directory
    # by another relative path: still the run's data, not a data set of its own, whose pass would
    # not be composed with the run's uses
    x[:5] = 255 - x[:5]
    _npz(tmp_path / "d.npz", x, digits.target[:200])
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    assert main(["evaluate", "--checkpoint", str(out / "checkpoint.pt"), "--data", "npz:../d.npz", *split]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["accounted_as"] == ["train", "validation"] and result["uses"] == {"train": 3, "validation": 4}
    # other data is a data set of its own
    other = _npz(tmp_path / "e.npz", 255 - x, digits.target[:200])
    assert main(["evaluate", "--checkpoint", str(out / "checkpoint.pt"), "--data", other, *split]) == 0
    assert json.loads(capsys.readouterr().out)["accounted_as"] == [f"evaluate {other}"]


def test_a_run_whose_batchnorm_cannot_train_on_one_sample_is_refused_before_it_starts(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", "resnet18", "--batch-size", "1", "--max-samples", "20", "--out", str(out),
                 "--no-progress"]) == 2
    assert "cannot train on batches of one sample" in capsys.readouterr().err
    assert not (out / "checkpoint.pt").exists() and not (out / "privacy_ledger.json").exists()  # nothing spent


def test_resume_from_a_checkpoint_without_its_optimizer_is_refused_by_name(tmp_path, capsys):
    import torch

    out = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--max-samples", "100", "--out", str(out), "--no-progress"]) == 0
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    del state["optimizer"]
    torch.save(state, out / "checkpoint.pt")
    capsys.readouterr()
    assert main(["train", "--epochs", "2", "--out", str(out), "--resume", "--no-progress"]) == 2
    assert "cannot be resumed: it holds no optimizer" in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [(["--seed", "99999999999999999999999"], "--seed: must be an integer"),
                                          (["--noise-seed", "-5"], "--noise-seed: must be an integer")])
def test_seeds_out_of_range_are_refused_when_parsed(args, message, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", *args])
    assert message in capsys.readouterr().err


def test_a_model_name_is_normalised_so_resume_compares_like_with_like():
    assert build_parser().parse_args(["train", "--model", " CNN"]).model == "cnn"


def test_a_delta_of_one_over_n_or_more_is_warned_about(tmp_path):
    with pytest.warns(UserWarning, match="at least 1/n"):
        assert main(["train", "--epochs", "1", "--max-samples", "100", "--delta", "0.05", "--out", str(tmp_path / "r"),
                     "--no-progress"]) == 0


# ---- the command line keeps its promises (issue 32, item 4) ----------------------------------


def test_every_option_of_every_command_shows_its_default_from_the_parser():
    """--help ends each option with the default the parser holds; none is also written by hand (it would drift)."""
    missing, by_hand = [], []
    for path, parser in _commands(build_parser()):
        formatter = parser._get_formatter()
        for action in parser._actions:
            if not action.option_strings or isinstance(action, argparse._HelpAction) or action.required:
                continue
            name = f"legrace {' '.join(path)} {action.option_strings[-1]}"
            if "default" not in formatter._expand_help(action):
                missing.append(name)
            if action.default is not None and any(w in action.help.lower() for w in ("(default", "default:")):
                by_hand.append(name)
    assert missing == [] and by_hand == []


def test_help_shows_defaults_as_they_are_typed(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for shown in ("--rank RANK R per conv: an int, a comma-separated list, or auto (default: 8)",
                  "(default: 0)", "(default: 1e-05)", "(default: runs/legrace)", "(default: cnn)",
                  "--verify check every answer", "test (a few % more trusted work) (default: off)",
                  "--keep-heap, --no-keep-heap", "(default: on)",
                  "--threads THREADS torch CPU threads (default: torch's)"):
        assert shown in text, shown
    with pytest.raises(SystemExit):
        main(["study", "privacy-utility", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 1,8,64,1000)" in text and "(default: 0,1)" in text
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--train forward + backward (default: on)" in text and "--infer forward only (default: off)" in text


@pytest.mark.parametrize("command", [["train"], ["evaluate", "--checkpoint", "c.pt", "--data", "digits"], ["worker"],
                                     ["bench"], ["attack", "inversion"], ["attack", "gradients"],
                                     ["attack", "membership"], ["study", "privacy-utility"], ["analyze", "rank"]])
def test_threads_is_an_option_wherever_torch_runs_and_is_set_before_the_command_starts(command, monkeypatch):
    import torch

    import legrace.cli as cli

    seen, real = [], cli.build_parser

    def recording():
        parser = real()
        for _, sub in _commands(parser):
            if sub.get_default("func") is not None:
                sub.set_defaults(func=lambda args: seen.append(torch.get_num_threads()) or 0)
        return parser

    monkeypatch.setattr(cli, "build_parser", recording)
    before = torch.get_num_threads()
    want = 1 if before > 1 else 2
    try:
        assert main(command + ["--threads", str(want)]) == 0  # train and evaluate refused --threads
    finally:
        torch.set_num_threads(before)
    assert seen == [want]


@pytest.mark.parametrize("argv,kept", [([], True), (["--no-keep-heap"], False), (["--keep-heap"], True)])
def test_train_keeps_the_heap_unless_told_not_to(tmp_path, monkeypatch, argv, kept):
    import legrace.trusted.heap

    calls = []
    monkeypatch.setattr(legrace.trusted.heap, "keep_freed_memory", lambda: calls.append(1))
    assert main(["train", "--epochs", "1", "--max-samples", "100", "--out", str(tmp_path / "r"), "--no-progress",
                 *argv]) == 0  # --no-keep-heap was refused
    assert calls == ([1] if kept else [])


class _Terminal:
    """A stderr that says it is a terminal, keeping what is written."""

    def __init__(self, tty: bool) -> None:
        self.tty, self.parts = tty, []

    def isatty(self) -> bool:
        return self.tty

    def write(self, text: str) -> int:
        self.parts.append(text)
        return len(text)

    def flush(self) -> None:
        pass


@pytest.mark.parametrize("tty,argv,bar", [(True, [], True), (True, ["--no-progress"], False), (False, [], False)])
def test_a_progress_bar_only_on_a_terminal(tmp_path, monkeypatch, tty, argv, bar):
    stderr = _Terminal(tty)
    monkeypatch.setattr(sys, "stderr", stderr)
    assert main(["train", "--epochs", "1", "--max-samples", "200", "--out", str(tmp_path / "r"), *argv]) == 0
    written = "".join(stderr.parts)
    assert "epoch 1/1: train_acc" in written  # the epoch's log line, bar or none
    assert ("%|" in written) == bar  # tqdm's bar, never in a log file


def _not_checkpoints(tmp_path):
    import pickle
    import zipfile

    import torch

    (tmp_path / "notes.txt").write_text("hello, not a checkpoint\n")
    with zipfile.ZipFile(tmp_path / "archive.zip", "w") as z:
        z.writestr("a.txt", "a zip that is not torch's")
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"a": 1}))

    class Payload:
        def __reduce__(self):
            return (print, ("the payload ran",))

    torch.save({"config": Payload()}, tmp_path / "objects.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "objects.pt").read_bytes()[:100])
    (tmp_path / "empty.pt").write_bytes(b"")
    torch.save([1, 2], tmp_path / "list.pt")
    return ["notes.txt", "archive.zip", "plain.pkl", "objects.pt", "cut.pt", "empty.pt", "list.pt"]


def test_a_file_that_is_not_a_checkpoint_gets_one_line_that_never_suggests_unsafe_loading(tmp_path, capsys):
    from legrace.train import TrainError, load_checkpoint

    for name in _not_checkpoints(tmp_path):
        path = tmp_path / name
        assert main(["evaluate", "--checkpoint", str(path), "--data", "digits"]) == 2, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert f"{path} is not a legrace checkpoint (" in err and "give the checkpoint.pt that `legrace train` wrote" \
            in err, err
        for advice in ("weights_only", "trusted source", "safe_globals", "arbitrary code"):  # not torch's advice
            assert advice not in err, (name, err)
        with pytest.raises(TrainError) as ei:  # nor does a traceback of the library, through a chained cause
            load_checkpoint(path)
        chained = ei.value.__cause__ or (None if ei.value.__suppress_context__ else ei.value.__context__)
        assert "weights_only" not in str(chained), name
    assert "holds objects other than tensors" in str(pytest.raises(TrainError, load_checkpoint,
                                                                   tmp_path / "objects.pt").value)
