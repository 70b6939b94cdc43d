"""`trace(model, *inputs)`: the computational graph of any NNX module, from its jaxpr.

The forward pass is traced with `jax.make_jaxpr` over the model's split state,
so every parameter leaf is a jaxpr input with its exact `nnx.state` path, and
abstract models (`nnx.eval_shape`) trace without allocating a single weight.
Equations are then grouped into nodes by data flow:

* an operation that consumes a parameter starts a node owned by that
  parameter (dense, conv, embedding, bias, ...); a normalization's scale and
  bias, owned by one module, form one node;
* operations whose inputs all come from one node (activations, reshapes,
  softmax, the normalizing arithmetic of a norm layer) are absorbed into it;
* operations that combine activations from different nodes become
  parameter-free nodes (residual sum, product, concat), as do pooling and
  global averaging; an activation-by-activation matmul is attention.

Nothing here depends on the model's class or on how a library implements a
layer, which is what keeps graphs stable across Flax versions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any

import jax
import jax.extend.core as jex_core
import numpy as np
from flax import nnx

from ghn._compat import patched_calls
from ghn.errors import GHNError
from ghn.graph.graph import DEFAULT_SPD_CUTOFF, Graph, ParamInfo, norm_like
from ghn.treepath import path_str

SCOPE_PREFIX = "ghn@"


class TraceError(GHNError, ValueError):
    """The model could not be traced into a graph."""


class UnsupportedOpError(TraceError):
    """A primitive that `ghn.trace` has no graph semantics for."""

    def __init__(self, primitive: str, module: str, detail: str = ""):
        self.primitive = primitive
        self.module = module
        where = f"module '{module}'" if module else "the top-level module"
        super().__init__(
            f"unsupported primitive '{primitive}' in {where}{detail}. "
            "ghn.trace supports feed-forward networks built from dense/conv/"
            "embedding/normalization layers, attention, pooling and elementwise ops; "
            "control flow (scan, cond, while) must be unrolled."
        )


class ExampleInputError(TraceError):
    """The example inputs do not fit the model."""


_SHAPE_OPS = frozenset(
    """reshape transpose broadcast_in_dim squeeze expand_dims convert_element_type copy copy_p
    reduce_precision slice dynamic_slice dynamic_update_slice rev pad gather concatenate split
    sharding_constraint mesh_cast reshard stop_gradient optimization_barrier select_n clamp
    iota real imag""".split()
)
_ELEMENTWISE_OPS = frozenset(
    """neg sign floor ceil round is_finite exp exp2 log log1p expm1 tanh logistic sin cos tan
    asin acos atan sinh cosh asinh acosh atanh erf erfc erf_inv lgamma digamma sqrt rsqrt cbrt
    abs square integer_pow pow not and or xor eq ne lt le gt ge add sub mul div rem max min
    atan2 nextafter add_any""".split()
)
_REDUCE_OPS = frozenset(
    """reduce_sum reduce_max reduce_min reduce_prod reduce_and reduce_or argmax argmin cumsum
    cumprod cummax cummin cumlogsumexp reduce_and reduce_or""".split()
)
_WINDOW_OPS = {
    "reduce_window_max": "max_pool",
    "reduce_window_sum": "avg_pool",
    "reduce_window_min": "max_pool",
}
_CALL_OPS = frozenset(
    "jit pjit closed_call core_call remat checkpoint custom_jvp_call custom_vjp_call "
    "custom_vjp_call_jaxpr custom_lin".split()
)
_CONTROL_FLOW = frozenset({"scan", "while", "cond", "switch", "for"})
_KNOWN = (
    _SHAPE_OPS
    | _ELEMENTWISE_OPS
    | _REDUCE_OPS
    | set(_WINDOW_OPS)
    | {"dot_general", "conv_general_dilated"}
)
_MERGE_OPS = {
    "add": "sum",
    "add_any": "sum",
    "sub": "sum",
    "mul": "mul",
    "div": "mul",
    "concatenate": "concat",
    "max": "sum",
    "min": "sum",
    "select_n": "sum",
}
_NORM_CLASSES = (
    ("rmsnorm", "rms_norm"),
    ("layernorm", "ln"),
    ("batchnorm", "bn"),
    ("groupnorm", "gn"),
)


@dataclasses.dataclass(frozen=True)
class _Const:
    pass


@dataclasses.dataclass(frozen=True)
class _Act:
    node: int


@dataclasses.dataclass(frozen=True)
class _Param:
    paths: tuple[str, ...]
    # For each axis of this value, the axes of the (first) parameter it came from.
    axes: tuple[frozenset[int], ...]


_CONST = _Const()


@dataclasses.dataclass
class _Node:
    op: str
    name: str
    module: str
    params: list[str] = dataclasses.field(default_factory=list)
    shared: list[str] = dataclasses.field(default_factory=list)
    preds: list[int] = dataclasses.field(default_factory=list)
    shape: tuple[int, int, int, int] = (0, 0, 0, 0)


def _leaf_paths(state) -> list[str]:
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    out = []
    for path, _ in leaves:
        # Variables flatten to their `.value` (or `.raw_value`) attribute.
        if path and isinstance(path[-1], jax.tree_util.GetAttrKey):
            path = path[:-1]
        out.append(path_str(path))
    return out


@contextlib.contextmanager
def _module_scopes(model: nnx.Module, stack: list[str], classes_out: dict[str, str]):
    """Runs every submodule's `__call__` under `jax.named_scope(<its path>)`.

    NNX does not name scopes by itself; the scope lets errors and
    parameter-free nodes name the module they belong to. `stack` tracks the
    Python-side module stack so a failing forward can say where it failed.
    """
    modules = list(nnx.iter_modules(model))
    paths = {id(m): path_str(p) for p, m in modules}
    classes_out.update({paths[id(m)]: type(m).__name__ for _, m in modules})
    failed_in: list[str] = []

    def wrap(orig):
        def __call__(self, *args, **kwargs):
            path = paths.get(id(self))
            if path is None:
                return orig(self, *args, **kwargs)
            stack.append(path)
            try:
                with jax.named_scope(SCOPE_PREFIX + (path.replace("/", ".") or "<root>")):
                    return orig(self, *args, **kwargs)
            except Exception:
                if not failed_in:
                    failed_in.append(path)
                raise
            finally:
                stack.pop()

        return __call__

    with patched_calls((type(m) for _, m in modules), wrap):
        yield failed_in


def _scope_module(name_stack: str) -> str:
    module = ""
    for part in name_stack.split("/"):
        if part.startswith(SCOPE_PREFIX):
            module = part[len(SCOPE_PREFIX) :]
    return "" if module == "<root>" else module.replace(".", "/")


def _reshape_axes(in_shape, out_shape, axes):
    """Follows parameter-axis provenance through a reshape (merge/split groups)."""
    out: list[frozenset[int]] = []
    i = j = 0
    n_in, n_out = len(in_shape), len(out_shape)
    while j < n_out:
        if i < n_in and in_shape[i] == 1 and (j >= n_out or out_shape[j] != 1):
            i += 1
            continue
        if out_shape[j] == 1 and (i >= n_in or in_shape[i] != 1):
            out.append(frozenset())
            j += 1
            continue
        group_in, group_out = [i], [j]
        pi, po = in_shape[i] if i < n_in else 1, out_shape[j]
        while pi != po:
            if pi < po:
                i += 1
                group_in.append(i)
                pi *= in_shape[i]
            else:
                j += 1
                group_out.append(j)
                po *= out_shape[j]
        src = frozenset().union(*(axes[k] for k in group_in if k < n_in))
        out.extend(src for _ in group_out)
        i += 1
        j += 1
    return tuple(out)


class _Tracer:
    def __init__(
        self, module_classes: dict[str, str], param_paths: list[str], shapes, dtypes, batch: int
    ):
        self.nodes: list[_Node] = []
        self.batch = batch  # the example inputs' leading size, to tell heads from batch
        self.owner: dict[str, int] = {}
        self.info: dict[str, ParamInfo] = {}
        self.param_paths = param_paths
        self.param_shapes = dict(zip(param_paths, shapes))
        self.param_dtypes = dict(zip(param_paths, dtypes))
        self.module_classes = module_classes

    def new_node(self, op, name, module, preds=()) -> int:
        self.nodes.append(_Node(op, name, module))
        i = len(self.nodes) - 1
        self.add_preds(i, preds)
        return i

    def add_preds(self, node, preds):
        for p in preds:
            if p != node and p not in self.nodes[node].preds:
                self.nodes[node].preds.append(p)

    def run(self, jaxpr, env_in, name_stack=""):
        env: dict[Any, Any] = {}
        for v, val in zip(jaxpr.invars, env_in):
            env[v] = val
        for v in jaxpr.constvars:
            env[v] = _CONST

        def read(v):
            if isinstance(v, jex_core.Literal):
                return _CONST
            return env.get(v, _CONST)

        for eqn in jaxpr.eqns:
            stack = str(eqn.source_info.name_stack)
            full = f"{name_stack}/{stack}" if name_stack and stack else (name_stack or stack)
            ins = [read(v) for v in eqn.invars]
            outs = self.eqn(eqn, ins, full)
            for v, o in zip(eqn.outvars, outs):
                env[v] = o
        return [read(v) for v in jaxpr.outvars]

    def eqn(self, eqn, ins, name_stack):
        prim = eqn.primitive.name
        n_out = len(eqn.outvars)
        if prim in _CALL_OPS:
            inner = None
            for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
                if key in eqn.params:
                    inner = eqn.params[key]
                    break
            if inner is not None:
                if hasattr(inner, "jaxpr"):
                    inner = inner.jaxpr
                n = len(inner.invars)
                return self.run(inner, ins[len(ins) - n :], name_stack)
        acts = [v for v in ins if isinstance(v, _Act)]
        prms = [v for v in ins if isinstance(v, _Param)]
        module = _scope_module(name_stack)
        if not acts and not prms:
            return [_CONST] * n_out
        if "attention" in prim or "flash" in prim:
            return [self.attention(acts, module, eqn)] * n_out
        if prim in _CONTROL_FLOW or prim not in _KNOWN:
            raise UnsupportedOpError(prim, module, f" ({self.module_classes.get(module, '?')})")
        if not acts:
            return [self.param_value(eqn, ins, prms)] * n_out
        if prms:
            return [self.param_op(eqn, ins, acts, prms, module)] * n_out
        return [self.act_op(eqn, ins, acts, module)] * n_out

    def param_value(self, eqn, ins, prms) -> _Param:
        """A parameter transformed before use (reshape, transpose, cast, x const)."""
        prim = eqn.primitive.name
        paths = tuple(dict.fromkeys(p for v in prms for p in v.paths))
        src = prms[0]
        in_shape = eqn.invars[ins.index(src)].aval.shape
        out_shape = eqn.outvars[0].aval.shape
        axes = src.axes
        if prim == "transpose":
            axes = tuple(axes[k] for k in eqn.params["permutation"])
        elif prim in ("reshape", "squeeze", "expand_dims"):
            axes = _reshape_axes(in_shape, out_shape, axes)
        elif prim == "broadcast_in_dim":
            new = [frozenset()] * len(out_shape)
            for k, d in enumerate(eqn.params["broadcast_dimensions"]):
                new[d] = axes[k]
            axes = tuple(new)
        elif len(out_shape) != len(axes):
            axes = (
                _reshape_axes(in_shape, out_shape, axes)
                if math.prod(in_shape) == math.prod(out_shape)
                else tuple(frozenset() for _ in out_shape)
            )
        return _Param(paths, axes)

    def _orig_axes(self, path, axes_of_value, dims):
        shape = self.param_shapes[path]
        found = set()
        for d in dims:
            found |= axes_of_value[d]
        return tuple(sorted(a for a in found if shape[a] != 1))

    def _layout(self, eqn, ins, prm: _Param, prim):
        """out/in/spatial axes of the parameter, read off the consuming op."""
        path = prm.paths[0]
        shape = self.param_shapes[path]
        pos = ins.index(prm)
        rank = len(eqn.invars[pos].aval.shape)
        nonsingleton = tuple(a for a in range(len(shape)) if shape[a] != 1)
        spatial: tuple[int, ...] = ()
        if prim == "dot_general":
            (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
            contract, batch = (lc, lb) if pos == 0 else (rc, rb)
            in_ax = self._orig_axes(path, prm.axes, contract)
            rest = [d for d in range(rank) if d not in contract and d not in batch]
            out_ax = self._orig_axes(path, prm.axes, rest)
        elif prim == "conv_general_dilated":
            rhs_spec = eqn.params["dimension_numbers"].rhs_spec
            out_ax = self._orig_axes(path, prm.axes, rhs_spec[:1])
            in_ax = self._orig_axes(path, prm.axes, rhs_spec[1:2])
            spatial = self._orig_axes(path, prm.axes, rhs_spec[2:])
        elif prim == "gather" and pos == 0:
            rows = eqn.params["dimension_numbers"].collapsed_slice_dims
            out_ax = self._orig_axes(path, prm.axes, rows)
            in_ax = tuple(a for a in nonsingleton if a not in out_ax)
        elif prim == "concatenate" or (prim in ("add", "sub") and len(nonsingleton) > 1):
            in_ax = nonsingleton[-1:]
            out_ax = nonsingleton[:-1]
        else:
            out_ax, in_ax = nonsingleton, ()
        claimed = set(in_ax) | set(spatial)
        out_ax = tuple(a for a in out_ax if a not in claimed)
        missing = [a for a in nonsingleton if a not in claimed | set(out_ax)]
        return tuple(sorted(out_ax + tuple(missing))), in_ax, spatial

    def _norm_op(self, module_path: str) -> str | None:
        cls = self.module_classes.get(module_path, "").lower().replace("_", "")
        for key, op in _NORM_CLASSES:
            if key in cls:
                return op
        return None

    def param_op(self, eqn, ins, acts, prms, module) -> _Act:
        prim = eqn.primitive.name
        prm = prms[0]
        path = prm.paths[0]
        owner_module = path.rsplit("/", 1)[0] if "/" in path else ""
        shape = self.param_shapes[path]
        n_nonsingleton = sum(1 for s in shape if s != 1)
        preds = list(dict.fromkeys(a.node for a in acts))
        if prim == "dot_general":
            op, role = "dense", "dense"
        elif prim == "conv_general_dilated":
            groups = eqn.params.get("feature_group_count", 1)
            dil = eqn.params.get("rhs_dilation") or ()
            op = "dil_conv" if any(d > 1 for d in dil) else ("dw_conv" if groups > 1 else "conv")
            role = "conv"
        elif prim == "gather" and ins.index(prm) == 0:
            op, role = "embed", "embedding"
        elif prim in ("add", "sub", "add_any"):
            op, role = ("bias", "bias") if n_nonsingleton <= 1 else ("pos_enc", "pos_embedding")
        elif prim in ("mul", "div"):
            norm = self._norm_op(owner_module)
            op, role = (norm, "norm_scale") if norm else ("scale", "scale")
        elif prim == "concatenate":
            op, role = "cls_token", "cls_token"
        else:
            op, role = "param", "other"

        owned = [p for p in prm.paths if p not in self.owner]
        for v in prms[1:]:
            owned += [p for p in v.paths if p not in self.owner and p not in owned]

        # A normalization's bias joins the node of its scale (same owning module).
        if role == "bias" and len(preds) == 1 and owned:
            target = self.nodes[preds[0]]
            if (
                norm_like(target.op)
                and target.params
                and all(p.rsplit("/", 1)[0] == owner_module for p in target.params)
            ):
                role = "norm_bias" if target.op != "scale" else "bias"
                self._own(preds[0], owned, eqn, ins, prms, prim, role)
                return _Act(preds[0])

        node_name = owner_module if role == "norm_scale" and owner_module else path
        node = self.new_node(op, node_name, owner_module or module, preds)
        if owned:
            self._own(node, owned, eqn, ins, prms, prim, role)
        else:
            self.nodes[node].shared = list(prm.paths)
            out_ax, in_ax, spatial = self._layout(eqn, ins, prm, prim)
            info = ParamInfo(path, shape, "", node, role, out_ax, in_ax, spatial)
            self.nodes[node].shape = _node_shape(info)
        return _Act(node)

    def _own(self, node, owned, eqn, ins, prms, prim, role):
        for v in prms:
            for path in v.paths:
                if path not in owned:
                    continue
                out_ax, in_ax, spatial = (
                    self._layout(eqn, ins, v, prim)
                    if path == v.paths[0]
                    else (tuple(range(len(self.param_shapes[path]))), (), ())
                )
                info = ParamInfo(
                    path,
                    tuple(self.param_shapes[path]),
                    self.param_dtypes[path],
                    node,
                    role,
                    out_ax,
                    in_ax,
                    spatial,
                )
                self.info[path] = info
                self.owner[path] = node
                self.nodes[node].params.append(path)
                if self.nodes[node].shape == (0, 0, 0, 0):
                    self.nodes[node].shape = _node_shape(info)

    def attention(self, acts, module, eqn) -> _Act:
        preds = list(dict.fromkeys(a.node for a in acts))
        attn = [p for p in preds if self.nodes[p].op == "attn"]
        if attn:
            self.add_preds(attn[-1], preds)
            return _Act(attn[-1])
        node = self.new_node("attn", f"{module}:attn" if module else "attn", module, preds)
        self.nodes[node].shape = _attention_shape(eqn, self.batch)
        return _Act(node)

    def act_op(self, eqn, ins, acts, module) -> _Act:
        prim = eqn.primitive.name
        preds = list(dict.fromkeys(a.node for a in acts))
        label = lambda op: f"{module}:{op}" if module else op  # noqa: E731
        if prim == "dot_general":
            return self.attention(acts, module, eqn)
        if prim in _WINDOW_OPS:
            return _Act(self.new_node(_WINDOW_OPS[prim], label(_WINDOW_OPS[prim]), module, preds))
        if prim in ("reduce_sum", "reduce_max") and len(preds) == 1:
            rank = len(eqn.invars[0].aval.shape)
            axes = tuple(eqn.params["axes"])
            if rank >= 3 and 0 not in axes and rank - 1 not in axes:
                op = "glob_avg" if prim == "reduce_sum" else "glob_max"
                return _Act(self.new_node(op, label(op), module, preds))
        if len(preds) == 1:
            return _Act(preds[0])
        # The normalizing product of a norm layer with its own scale: x * (rsqrt(var) * scale).
        if len(preds) == 2:
            for a, b in (preds, preds[::-1]):
                if (
                    norm_like(self.nodes[b].op)
                    and self.nodes[b].params
                    and a in self.nodes[b].preds
                ):
                    return _Act(b)
        op = _MERGE_OPS.get(prim)
        if op is None:
            cls = self.module_classes.get(module, "?")
            raise UnsupportedOpError(prim, module, f" ({cls}) combining activations of two nodes")
        return _Act(self.new_node(op, label(op), module, preds))


def _attention_shape(eqn, batch: int) -> tuple[int, int, int, int]:
    """(heads, head width, 1, 1) of the attention whose first product is `eqn`.

    Two models that differ only in their head count have the same parameters and
    edges; without this a GHN would have to give both the same prediction.
    """
    q_shape = tuple(eqn.invars[0].aval.shape)
    if eqn.primitive.name == "dot_general":
        (contract, _), (batch_axes, _) = eqn.params["dimension_numbers"]
        width = math.prod(q_shape[a] for a in contract)
        both = math.prod(q_shape[a] for a in batch_axes)
        # Heads and the data batch may be separate axes or folded into one.
        heads = both // batch if batch > 0 and both % batch == 0 else both
    else:  # fused attention kernels take q as (batch, length, heads, head width)
        heads, width = (q_shape[-2], q_shape[-1]) if len(q_shape) >= 2 else (1, q_shape[-1])
    return (max(int(heads), 1), max(int(width), 1), 1, 1)


def _node_shape(info: ParamInfo) -> tuple[int, int, int, int]:
    c_out, c_in, kh, kw = info.canonical_shape
    return (c_out, max(c_in, 1), kh, kw)


def _describe(x) -> str:
    leaves = jax.tree_util.tree_leaves(x)
    return ", ".join(f"{getattr(v, 'dtype', type(v).__name__)}{list(np.shape(v))}" for v in leaves)


def trace(
    model: nnx.Module,
    *example_inputs,
    spd_cutoff: int = DEFAULT_SPD_CUTOFF,
    name: str | None = None,
    **example_kwargs,
) -> Graph:
    """Builds the computational graph of `model(*example_inputs)`.

    Args:
      model: any `nnx.Module`, concrete or abstract (`nnx.eval_shape`).
      *example_inputs: arrays or `jax.ShapeDtypeStruct`s the model is called
        with; only their shapes and dtypes are used.
      spd_cutoff: shortest-path distance up to which virtual edges connect nodes.
      name: a label for the graph (defaults to the model's class name).

    Returns:
      A `Graph` where every parameter leaf of `nnx.state(model, nnx.Param)`
      belongs to exactly one node.
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"trace expects an nnx.Module, got {type(model).__name__}")
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    paths = _leaf_paths(params)
    leaves = jax.tree_util.tree_leaves(params)
    shapes = [tuple(np.shape(v)) for v in leaves]
    dtypes = [str(getattr(v, "dtype", np.asarray(v).dtype)) for v in leaves]
    specs = jax.tree_util.tree_map(
        lambda v: jax.ShapeDtypeStruct(np.shape(v), getattr(v, "dtype", np.asarray(v).dtype)),
        (params, rest, example_inputs, example_kwargs),
    )
    stack: list[str] = []

    module_classes: dict[str, str] = {}

    def forward(params, rest, inputs, kwargs):
        m = nnx.merge(graphdef, params, rest, copy=True)
        with _module_scopes(m, stack, module_classes) as failed_in:
            try:
                return m(*inputs, **kwargs)
            except Exception as e:
                forward.failed_in = failed_in[0] if failed_in else ""
                raise e

    forward.failed_in = ""
    model_name = name or type(model).__name__
    try:
        closed = jax.make_jaxpr(forward)(*specs)
    except UnsupportedOpError:
        raise
    except Exception as e:  # noqa: BLE001 - re-raised with context below
        where = forward.failed_in
        where = f" in module '{where}' ({module_classes.get(where, '?')})" if where else ""
        msg = str(e).strip().splitlines()
        first = msg[0] if msg else type(e).__name__
        raise ExampleInputError(
            f"{model_name} could not run on the example inputs ({_describe(example_inputs)})"
            f"{where}: {type(e).__name__}: {first}"
        ) from e

    input_leaves = jax.tree_util.tree_leaves((example_inputs, example_kwargs))
    batch = int(np.shape(input_leaves[0])[0]) if input_leaves and np.ndim(input_leaves[0]) else 0
    tracer = _Tracer(module_classes, paths, shapes, dtypes, batch)
    n_rest = len(jax.tree_util.tree_leaves(rest))
    env: list[Any] = []
    for p, shape in zip(paths, shapes):
        env.append(_Param((p,), tuple(frozenset({k}) for k in range(len(shape)))))
    env += [_CONST] * n_rest
    input_nodes = []
    for i, _ in enumerate(input_leaves):
        node = tracer.new_node("input", f"input{i}" if len(input_leaves) > 1 else "input", "")
        input_nodes.append(node)
        env.append(_Act(node))
    outs = tracer.run(closed.jaxpr, env)

    for p, shape in zip(paths, shapes):
        if p not in tracer.owner:  # never used by the forward pass
            node = tracer.new_node("param", p, p.rsplit("/", 1)[0] if "/" in p else "")
            out_ax = tuple(a for a, s in enumerate(shape) if s != 1)
            info = ParamInfo(p, shape, tracer.param_dtypes[p], node, "other", out_ax)
            tracer.info[p], tracer.owner[p] = info, node
            tracer.nodes[node].params.append(p)
            tracer.nodes[node].shape = _node_shape(info)

    nodes = tracer.nodes
    edges = [(s, t) for t, n in enumerate(nodes) for s in n.preds]
    edges_Ex2 = np.asarray(sorted(edges), np.int32).reshape(-1, 2)
    return Graph(
        node_ops=[n.op for n in nodes],
        node_names=[n.name for n in nodes],
        node_modules=[n.module for n in nodes],
        node_params=[list(n.params) for n in nodes],
        node_shared=[list(n.shared) for n in nodes],
        node_shapes=np.asarray([n.shape for n in nodes], np.int64).reshape(-1, 4),
        edges=edges_Ex2,
        params={p: tracer.info[p] for p in paths},
        inputs=input_nodes,
        outputs=list(dict.fromkeys(o.node for o in outs if isinstance(o, _Act))),
        spd_cutoff=spd_cutoff,
        model_name=model_name,
    )
