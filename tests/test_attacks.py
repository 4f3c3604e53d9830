"""Attacks on what the accelerator sees: the tap, inversion, gradient inversion, membership."""

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from legrace import LegRace
from legrace.attacks.commands import gradient_attack, inversion_attack, membership_attack
from legrace.boundary.messages import ConvBackward, ConvForward, SetWeight
from legrace.boundary.gateway import InProcessTransport
from legrace.cli import main
from legrace.attacks.inversion import quality
from legrace.models import SmallCNN
from legrace.attacks.tap import ActivationTap, BoundaryTap
from legrace.attacks.target import AttackError, load_target
from legrace.train import TrainConfig, run_training
from legrace.attacks.views import RealRun, parse_clip_rule, parse_view

CIFAR_NPZ = Path(os.environ.get("LEGRACE_CIFAR10_NPZ")
                 or Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-train.npz")


def digits_target(max_samples=900, **kw):
    """A fresh cnn on digits: the first max_samples are the 'run', the other ~900 the adversary's."""
    return load_target(None, TrainConfig(model="cnn", data="digits", max_samples=max_samples, epochs=3, **kw))


# ---- the tap ---------------------------------------------------------------------------------


def test_tap_records_exactly_what_crossed():
    torch.manual_seed(0)
    module = SmallCNN(3, 3)  # 3 input channels, R = 2: the first conv releases a residual too
    engine = LegRace(rank=2, clip=0.5, noise_multiplier=1.0)
    model = engine.convert(module)
    crossed = []  # an independent recorder below the tap, next to the accelerator

    class Below(InProcessTransport):
        def request(self, message, reply_bytes=None):
            if isinstance(message, ConvForward):
                crossed.append(("inputs", message.layer, message.residual.tensor.clone()))
            elif isinstance(message, ConvBackward):
                crossed.append(("grad_y", message.layer, message.grad_y.clone()))
            elif isinstance(message, SetWeight):
                crossed.append(("weights", message.layer, message.weight.clone()))
            return super().request(message, reply_bytes)

    original = engine.boundary.transport
    engine.boundary.transport = Below(original.accelerator)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.5)
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 3, (6,))
    with BoundaryTap(engine.boundary) as tap:
        for _ in range(2):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    assert engine.boundary.transport is not tap  # removed on exit
    for kind in ("inputs", "grad_y", "weights"):
        expected = [(layer, t) for k, layer, t in crossed if k == kind]
        got = [(layer, t) for layer, ts in sorted(getattr(tap.view, kind).items()) for t in ts]
        assert sorted(layer for layer, _ in got) == sorted(layer for layer, _ in expected)
        for layer in {layer for layer, _ in expected}:
            mine = [t for lay, t in got if lay == layer]
            theirs = [t for lay, t in expected if lay == layer]
            assert len(mine) == len(theirs) and all(torch.equal(a, b) for a, b in zip(mine, theirs))
    # weights are copies made when they crossed: the optimizer's later in-place steps left them alone
    w0 = tap.view.weights[0]
    assert len(w0) == 2 and not torch.equal(w0[0], w0[1]) and not torch.equal(w0[1], module.features[0].weight)
    # residuals crossed noised: never the clean activation of layer 0 (the input)
    assert not torch.allclose(tap.view.inputs[0][0], x, atol=0.1)


def test_activation_tap_holds_the_raw_input_and_grad_y():
    model = SmallCNN(1, 3)
    x = torch.randn(4, 1, 8, 8)
    with ActivationTap(model) as tap:
        F.cross_entropy(model(x), torch.tensor([0, 1, 2, 0])).backward()
    assert torch.equal(tap.view.inputs[0][0], x)
    assert sorted(tap.view.inputs) == [0, 1, 2] and sorted(tap.view.grad_y) == [0, 1, 2]
    assert tap.view.grad_y[2][0].shape == (4, 64, 2, 2)


def test_real_run_takes_views_from_the_boundary():
    target = digits_target()
    data = target.subset(target.members[:20])
    low = RealRun(target, parse_view("lowrank_only"), epochs=3, batch_size=10).forward(data)
    assert low.inputs == {}  # nothing crosses
    run = RealRun(target, parse_view("dp_only@8"), epochs=3, batch_size=10, layers=[0])
    view = run.forward(data)
    assert list(view.inputs) == [0] and view.stacked("inputs", 0).shape == (20, 1, 8, 8)
    assert run.engine.sigma == pytest.approx(0.05)  # auto clip: noise std 0.05 whatever epsilon
    with pytest.raises(AttackError, match="does not exist"):
        RealRun(target, parse_view("legrace@8"), epochs=3, batch_size=10, layers=[5])


def test_view_and_clip_rule_parsing():
    assert parse_view("legrace@8").epsilon == 8 and parse_view("gpu_only").epsilon is None
    assert parse_view("legrace@inf").label == "legrace@inf"
    for bad, msg in [("legrace", "give the epsilon"), ("fast@3", "unknown view"), ("gpu_only@8", "takes no"),
                     ("legrace@-1", "> 0"), ("legrace@x", "number")]:
        with pytest.raises(AttackError, match=msg):
            parse_view(bad)
    assert parse_clip_rule("std:0.25") == "std:0.25"
    with pytest.raises(AttackError):
        parse_clip_rule("std:big")


# ---- inversion ---------------------------------------------------------------------------------


def test_decoder_inverts_the_raw_view_but_not_the_noised_one():
    torch.manual_seed(0)
    target = digits_target()
    views = [parse_view(v) for v in ("gpu_only", "dp_only@1", "legrace@1", "lowrank_only")]
    result = inversion_attack(target, views, [0], n_aux=400, n_victims=48, decoder_epochs=12, log=lambda m: None)
    ssim = {r["view"]: r["ssim"] for r in result["rows"]}
    crossed = {r["view"]: r["crossed"] for r in result["rows"]}
    assert ssim["gpu_only"] > 0.8
    assert ssim["gpu_only"] > ssim["dp_only@1"] + 0.3
    # the noised view carries nothing a decoder can use beyond the prior (the mean image)
    assert ssim["dp_only@1"] < ssim["lowrank_only"] + 0.1
    # legrace splits the one-channel image exactly (R = 8 >= 1 channel): nothing of it crosses
    assert crossed["legrace@1"] == crossed["lowrank_only"] == "nothing" and crossed["dp_only@1"] == "yes"
    assert ssim["legrace@1"] == ssim["lowrank_only"]


def test_quality_measures_are_sane():
    x = torch.rand(4, 3, 16, 16)
    same, noisy = quality(x, x), quality((x + 0.3 * torch.randn_like(x)).clamp(0, 1), x)
    assert same["ssim"] == pytest.approx(1.0, abs=1e-4) and same["psnr"] > 60
    assert noisy["ssim"] < 0.7 and noisy["psnr"] < 15


# ---- gradients ---------------------------------------------------------------------------------


def test_gradient_matching_recovers_images_from_legrace_weights_and_grad_y():
    # digits at B=1: the first conv's weight update has 144 equations for 64 pixels, so an
    # accelerator that sees the weights and dL/dY there (gpu_only) has the image; dp_only's gradient
    # is its own noised view; legrace splits the one-channel image exactly, and its first conv's
    # dL/dY never crosses (only the prior row stands for it).
    target = digits_target()
    views = [parse_view(v) for v in ("gpu_only", "legrace@8", "dp_only@8")]
    logged = []
    result = gradient_attack(target, views, 0, n_aux=64, n_victims=4, batch_size=1, iters=300, decoder_epochs=1,
                             log=logged.append)
    ssim = {(r["view"], r["attack"]): r["ssim"] for r in result["rows"]}
    assert ssim[("gpu_only", "gradient matching")] > 0.8
    assert ssim[("dp_only@8", "gradient matching")] < 0.3
    assert not any(view == "legrace@8" for view, _ in ssim)
    assert any("legrace@8: nothing of layer 0 crosses" in line for line in logged)


def test_weight_updates_seen_by_the_accelerator_are_the_sgd_steps():
    target = digits_target()
    run = RealRun(target, parse_view("legrace@8"), epochs=3, batch_size=5, layers=[1])
    data = target.subset(target.members[:10])
    run.forward(data)
    view, weights = run.steps(data, lr=0.1)
    assert len(weights[1]) == 2 and len(view.grad_y[1]) == 2
    before, after = weights[1][0]
    assert not torch.equal(before, after)
    with pytest.raises(AttackError, match="nothing crosses"):
        RealRun(target, parse_view("lowrank_only"), epochs=3, batch_size=5).steps(data, lr=0.1)


# ---- membership --------------------------------------------------------------------------------


def test_membership_on_an_overfit_model_is_well_above_chance(tmp_path):
    torch.manual_seed(0)
    run_training(TrainConfig(model="cnn", data="digits", max_samples=200, epochs=40, lr=0.05, mode="gpu_only",
                             weight_decay=0.0, out=str(tmp_path / "run"), progress=False), log=lambda m: None)
    target = load_target(str(tmp_path / "run" / "checkpoint.pt"))
    result = membership_attack(target, n=150, shadow=False, log=lambda m: None)
    loss = result["rows"][0]
    assert loss["attack"] == "loss threshold" and loss["auc"] > 0.65
    assert 0 <= loss["tpr_at_1%_fpr"] <= 1
    assert result["generalisation"]["member_acc"] > result["generalisation"]["nonmember_acc"]


def test_membership_needs_a_trained_model():
    with pytest.raises(AttackError, match="trained model"):
        membership_attack(digits_target(), n=10, log=lambda m: None)


# ---- command line ------------------------------------------------------------------------------


@pytest.mark.parametrize("args,message", [
    (["attack", "inversion", "--views", "legrace", "--max-samples", "900"], "give the epsilon"),
    (["attack", "inversion", "--views", ",", "--max-samples", "900"], "names no view"),
    (["attack", "inversion", "--layers", "7", "--max-samples", "900"], "do not exist"),
    (["attack", "inversion", "--aux", "5000", "--max-samples", "900"], "only"),
    (["attack", "membership"], "trained model"),
    (["attack", "gradients", "--checkpoint", "/no/such.pt"], "no checkpoint"),
    (["attack", "gradients", "--victims", "8", "--batch-size", "32", "--max-samples", "900"], "more than the 8 victims"),
])
def test_attack_cli_bad_input_is_one_clear_line(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_attack_cli_writes_tables_and_figures(tmp_path, capsys):
    out = tmp_path / "inv"
    assert main(["attack", "inversion", "--max-samples", "900", "--views", "gpu_only,legrace@8", "--layers", "1",
                 "--aux", "100", "--victims", "16", "--decoder-epochs", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "legrace@8" in printed and "budget:" in printed
    for name in ("inversion.json", "inversion.csv", "inversion_layer1.png"):
        assert (out / name).stat().st_size > 0


@pytest.mark.slow
@pytest.mark.skipif(not CIFAR_NPZ.exists(), reason="CIFAR-10 npz not available")
def test_cifar_raw_view_leaks_and_legrace_view_does_not():
    target = load_target(None, TrainConfig(model="cnn", data=f"npz:{CIFAR_NPZ}", max_samples=2000, epochs=5))
    result = inversion_attack(target, [parse_view("gpu_only"), parse_view("legrace@8"), parse_view("lowrank_only")],
                              [0, 1], n_aux=1500, n_victims=64, decoder_epochs=5, log=lambda m: None)
    ssim = {(r["layer"], r["view"]): r["ssim"] for r in result["rows"]}
    assert ssim[(0, "gpu_only")] >= 0.5
    for layer in (0, 1):
        assert ssim[(layer, "legrace@8")] <= ssim[(layer, "lowrank_only")] + 0.05


def test_attack_views_calibrate_the_noise_as_training_does():
    # the same releases counted (digits' 2x2 maps, which R = 8 covers, release nothing), so the same z
    from torch.utils.data import DataLoader, TensorDataset

    from legrace.models import build_model
    from legrace.attacks.views import calibrated_noise

    def cnn():
        return build_model("cnn", num_classes=10, in_channels=1, image_size=8)

    engine = LegRace("legrace", rank=8, target_epsilon=8.0, target_delta=1e-5)
    loader = DataLoader(TensorDataset(torch.zeros(100, 1, 8, 8), torch.zeros(100)), batch_size=64)
    engine.make_private(module=cnn(), optimizer=None, data_loader=loader, epochs=5)
    assert engine.releases_per_sample == 1
    assert calibrated_noise(cnn(), "legrace", 8, 8.0, 5, 64, 1e-5, (1, 8, 8)) == engine.noise_multiplier


def test_a_fresh_target_model_is_the_one_its_seed_makes():
    # (was: new random weights on every call, whatever --seed said)
    weights = [list(digits_target(seed=seed).model.state_dict().values()) for seed in (0, 0, 1)]
    assert all(torch.equal(p, q) for p, q in zip(weights[0], weights[1]))
    assert not torch.equal(weights[0][0], weights[2][0])


# ---- defaults on the bundled digits ------------------------------------------------------------


def test_the_auxiliary_data_is_never_trained_on_and_by_default_is_all_the_run_left():
    from legrace.attacks.target import auxiliary

    whole = digits_target(max_samples=None)  # all of digits: 1617 members, 180 held out, nothing unused
    assert not whole.unused
    aux = auxiliary(whole, None, 2000)
    assert sorted(aux) == sorted(whole.held_out) and not set(aux) & set(whole.members)
    with pytest.raises(AttackError, match="asked for 181 auxiliary samples"):
        auxiliary(whole, 181, 2000)
    part = digits_target()  # --max-samples 900: the unused samples first, then the validation split
    assert auxiliary(part, 50, 2000) == part.unused[:50]
    aux = auxiliary(part, None, 2000)
    assert aux == part.unused + part.held_out and not set(aux) & set(part.members)
    assert len(auxiliary(part, None, 100)) == 100
    no_val = digits_target(max_samples=None, val_fraction=0.0)
    with pytest.raises(AttackError, match="leaving the adversary no auxiliary data"):
        auxiliary(no_val, None, 2000)


def test_inversion_runs_on_digits_with_its_default_data_and_auxiliary_count(tmp_path, capsys):
    out = tmp_path / "inv"  # no --max-samples, no --aux (was: "asked for 2000 auxiliary (unused) samples but only 0")
    assert main(["attack", "inversion", "--views", "gpu_only", "--layers", "1", "--victims", "16",
                 "--decoder-epochs", "1", "--out", str(out)]) == 0
    assert json.loads((out / "inversion.json").read_text())["budget"]["auxiliary_samples"] == 180


def test_membership_runs_on_a_default_digits_run_and_says_why_it_trains_no_shadow(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--out", str(run), "--no-progress"]) == 0
    capsys.readouterr()
    out = tmp_path / "mem"
    assert main(["attack", "membership", "--checkpoint", str(run / "checkpoint.pt"), "--out", str(out)]) == 0
    result = json.loads((out / "membership.json").read_text())
    assert result["budget"]["members"] == result["budget"]["nonmembers"] == 180
    assert [r["attack"] for r in result["rows"]] == ["loss threshold"]
    assert "no shadow model: 0 samples are left beyond the 180 non-members" in capsys.readouterr().err
    assert main(["attack", "membership", "--checkpoint", str(run / "checkpoint.pt"), "--shadow",
                 "--out", str(out)]) == 2  # asked for, it cannot be trained: one line says so
    err = capsys.readouterr().err
    assert "a shadow model needs 2 x 20" in err and err.count("\n") == 1
    assert main(["attack", "membership", "--checkpoint", str(run / "checkpoint.pt"), "--samples", "181",
                 "--out", str(out)]) == 2
    assert "only 180 are available" in capsys.readouterr().err
