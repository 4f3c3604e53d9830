"""Trusted inference: the model wholly on the trusted side, nothing released, nothing accounted; and
split inference, which states its cost and keeps to the run's target epsilon."""

import copy
import json
import threading
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from legrace import LegRace
from legrace.boundary.gateway import InProcessTransport
from legrace.boundary.messages import ConvForward
from legrace.cli import main
from legrace.models import SmallCNN, build_model
from legrace.trusted.split_conv import SplitConv2d


def count_requests(engine):
    """Every message the trusted side sends the accelerator from now on, by kind."""
    sent = []
    transport = engine.boundary.transport

    class Counting(InProcessTransport):
        def request(self, message, reply_bytes=None):
            sent.append(type(message).__name__)
            return transport.request(message, reply_bytes)

        def start(self, message, reply_bytes=None):
            sent.append(type(message).__name__)
            return transport.start(message, reply_bytes)

    engine.boundary.transport = Counting(transport.accelerator)
    return sent


def resnet_with_statistics():
    torch.manual_seed(0)
    module = build_model("resnet18", num_classes=3, in_channels=3, image_size=16).double()
    for m in module.modules():  # running statistics a trained model would have: eval mode uses them
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    return module.eval()


@pytest.mark.parametrize("mode", ["legrace", "dp_only"])
def test_trusted_inference_is_the_unconverted_model_and_sends_nothing(mode):
    plain = resnet_with_statistics()
    engine = LegRace(mode=mode, rank=4, noise_multiplier=1.0, clip=0.5)  # noise on
    model = engine.convert(copy.deepcopy(plain)).eval()
    splits = [m for m in model.modules() if isinstance(m, SplitConv2d)]
    # a silent stem (R = 4 covers its 3 channels) in legrace, and downsamples that reuse a block's split
    assert any(m.same_as is not None for m in splits) and any(m.silent for m in splits) == (mode == "legrace")
    sent = count_requests(engine)
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (a forward outside a loader that released would warn)
        with engine.trusted_inference():
            with torch.no_grad():
                logits = model(x)
            F.cross_entropy(model(x), torch.tensor([0, 1, 2, 0])).backward()  # with autograd too
    assert torch.equal(logits, plain(x))
    assert sent == [] and engine.ledger.uses == {} and engine.get_epsilon() == 0.0
    assert engine._config.shared == {} and engine.boundary.transport.accelerator._stored == {}
    # outside the block the same model releases and accounts again
    with torch.no_grad(), pytest.warns(UserWarning, match="outside a pass over a private loader"):
        noisy = model(x)
    assert "ConvForward" in sent and engine.ledger.uses == {"outside a private loader": 1}
    assert not torch.allclose(noisy, logits) and engine._config.shared == {}


def test_lowrank_only_trusted_inference_is_its_own_forward():
    # lowrank_only trains the model on the low-rank part alone and releases nothing: that is the
    # model it deploys, not the plain conv of the whole input
    plain = resnet_with_statistics()
    engine = LegRace(mode="lowrank_only", rank=2)
    model = engine.convert(copy.deepcopy(plain)).eval()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        own = model(x)
        with engine.trusted_inference():
            trusted = model(x)
    assert engine.boundary is None and torch.equal(trusted, own) and not torch.allclose(own, plain(x))


def test_trusted_inference_covers_only_the_thread_that_opened_it():
    engine = LegRace(rank=1, clip=0.5, noise_multiplier=3.0)
    model = engine.convert(SmallCNN(1, 3)).eval()
    seen = []
    transport = engine.boundary.transport

    class Spy(InProcessTransport):
        def request(self, message, reply_bytes=None):
            if isinstance(message, ConvForward):
                seen.append(threading.get_ident())
            return transport.request(message, reply_bytes)

    engine.boundary.transport = Spy(transport.accelerator)
    inside, leave, outputs = threading.Event(), threading.Event(), []

    def serving_inside():
        with engine.trusted_inference(), torch.no_grad():
            inside.set()
            leave.wait(30)  # while this block is open, the other thread forwards
            outputs.append(model(torch.randn(2, 1, 8, 8)))

    other = threading.Thread(target=serving_inside)
    other.start()
    try:
        assert inside.wait(30)
        with torch.no_grad(), pytest.warns(UserWarning, match="outside a pass over a private loader"):
            model(torch.randn(2, 1, 8, 8))  # this thread is not in the block: it releases, accounted
    finally:
        leave.set()
        other.join()
    assert len(outputs) == 1 and seen and set(seen) == {threading.get_ident()}  # the block's thread sent nothing
    assert engine.ledger.uses == {"outside a private loader": 1}


# ---- the command line -------------------------------------------------------------------------


def _run(tmp_path, *extra):
    out = tmp_path / "run"
    assert main(["train", "--epochs", "2", "--max-samples", "300", "--out", str(out), "--no-progress", *extra]) == 0
    return out


def _evaluate(capsys, out, *args):
    capsys.readouterr()
    code = main(["evaluate", "--checkpoint", str(out / "checkpoint.pt"), *args])
    said = capsys.readouterr()
    return code, (json.loads(said.out) if code == 0 else None), said.err


def test_evaluate_by_default_spends_no_privacy_and_leaves_the_ledger_as_it_was(tmp_path, capsys):
    out = _run(tmp_path)
    summary = json.loads((out / "summary.json").read_text())
    ledger = (out / "privacy_ledger.json").read_bytes()
    for args in (["--data", "digits", "--split", "val"], ["--data", "digits"]):  # neither adds a use
        code, result, _ = _evaluate(capsys, out, *args)
        assert code == 0 and result["inference"] == "trusted" and "trusted inference" in result["measured"]
        assert result["epsilon_before"] == result["epsilon"] == summary["epsilon"] > 0
        assert result["epsilon_of_this_pass"] == 0.0 and result["accounted_as"] == []
        assert (out / "privacy_ledger.json").read_bytes() == ledger
    # the validation split by trusted inference: exactly what training's validation measured
    code, result, _ = _evaluate(capsys, out, "--data", "digits", "--split", "val")
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert (result["accuracy"], result["loss"]) == (last["val_acc"], last["val_loss"])
    # trusted inference needs no accelerator, and spends nothing that a target could be passed by
    for extra, message in ((["--accelerator", "process"], "drop --accelerator"),
                           (["--allow-past-target"], "trusted inference spends nothing")):
        code, _, err = _evaluate(capsys, out, "--data", "digits", *extra)
        assert code == 2 and message in err and "Traceback" not in err
    assert (out / "privacy_ledger.json").read_bytes() == ledger


def test_split_inference_says_its_cost_first_and_keeps_to_the_target(tmp_path, capsys):
    out = _run(tmp_path)
    trained = json.loads((out / "summary.json").read_text())
    assert trained["target_epsilon"] == 8.0 and 7 < trained["epsilon"] <= 8.0
    # the validation split has had no use yet (trusted validation): a pass over it does not move epsilon
    code, result, err = _evaluate(capsys, out, "--data", "digits", "--split", "val", "--inference", "split")
    eps = f"{trained['epsilon']:.4g}"
    assert code == 0 and f"epsilon {eps} -> {eps}" in err and "target 8" in err
    assert result["inference"] == "split" and "noised residuals" in result["measured"]
    assert result["uses"] == {"train": 2, "validation": 1} and result["epsilon"] == trained["epsilon"]
    # all of digits: a third use of the training samples, past the target: refused, nothing spent
    ledger = (out / "privacy_ledger.json").read_bytes()
    code, _, err = _evaluate(capsys, out, "--data", "digits", "--inference", "split")
    lines = [line for line in err.splitlines() if line.startswith("legrace: error:")]
    assert code == 2 and len(lines) == 1 and "past its target 8" in lines[0] and "--allow-past-target" in lines[0]
    assert (out / "privacy_ledger.json").read_bytes() == ledger and "Traceback" not in err
    code, result, err = _evaluate(capsys, out, "--data", "digits", "--inference", "split", "--allow-past-target")
    assert code == 0 and result["epsilon"] > 8.0 == result["target_epsilon"] >= result["epsilon_before"]
    assert f"-> {result['epsilon']:.4g}" in err
    assert json.loads((out / "privacy_ledger.json").read_text())["uses"] == {"train": 3, "validation": 2}


def test_validation_during_training_is_trusted_unless_asked(tmp_path, capsys):
    out = _run(tmp_path)
    assert json.loads((out / "privacy_ledger.json").read_text())["uses"] == {"train": 2}  # no validation use
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    assert [r["val_inference"] for r in rows] == ["trusted"] * 2 and summary["val_inference"] == "trusted"
    assert "measured by trusted inference" in capsys.readouterr().out
    # the old behaviour: accounted as passes over the validation split, within the calibration
    split = tmp_path / "split"
    assert main(["train", "--epochs", "2", "--max-samples", "300", "--out", str(split), "--no-progress",
                 "--val-inference", "split"]) == 0
    assert json.loads((split / "privacy_ledger.json").read_text())["uses"] == {"train": 2, "validation": 2}
    s = json.loads((split / "summary.json").read_text())
    assert s["val_inference"] == "split" and s["epsilon"] == summary["epsilon"] <= 8.0
    assert "measured by split inference" in capsys.readouterr().out


def test_resume_takes_val_inference_from_its_command(tmp_path):
    out = str(tmp_path / "run")
    common = ["train", "--max-samples", "200", "--noise-multiplier", "20", "--out", out, "--no-progress"]
    assert main(common + ["--epochs", "1", "--val-inference", "split"]) == 0
    assert main(common + ["--epochs", "2", "--resume"]) == 0  # how to measure, not what to train
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_inference"] for r in rows] == ["split", "trusted"]
    assert json.loads((tmp_path / "run" / "privacy_ledger.json").read_text())["uses"] == {"train": 2, "validation": 1}


def test_a_mode_that_releases_nothing_measures_the_same_either_way(tmp_path, capsys):
    g = np.random.default_rng(0)
    path = tmp_path / "tiny.npz"
    np.savez(path, x=g.integers(0, 256, size=(60, 8, 8, 3), dtype=np.uint8), y=np.arange(60) % 2)
    out = tmp_path / "run"
    assert main(["train", "--data", f"npz:{path}", "--mode", "lowrank_only", "--epochs", "1", "--batch-size", "16",
                 "--out", str(out), "--no-progress"]) == 0
    results = []
    for inference in ("trusted", "split"):
        code, result, err = _evaluate(capsys, out, "--data", f"npz:{path}", "--split", "val", "--inference", inference)
        assert code == 0 and result["epsilon"] == 0.0 and "lowrank_only" in result["measured"]
        results.append((result["accuracy"], result["loss"]))
    assert results[0] == results[1] and "releases nothing (lowrank_only)" in err
