"""Convert a user's own nn.Module by rewriting its torch.fx graph (like quantize_fx).

The model is traced once; every node is checked against the layers legrace knows how to place
(DESIGN section 4), and every nn.Conv2d call becomes a decomposition point: a SplitConv2d that
shares the conv's Parameters, so parameter names, state_dict keys and the user's optimizer stay
valid. Everything else (BN, ReLU, pools, adds, the classifier head) runs on the trusted side as is.
"""

from __future__ import annotations

import contextlib
import inspect
import operator
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.utils import parametrize

from legrace.trusted.compact import CompactMaxPool2d, PackedReLU, compact_equivalent
from legrace.trusted.split_conv import SplitConv2d


class UnsupportedModelError(ValueError):
    """The model uses a layer or operation legrace cannot place; the message names it."""


SUPPORTED_MODULES = (
    nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
    nn.Dropout, nn.Flatten, nn.Identity,
)
SUPPORTED_FUNCTIONS = {
    operator.add, operator.iadd, torch.add, torch.flatten, torch.relu, torch.relu_, F.relu,
    F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.dropout, getattr, operator.getitem,
}
SUPPORTED_METHODS = {"add", "add_", "relu", "relu_", "flatten", "view", "reshape", "size", "dim", "contiguous"}


def trace(module: nn.Module) -> fx.GraphModule:
    """Symbolically trace `module`, turning tracer failures into one clear error."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(module).__name__}")
    try:
        return fx.symbolic_trace(module)
    except Exception as err:  # tracer errors come in many types; the user needs one message
        raise UnsupportedModelError(
            f"could not trace {type(module).__name__} with torch.fx ({type(err).__name__}: {err}). "
            "legrace needs a model without data-dependent control flow."
        ) from err


def check_supported(gm: fx.GraphModule) -> None:
    """Raise UnsupportedModelError naming the first node legrace cannot place."""
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        if node.op == "call_module":
            mod = modules[node.target]
            if not isinstance(mod, SUPPORTED_MODULES):
                raise UnsupportedModelError(
                    f"layer '{node.target}' ({type(mod).__name__}) is not supported by legrace; "
                    f"supported: {', '.join(m.__name__ for m in SUPPORTED_MODULES)}"
                )
            if isinstance(mod, nn.Conv2d):
                if mod.groups != 1:
                    raise UnsupportedModelError(f"layer '{node.target}' is a grouped conv (groups={mod.groups}); only groups=1 is supported")
                if mod.padding_mode != "zeros":
                    raise UnsupportedModelError(f"layer '{node.target}' uses padding_mode={mod.padding_mode!r}; only 'zeros' is supported")
        elif node.op == "call_function" and node.target not in SUPPORTED_FUNCTIONS:
            name = getattr(node.target, "__name__", str(node.target))
            raise UnsupportedModelError(f"operation '{name}' (node '{node.name}'{_inside(node)}) is not supported by legrace")
        elif node.op == "call_method" and node.target not in SUPPORTED_METHODS:
            raise UnsupportedModelError(
                f"tensor method '.{node.target}()' (node '{node.name}'{_inside(node)}) is not supported by legrace")


def _inside(node: fx.Node) -> str:
    """', in layer NAME (Class)' for a node traced inside a submodule's own forward, such as a ReLU
    subclass that computes something else: the user needs the layer, not only the operation."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    key, value = list(stack.items())[-1]
    path, cls = value if isinstance(value, tuple) else (key, value)  # (path, class) since torch 2.1
    return f", in layer '{path}' ({getattr(cls, '__name__', cls)})"


LEGRACE_LAYERS = (SplitConv2d, PackedReLU, CompactMaxPool2d)  # what a conversion puts in


def check_modules(module: nn.Module) -> None:
    """Refuse, by name, modules that tracing would misread: a model legrace has converted already,
    a lazy layer not yet initialised, and subclasses of Conv2d (each conv is replaced by a stand-in
    that computes a plain Conv2d, which would drop what a subclass adds, such as the fake
    quantisation of quantisation-aware training)."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(module).__name__}")
    for name, m in module.named_modules():
        what = f"layer '{name}'" if name else "the model"
        if isinstance(m, LEGRACE_LAYERS):
            raise UnsupportedModelError(f"{what} ({type(m).__name__}) is legrace's own: the model was converted "
                                        "already; convert the original model")
        if isinstance(m, LazyModuleMixin) and m.has_uninitialized_params():
            raise UnsupportedModelError(f"{what} ({type(m).__name__}) is not initialised yet: run one forward of "
                                        "the model before make_private (or convert)")
        if isinstance(m, nn.Conv2d) and type(m) is not nn.Conv2d and not parametrize.is_parametrized(m):
            raise UnsupportedModelError(f"{what} is a {type(m).__module__}.{type(m).__qualname__}, a subclass of Conv2d: legrace stands in "
                                        "for torch.nn.Conv2d itself and would drop what the subclass adds")
        if isinstance(m, nn.Conv2d) and m.weight.dtype not in (torch.float32, torch.float64):
            raise UnsupportedModelError(f"{what} has {m.weight.dtype} weights: legrace's trusted side computes in "
                                        "float32 or float64; keep the model in float32 (torch.autocast is allowed)")


def has_hooks(module: nn.Module) -> bool:
    """Whether forward or backward hooks are registered on `module` itself (a stand-in would drop them)."""
    return bool(module._forward_pre_hooks or module._forward_hooks or module._backward_pre_hooks
                or module._backward_hooks)


def check_replaceable(name: str, conv: nn.Conv2d) -> None:
    """Refuse a conv that a SplitConv2d cannot stand in for: the stand-in shares the conv's weight
    and bias Parameters once, at conversion, and runs none of the conv's hooks."""
    how = "before make_private (or convert)"
    if parametrize.is_parametrized(conv):
        raise UnsupportedModelError(
            f"layer '{name}' has parametrized weights (torch.nn.utils.parametrize, e.g. weight_norm or "
            f"spectral_norm), which legrace does not support: remove the parametrization {how}")
    if not isinstance(conv.weight, nn.Parameter) or not (conv.bias is None or isinstance(conv.bias, nn.Parameter)):
        raise UnsupportedModelError(
            f"layer '{name}' has a weight or bias that is not an nn.Parameter (torch.nn.utils.weight_norm and "
            f"spectral_norm compute it in a hook), which legrace does not support: remove it {how}")
    if has_hooks(conv):
        raise UnsupportedModelError(
            f"layer '{name}' has forward or backward hooks, which legrace's stand-in for the conv would not "
            f"run: remove them {how}")


def conv_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The Conv2d calls in forward order: the decomposition points."""
    modules = dict(gm.named_modules())
    return [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(modules[n.target], nn.Conv2d)]


def batch_coupled(gm: fx.GraphModule, nodes: list[fx.Node]) -> list[bool]:
    """For each node: does a BatchNorm come before it? In training mode BatchNorm mixes the batch,
    so the activation there depends on every batch-mate (accounted in legrace.privacy.accountant)."""
    modules = dict(gm.named_modules())
    after_bn: dict[fx.Node, bool] = {}
    for node in gm.graph.nodes:  # topological order: inputs are seen before their users
        is_bn = node.op == "call_module" and isinstance(modules[node.target], nn.BatchNorm2d)
        after_bn[node] = is_bn or any(after_bn[i] for i in node.all_input_nodes)
    return [any(after_bn[i] for i in n.all_input_nodes) for n in nodes]


def probe_conv_inputs(module: nn.Module, sample_shape: tuple[int, ...], like: Optional[torch.Tensor] = None,
                      convs: Optional[list[nn.Conv2d]] = None, batch_size: int = 2) -> list[tuple[int, ...]]:
    """Each conv call's input map size, from forwards of `module` in eval mode, without autograd, on
    seeded random batches of `batch_size` (no private value is read).

    The same forwards check what the accountant assumes (DESIGN section 7): a sample's conv inputs,
    and so its releases, depend on that sample alone. The batch is run as drawn, then, for each bit
    of a sample's index, with the samples whose bit is set replaced, and then those whose bit is
    clear: the other samples' inputs to every conv must not move. Any two samples differ in some
    bit, so every pair is tried both ways in 1 + 2·ceil(log2(batch_size)) forwards (3 for a pair).
    An operation that mixes the batch (a view that folds the batch into features, an index that
    takes another sample, a custom reduction over dim 0) is refused, naming the first conv it
    reaches. BatchNorm mixes the batch only in training mode, which the accountant prices
    (accountant.py); in eval mode it does not, so it passes here; one that keeps no running
    statistics normalises with the batch's even in eval mode, and is given mean 0 and variance 1
    for the probe (it is priced as coupled all the same). Random operations (a dropout that ignores
    the mode) draw the same numbers in every forward, from a forked generator: the caller's stays
    where it was.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 2:
        raise ValueError(f"the probe needs a batch of at least 2 samples, got {batch_size!r}")
    convs = list(convs) if convs is not None else [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    names = {id(m): name for name, m in module.named_modules()}
    n = batch_size
    base = torch.randn(n, *sample_shape, generator=torch.Generator().manual_seed(0))
    fresh = torch.randn(n, *sample_shape, generator=torch.Generator().manual_seed(1))
    index = torch.arange(n)
    batches: list[tuple[torch.Tensor, Optional[torch.Tensor]]] = [(base, None)]
    for bit in range((n - 1).bit_length()):
        for side in (1, 0):
            replaced = (index >> bit & 1) == side
            batches.append((torch.where(replaced.view(-1, *[1] * len(sample_shape)), fresh, base), ~replaced))
    first: list[tuple[str, torch.Tensor]] = []  # each conv's name and input in the first forward
    problem: list[str] = []

    def record(m: nn.Module, args: tuple) -> None:
        first.append((names.get(id(m), "?"), args[0].detach().clone()))

    def compare(x: torch.Tensor, seen: Iterator, kept_rows: torch.Tensor) -> None:
        name, kept = next(seen, ("?", None))
        if problem or kept is None:
            return
        if x.shape[0] != n:
            problem.append(f"layer '{name}' gets {x.shape[0]} rows for a batch of {n} samples: the model changes "
                           "the batch dimension before it")
            return
        if x.shape == kept.shape:  # each kept row within rtol = 1e-6 and atol = 1e-6 of the row's largest value
            rows = kept_rows.to(kept.device)
            now, then = x.detach()[rows], kept[rows]
            finite = torch.where(then.isfinite(), then.abs(), torch.zeros_like(then))
            scale = finite.flatten(1).amax(1).clamp_min(1e-30).view(-1, *[1] * (then.dim() - 1))
            # (== for the infinities an overflow can give; an infinity widens no tolerance)
            if bool(((now == then) | ((now - then).abs() <= 1e-6 * (finite + scale))).all()):
                return
        problem.append(f"the input of layer '{name}' for one sample changes with another sample of the batch: "
                       "an operation before it mixes the batch (a view or flatten that folds the batch into "
                       "features, an index that takes another sample, a reduction over dim 0)")

    statless = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is None]
    devices = [like.device] if like is not None and like.device.type == "cuda" else []
    for x, rows in batches:
        if like is not None:
            x = x.to(device=like.device, dtype=like.dtype)
        seen = iter(list(first))
        hook = record if rows is None else (lambda m, args, seen=seen, rows=rows: compare(args[0], seen, rows))
        hooks = [m.register_forward_pre_hook(hook) for m in convs]
        try:
            for m in statless:
                m.running_mean, m.running_var = (torch.zeros(m.num_features, device=x.device, dtype=x.dtype),
                                                 torch.ones(m.num_features, device=x.device, dtype=x.dtype))
            with torch.no_grad(), every_module_in_mode(module, False), torch.random.fork_rng(devices):
                torch.random.default_generator.manual_seed(0)  # (torch.manual_seed would reseed every GPU too)
                if devices:
                    torch.cuda.manual_seed(0)  # the model's device, restored by fork_rng
                module(x)
        finally:
            for h in hooks:
                h.remove()
            for m in statless:
                m.running_mean = m.running_var = None
        if problem:
            raise UnsupportedModelError(f"{problem[0]}. legrace accounts each release by its own sample alone "
                                        "(BatchNorm in training mode excepted, priced apart), so such a model is refused")
    return [tuple(kept.shape[2:]) for _, kept in first]


def same_input(nodes: list[fx.Node]) -> list[Optional[int]]:
    """For each conv node: the first earlier decomposition point that reads the very same input
    node (a ResNet block's downsample conv and its first conv), or None."""
    first: dict[fx.Node, int] = {}
    out = []
    for point, node in enumerate(nodes):
        source = node.args[0] if node.args else None
        out.append(first.get(source) if isinstance(source, fx.Node) else None)
        if isinstance(source, fx.Node):
            first.setdefault(source, point)
    return out


def convert(
    module: nn.Module,
    make_split: Callable[[nn.Conv2d, int, int, bool, Optional[int]], nn.Module] | None = None,
    compact: bool = True,
) -> fx.GraphModule:
    """Trace, check and rewrite `module`; `make_split(conv, point, n_points, coupled, same_as)`
    replaces each conv (coupled: a BatchNorm comes before it, see batch_coupled; same_as: an
    earlier point with the same input, see same_input). With `compact`, ReLU and 2x2 max-pool
    modules become their memory-light, exactly equivalent forms (legrace.trusted.compact).

    Each call of a conv gets its own decomposition point; a conv module called twice is refused,
    since its two calls would need two different trusted-side stand-ins under one name.
    The user's modules are shared, never changed (not even their train/eval mode).
    """
    check_modules(module)
    gm = trace(module)
    check_supported(gm)
    _check_hooks(module, gm)
    _follow_mode(module, gm)
    _positional_inputs(gm)
    nodes = conv_nodes(gm)
    targets = [n.target for n in nodes]
    reused = {t for t in targets if targets.count(t) > 1}
    if reused:
        raise UnsupportedModelError(f"conv layer(s) {sorted(reused)} are called more than once in forward")
    if make_split is not None:
        for node in nodes:
            check_replaceable(node.target, gm.get_submodule(node.target))
        coupled, same = batch_coupled(gm, nodes), same_input(nodes)
        for point, node in enumerate(nodes):
            split = make_split(gm.get_submodule(node.target), point, len(nodes), coupled[point], same[point])
            _set_submodule(gm, node.target, split)
    if compact:
        _compact_layers(gm)
    _match_original(module, gm)
    gm.recompile()
    return gm


def _check_hooks(module: nn.Module, gm: fx.GraphModule) -> None:
    """Refuse hooks that the GraphModule would not run: those of the model itself and of modules
    fx traced through (their hooks ran once, at trace time). Leaf modules are kept with theirs."""
    kept = set(map(id, gm.modules()))
    for name, m in module.named_modules():
        if has_hooks(m) and id(m) not in kept:
            what = f"layer '{name}' ({type(m).__name__})" if name else type(m).__name__
            raise UnsupportedModelError(f"{what} has forward or backward hooks, which the converted model would "
                                        "not run: remove them before make_private (or convert)")


@contextlib.contextmanager
def every_module_in_mode(module: nn.Module, training: bool) -> Iterator[None]:
    """Every submodule of `module` in train (or eval) mode for the block; each flag restored after."""
    flags = [(m, m.training) for m in module.modules()]
    try:
        for m, _ in flags:
            m.training = training  # not .train(): a user's override of train() may do more
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _trace_in_mode(module: nn.Module, training: bool) -> fx.GraphModule:
    """`module` traced with every submodule in train (or eval) mode."""
    try:
        with every_module_in_mode(module, training):
            return trace(module)
    except UnsupportedModelError as err:
        raise UnsupportedModelError(f"{err} (tracing in {'train' if training else 'eval'} mode)") from err


def _call_key(node: fx.Node) -> tuple:
    return node.op, node.target, node.name, repr(node.args), repr(node.kwargs)


def _dropout_args(node: fx.Node) -> dict:
    bound = inspect.signature(F.dropout).bind(*node.args, **node.kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def _follow_mode(module: nn.Module, gm: fx.GraphModule) -> None:
    """fx records forward for the train/eval flags at trace time: `F.dropout(h, training=self.training)`
    would keep that flag forever. Traced again in train and in eval mode, a call that differs only
    in F.dropout's `training` becomes an nn.Dropout module (which follows .train()/.eval()); any
    other difference (an `if self.training:` branch) is refused."""
    nodes, varies = list(gm.graph.nodes), set()
    flags = {m.training for m in module.modules()}
    for training in [mode for mode in (True, False) if flags != {mode}]:  # gm is the trace in a uniform mode
        other = list(_trace_in_mode(module, training).graph.nodes)
        if len(other) != len(nodes):
            raise _mode_error(module)
        for mine, theirs in zip(nodes, other):
            if _call_key(mine) == _call_key(theirs):
                continue
            if mine.target is F.dropout and theirs.target is F.dropout:
                a, b = _dropout_args(mine), _dropout_args(theirs)
                if a.pop("training") != b.pop("training") and repr(a) == repr(b):
                    varies.add(mine)
                    continue
            raise _mode_error(module, f" at node '{mine.name}'")
    for node in [n for n in nodes if n in varies]:
        args = _dropout_args(node)
        if not isinstance(args["p"], (int, float)) or not isinstance(args["inplace"], bool):
            raise UnsupportedModelError(f"dropout '{node.name}' needs a constant p and inplace to follow train/eval mode")
        name = f"legrace_{node.name}"
        while hasattr(gm, name) or hasattr(module, name):
            name += "_"
        dropout = nn.Dropout(args["p"], args["inplace"])
        dropout.training = bool(args["training"])  # the mode it was traced in
        gm.add_module(name, dropout)
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(name, (args["input"],))
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)


def _mode_error(module: nn.Module, where: str = "") -> UnsupportedModelError:
    return UnsupportedModelError(
        f"{type(module).__name__}'s forward changes with train/eval mode{where} (e.g. an `if self.training:` "
        "branch), which legrace's traced graph cannot follow: use an nn.Dropout module or "
        "F.dropout(..., training=self.training), or remove the branch")


def _positional_inputs(gm: fx.GraphModule) -> None:
    """`self.conv(input=x)` as `self.conv(x)`: the stand-ins name their argument otherwise."""
    for node in gm.graph.nodes:
        if node.op == "call_module" and not node.args and set(node.kwargs) == {"input"}:
            node.args, node.kwargs = (node.kwargs["input"],), {}


def _compact_layers(gm: fx.GraphModule) -> None:
    _pool_before_relu(gm)
    # A module called twice gets one stand-in (stateless); it is swapped only if every call allows it.
    keep = set()
    for node in gm.graph.nodes:
        if node.op == "call_module" and not _compactable(gm, node):
            keep.add(node.target)
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target not in keep:
            new = compact_equivalent(gm.get_submodule(node.target))
            if new is not None:
                _set_submodule(gm, node.target, new)


def _compactable(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether the module of this call may become its (out-of-place, hook-free) compact stand-in."""
    module = gm.get_submodule(node.target)
    return not has_hooks(module) and not (isinstance(module, nn.ReLU) and module.inplace and _inplace_seen(gm, node))


# Calls whose result may be (a view of) their first argument; any other supported call makes a new tensor.
_ALIAS_FUNCTIONS = {operator.iadd, torch.relu_, F.relu, torch.flatten, F.dropout, operator.getitem}
_ALIAS_METHODS = {"add_", "relu_", "flatten", "view", "reshape", "contiguous"}


def _aliases_input(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return isinstance(module, (nn.Identity, nn.Flatten, nn.Dropout)) or (
            isinstance(module, nn.ReLU) and module.inplace)
    return (node.op == "call_function" and node.target in _ALIAS_FUNCTIONS) or (
        node.op == "call_method" and node.target in _ALIAS_METHODS)


def _inplace_seen(gm: fx.GraphModule, relu: fx.Node) -> bool:
    """Whether anything but the ReLU's own result could see the change an in-place ReLU makes to
    its input (read later, through an alias, or the model's input or a buffer); if nothing can, an
    out-of-place ReLU is the same."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    child, node = relu, relu.args[0] if relu.args else None
    while True:
        if not isinstance(node, fx.Node) or node.op not in ("call_module", "call_function", "call_method"):
            return True
        if any(u is not child and (order[u] > order[relu] or _aliases_input(gm, u)) for u in node.users):
            return True
        if not _aliases_input(gm, node):
            return False
        child, node = node, node.args[0] if node.args else None


def _pool_before_relu(gm: fx.GraphModule) -> None:
    """ReLU -> MaxPool becomes MaxPool -> ReLU: the same values and gradients (max commutes with
    the monotone ReLU, and ties resolve to the same window position), with the ReLU's passes and
    mask on a quarter of the elements for a 2x2 pool. Only where nothing else sees the ReLU's
    input or output, and the pool module is called once."""
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or type(gm.get_submodule(node.target)) is not nn.ReLU or len(node.users) != 1:
            continue
        pool, (source,) = next(iter(node.users)), node.args
        if not (pool.op == "call_module" and type(gm.get_submodule(pool.target)) is nn.MaxPool2d
                and calls[pool.target] == 1 and pool.args == (node,) and not pool.kwargs
                and isinstance(source, fx.Node) and len(source.users) == 1
                and _compactable(gm, node) and _compactable(gm, pool)):
            continue
        module, relu = gm.get_submodule(pool.target), gm.get_submodule(node.target)
        if module.return_indices:
            continue
        pool.replace_input_with(node, source)
        gm.graph.erase_node(node)
        first, second = compact_equivalent(module) or module, PackedReLU()
        if first is not module:
            first.training = module.training
        second.training = relu.training
        _set_submodule(gm, pool.target, nn.Sequential(first, second))
    gm.graph.lint()


def _set_submodule(root: nn.Module, target: str, new: nn.Module) -> None:
    """Put `new` in place of the module at `target`, in that module's train/eval mode."""
    new.training = root.get_submodule(target).training
    parent, _, name = target.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)


def _match_original(original: nn.Module, gm: fx.GraphModule) -> None:
    """fx builds the GraphModule from what forward uses: new containers along module paths holding
    only the modules, parameters and buffers forward reads, in forward order, all in train mode (and
    a tensor attribute becomes a persistent buffer). Give it the original's form: every module,
    parameter and buffer under its own name and in the original's order (so no state_dict entry is
    lost or added and an optimizer built from either model sees one order), and every module convert
    made the train/eval mode of the one it stands for. The user's own modules are shared, unchanged."""
    for name, orig in original.named_modules(remove_duplicate=False):
        try:
            mine = gm.get_submodule(name)
        except AttributeError:  # never called in forward: keep it (its parent came earlier)
            parent, _, leaf = name.rpartition(".")
            gm.get_submodule(parent).add_module(leaf, orig)
            continue
        if mine is orig:
            continue
        mine.training = orig.training
        for key, param in orig._parameters.items():
            if _free(mine, key):
                mine.register_parameter(key, param)
        for key, buf in orig._buffers.items():
            if _free(mine, key):
                mine.register_buffer(key, buf, persistent=key not in orig._non_persistent_buffers_set)
        for key in mine._buffers:
            if key not in orig._buffers or key in orig._non_persistent_buffers_set:
                mine._non_persistent_buffers_set.add(key)
        for own, like in ((mine._parameters, orig._parameters), (mine._buffers, orig._buffers),
                          (mine._modules, orig._modules)):
            items = [(k, own[k]) for k in like if k in own] + [(k, v) for k, v in own.items() if k not in like]
            own.clear()
            own.update(items)


def _free(module: nn.Module, key: str) -> bool:
    """Whether `key` names nothing on `module` yet (a stand-in may hold it as a plain attribute)."""
    return not (key in module._parameters or key in module._buffers or key in module._modules
                or key in vars(module) or hasattr(type(module), key))


def conv_modules(model: nn.Module) -> list[nn.Conv2d]:
    """The Conv2d modules of a plain model in forward order: decomposition points 0, 1, ..."""
    gm = trace(model)
    return [model.get_submodule(node.target) for node in conv_nodes(gm)]
