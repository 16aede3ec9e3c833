"""The single place that routes each solver op to the compiled kernel or to its pure-PyTorch twin.

A tensor on a device that hypergrad._C has kernels for goes to torch.ops.hypergrad.*; anything
else (no compiled library, a CUDA tensor with a CPU-only build, another device, or the reference
path forced by `use_extension(False)` / HYPERGRAD_DISABLE_EXTENSION=1) goes to hypergrad._reference.
"""
import contextlib
import os
import warnings

import torch

from . import _reference

try:
    from . import _C  # loading the library registers torch.ops.hypergrad.*
except ImportError as exc:  # not built, or built against another torch
    _C = None
    EXTENSION_ERROR = f"{type(exc).__name__}: {exc}"
else:
    EXTENSION_ERROR = None
    if _C.compiled_torch_version() != torch.__version__:
        warnings.warn(f"hypergrad._C was compiled against torch {_C.compiled_torch_version()} but torch "
                      f"{torch.__version__} is running; reinstall hypergrad (pip install .) if ops fail",
                      RuntimeWarning, stacklevel=2)

_enabled = os.environ.get("HYPERGRAD_DISABLE_EXTENSION", "0") not in ("1", "true", "yes")


def has_extension():
    """True when the compiled library hypergrad._C is loaded and in use."""
    return _C is not None and _enabled


def has_cuda_extension():
    """True when hypergrad._C is in use and carries CUDA kernels."""
    return has_extension() and _C.compiled_cuda_version() != ""


@contextlib.contextmanager
def use_extension(enabled):
    """Context manager that turns the compiled kernels on or off (the twins run when off)."""
    global _enabled
    previous = _enabled
    _enabled = bool(enabled) and _C is not None
    try:
        yield
    finally:
        _enabled = previous


def _kernel_for(t):
    if not has_extension():
        return False
    return t.device.type == "cpu" or (t.device.type == "cuda" and has_cuda_extension())


def row_dot(a, b):
    """<a_i, b_i> per row in float64 (see hypergrad._reference.row_dot)."""
    if _kernel_for(a):
        return torch.ops.hypergrad.row_dot(a, b)
    return _reference.row_dot(a, b)


def cg_step(x, r, p, q, num, den, active):
    """Fused CG update x += alpha p, r -= alpha q, returning the new <r, r> (see _reference.cg_step)."""
    if _kernel_for(x):
        return torch.ops.hypergrad.cg_step(x, r, p, q, num, den, active)
    return _reference.cg_step(x, r, p, q, num, den, active)


def cg_direction(p, z, num_new, num_old, active):
    """Fused direction update p = z + beta p in place (see _reference.cg_direction)."""
    if _kernel_for(p):
        torch.ops.hypergrad.cg_direction(p, z, num_new, num_old, active)
    else:
        _reference.cg_direction(p, z, num_new, num_old, active)


def cg_track(den, rr, tol2, active, iterations, negative):
    """Per-row CG bookkeeping (active, iterations, negative) updated in place (see _reference.cg_track)."""
    if _kernel_for(den):
        torch.ops.hypergrad.cg_track(den, rr, tol2, active, iterations, negative)
    else:
        _reference.cg_track(den, rr, tol2, active, iterations, negative)


def activation_jvp(z, rz, activation, negative_slope=0.0):
    """sigma'(z) * rz (see _reference.activation_jvp)."""
    if _kernel_for(z):
        return torch.ops.hypergrad.activation_jvp(z, rz, activation, negative_slope)
    return _reference.activation_jvp(z, rz, activation, negative_slope)


def activation_hvp_backward(z, rz, grad_a, r_grad_a, activation, negative_slope=0.0):
    """sigma''(z) * rz * grad_a + sigma'(z) * r_grad_a (see _reference.activation_hvp_backward)."""
    if _kernel_for(z):
        return torch.ops.hypergrad.activation_hvp_backward(z, rz, grad_a, r_grad_a, activation, negative_slope)
    return _reference.activation_hvp_backward(z, rz, grad_a, r_grad_a, activation, negative_slope)


def softmax_ce_hvp(probs, rz, scale):
    """The softmax cross-entropy Hessian times rz, per row (see _reference.softmax_ce_hvp)."""
    if _kernel_for(probs):
        return torch.ops.hypergrad.softmax_ce_hvp(probs, rz, scale)
    return _reference.softmax_ce_hvp(probs, rz, scale)


def mlp_ce_hvp(weights, inputs, pre_activations, grad_activations, deltas, probs, v, activation, negative_slope=0.0):
    """Structured H v of a linear-activation chain under softmax cross-entropy (csrc/mlp_hvp.cpp)."""
    if _kernel_for(v):
        return torch.ops.hypergrad.mlp_ce_hvp(weights, inputs, pre_activations, grad_activations, deltas, probs, v,
                                              activation, negative_slope)
    return _reference.mlp_ce_hvp(weights, inputs, pre_activations, grad_activations, deltas, probs, v, activation,
                                 negative_slope)


if _C is not None:
    # Shapes and dtypes of the outputs, so that torch.compile can trace through the ops.
    @torch.library.register_fake("hypergrad::row_dot")
    def _row_dot_fake(a, b):
        return a.new_empty(a.shape[:-1], dtype=torch.float64)

    @torch.library.register_fake("hypergrad::cg_step")
    def _cg_step_fake(x, r, p, q, num, den, active):
        return x.new_empty(x.shape[:-1], dtype=torch.float64)

    @torch.library.register_fake("hypergrad::cg_direction")
    def _cg_direction_fake(p, z, num_new, num_old, active):
        return None

    @torch.library.register_fake("hypergrad::cg_track")
    def _cg_track_fake(den, rr, tol2, active, iterations, negative):
        return None

    @torch.library.register_fake("hypergrad::activation_jvp")
    def _activation_jvp_fake(z, rz, activation, negative_slope):
        return torch.empty_like(rz)

    @torch.library.register_fake("hypergrad::activation_hvp_backward")
    def _activation_hvp_backward_fake(z, rz, grad_a, r_grad_a, activation, negative_slope):
        return torch.empty_like(rz)

    @torch.library.register_fake("hypergrad::softmax_ce_hvp")
    def _softmax_ce_hvp_fake(probs, rz, scale):
        return torch.empty_like(rz)


def build_info():
    """What is in use: a dict with the torch and CUDA versions and which kernels are present."""
    info = {
        "torch_version": torch.__version__,
        "torch_cuda_version": torch.version.cuda,
        "extension_loaded": _C is not None,
        "extension_enabled": has_extension(),
        "extension_error": EXTENSION_ERROR,
        "compiled_torch_version": _C.compiled_torch_version() if _C is not None else None,
        "compiled_cuda_version": (_C.compiled_cuda_version() or None) if _C is not None else None,
        "cpu_kernels": _C is not None,
        "cuda_kernels": _C is not None and _C.compiled_cuda_version() != "",
        "cuda_device_available": torch.cuda.is_available(),
        "ops": ["row_dot", "cg_step", "cg_direction", "cg_track", "activation_jvp", "activation_hvp_backward", "softmax_ce_hvp",
                "mlp_ce_hvp"],
    }
    return info
