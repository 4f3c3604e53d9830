"""The privacy-utility study and the rank analysis."""

import json

import pytest

from legrace.attacks.rank import rank_profile, write_profile
from legrace.cli import main
from legrace.attacks.study import StudyConfig, findings, planned_runs
from legrace.attacks.target import load_target
from legrace.train import TrainConfig


def row(mode, eps, acc, rule="auto", **kw):
    return {"mode": mode, "epsilon": eps, "clip_rule": rule if eps is not None else None, "val_acc": acc, **kw}


def test_findings_check_the_claims():
    rows = [row("gpu_only", None, 0.60, ssim_layer1=0.8), row("lowrank_only", None, 0.50, ssim_layer1=0.19),
            row("legrace", 1.0, 0.495, ssim_layer1=0.18), row("legrace", 1e6, 0.53, ssim_layer1=0.4),
            row("dp_only", 1.0, 0.10), row("dp_only", 1e6, 0.45)]
    f = findings(rows, (1,))
    auto = f["per_rule"]["auto"]
    assert auto["legrace_minus_dp_only"] == {1.0: pytest.approx(0.395), 1e6: pytest.approx(0.08)}
    assert auto["at_least_15_points_over_dp_only"] is False  # fails at 1e6
    assert auto["never_more_than_1_point_below_lowrank_only"] is True  # -0.5 points at eps 1
    assert auto["epsilon_from_which_leg_adds_2_points"] == 1e6
    assert auto["max_ssim_layer1_legrace"] == 0.4
    assert f["ssim_layer1_raw_view"] == 0.8 and f["ssim_layer1_prior_only"] == 0.19
    worse = findings([r if r["epsilon"] != 1.0 or r["mode"] != "legrace" else row("legrace", 1.0, 0.48)
                      for r in rows], (1,))
    assert worse["per_rule"]["auto"]["never_more_than_1_point_below_lowrank_only"] is False


def test_best_rule_is_flagged_as_chosen_on_validation_data():
    rows = [row("lowrank_only", None, 0.50), row("legrace", 8.0, 0.50, "auto"), row("legrace", 8.0, 0.53, "std:0.25")]
    f = findings(rows, ())
    best = f["best_rule_per_epsilon_chosen_on_validation_data"]
    assert best["epsilon_from_which_leg_adds_2_points"] == 8.0 and "validation" in best["note"]
    assert f["per_rule"]["auto"]["epsilon_from_which_leg_adds_2_points"] is None


def test_planned_runs_cover_the_grid():
    runs = planned_runs(StudyConfig(epsilons=(1.0, 8.0), clip_rules=("auto", "std:0.25"), seeds=(0, 1)))
    assert len(runs) == 2 * (2 + 2 * 2 * 2)
    assert len({r["name"] for r in runs}) == len(runs)
    with pytest.raises(ValueError, match="unknown mode"):
        planned_runs(StudyConfig(modes=("tee_only", "nope")))


def test_study_command_runs_a_small_grid(tmp_path, capsys):
    out = tmp_path / "study"
    args = ["study", "privacy-utility", "--max-samples", "400", "--epochs", "1", "--epsilons", "8,1000",
            "--attack-layers", "1", "--aux", "100", "--victims", "16", "--decoder-epochs", "1", "--out", str(out)]
    assert main(args) == 0
    result = json.loads((out / "results.json").read_text())
    modes = [(r["mode"], r["epsilon"]) for r in result["rows"]]
    assert modes == [("gpu_only", None), ("lowrank_only", None), ("legrace", 8.0), ("legrace", 1000.0),
                     ("dp_only", 8.0), ("dp_only", 1000.0)]
    assert all("ssim_layer1" in r for r in result["rows"])
    spent = {r["epsilon"]: r["epsilon_spent"] for r in result["rows"] if r["mode"] == "legrace"}
    assert spent[8.0] == pytest.approx(8.0, abs=0.05) and spent[1000.0] == pytest.approx(1000.0, rel=0.01)
    assert result["budget"]["train_samples"] == 360 and result["budget"]["epochs"] == 1
    assert (out / "results.csv").read_text().startswith("mode,epsilon")
    assert (out / "privacy_utility.png").stat().st_size > 0
    # a rerun reuses the finished runs and their attacks
    capsys.readouterr()
    assert main(args) == 0
    assert "reusing" in capsys.readouterr().err
    # but never a run trained with other settings
    other = list(args)
    other[other.index("--epochs") + 1] = "2"
    assert main(other) == 2
    assert "trained with other settings (epochs)" in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["--seeds", ","], "the grid is empty"),
    (["--modes", "legrace", "--clip-rules", ","], "the grid is empty"),
    (["--attack-layers", "7"], "do not exist"),
    (["--attack-layers=-1"], "do not exist"),
])
def test_a_bad_grid_is_refused_before_any_run_trains(tmp_path, capsys, args, message):
    assert main(["study", "privacy-utility", "--max-samples", "400", "--out", str(tmp_path / "s"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "s" / "runs").exists()
    with pytest.raises(SystemExit):
        main(["study", "privacy-utility", "--rank", "abc"])


def test_rank_profile_measures_energy_and_residuals(tmp_path):
    target = load_target(None, TrainConfig(model="cnn", data="digits", max_samples=900))
    result = rank_profile(target, samples=64, rank=4, ranks=(1, 2, 4, 8))
    layers = result["layers"]
    assert [layer["layer"] for layer in layers] == [0, 1, 2]
    for layer in layers:
        kept = [layer["energy_kept"][str(r)] for r in (1, 2, 4, 8)]
        assert kept == sorted(kept) and 0 < kept[0] <= kept[-1] <= 1 + 1e-9
        assert 1 <= layer["entropy_rank_median"] <= layer["channels"]
    # one input channel: R >= 1 keeps it all and nothing is left to release
    assert layers[0]["residual_relative_median"] < 1e-5 and layers[0]["energy_kept"]["1"] == pytest.approx(1.0)
    assert 0.01 < layers[1]["residual_relative_median"] < 1  # 16 channels of 4x4, R = 4
    paths = write_profile(result, tmp_path)
    assert all(p.stat().st_size > 0 for p in paths)


def test_tables_keep_the_sign_of_an_infinite_value():
    from legrace.attacks.results import _cell, text_table

    assert (_cell(float("-inf")), _cell(float("inf"))) == ("-inf", "inf")
    assert "-inf" in text_table([{"a": float("-inf")}], ["a"])


def test_analyze_rank_runs_with_its_defaults_on_digits_and_says_what_it_read(tmp_path, capsys):
    out = tmp_path / "rank"
    assert main(["analyze", "rank", "--out", str(out)]) == 0
    budget = json.loads((out / "rank.json").read_text())["budget"]
    assert (budget["source"], budget["samples"], budget["data"]) == ("heldout", 180, "digits")
    assert "reads its validation split: a C chosen from these norms is a choice made on private data" in \
        capsys.readouterr().err
    assert main(["analyze", "rank", "--max-samples", "1000", "--out", str(out)]) == 0  # public samples left: those
    budget = json.loads((out / "rank.json").read_text())["budget"]
    assert (budget["source"], budget["samples"]) == ("unused", 256)
    assert "validation split" not in capsys.readouterr().err
    assert main(["analyze", "rank", "--source", "unused", "--out", str(out)]) == 2  # asked for, there are none
    assert "no unused samples to analyse" in capsys.readouterr().err


def test_the_study_attacks_with_the_runs_validation_split_when_nothing_is_left_out(tmp_path):
    out = tmp_path / "study"  # no --max-samples, no --aux (was: no auxiliary data, after training the first run)
    assert main(["study", "privacy-utility", "--modes", "gpu_only", "--epochs", "1", "--attack-layers", "1",
                 "--victims", "16", "--decoder-epochs", "1", "--out", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["budget"]["attack_aux"] == 180 and "ssim_layer1" in result["rows"][0]
