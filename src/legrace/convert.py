"""Convert a user's own nn.Module by rewriting its torch.fx graph (like quantize_fx).

The model is traced once; every node is checked against the layers legrace knows how to place
(DESIGN section 4), and every nn.Conv2d call becomes a decomposition point: a SplitConv2d that
shares the conv's Parameters, so parameter names, state_dict keys and the user's optimizer stay
valid. Everything else (BN, ReLU, pools, adds, the classifier head) runs on the trusted side as is.
"""

from __future__ import annotations

import operator
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from legrace.compact import PackedReLU, compact_equivalent


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
            raise UnsupportedModelError(f"operation '{name}' (node '{node.name}') is not supported by legrace")
        elif node.op == "call_method" and node.target not in SUPPORTED_METHODS:
            raise UnsupportedModelError(f"tensor method '.{node.target}()' (node '{node.name}') is not supported by legrace")


def conv_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The Conv2d calls in forward order: the decomposition points."""
    modules = dict(gm.named_modules())
    return [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(modules[n.target], nn.Conv2d)]


def batch_coupled(gm: fx.GraphModule, nodes: list[fx.Node]) -> list[bool]:
    """For each node: does a BatchNorm come before it? In training mode BatchNorm mixes the batch,
    so the activation there depends on every batch-mate (accounted in legrace.accountant)."""
    modules = dict(gm.named_modules())
    after_bn: dict[fx.Node, bool] = {}
    for node in gm.graph.nodes:  # topological order: inputs are seen before their users
        is_bn = node.op == "call_module" and isinstance(modules[node.target], nn.BatchNorm2d)
        after_bn[node] = is_bn or any(after_bn[i] for i in node.all_input_nodes)
    return [any(after_bn[i] for i in n.all_input_nodes) for n in nodes]


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
    modules become their memory-light, exactly equivalent forms (legrace.compact).

    Each call of a conv gets its own decomposition point; a conv module called twice is refused,
    since its two calls would need two different trusted-side stand-ins under one name.
    """
    gm = trace(module)
    check_supported(gm)
    nodes = conv_nodes(gm)
    targets = [n.target for n in nodes]
    reused = {t for t in targets if targets.count(t) > 1}
    if reused:
        raise UnsupportedModelError(f"conv layer(s) {sorted(reused)} are called more than once in forward")
    if make_split is not None:
        coupled, same = batch_coupled(gm, nodes), same_input(nodes)
        for point, node in enumerate(nodes):
            split = make_split(gm.get_submodule(node.target), point, len(nodes), coupled[point], same[point])
            _set_submodule(gm, node.target, split)
    if compact:
        _compact_layers(gm)
    _keep_unused(module, gm)
    gm.train(module.training)
    gm.recompile()
    return gm


def _compact_layers(gm: fx.GraphModule) -> None:
    _pool_before_relu(gm)
    # Each call gets its own stand-in (stateless), so a ReLU module used twice stays correct.
    for node in gm.graph.nodes:
        if node.op == "call_module":
            new = compact_equivalent(gm.get_submodule(node.target))
            if new is not None:
                _set_submodule(gm, node.target, new)


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
                and isinstance(source, fx.Node) and len(source.users) == 1):
            continue
        module = gm.get_submodule(pool.target)
        if module.return_indices:
            continue
        pool.replace_input_with(node, source)
        gm.graph.erase_node(node)
        _set_submodule(gm, pool.target, nn.Sequential(compact_equivalent(module) or module, PackedReLU()))
    gm.graph.lint()


def _set_submodule(root: nn.Module, target: str, new: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)


def _keep_unused(original: nn.Module, gm: fx.GraphModule) -> None:
    # fx drops submodules that forward never calls; keep them so no parameter or buffer of the
    # user's model silently disappears from state_dict or checkpoints.
    have = dict(gm.named_modules())
    for name, mod in original.named_modules():
        if name and name not in have:
            parent, _, leaf = name.rpartition(".")
            if not parent or parent in have:
                (gm.get_submodule(parent) if parent else gm).add_module(leaf, mod)
                have = dict(gm.named_modules())
