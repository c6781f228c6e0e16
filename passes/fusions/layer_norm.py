"""``fuse-layer-norm``: layer normalization written out in core ops -> ``core.layer_norm``.

``nn.LayerNorm`` already traces to ``core.layer_norm``; this pass covers models that write
the statistics out (T5-style custom norms, ports of TF/JAX code)::

    c = x - mean(x, -1, keepdim)
    y = c * rsqrt(mean(c², -1, keepdim) + eps)       # or c / sqrt(var + eps)
    out = y * w + b

The normalization becomes ``layer_norm(x){eps}``; then the affine parts are absorbed one at
a time, so a norm with a weight and no bias (or neither) is covered too, and so is a
``core.layer_norm`` without an affine part followed by a multiply and an add.  Checked: both
means reduce the last axis only, the same centered value is squared and normalized, eps is a
scalar constant, the weight and bias are vectors of the normalized width and x's dtype, and
the absorbed norm has one use.
"""
from __future__ import annotations

from ..rewriting.driver import pattern_pass
from ..rewriting.pattern import Const, Var, op, rule
from .constraints import is_vector_of, keeps_type, reduces_last_axis, scalar, scalar_splat

x = Var("x").is_float()
eps = Const(name="eps")

centered = op("core.sub")(x, op("core.mean", keepdim=True)(x).named("mean")).named("centered")
variance = op("core.mean", keepdim=True)(
    (op("core.pow")(centered, scalar(2.0)) | op("core.mul")(centered, centered)).one_use()
).named("variance")
variance_eps = op("core.add")(variance.one_use(), eps).named("add_eps").one_use()
normalized = (op("core.mul")(centered, op("core.rsqrt")(variance_eps).one_use()) |
              op("core.div")(centered, op("core.sqrt")(variance_eps).one_use()))


@rule(normalized)
def layer_norm_statistics(m, rw):
    """(x - mean(x)) * rsqrt(mean((x - mean(x))²) + eps) = layer_norm(x){eps}"""
    epsilon = scalar_splat(m.eps)
    if not (reduces_last_axis(m.mean) and reduces_last_axis(m.variance)):
        return None
    if epsilon is None or epsilon < 0 or not keeps_type(m.add_eps.results[0],
                                                        m.variance.results[0]):
        return None
    if not keeps_type(m.root.results[0], m.x):
        return None
    return rw.op("core.layer_norm", m.x, normalized_shape=[m.x.type.shape[-1]], eps=epsilon)


unscaled = op("core.layer_norm")(Var("x")).named("norm").one_use()
unshifted = op("core.layer_norm")(Var("x"), Var("w")).named("norm").one_use()


@rule(op("core.mul")(unscaled, Var("w")))
def layer_norm_weight(m, rw):
    """layer_norm(x) * w = layer_norm(x, w)"""
    return _absorb(m, rw, m.w)


@rule(op("core.add")(unshifted, Var("b")))
def layer_norm_bias(m, rw):
    """layer_norm(x, w) + b = layer_norm(x, w, b)"""
    return _absorb(m, rw, m.b)


def _absorb(m, rw, vector):
    norm = m.norm
    shape = norm.attrs["normalized_shape"]
    if len(shape) != 1 or not is_vector_of(vector, shape[0], m.x.type.dtype):
        return None
    if not keeps_type(m.root.results[0], m.x):
        return None
    return rw.op("core.layer_norm", *norm.operands, vector, normalized_shape=shape,
                 eps=norm.attrs["eps"])


LAYER_NORM_PATTERNS = [layer_norm_statistics, layer_norm_weight, layer_norm_bias]

fuse_layer_norm = pattern_pass("fuse-layer-norm", LAYER_NORM_PATTERNS)
