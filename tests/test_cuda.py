"""The in-process CUDA accelerator: the split is still exact, honest answers pass the Freivalds
checks, and the benchmark runs. Skipped on machines without a GPU (CI); run where one is lent
(benchmarks/gpu_bench.sh runs this file first)."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from legrace import LegRace
from legrace.cli import main
from legrace.models import SmallCNN, build_model
from legrace.verify import grad_errors

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _assert_same_step(engine: LegRace, split, module, x, y) -> None:
    """One training step of the split model (noise off) gives the plain model's output and grads."""
    ref = copy.deepcopy(module)
    outs = []
    for m in (split, ref):
        out = m(x)
        F.cross_entropy(out, y).backward()
        outs.append(out.detach())
    engine.close()
    assert float((outs[0] - outs[1]).norm() / outs[1].norm()) < 1e-5
    assert max(grad_errors(split, ref).values()) < 1e-4


@pytest.mark.parametrize("overlap,pinned", [(False, False), (True, False), (True, True)])
def test_cuda_accelerator_keeps_the_split_exact(overlap, pinned):
    torch.manual_seed(0)
    module = build_model("vgg11", num_classes=10, image_size=32)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    engine = LegRace(rank=4, clip=None, noise_multiplier=0, accelerator="cuda", overlap=overlap, verify=True,
                     basis_dtype=None, pinned_memory=pinned)
    split = engine.convert(copy.deepcopy(module))
    assert engine.boundary.transport.accelerator.pinned is pinned
    _assert_same_step(engine, split, module, x, y)


@pytest.mark.parametrize("wire_dtype", ["float32", "bfloat16"])
def test_cuda_accelerator_with_noise_trains(wire_dtype):
    torch.manual_seed(0)
    module = SmallCNN(3, 4)
    engine = LegRace(rank=2, noise_multiplier=1.0, accelerator="cuda", wire_dtype=wire_dtype)
    model = engine.convert(module)
    # noise is drawn straight into pinned memory (a bfloat16 wire then rounds it into a new,
    # pageable tensor, which the accelerator copies through a pinned buffer)
    assert engine.mechanism.pinned_output
    assert engine.mechanism.release(torch.randn(2, 3, 4, 4)).tensor.is_pinned()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 4, (8,))
    for _ in range(3):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
    engine.close()
    assert torch.isfinite(loss) and all(p.device.type == "cpu" for p in model.parameters())


def test_gpu_only_puts_the_plain_model_on_the_gpu():
    engine = LegRace(mode="gpu_only", accelerator="cuda")
    model = engine.convert(SmallCNN(3, 4))
    assert all(p.device.type == "cuda" for p in model.parameters())
    assert model(torch.randn(2, 3, 16, 16, device="cuda")).shape == (2, 4)


@pytest.mark.parametrize("flags", [[], ["--no-overlap"], ["--no-pinned"]])
def test_bench_smoke_on_cuda(tmp_path, flags):
    out = tmp_path / "bench"
    assert main(["bench", "--model", "resnet18", "--input-size", "32", "--batch-size", "4", "--repeats", "1",
                 "--warmup", "1", "--modes", "tee_only,legrace,gpu_only", "--accelerator", "cuda", *flags,
                 "--out", str(out)]) == 0
    report = json.loads((out / "bench.json").read_text())
    modes = {m["mode"]: m for m in report["modes"]}
    assert report["overlap"] is ("--no-overlap" not in flags) and report["pinned_memory"] is ("--no-pinned" not in flags)
    assert modes["legrace"]["accelerator_seconds"] > 0 and modes["gpu_only"]["step_seconds"] > 0
    assert "legrace_step / gpu_only_step" in report["ratios"]


def test_a_cuda_worker_process_keeps_the_split_exact():
    torch.manual_seed(1)
    module = SmallCNN(3, 4)
    x, y = torch.randn(6, 3, 16, 16), torch.randint(0, 4, (6,))
    engine = LegRace(rank=2, clip=None, noise_multiplier=0, accelerator="process:cuda")
    _assert_same_step(engine, engine.convert(copy.deepcopy(module)), module, x, y)
