"""Pure-PyTorch twins of the ops of hypergrad._C, with the same signatures and semantics.

They run wherever the compiled library or a device kernel is missing, and they are the oracle
the tests hold the kernels to. The ops are the vector work of the Krylov solvers that compute
(H_ww + damping I)^-1 grad_w l in the total derivative of Lu, Kamath & Yu (TMLR 2022), eq. 15-17.

Vectors are contiguous float32/float64 tensors shaped [n] or [B, n] (one system per row); per-row
scalars are float64 tensors shaped like the rows ([] or [B]); masks are bool tensors of that shape.
"""
import torch

_VECTOR_DTYPES = (torch.float32, torch.float64)


def check_vector(op, name, t, like):
    """Raises ValueError unless t is a valid solver vector matching the op's first vector `like`."""
    if t.dim() not in (1, 2):
        raise ValueError(f"hypergrad::{op}: {name} must be a vector [n] or a batch of vectors [B, n], "
                         f"got shape {list(t.shape)}")
    if t.dtype not in _VECTOR_DTYPES:
        raise ValueError(f"hypergrad::{op}: {name} must be float32 or float64, got {t.dtype}")
    if t.shape != like.shape:
        raise ValueError(f"hypergrad::{op}: {name} has shape {list(t.shape)} but the first vector "
                         f"argument has shape {list(like.shape)}; all vectors must match")
    if t.dtype != like.dtype:
        raise ValueError(f"hypergrad::{op}: {name} is {t.dtype} but the first vector argument is "
                         f"{like.dtype}; convert both to one dtype")
    if t.device != like.device:
        raise ValueError(f"hypergrad::{op}: {name} is on {t.device} but the first vector argument is on "
                         f"{like.device}; move both to one device")
    if not t.is_contiguous():
        raise ValueError(f"hypergrad::{op}: {name} must be contiguous; call .contiguous() on it first")


def check_row_scalars(op, name, s, like, dtype, rows=None):
    """Raises ValueError unless s holds one `dtype` value per row (of the vectors `like`, or of the
    shape `rows` when given) on like's device."""
    rows = like.shape[:-1] if rows is None else rows
    if s.shape != rows:
        raise ValueError(f"hypergrad::{op}: {name} must hold one value per row, shape {list(rows)}, "
                         f"got {list(s.shape)}")
    if s.dtype != dtype:
        raise ValueError(f"hypergrad::{op}: {name} must be {dtype}, got {s.dtype}")
    if s.device != like.device:
        raise ValueError(f"hypergrad::{op}: {name} is on {s.device} but {like.device} is expected")
    if not s.is_contiguous():
        raise ValueError(f"hypergrad::{op}: {name} must be contiguous")


def row_dot(a, b):
    """<a_i, b_i> for every row i, accumulated in float64."""
    check_vector("row_dot", "a", a, a)
    check_vector("row_dot", "b", b, a)
    return (a.double() * b.double()).sum(-1)


def cg_step(x, r, p, q, num, den, active):
    """alpha_i = num_i/den_i on active rows with den_i > 0 (else 0); x += alpha p; r -= alpha q.

    Updates x and r in place and returns <r_i, r_i> of the updated r in float64.
    """
    for name, t in (("x", x), ("r", r), ("p", p), ("q", q)):
        check_vector("cg_step", name, t, x)
    check_row_scalars("cg_step", "num", num, x, torch.float64)
    check_row_scalars("cg_step", "den", den, x, torch.float64)
    check_row_scalars("cg_step", "active", active, x, torch.bool)
    alpha = torch.where(active & (den > 0), num / den, torch.zeros_like(num)).to(x.dtype).unsqueeze(-1)
    x.add_(alpha * p)
    r.sub_(alpha * q)
    return row_dot(r, r)


def cg_direction(p, z, num_new, num_old, active):
    """p_i = z_i + (num_new_i/num_old_i) p_i on active rows (beta = 0 where num_old_i = 0), in place."""
    check_vector("cg_direction", "p", p, p)
    check_vector("cg_direction", "z", z, p)
    check_row_scalars("cg_direction", "num_new", num_new, p, torch.float64)
    check_row_scalars("cg_direction", "num_old", num_old, p, torch.float64)
    check_row_scalars("cg_direction", "active", active, p, torch.bool)
    beta = torch.where(num_old != 0, num_new / num_old, torch.zeros_like(num_new)).to(p.dtype).unsqueeze(-1)
    p.copy_(torch.where(active.unsqueeze(-1), z + beta * p, p))


def cg_track(den, rr, tol2, active, iterations, negative):
    """The per-row bookkeeping of one CG iteration, in place: a row steps when it is active with
    den > 0 (iterations += 1), meets negative curvature when it is active with den <= 0, and stays
    active when it stepped and its new squared residual rr is still above tol2."""
    if den.dim() > 1:
        raise ValueError(f"hypergrad::cg_track: den must hold one value per row, shape [] or [B], got {list(den.shape)}")
    for name, t, dtype in (("den", den, torch.float64), ("rr", rr, torch.float64), ("tol2", tol2, torch.float64),
                           ("active", active, torch.bool), ("iterations", iterations, torch.int64),
                           ("negative", negative, torch.bool)):
        check_row_scalars("cg_track", name, t, den, dtype, rows=den.shape)
    stepping = active & (den > 0)
    negative |= active & (den <= 0)
    iterations += stepping
    active.copy_(stepping & (rr > tol2))


# The structured Hessian-vector product of csrc/mlp_hvp.cpp (Pearlmutter's R-operator for a chain
# of linear layers and one pointwise activation under the mean softmax cross-entropy) and its pieces.
ACTIVATIONS = ("identity", "relu", "leaky_relu", "tanh", "sigmoid")
CURVED_ACTIVATIONS = ("tanh", "sigmoid")  # the others are piecewise linear: sigma'' = 0


def activation_derivatives(z, activation, negative_slope):
    """sigma'(z) and sigma''(z); ReLU-type kinks take the left derivative, as autograd does."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation '{activation}'; supported: {', '.join(ACTIVATIONS)}")
    if activation in ("relu", "leaky_relu"):
        slope = 0.0 if activation == "relu" else negative_slope
        return torch.where(z > 0, torch.ones_like(z), torch.full_like(z, slope)), torch.zeros_like(z)
    if activation == "tanh":
        t = torch.tanh(z)
        d = 1 - t * t
        return d, -2 * t * d
    if activation == "sigmoid":
        s = torch.sigmoid(z)
        d = s * (1 - s)
        return d, d * (1 - 2 * s)
    return torch.ones_like(z), torch.zeros_like(z)


def activation_jvp(z, rz, activation, negative_slope=0.0):
    """sigma'(z) * rz, with rz shaped like z or [B, *z.shape]."""
    return activation_derivatives(z, activation, negative_slope)[0] * rz


def activation_hvp_backward(z, rz, grad_a, r_grad_a, activation, negative_slope=0.0):
    """sigma''(z) * rz * grad_a + sigma'(z) * r_grad_a; for a piecewise-linear sigma (sigma'' = 0) rz and grad_a are not
    read, as autograd's double backward does not (an inf in them leaves the result finite, not 0 * inf = nan)."""
    first, second = activation_derivatives(z, activation, negative_slope)
    if activation not in CURVED_ACTIVATIONS:
        return first * r_grad_a
    return second * rz * grad_a + first * r_grad_a


def softmax_ce_hvp(probs, rz, scale):
    """scale * (p * rz - p <p, rz>) per row of classes: the softmax cross-entropy Hessian times rz."""
    return scale * probs * (rz - (probs * rz).sum(-1, keepdim=True))


def mlp_ce_hvp(weights, inputs, pre_activations, grad_activations, deltas, probs, v, activation, negative_slope=0.0):
    """H v of the mean softmax cross-entropy of a linear-activation chain (see csrc/mlp_hvp.cpp)."""
    expected = sum(w.numel() + w.shape[0] for w in weights)
    if v.dim() not in (1, 2):
        raise ValueError(f"hypergrad::mlp_ce_hvp: v must be [P] or [B, P], got {list(v.shape)}")
    if v.shape[-1] != expected:
        raise ValueError(f"hypergrad::mlp_ce_hvp: v has {v.shape[-1]} entries per direction but the layers have "
                         f"{expected} parameters (weights and biases, in that order per layer)")
    directions = v.reshape(-1, expected)
    batch, layers = directions.shape[0], len(weights)
    d_weight, d_bias, offset = [], [], 0
    for w in weights:
        d_weight.append(directions[:, offset:offset + w.numel()].reshape(batch, *w.shape))
        offset += w.numel()
        d_bias.append(directions[:, offset:offset + w.shape[0]])
        offset += w.shape[0]
    r_inputs, r_pre = [None] * layers, []
    for k in range(layers):
        rz = inputs[k] @ d_weight[k].transpose(1, 2) + d_bias[k].unsqueeze(1)
        if r_inputs[k] is not None:
            rz = rz + r_inputs[k] @ weights[k].T
        r_pre.append(rz)
        if k + 1 < layers:
            r_inputs[k + 1] = activation_jvp(pre_activations[k], rz, activation, negative_slope)
    r_delta = softmax_ce_hvp(probs, r_pre[-1], 1.0 / probs.shape[0])
    blocks = [None] * (2 * layers)
    for k in reversed(range(layers)):
        hw = r_delta.transpose(1, 2) @ inputs[k]
        if r_inputs[k] is not None:
            hw = hw + deltas[k].T @ r_inputs[k]
        blocks[2 * k], blocks[2 * k + 1] = hw.reshape(batch, -1), r_delta.sum(1)
        if k > 0:
            r_grad = r_delta @ weights[k] + deltas[k] @ d_weight[k]
            r_delta = activation_hvp_backward(pre_activations[k - 1], r_pre[k - 1], grad_activations[k - 1], r_grad,
                                              activation, negative_slope)
    hv = torch.cat(blocks, dim=1)
    return hv.squeeze(0) if v.dim() == 1 else hv
