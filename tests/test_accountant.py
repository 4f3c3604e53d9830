import math

import pytest

from legrace.privacy.accountant import OUTSIDE_A_LOADER, covers, PrivacyLedger, calibrate_noise_multiplier, epsilon


def classic_rdp_bound(z, releases, delta):
    """Independent check: Gaussian RDP with sensitivity 2C and std zC is T*a/(2 (z/2)^2);
    the classic conversion eps = min_a RDP(a) + log(1/delta)/(a-1) is an upper bound on the
    tighter conversion Opacus uses."""
    m = z / 2
    return min(releases * a / (2 * m * m) + math.log(1 / delta) / (a - 1) for a in [1 + i / 100 for i in range(1, 20000)])


@pytest.mark.parametrize("z,T", [(4.42, 12), (2.0, 1), (10.0, 300), (1.0, 40)])
def test_epsilon_against_closed_form(z, T):
    eps = epsilon(z, [(2.0, T)], 1e-5)
    bound = classic_rdp_bound(z, T, 1e-5)
    assert eps <= bound + 1e-6
    assert eps >= 0.8 * bound  # the improved conversion is tighter, but not by much


def test_design_section_9_number():
    # DESIGN section 9: 12 releases, eps 8 at delta 1e-5 need sigma = 2.2 x sensitivity (z = 4.4).
    z = calibrate_noise_multiplier(8.0, 1e-5, [(2.0, 12)])
    assert z / 2 == pytest.approx(2.2, abs=0.05)
    assert 7.9 <= epsilon(z, [(2.0, 12)], 1e-5) <= 8.0


def test_more_releases_cost_more_and_prv_agrees():
    one = [(2.0, 1)]
    assert epsilon(5.0, [(2.0, 20)], 1e-5) > epsilon(5.0, [(2.0, 10)], 1e-5) > epsilon(5.0, one, 1e-5)
    assert epsilon(5.0, [(2.0, 20)], 1e-5, "prv") == pytest.approx(epsilon(5.0, [(2.0, 20)], 1e-5), rel=0.25)
    assert epsilon(0.0, [(2.0, 5)], 1e-5) == math.inf and epsilon(3.0, [(2.0, 0)], 1e-5) == 0.0


def test_mixed_sensitivities_compose():
    # releases with sensitivity 2C*sqrt(B) cost like releases with noise divided by sqrt(B)
    z, B = 20.0, 16
    mixed = epsilon(z, [(2.0, 10), (2.0 * math.sqrt(B), 5)], 1e-5)
    assert epsilon(z, [(2.0, 10)], 1e-5) < mixed < epsilon(z / math.sqrt(B), [(2.0, 15)], 1e-5)
    zc = calibrate_noise_multiplier(3.0, 1e-5, [(2.0, 10), (8.0, 5)])
    assert 2.99 - 0.01 <= epsilon(zc, [(2.0, 10), (8.0, 5)], 1e-5) <= 3.0


def test_calibration_errors():
    with pytest.raises(ValueError, match="target_epsilon"):
        calibrate_noise_multiplier(0.0, 1e-5, [(2.0, 3)])
    with pytest.raises(ValueError, match="delta"):
        calibrate_noise_multiplier(1.0, 2.0, [(2.0, 3)])
    with pytest.raises(ValueError, match="unknown accountant"):
        epsilon(1.0, [(2.0, 1)], 1e-5, "moments")


def test_ledger_persists_before_a_pass_and_never_forgets(tmp_path):
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger(path)
    ledger.record_pass("train")
    ledger.record_pass("train")
    ledger.record_pass("validation")
    again = PrivacyLedger(path)
    assert again.uses == {"train": 2, "validation": 1} and again.max_uses == 2
    again.load_state_dict({"uses": {"train": 1}})  # an older checkpoint cannot lower the count
    assert again.uses["train"] == 2


def test_two_processes_sharing_a_ledger_file_never_lose_a_use(tmp_path):
    # an evaluation during training: each ledger object adds its pass to what the file holds
    training, evaluation = PrivacyLedger(tmp_path / "ledger.json"), PrivacyLedger(tmp_path / "ledger.json")
    training.record_pass("train")
    evaluation.record_pass("train")
    training.record_pass("train")
    assert training.uses["train"] == 3 and PrivacyLedger(tmp_path / "ledger.json").uses["train"] == 3


def test_uses_outside_a_loader_add_to_every_data_set():
    ledger = PrivacyLedger()
    for name in ("train", "train", "validation", OUTSIDE_A_LOADER):
        ledger.record_pass(name)
    assert ledger.max_uses == 3


def test_a_pricing_covers_another_only_if_it_accounts_at_least_as_much():
    assert covers([(2.0, 3), (16.0, 1)], [(2.0, 3), (8.0, 1)])
    assert covers([(2.0, 2), (16.0, 2)], [(2.0, 3), (16.0, 1)])  # a dearer release stands for a cheaper one
    assert not covers([(2.0, 3), (8.0, 1)], [(2.0, 3), (16.0, 1)])  # a smaller batch after a BatchNorm
    assert not covers([(2.0, 2), (16.0, 1)], [(2.0, 3), (16.0, 1)])  # a point fewer
