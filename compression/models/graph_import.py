"""Turn a ``torch.export`` program or a TorchScript module into an ``fx.GraphModule`` of ordinary layers.

The compression techniques work on what a ``python`` or ``torchvision`` source gives them: ``nn.Conv*``,
``nn.Linear`` and ``nn.BatchNorm*`` modules they can hook (MACs, the classifier), fold, prune and export
again. A loaded ``ExportedProgram``'s ``module()`` has none of them: its graph calls aten ops on bare
parameters, and it carries input guards and pinned ``train``/``eval``. A TorchScript module cannot be
traced by ``torch.export`` at all. So both are imported here, once, at load time:

* TorchScript -> ``ExportedProgram`` with torch's own converter (``TS2EPConverter``);
* ``ExportedProgram`` -> a fresh ``GraphModule`` of the same graph (no guards, hooks or pinned methods),
  in which every conv, transposed conv, linear and eval-mode batch norm call on parameters of one
  submodule is replaced by a call to a real layer of that type, installed where the parameters were
  (``features.0.0.weight`` becomes the ``weight`` of the ``nn.Conv2d`` at ``features.0.0``), sharing the
  same tensors. Names and ``state_dict`` keys stay those of the model that was exported.

Calls that do not fit (parameters computed in the graph, a layer whose parameters live on a module with
other state, training-mode batch norm) stay as they are: the graph still runs, the techniques just do not
see those layers. The loader checks that the imported module computes what the original does.
"""

from __future__ import annotations

import logging
import operator
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.operator_schemas import normalize_function

aten = torch.ops.aten
log = logging.getLogger("slimserve.loading")

_CONV_CLASSES: dict[bool, tuple[type[nn.Module], ...]] = {
    False: (nn.Conv1d, nn.Conv2d, nn.Conv3d),
    True: (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d),
}
_BN_CLASSES: dict[int, type[nn.modules.batchnorm._BatchNorm]] = {
    2: nn.BatchNorm1d,
    3: nn.BatchNorm1d,
    4: nn.BatchNorm2d,
    5: nn.BatchNorm3d,
}


def torchscript_to_program(module: torch.jit.ScriptModule, example: torch.Tensor) -> torch.export.ExportedProgram:
    """Convert an eval-mode TorchScript module with torch's converter (raises whatever it raises)."""
    from torch._export.converter import TS2EPConverter

    with warnings.catch_warnings():
        # NOTE: it warns for every BatchNorm's num_batches_tracked, which it keeps in the state_dict only, and
        # for every scripted branch on a constant (``if self.training``), which it resolves as it should.
        warnings.filterwarnings("ignore", message="Manually populate", category=UserWarning)
        warnings.filterwarnings("ignore", message="Pred is a Python constant", category=UserWarning)
        return TS2EPConverter(module, (example,)).convert()


def import_program(program: torch.export.ExportedProgram) -> tuple[fx.GraphModule, int]:
    """A plain eval-mode ``GraphModule`` of ``program``'s graph with its layers lifted, and how many were.

    The module shares its parameters and buffers with ``program``.
    """
    exported = program.module()
    graph = exported.graph
    for node in list(graph.nodes):
        # NOTE: the guards check the shapes seen at export (e.g. a batch of at least 2 after TorchScript
        # conversion); the server checks its inputs itself, and a re-export would trip over them.
        if node.op == "call_module" and str(node.target).startswith("_guards_fn") and not node.users:
            graph.erase_node(node)
    module = fx.GraphModule(exported, graph)
    lifted = lift_layers(module)
    for name, layer in module.named_modules():
        tracked = program.state_dict.get(f"{name}.num_batches_tracked")
        if isinstance(layer, nn.modules.batchnorm._BatchNorm) and isinstance(tracked, torch.Tensor):
            layer.num_batches_tracked = tracked  # NOTE: a state_dict entry the graph does not read
    # NOTE: eval before any call: a lifted BatchNorm in train mode would update the running statistics that
    # it shares with the program.
    return module.eval(), lifted


def lift_layers(module: fx.GraphModule) -> int:
    """Replace aten conv/linear/batch-norm calls on a submodule's parameters by real layers, in place."""
    lifted = 0
    for node in list(module.graph.nodes):
        if node.op != "call_function":
            continue
        lifter = _LIFTERS.get(node.target)
        if lifter is None:
            continue
        try:
            kwargs = _arguments(node)
            # NOTE: a lifter checks everything before it changes the graph, so a failure leaves the call as it is.
            lifted += bool(kwargs is not None and lifter(module, node, kwargs))
        except (TypeError, ValueError, RuntimeError, AttributeError) as exc:
            log.debug("left %s as it is: %s", node.format_node(), exc)
    module.graph.eliminate_dead_code()
    module.graph.lint()
    module.delete_all_unused_submodules()
    module.recompile()
    return lifted


def training_batch_norms(module: fx.GraphModule) -> int:
    """Batch norm calls that normalize with the batch's own statistics (the model was exported in train mode)."""
    count = 0
    training_capable = (aten.batch_norm.default, aten._native_batch_norm_legit.default)
    for node in module.graph.nodes:
        if node.op == "call_function" and node.target in training_capable:
            kwargs = _arguments(node)
            count += bool(kwargs and kwargs.get("training"))
    return count


def _arguments(node: fx.Node) -> dict[str, Any] | None:
    if not callable(node.target):
        return None
    normalized = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
    return None if normalized is None else dict(normalized.kwargs)


def _ints(value: Any) -> tuple[int, ...] | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,)
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return tuple(value)
    return None


def _owner(tensors: dict[str, Any]) -> str | None:
    """The submodule that holds every given tensor as ``<owner>.<role>`` (None-valued roles are absent)."""
    owner = None
    for role, node in tensors.items():
        if node is None:
            continue
        if not isinstance(node, fx.Node) or node.op != "get_attr":
            return None
        prefix, _, name = str(node.target).rpartition(".")
        if name != role or not prefix or (owner is not None and prefix != owner):
            return None
        owner = prefix
    return owner


def _weighted(module: fx.GraphModule, kwargs: dict[str, Any]) -> tuple[str, dict[str, Any], torch.Tensor] | None:
    """For a call on a ``weight`` and an optional ``bias`` of one submodule: that submodule, the two
    arguments by role, and the weight tensor (None for any other call)."""
    tensors = {"weight": kwargs.get("weight"), "bias": kwargs.get("bias")}
    owner = _owner(tensors)
    if owner is None or tensors["weight"] is None:
        return None
    return owner, tensors, _tensor(module, str(tensors["weight"].target))


def _tensor(module: fx.GraphModule, target: str) -> torch.Tensor:
    prefix, _, name = target.rpartition(".")
    value = getattr(module.get_submodule(prefix) if prefix else module, name)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{target} is a {type(value).__name__}, not a tensor")
    return value


def _install(
    module: fx.GraphModule,
    node: fx.Node,
    owner: str,
    layer: nn.Module,
    tensors: dict[str, Any],
    input_node: Any,
    replace: Callable[[fx.Node, fx.Node], None] | None = None,
) -> bool:
    """Give ``layer`` the owner's tensors, put it in the owner's place and call it instead of ``node``."""
    current = module.get_submodule(owner)
    if type(current) is type(layer):
        # NOTE: a layer called at several places (weights shared) is reused if it is the same layer.
        if current.extra_repr() != layer.extra_repr():
            return False
    else:
        if type(current) is not nn.Module or list(current.children()):
            return False
        state = {**current._parameters, **current._buffers}
        used = {role for role, node_ in tensors.items() if node_ is not None}
        # NOTE: state the call does not read (a bias it passes as None, ...) would change what the layer computes.
        if not set(state) <= used | (set(layer._buffers) - set(tensors)):
            return False
        for role in layer._parameters:
            value = state.get(role)
            if value is not None:
                layer._parameters[role] = value if isinstance(value, nn.Parameter) else nn.Parameter(value)
        for role in layer._buffers:
            value = state.get(role)
            if value is not None:
                layer._buffers[role] = value
        if any(t.is_meta for t in [*layer.parameters(), *layer.buffers()]):
            return False
        parent_name, _, attr = owner.rpartition(".")
        setattr(module.get_submodule(parent_name) if parent_name else module, attr, layer)
    with module.graph.inserting_before(node):
        call = module.graph.call_module(owner, (input_node,))
    call.meta = dict(node.meta)
    if replace is None:
        node.replace_all_uses_with(call)
    else:
        replace(node, call)
    module.graph.erase_node(node)
    return True


def _lift_conv(module: fx.GraphModule, node: fx.Node, kwargs: dict[str, Any]) -> bool:
    if (weighted := _weighted(module, kwargs)) is None:
        return False
    owner, tensors, weight = weighted
    dims = weight.dim() - 2
    if dims not in (1, 2, 3):
        return False
    transposed = bool(kwargs.get("transposed", False)) or "conv_transpose" in str(node.target)
    stride, dilation = _ints(kwargs.get("stride", 1)), _ints(kwargs.get("dilation", 1))
    padding_arg = kwargs.get("padding", 0)
    padding: Any = padding_arg if isinstance(padding_arg, str) else _ints(padding_arg)
    groups = kwargs.get("groups", 1)
    output_padding = _ints(kwargs.get("output_padding", 0)) if transposed else (0,)
    if None in (stride, dilation, padding, output_padding) or not isinstance(groups, int):
        return False
    expand = lambda v: v * dims if len(v) == 1 else v  # noqa: E731
    options: dict[str, Any] = {
        "kernel_size": tuple(weight.shape[2:]),
        "stride": expand(stride),
        "padding": padding if isinstance(padding, str) else expand(padding),
        "dilation": expand(dilation),
        "groups": groups,
        "bias": tensors["bias"] is not None,
        "device": "meta",
    }
    if transposed:
        if isinstance(padding, str):
            return False
        options["output_padding"] = expand(output_padding)
        layer = _CONV_CLASSES[True][dims - 1](weight.shape[0], weight.shape[1] * groups, **options)
    else:
        layer = _CONV_CLASSES[False][dims - 1](weight.shape[1] * groups, weight.shape[0], **options)
    return _install(module, node, owner, layer, tensors, kwargs["input"])


def _lift_linear(module: fx.GraphModule, node: fx.Node, kwargs: dict[str, Any]) -> bool:
    if (weighted := _weighted(module, kwargs)) is None:
        return False
    owner, tensors, weight = weighted
    if weight.dim() != 2:
        return False
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=tensors["bias"] is not None, device="meta")
    return _install(module, node, owner, layer, tensors, kwargs["input"])


def _lift_batch_norm(module: fx.GraphModule, node: fx.Node, kwargs: dict[str, Any]) -> bool:
    tuple_output = node.target is aten._native_batch_norm_legit_no_training.default
    if kwargs.get("training", False):
        return False
    tensors = {role: kwargs.get(role) for role in ("weight", "bias", "running_mean", "running_var")}
    owner = _owner(tensors)
    if owner is None or tensors["running_mean"] is None or tensors["running_var"] is None:
        return False
    if (tensors["weight"] is None) != (tensors["bias"] is None):
        return False
    value = kwargs["input"].meta.get("val") if isinstance(kwargs["input"], fx.Node) else None
    if not isinstance(value, torch.Tensor) or value.dim() not in _BN_CLASSES:
        return False
    if tuple_output and not all(u.target is operator.getitem and u.args[1] == 0 for u in node.users):
        return False
    mean = _tensor(module, str(tensors["running_mean"].target))
    momentum = kwargs.get("momentum")
    layer = _BN_CLASSES[value.dim()](
        mean.shape[0],
        eps=float(kwargs["eps"]),
        momentum=float(momentum) if momentum is not None else None,
        affine=tensors["weight"] is not None,
        device="meta",
    )
    # NOTE: the exported graph does not read num_batches_tracked when its owner did not keep it.
    layer.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
    replace = None
    if tuple_output:

        def replace(old: fx.Node, new: fx.Node) -> None:
            for user in list(old.users):
                user.replace_all_uses_with(new)
                module.graph.erase_node(user)

    return _install(module, node, owner, layer, tensors, kwargs["input"], replace)


_LIFTERS: dict[Any, Callable[[fx.GraphModule, fx.Node, dict[str, Any]], bool]] = {
    **{
        op: _lift_conv
        for op in (
            aten.conv1d.default,
            aten.conv2d.default,
            aten.conv3d.default,
            aten.conv1d.padding,
            aten.conv2d.padding,
            aten.conv3d.padding,
            aten.conv_transpose1d.default,
            aten.conv_transpose2d.input,
            aten.conv_transpose3d.input,
            aten.convolution.default,
        )
    },
    aten.linear.default: _lift_linear,
    aten.batch_norm.default: _lift_batch_norm,
    aten._native_batch_norm_legit_no_training.default: _lift_batch_norm,
}
