"""legrace: train CNNs on private data with a trusted side (TEE) and an untrusted accelerator.

The asymmetric decomposition of 3LegRace / AsymML: every conv input X is split per sample into
a low-rank X_main = A·V that stays on the trusted side and a residual X_res that is clipped,
perturbed with Gaussian noise and handed to the accelerator for the heavy convolution.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy so `import legrace.data` does not pay for torch.fx and opacus.
    if name == "LegRace":
        from legrace.wiring import LegRace

        return LegRace
    if name == "MODES":
        from legrace.trusted.settings import MODES

        return MODES
    if name == "Settings":
        from legrace.trusted.settings import Settings

        return Settings
    raise AttributeError(f"module 'legrace' has no attribute {name!r}")


__all__ = ["LegRace", "MODES", "Settings", "__version__"]
