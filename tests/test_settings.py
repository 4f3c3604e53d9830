"""legrace.trusted.settings: an engine's settings are validated once and frozen."""

import dataclasses

import pytest

from legrace import LegRace, Settings


def test_an_engine_keeps_its_settings_frozen_and_normalised():
    engine = LegRace(rank=[4, 2], noise_multiplier=1.0)
    s = engine.settings
    assert isinstance(s, Settings) and s.rank == [4, 2] and s.noise_ahead == 0 and s.overlap is False
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.rank = 8  # type: ignore[misc]
    assert engine.mode == "legrace" and engine.target_delta == 1e-5


def test_the_secret_is_never_printed():
    s = Settings(noise_multiplier=1.0, accelerator="tcp://127.0.0.1:9", secret="hunter2")
    assert "hunter2" not in repr(s) and "hunter2" not in str(s)


@pytest.mark.parametrize("kwargs, message", [
    (dict(mode="fast"), "unknown mode"),
    (dict(noise_multiplier=1.0, target_epsilon=8.0), "exactly one of noise_multiplier and target_epsilon"),
    (dict(noise_multiplier=1.0, clip=None), "only allowed with noise_multiplier=0"),
    (dict(noise_multiplier=1.0, basis_dtype="float16"), "basis_dtype must be one of"),
    (dict(noise_multiplier=1.0, wire_dtype="int8"), "wire_dtype must be"),
    (dict(noise_multiplier=1.0, keep_outputs_mb=5, rebuild_outputs=False), "every conv output is kept already"),
    (dict(noise_multiplier=1.0, power_iters=0), "power_iters must be an int >= 1"),
])
def test_bad_settings_are_refused_by_the_dataclass_and_the_engine_alike(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Settings(**kwargs)
    with pytest.raises(ValueError, match=message):
        LegRace(**kwargs)


def test_an_unknown_setting_is_named():
    with pytest.raises(TypeError, match="noise_multiplyer"):
        LegRace(noise_multiplyer=1.0)
