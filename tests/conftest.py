import gc

import pytest
import torch

torch.set_num_threads(max(1, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _collect_after_slow_tests(request):
    """Free each slow test's models before the next one starts.

    A converted model is a torch.fx GraphModule, whose graph and nodes refer to each other, so
    its parameters go only when Python's cycle collector runs. Between 224x224 float64 models
    that can be gigabytes; left to the collector's own timing, the slow suite once peaked past
    this machine's 24 GiB and was killed.
    """
    yield
    if request.node.get_closest_marker("slow"):
        gc.collect()


def rel_err(a: torch.Tensor, b: torch.Tensor, floor: float = 0.0) -> float:
    """||a - b|| / max(||b||, floor)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / max(float(b.norm()), floor, 1e-300))
