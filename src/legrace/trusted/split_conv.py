"""The trusted side of one conv layer, split as in DESIGN section 2.

Forward:  Y = sum_p conv(V_p, W'_p) [trusted, R input channels]  +  conv(X_res~, W) [accelerator]
          with W'[i, p] = sum_j A[j, p] W[i, j], batched as one grouped conv with per-sample kernels.
Backward: dL/dX = conv_transpose(dL/dY, W) [accelerator, paper's mode; the decomposition is the
          identity in backward], dL/dW = trusted low-rank part + accelerator's X_res~ part.

Modes: "legrace" releases the noised residual; "dp_only" is the same with R = 0 (the whole
activation is the residual); "lowrank_only" drops the residual and sends nothing at all. In
legrace, a conv whose input channels R covers has no residual and sends nothing either (silent).
Under the engine's `trusted_inference` a releasing mode's conv computes conv(X, W) whole on the
trusted side instead (the unconverted model's output): no split, no noise, nothing crosses.

Each request to the accelerator is sent before the trusted side computes its own part of the
same layer and collected after, so with `Boundary(overlap=True)` the two legs run concurrently.

Threads may share an engine (a serving pool): each split conv's forward, backward and rebuild holds
the engine's lock (`SplitConfig.lock`), so its accounting, noise and crossings are never
interleaved with another thread's, and a split kept for a later conv is kept per thread.
"""

from __future__ import annotations

import itertools
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.grad import conv2d_input, conv2d_weight
from torch.nn.modules.utils import _pair

from legrace.boundary.gateway import Boundary
from legrace.trusted.compact import layout_of
from legrace.trusted.decompose import Rank, decompose, rank_for_point
from legrace.trusted.mechanism import GaussianMechanism
from legrace.trusted.recompute import ConvOutputs

SPLIT_MODES = ("legrace", "dp_only", "lowrank_only")


@dataclass
class SplitConfig:
    """Trusted-side settings shared by every split conv of one model."""

    mode: str
    rank: Rank
    method: str = "light"
    iters: int = 2
    max_rank: int = 16
    basis_dtype: Optional[torch.dtype] = None  # how V is kept for backward (see decompose)
    wire_dtype: Optional[torch.dtype] = None  # noised residuals cross in this dtype (post-processing)
    n_points: int = 0
    mechanism: Optional[GaussianMechanism] = None
    boundary: Optional[Boundary] = None
    outputs: Optional[ConvOutputs] = None  # conv outputs that backward rebuilds instead of keeping
    on_release: Optional[Callable[[int, int], None]] = None  # told each release's point and rows (accounting)
    trusted_only: Optional[Callable[[], bool]] = None  # whether this thread's forwards stay trusted (trusted_inference)
    # (thread, point) -> [its input, the input's version, its A, V and noised residual, reusers
    # left], kept by a conv whose input later convs read too (SplitConv2d.reusers) until the last
    # takes it: per thread, since two threads' forwards may be between the same two convs
    shared: dict = field(default_factory=dict)
    # held by each split conv's forward, backward and rebuild: one thread at a time accounts,
    # draws, crosses and times (the engine's lock, which its private loaders' bookkeeping holds too)
    lock: threading.RLock = field(default_factory=threading.RLock)

    def __deepcopy__(self, memo: dict) -> "SplitConfig":
        # A copy of the model (an EMA, torch.optim.swa_utils.AveragedModel) runs under the same
        # engine: one boundary, and one noise generator, whose copy would replay the same noise.
        return self

    def point_rank(self, point: int) -> int | str:
        """R at a decomposition point (0 in dp_only: the whole activation is the residual)."""
        return 0 if self.mode == "dp_only" else rank_for_point(self.rank, point, self.n_points)

    @property
    def releases(self) -> bool:
        return self.mode in ("legrace", "dp_only")


def direct_is_cheaper(N: int, R: int, hw: int) -> bool:
    """conv(V, W') costs about R·M·hw·k² + M·N·R·k² (forming W'); conv(A·V, W) N·M·hw·k².
    On small feature maps (hw <= R) forming W' costs more than the conv it saves."""
    return R * (hw + N) >= N * hw


# The low-rank conv is R input channels per sample with per-sample kernels W'. oneDNN's grouped conv
# (groups = B) runs it far below its dense-conv rate; im2col (F.unfold of V, R·k² rows) and one
# batched GEMM per sample do better once M, the GEMM's other side, amortises the unfold, on maps
# that are not too large (benchmarks/lowrank_paths.py; docs/performance.md).
UNFOLD_MIN_OUT_CHANNELS = 128
UNFOLD_MAX_PIXELS = 56 * 56


def unfold_is_faster(M: int, hw: int) -> bool:
    """Whether the low-rank conv and its weight gradient go through F.unfold and a batched GEMM."""
    return M >= UNFOLD_MIN_OUT_CHANNELS and hw <= UNFOLD_MAX_PIXELS


def _unfold(V: Tensor, hw, kernel, stride, padding, dilation) -> Tensor:
    """im2col of V: B x (R·kh·kw) x L, rows in the (p, kh, kw) order of W'[b, i].flatten()."""
    B, R, _ = V.shape
    return F.unfold(V.reshape(B, R, *hw), kernel, dilation=dilation, padding=padding, stride=stride)


LOWRANK_PATHS = ("direct", "grouped", "unfold")


def lowrank_path(N: int, R: int, M: int, hw: int) -> str:
    """How the low-rank conv of an N -> M conv at rank R on hw pixels is computed: "direct" as
    conv(A·V, W), else with W' by a grouped conv or by im2col and a batched GEMM."""
    if direct_is_cheaper(N, R, hw):
        return "direct"
    return "unfold" if unfold_is_faster(M, hw) else "grouped"


def rebuild_cost(N: int, R: int, M: int, hw_in: int, hw_out: int, k: int) -> float:
    """Multiply-accumulates per output element of rebuilding a conv's output on the trusted side
    (one low-rank conv, `lowrank_conv`'s path): k = kh·kw. Forming W' (M·N·R·k per sample) is
    spread over the M·hw_out outputs, so small deep maps cost the most per byte kept."""
    if lowrank_path(N, R, M, hw_in) == "direct":
        return N * k + N * R * hw_in / (M * hw_out)  # conv(A·V, W), and A·V
    return R * k + N * R * k / hw_out


def _checked_path(path: Optional[str]) -> Optional[str]:
    if path is not None and path not in LOWRANK_PATHS:
        raise ValueError(f"unknown low-rank conv path {path!r}; choose one of {LOWRANK_PATHS}")
    return path


def lowrank_conv(A: Tensor, V: Tensor, weight: Tensor, hw: tuple[int, int], stride, padding, dilation,
                 bias: Optional[Tensor] = None, path: Optional[str] = None) -> Tensor:
    """conv(A·V, W) (+ bias), computed as conv(V, W') with only R input channels per sample where
    cheaper. The bias rides in the conv's (or GEMM's) own epilogue instead of an extra pass over Y.
    path: one of LOWRANK_PATHS, or None to choose by shape (`lowrank_path`)."""
    B, N, R = A.shape
    M, _, kh, kw = weight.shape
    V = V.to(A.dtype)  # V may be stored in a smaller dtype (SplitConfig.basis_dtype)
    path = _checked_path(path) or lowrank_path(N, R, M, hw[0] * hw[1])
    if path == "direct":
        return F.conv2d((A @ V).reshape(B, N, *hw), weight, bias, stride, padding, dilation)
    w_prime = torch.einsum("bnr,mnkl->bmrkl", A, weight)
    if path == "unfold":
        U = _unfold(V, hw, (kh, kw), stride, padding, dilation)
        w_prime = w_prime.reshape(B, M, R * kh * kw)
        y = torch.bmm(w_prime, U) if bias is None else torch.baddbmm(bias.reshape(1, M, 1), w_prime, U)
        return y.reshape(B, M, *_out_hw(hw, (kh, kw), stride, padding, dilation))
    y = F.conv2d(V.reshape(1, B * R, *hw), w_prime.reshape(B * M, R, kh, kw),
                 None if bias is None else bias.repeat(B), stride, padding, dilation, groups=B)
    return y.reshape(B, M, *y.shape[2:])


def lowrank_weight_grad(A: Tensor, V: Tensor, grad_y: Tensor, w_shape, hw, stride, padding, dilation,
                        path: Optional[str] = None) -> Tensor:
    """The trusted part of dL/dW: sum_b sum_p A[b, j, p] · (V_bp (*) dL/dY_bi), by `path` as in
    lowrank_conv."""
    B, N, R = A.shape
    M, _, kh, kw = w_shape
    V = V.to(A.dtype)
    path = _checked_path(path) or lowrank_path(N, R, M, hw[0] * hw[1])
    if path == "direct":
        return conv2d_weight((A @ V).reshape(B, N, *hw), w_shape, grad_y, stride, padding, dilation)
    if path == "unfold":
        U = _unfold(V, hw, (kh, kw), stride, padding, dilation)
        g_prime = torch.bmm(grad_y.flatten(2), U.transpose(1, 2))
    else:
        step = _grouped_chunk(grad_y)
        chunks = [_grouped_weight_grad(V[i:i + step], grad_y[i:i + step], R, hw, (kh, kw), stride, padding,
                                       dilation) for i in range(0, B, step)]
        g_prime = torch.cat(chunks) if chunks else grad_y.new_zeros(0, M * R, kh, kw)  # no samples: dW = 0
    return torch.einsum("bnr,bmrkl->mnkl", A, g_prime.reshape(B, M, R, kh, kw))


# oneDNN's grouped weight gradient reorders all of dL/dY into a scratch buffer of its own size, a
# fresh allocation at each call, which glibc maps afresh (every page faults) on any thread but the
# main one, or when the heap has no free block that large. In chunks of a few samples the scratch
# is reused: as fast as one call without faults, bit for bit the same (benchmarks/wgrad_scratch.py;
# docs/performance.md).
GROUPED_CHUNK_BYTES = 16 * 2**20


def _grouped_chunk(grad_y: Tensor) -> int:
    """Samples per chunk of the grouped weight gradient: dL/dY of at most GROUPED_CHUNK_BYTES."""
    return max(1, GROUPED_CHUNK_BYTES // max(1, grad_y.shape[1:].numel() * grad_y.element_size()))


def _grouped_weight_grad(V: Tensor, grad_y: Tensor, R: int, hw, kernel, stride, padding, dilation) -> Tensor:
    """g' of the samples in V and dL/dY: B x (M·R) x kh x kw, one group per sample."""
    B, M = grad_y.shape[:2]
    return conv2d_weight(V.reshape(1, B * R, *hw), (B * M, R, *kernel), grad_y.reshape(1, B * M, *grad_y.shape[2:]),
                         stride, padding, dilation, groups=B)


def _out_hw(hw, kernel, stride, padding, dilation) -> tuple[int, int]:
    """A conv's output height and width (ints or pairs, as F.conv2d takes them)."""
    return tuple((n + 2 * p - d * (k - 1) - 1) // s + 1
                 for n, k, s, p, d in zip(hw, *map(_pair, (kernel, stride, padding, dilation))))


class LayerObserver(Protocol):
    """Told of each split conv's trusted work, e.g. `legrace bench`'s per-layer timing.

    point: the layer's decomposition point; phase: "fwd" or "bwd"; kind: "total" (the layer's wall
    time on the trusted side, its waits included), "wait" (of which the boundary's transport took:
    the accelerator's compute and the transfers) or "rebuild" (its output was rebuilt for backward;
    seconds: the rebuild's time, also in "total").
    """

    def layer_event(self, point: int, phase: str, kind: str, seconds: float) -> None: ...


Observer = Union[LayerObserver, Callable[[int, str, str, float], None]]
_observer_ids = itertools.count()


class ObserverHandle:
    """What observe_layers and SplitConv2d.register_observer return: `remove()` detaches the
    observer again (also on leaving a `with` block)."""

    def __init__(self, layers: list["SplitConv2d"], key: int) -> None:
        self._layers, self._key = layers, key

    def remove(self) -> None:
        for layer in self._layers:
            layer._observers.pop(self._key, None)

    def __enter__(self) -> "ObserverHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def observe_layers(model: nn.Module, observer: Observer) -> ObserverHandle:
    """Attach `observer` (a LayerObserver or a callable with its arguments) to every split conv of
    `model`, like torch's register_forward_hook; with none attached a layer pays one check."""
    layers = [m for m in model.modules() if isinstance(m, SplitConv2d)]
    fn = getattr(observer, "layer_event", observer)
    if not callable(fn):
        raise TypeError(f"a layer observer is a callable or has a layer_event method, got {type(observer).__name__}")
    key = next(_observer_ids)
    for layer in layers:
        layer._observers[key] = fn
    return ObserverHandle(layers, key)


def _tell(layer: "SplitConv2d", phase: str, kind: str, seconds: float) -> None:
    for fn in tuple(layer._observers.values()):
        fn(layer.point, phase, kind, seconds)


def _timed_call(layer: "SplitConv2d", phase: str, fn, *args, **kwargs):
    """Call a boundary method; when observed, tell the time its transport took as "wait".

    Only the transport's time counts as waiting (the accelerator's compute and the transfers):
    the boundary's own checks of a reply are trusted-side work and stay in the trusted time.
    """
    if not layer._observers:
        return fn(*args, **kwargs)
    boundary = layer.config.boundary
    before = boundary.seconds_waiting
    try:
        return fn(*args, **kwargs)
    finally:
        _tell(layer, phase, "wait", boundary.seconds_waiting - before)


def combine_outputs(y_main: Optional[Tensor], y_res: Optional[Tensor], bias: Optional[Tensor], out_shape,
                    like: Tensor) -> Tensor:
    """Y = Y_main (bias included) + Y_res, in one fixed order, so a rebuilt Y has the same bits."""
    if y_main is not None:
        return y_main.add_(y_res) if y_res is not None else y_main
    if y_res is not None:
        y = y_res.clone() if y_res.dtype == like.dtype else y_res.to(like.dtype)
    else:
        y = like.new_zeros(out_shape)
    return y.add_(bias.reshape(1, -1, 1, 1)) if bias is not None else y


def _rebuilder(layer: "SplitConv2d", A: Tensor, V: Tensor, weight: Tensor, bias: Optional[Tensor], hw,
               stored, out_shape):
    """Y again, from the kept A and V and the accelerator's stored residual (legrace.trusted.recompute)."""
    cfg = layer.config
    versions = [p._version for p in (weight, bias) if p is not None]

    def rebuild() -> Tensor:
        with cfg.lock:
            return _rebuild()

    def _rebuild() -> Tensor:
        t0 = time.perf_counter()
        if [p._version for p in (weight, bias) if p is not None] != versions:
            raise RuntimeError(f"the weight or bias of conv layer {layer.point} changed between forward and "
                               "backward, so its output cannot be rebuilt; step the optimizer after backward")
        pending = y_main = y_res = None
        if stored is not None:  # asked for first: the accelerator works while the trusted side does
            _timed_call(layer, "bwd", cfg.boundary.hold_weight, layer.point, weight)
            pending = _timed_call(layer, "bwd", cfg.boundary.resend_output, layer.point, stored,
                                  out_shape, wait=False)
        if A.shape[-1] > 0:
            y_main = lowrank_conv(A, V, weight, hw, layer.stride, layer.padding, layer.dilation, bias)
        if pending is not None:
            y_res = _timed_call(layer, "bwd", pending.result)
        y = combine_outputs(y_main, y_res, bias, out_shape, A)
        if layer._observers:
            seconds = time.perf_counter() - t0
            _tell(layer, "bwd", "rebuild", seconds)
            _tell(layer, "bwd", "total", seconds)
        return y

    return rebuild


def _version(t: Tensor) -> Optional[int]:
    """t's in-place version counter; None for inference tensors (torch.inference_mode), which
    keep none."""
    return None if t.is_inference() else t._version


def _take_shared(layer: "SplitConv2d", x: Tensor):
    """A, V and the noised residual that conv `layer.same_as` made of x. Anything else is
    refused: a fresh release here would not be accounted."""
    shared, key = layer.config.shared, (threading.get_ident(), layer.same_as)
    entry = shared.get(key)
    if entry is None or entry[0]() is not x or entry[1] != _version(x):
        shared.pop(key, None)
        raise RuntimeError(
            f"conv layer {layer.point} reads the same input as conv layer {layer.same_as} in the traced model, "
            "but did not get the tensor that layer split and released: a second release of it would not be "
            "accounted (was the input changed in place, or the layers called outside the model's forward?)")
    entry[5] -= 1
    if entry[5] == 0:
        del shared[key]
    return entry[2:5]


class SplitConvFunction(torch.autograd.Function):
    """SplitConv2d's autograd function: the split forward and backward of one conv call."""

    # Under autocast the trusted side still computes in float32: the split and the noise are
    # defined on the activations' own values (and a residual's Y_res must match its dtype).
    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu", cast_inputs=torch.float32)
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], layer: "SplitConv2d", sends: bool,
                grad: bool) -> Tensor:
        """sends: this call releases (see SplitConv2d.sends_at); grad: autograd records it, so
        backward will run (the accelerator keeps the residual, the output may be rebuilt)."""
        t0 = time.perf_counter()
        cfg = layer.config
        released = X_res = None
        if sends and layer.same_as is not None:  # the earlier conv's split and release of this very input
            A, V, released = _take_shared(layer, x)
        else:
            dec = decompose(x, cfg.point_rank(layer.point), method=cfg.method, iters=cfg.iters, max_rank=cfg.max_rank,
                            basis_dtype=cfg.basis_dtype)
            A, V, X_res = dec.A, dec.V, dec.X_res
            del dec
        hw = tuple(x.shape[2:])
        out_shape = (x.shape[0], weight.shape[0], *layer.output_hw(hw))
        pending = y_main = stored = y_res = None
        if sends:  # sent first: the accelerator convolves X_res~ while we convolve V with W'
            if released is None:
                if cfg.on_release is not None:  # accounted (or refused) before anything is drawn or sent
                    cfg.on_release(layer.point, x.shape[0])
                released = cfg.mechanism.release(X_res, cfg.wire_dtype)
            if layer.reusers:  # kept for the later convs without X_res, which they do not need
                cfg.shared[threading.get_ident(), layer.point] = [weakref.ref(x), _version(x), A, V, released,
                                                                  layer.reusers]
            pending = _timed_call(layer, "fwd", cfg.boundary.conv_forward, layer.point, released,
                                  grad and weight.requires_grad, out_shape, wait=False)
        X_res = None  # released (or, lowrank_only, dropped): not kept past this point
        if A.shape[-1] > 0:
            y_main = lowrank_conv(A, V, weight, hw, layer.stride, layer.padding, layer.dilation, bias)
        if pending is not None:
            y_res, stored = _timed_call(layer, "fwd", pending.result)
        y = combine_outputs(y_main, y_res, bias, out_shape, x)  # lowrank_only: the residual is dropped
        if grad and cfg.outputs is not None and (stored is not None or pending is None):
            cfg.outputs.offer(y, _rebuilder(layer, A, V, weight, bias, hw, stored, out_shape), layer.point,
                              rebuild_cost(A.shape[1], A.shape[2], weight.shape[0], hw[0] * hw[1],
                                           out_shape[2] * out_shape[3], weight.shape[2] * weight.shape[3]))
        ctx.save_for_backward(A, V, weight)
        ctx.layer, ctx.stored, ctx.x_shape, ctx.sent = layer, stored, tuple(x.shape), sends
        if layer._observers:
            _tell(layer, "fwd", "total", time.perf_counter() - t0)
        return y

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad_y: Tensor):
        with ctx.layer.config.lock:
            return SplitConvFunction._backward(ctx, grad_y)

    @staticmethod
    def _backward(ctx, grad_y: Tensor):
        t0 = time.perf_counter()
        A, V, weight = ctx.saved_tensors
        layer, cfg = ctx.layer, ctx.layer.config
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        conv_args = (layer.stride, layer.padding, layer.dilation)
        grad_y = grad_y.contiguous()
        grad_x = grad_w = g_main = pending = None
        if ctx.sent:  # sent first: the accelerator works while the trusted side does its part
            _timed_call(layer, "bwd", cfg.boundary.hold_weight, layer.point, weight)
            pending = _timed_call(layer, "bwd", cfg.boundary.conv_backward, layer.point, ctx.stored, grad_y,
                                  ctx.x_shape, tuple(weight.shape), need_x, need_w, wait=False)
        elif need_x:  # lowrank_only or a silent layer: nothing leaves the trusted side, not even dL/dY
            grad_x = conv2d_input(ctx.x_shape, weight, grad_y, *conv_args)
        if need_w and A.shape[-1] > 0:
            g_main = lowrank_weight_grad(A, V, grad_y, weight.shape, ctx.x_shape[2:], *conv_args)
        grad_b = grad_y.sum((0, 2, 3)) if need_b else None
        if pending is not None:
            grad_x, grad_w = _timed_call(layer, "bwd", pending.result)
        if need_w:
            if g_main is not None:
                grad_w = g_main if grad_w is None else g_main.add_(grad_w)
            elif grad_w is None:
                grad_w = torch.zeros_like(weight)
        if layer._observers:
            _tell(layer, "bwd", "total", time.perf_counter() - t0)
        return grad_x, grad_w, grad_b, None, None, None


class SplitConv2d(nn.Module):
    """Stands in for a user's nn.Conv2d; shares its weight and bias Parameters (same names)."""

    def __init__(self, conv: nn.Conv2d, point: int, config: SplitConfig,
                 same_as: Optional["SplitConv2d"] = None) -> None:
        super().__init__()
        self.weight = conv.weight
        self.bias = conv.bias
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.dilation = conv.kernel_size, conv.stride, conv.dilation
        self.padding = conv_padding(conv)
        self.point = point
        self.config = config
        self._observers: dict[int, Callable[[int, str, str, float], None]] = {}  # see observe_layers
        self.planned_hw: Optional[tuple[int, int]] = None  # see plan()
        # A fixed R that covers every input channel splits X exactly (X_main = X, X_res = 0): such a
        # conv (a first conv's image, at R >= 3) runs wholly on the trusted side and nothing about
        # it crosses: no residual (it would be noise alone), no weight, no dL/dY. It is not accounted.
        R = config.point_rank(point)
        self.silent = config.releases and R != "auto" and R >= conv.in_channels
        # A conv that reads the same input as an earlier one (a ResNet block's downsample and its
        # first conv) at the same rank reuses that conv's split and noised residual: the same
        # release sent twice is post-processing, so the input is released, and accounted, once.
        self.same_as: Optional[int] = None
        self.reusers = 0  # later convs that reuse this one's split (their same_as == self.point)
        if same_as is not None and self.sends and same_as.sends and R == config.point_rank(same_as.point):
            self.same_as = same_as.point
            same_as.reusers += 1
        if self.sends:
            config.boundary.register_conv(point, self.stride, self.padding, self.dilation)

    def register_observer(self, observer: Observer) -> ObserverHandle:
        """Attach a LayerObserver to this conv alone (observe_layers attaches one to a whole model)."""
        return observe_layers(self, observer)

    @property
    def sends(self) -> bool:
        """Whether this conv talks to the accelerator at all (releasing modes, not silent)."""
        return self.config.releases and not self.silent

    @property
    def crosses(self) -> bool:
        """Whether this conv talks to the accelerator at the map size planned (if any)."""
        return self.sends if self.planned_hw is None else self.sends_at(self.planned_hw)

    @property
    def releases_nothing(self) -> bool:
        """Not accounted: silent, split exactly at the map size planned, or reusing an earlier
        conv's release."""
        return not self.crosses or self.same_as is not None

    def plan(self, hw: tuple[int, int]) -> None:
        """The input size the noise is calibrated for (LegRace.make_private): if R covers it, this
        conv is not accounted, and an input on which it would release is refused."""
        self.planned_hw = tuple(hw)

    def output_hw(self, hw: tuple[int, int]) -> tuple[int, int]:
        return _out_hw(hw, self.kernel_size, self.stride, self.padding, self.dilation)

    def sends_at(self, hw: tuple[int, int]) -> bool:
        """Whether a call on h x w maps releases. A fixed R >= h*w splits X exactly too (A = X,
        V = I, X_res = 0): such a call (a deep layer of a small image) runs wholly on the trusted
        side like a silent conv. Shapes are public, so this depends on no private value. Such a
        point is not accounted once planned (`plan`); unplanned, it stays accounted (epsilon overstated)."""
        R = self.config.point_rank(self.point)
        return self.sends and (R == "auto" or R < hw[0] * hw[1])

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"layer {self.point} expects a 4-d N x C x H x W input, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"layer {self.point} expects a floating-point input, got {x.dtype}")
        if self.config.trusted_only is not None and self.config.trusted_only():
            # trusted inference: the plain conv of the whole input, as nn.Conv2d computes it; no
            # split (none kept for a conv that reuses it), no noise, nothing crosses or is accounted
            return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)
        sends = self.sends_at(tuple(x.shape[2:]))
        if sends and not self.crosses:
            raise RuntimeError(
                f"conv layer {self.point} was planned to release nothing (R covers its {self.planned_hw[0]}x"
                f"{self.planned_hw[1]} map at the input size the noise was calibrated for), but this input gives "
                f"{x.shape[2]}x{x.shape[3]}: its release would not be accounted; feed inputs of one size")
        with self.config.lock:
            if sends:
                self._sync_weight()
            y = SplitConvFunction.apply(x, self.weight, self.bias, self, sends, torch.is_grad_enabled())
        return layout_of(y, x)

    def _sync_weight(self) -> None:
        # Every forward: a change through `.data` (weight clipping, pruning masks, EMA swaps) moves
        # no version counter, and a remote accelerator holds a copy. Training changes W every step
        # anyway; beside a batch's residuals, W is a small message. Timed as the layer's (its transport
        # time as waiting, the rest as trusted work), like its conv requests, for `legrace bench`.
        t0 = time.perf_counter()
        _timed_call(self, "fwd", self.config.boundary.set_weight, self.point, self.weight)
        if self._observers:
            _tell(self, "fwd", "total", time.perf_counter() - t0)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, point={self.point}, mode={self.config.mode}"
            + (", silent (R covers every input channel: nothing crosses)" if self.silent else "")
        )


def conv_padding(conv: nn.Conv2d) -> tuple[int, int]:
    """Integer padding of a conv, resolving 'valid' and symmetric 'same'."""
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        if any(t % 2 for t in total):
            raise ValueError("padding='same' with an even kernel pads asymmetrically, which legrace does not support")
        return tuple(t // 2 for t in total)
    return tuple(conv.padding)
