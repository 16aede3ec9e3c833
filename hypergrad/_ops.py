"""The ops of hypergrad._C in one registration table, and the routers generated from it.

Each op has three faces, declared together by one `@declare_op` on its fake below (pytorch/extension-cpp's
ops.py is the model): the compiled kernel (schema in csrc/hypergrad.cpp, CPU and CUDA kernels in
csrc/), its pure-PyTorch twin of the same name (hypergrad._reference, the oracle of the tests) and
its fake, which gives torch.compile and torch.library.opcheck the shapes and dtypes of the outputs
and checks the inputs with torch._check. For every op of the table OPS this module defines a router of the op's name
(`_ops.row_dot`, ...): a tensor on a device that hypergrad._C has kernels for goes to
torch.ops.hypergrad.*, anything else (no compiled library, a CUDA tensor with a CPU-only build,
one built for another CUDA major or for other GPU architectures, another device, or the twins forced by `use_extension(False)` /
HYPERGRAD_DISABLE_EXTENSION=1) to the twin. The ops are the vector work of the Krylov solvers and
the pieces of the structured Hessian-vector product behind the total derivative of Lu, Kamath & Yu
(TMLR 2022), eq. 15-17.
"""
import contextlib
import importlib.util
import inspect
import os
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from . import _reference, _toolchain

try:
    from . import _C  # loading the library registers torch.ops.hypergrad.*
except ImportError as exc:  # not built, or built against another torch
    _C = None
    EXTENSION_ERROR = (f"{type(exc).__name__}: {exc}" if importlib.util.find_spec(f"{__package__}._C") is not None
                       else "hypergrad._C is not built (pip install . builds it; the pure-PyTorch twins run meanwhile)")
else:
    EXTENSION_ERROR = None
    if _C.compiled_torch_version() != torch.__version__:
        warnings.warn(f"hypergrad._C was compiled against torch {_C.compiled_torch_version()} but torch "
                      f"{torch.__version__} is running; reinstall hypergrad (pip install .) if ops fail",
                      RuntimeWarning, stacklevel=2)


def cuda_major_mismatch(compiled, running):
    """Why the extension's CUDA kernels cannot serve this torch (None when they can): the CUDA
    major version they were compiled with (compiled) against the one torch runs (running)."""
    if not compiled or not running or compiled.split(".")[0] == running.split(".")[0]:
        return None
    return (f"hypergrad._C was compiled with CUDA {compiled} but torch {torch.__version__} runs CUDA {running}: "
            f"hypergrad no longer calls its CUDA kernels, CUDA tensors take the pure-PyTorch twins (same results, slower). "
            f"Rebuild it against this torch: pip install --no-build-isolation --no-deps --force-reinstall .")


CUDA_MISMATCH = cuda_major_mismatch(_C.compiled_cuda_version(), torch.version.cuda) if _C is not None else None
if CUDA_MISMATCH:
    warnings.warn(CUDA_MISMATCH, RuntimeWarning, stacklevel=2)

def _disabled_by_environment(environ):
    """HYPERGRAD_DISABLE_EXTENSION read as the build switches are (1/0, yes/no, true/false, on/off, any case; empty:
    off); another value warns and leaves the kernels on."""
    try:
        return _toolchain.switch(environ, "HYPERGRAD_DISABLE_EXTENSION")
    except ValueError as exc:
        warnings.warn(f"{exc}; the compiled kernels stay on", RuntimeWarning, stacklevel=3)
        return False


_enabled = not _disabled_by_environment(os.environ)


def has_extension():
    """True when the compiled library hypergrad._C is loaded and in use."""
    return _C is not None and _enabled


_CUDA_BUILT = _C is not None and _C.compiled_cuda_version() != ""  # read once: a trace cannot call into the library


def has_cuda_extension():
    """True when hypergrad._C is in use and carries CUDA kernels built for torch's CUDA major."""
    return has_extension() and _CUDA_BUILT and CUDA_MISMATCH is None


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


_device_problems = {}  # CUDA device index -> why the kernels cannot run there, or None: asked once a device


def cuda_kernel_problem(device):
    """Why hypergrad._C's CUDA kernels cannot run on the CUDA device `device` (None when they can): a library built for
    other architectures (without a visible GPU it is built for 8.0 and 9.0) has no image a V100 or a T4 can run. The
    first call for a device that cannot warns, once; its tensors then take the twins."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _device_problems:
        problem = _C.cuda_kernel_problem(index) or None
        if problem:
            major, minor = torch.cuda.get_device_capability(index)
            warnings.warn(f"hypergrad._C has no CUDA kernels {torch.cuda.get_device_name(index)} (compute capability "
                          f"{major}.{minor}) can run ({problem}): its tensors take the pure-PyTorch twins (same results, "
                          f"slower). Rebuild on this machine, or with TORCH_CUDA_ARCH_LIST={major}.{minor}: "
                          "pip install --no-build-isolation --no-deps --force-reinstall .", RuntimeWarning, stacklevel=4)
        _device_problems[index] = problem
    return _device_problems[index]


def _kernel_for(t):
    if not has_extension():
        return False
    if t.device.type == "cpu":
        return True
    if t.device.type != "cuda" or not has_cuda_extension():
        return False
    if torch.compiler.is_compiling() and t.device.index not in _device_problems:
        return True  # no query inside a trace (a call into the library breaks the graph): asked at the first eager call
    return cuda_kernel_problem(t.device) is None


# ---- the registration table: one declaration per op, at its fake -------------------------------

@dataclass(frozen=True)
class Op:
    """One op of hypergrad._C: its name in torch.ops.hypergrad, its twin (hypergrad._reference, same
    name), its fake, and which argument's device picks between the kernel and the twin."""
    name: str
    twin: Callable
    fake: Callable
    routes_on: int
    doc: str


OPS = []  # the table, in declaration order


def declare_op(name, doc, routes_on=0):
    """Declares the op `name` with the decorated function as its fake."""
    def declare(fake):
        OPS.append(Op(name, getattr(_reference, name), fake, routes_on, doc))
        return fake
    return declare


def _check_vectors(name, like, *others):
    torch._check_value(like.dim() in (1, 2), lambda: f"hypergrad::{name}: vectors must be [n] or [B, n], got {list(like.shape)}")
    torch._check_value(like.dtype in (torch.float32, torch.float64), lambda: f"hypergrad::{name}: vectors must be float32 or float64")
    for t in others:
        torch._check_value(t.shape == like.shape, lambda: f"hypergrad::{name}: all vectors must have shape {list(like.shape)}")
        torch._check_value(t.dtype == like.dtype, lambda: f"hypergrad::{name}: all vectors must be {like.dtype}")


def _check_rows(name, rows, dtype, *scalars):
    for t in scalars:
        torch._check_value(t.shape == rows, lambda: f"hypergrad::{name}: per-row values must have shape {list(rows)}")
        torch._check_value(t.dtype == dtype, lambda: f"hypergrad::{name}: per-row values must be {dtype}")


def _check_activation(name, z, activation):
    torch._check_value(activation in _reference.ACTIVATIONS, lambda: f"hypergrad::{name}: unknown activation "
                       f"'{activation}'; supported: {', '.join(_reference.ACTIVATIONS)}")
    torch._check_value(z.dtype in (torch.float32, torch.float64), lambda: f"hypergrad::{name}: z must be float32 or float64")


def _check_pair(name, base, batched):
    """batched is shaped like base or [B, *base.shape], with base's dtype."""
    torch._check_value(batched.shape == base.shape or batched.shape[1:] == base.shape,
                 lambda: f"hypergrad::{name}: {list(batched.shape)} must be {list(base.shape)} or [B, *{list(base.shape)}]")
    torch._check_value(batched.dtype == base.dtype, lambda: f"hypergrad::{name}: all tensors must be {base.dtype}")


@declare_op("row_dot", "<a_i, b_i> per row in float64.")
def _row_dot_fake(a, b):
    _check_vectors("row_dot", a, b)
    return a.new_empty(a.shape[:-1], dtype=torch.float64)


@declare_op("cg_step", "Fused CG update x += alpha p, r -= alpha q (alpha = num/den on active rows), returning the new <r, r>.")
def _cg_step_fake(x, r, p, q, num, den, active):
    _check_vectors("cg_step", x, r, p, q)
    _check_rows("cg_step", x.shape[:-1], torch.float64, num, den)
    _check_rows("cg_step", x.shape[:-1], torch.bool, active)
    return x.new_empty(x.shape[:-1], dtype=torch.float64)


@declare_op("cg_direction", "Fused direction update p = z + (num_new/num_old) p in place on active rows.")
def _cg_direction_fake(p, z, num_new, num_old, active):
    _check_vectors("cg_direction", p, z)
    _check_rows("cg_direction", p.shape[:-1], torch.float64, num_new, num_old)
    _check_rows("cg_direction", p.shape[:-1], torch.bool, active)


@declare_op("cg_track", "Per-row CG bookkeeping (active, iterations, negative curvature) updated in place.")
def _cg_track_fake(den, rr, tol2, active, iterations, negative):
    torch._check_value(den.dim() <= 1, lambda: "hypergrad::cg_track: den must hold one value per row, shape [] or [B]")
    _check_rows("cg_track", den.shape, torch.float64, den, rr, tol2)
    _check_rows("cg_track", den.shape, torch.bool, active, negative)
    _check_rows("cg_track", den.shape, torch.int64, iterations)


@declare_op("activation_jvp", "sigma'(z) * rz, rz shaped like z or [B, *z.shape].")
def _activation_jvp_fake(z, rz, activation, negative_slope):
    _check_activation("activation_jvp", z, activation)
    _check_pair("activation_jvp", z, rz)
    return torch.empty_like(rz)


@declare_op("activation_hvp_backward", "sigma''(z) * rz * grad_a + sigma'(z) * r_grad_a.")
def _activation_hvp_backward_fake(z, rz, grad_a, r_grad_a, activation, negative_slope):
    _check_activation("activation_hvp_backward", z, activation)
    _check_pair("activation_hvp_backward", z, rz)
    _check_pair("activation_hvp_backward", z, grad_a)
    _check_pair("activation_hvp_backward", rz, r_grad_a)
    torch._check_value(grad_a.shape == z.shape, lambda: "hypergrad::activation_hvp_backward: grad_a must have the shape of z")
    torch._check_value(r_grad_a.shape == rz.shape, lambda: "hypergrad::activation_hvp_backward: r_grad_a must have the shape of rz")
    return torch.empty_like(rz)


@declare_op("softmax_ce_hvp", "The softmax cross-entropy Hessian times rz, per row: scale * (p * rz - p <p, rz>).")
def _softmax_ce_hvp_fake(probs, rz, scale):
    torch._check_value(probs.dim() == 2, lambda: "hypergrad::softmax_ce_hvp: probs must be [N, C]")
    _check_pair("softmax_ce_hvp", probs, rz)
    return torch.empty_like(rz)


@declare_op("mlp_ce_hvp", "Structured H v of a linear-activation chain under mean softmax cross-entropy (csrc/mlp_hvp.cpp).", routes_on=6)
def _mlp_ce_hvp_fake(weights, inputs, pre_activations, grad_activations, deltas, probs, v, activation, negative_slope):
    layers = len(weights)
    torch._check_value(len(inputs) == layers and len(deltas) == layers, lambda: "hypergrad::mlp_ce_hvp: one input and one "
                 "delta per layer")
    torch._check_value(len(pre_activations) == layers - 1 and len(grad_activations) == layers - 1,
                 lambda: "hypergrad::mlp_ce_hvp: one pre-activation and one activation gradient per hidden layer")
    torch._check_value(v.dim() in (1, 2), lambda: f"hypergrad::mlp_ce_hvp: v must be [P] or [B, P], got {list(v.shape)}")
    parameters = sum(w.numel() + w.shape[0] for w in weights)
    torch._check_value(v.shape[-1] == parameters, lambda: f"hypergrad::mlp_ce_hvp: v must have {parameters} entries per "
                 f"direction (weights and biases, in that order per layer)")
    torch._check_value(v.dtype == probs.dtype, lambda: "hypergrad::mlp_ce_hvp: v must have the dtype of the model's state")
    return v.new_empty(v.shape)


def _router(op):
    kernel = getattr(torch.ops.hypergrad, op.name) if _C is not None else None
    twin, routes_on = op.twin, op.routes_on
    signature = inspect.signature(twin)
    arity = len(signature.parameters)

    def route(*args, **kwargs):
        if kwargs or len(args) != arity:  # keywords or defaults: the kernel takes every argument by position
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            args = bound.args
        if _kernel_for(args[routes_on]):
            return kernel(*args)
        return twin(*args)

    route.__name__ = route.__qualname__ = op.name
    route.__doc__ = f"{op.doc}\n\nThe kernel torch.ops.hypergrad.{op.name}, or hypergrad._reference.{op.name} (the twin)."
    route.__signature__ = signature
    return route


for _op in OPS:
    globals()[_op.name] = _router(_op)  # _ops.row_dot, _ops.cg_step, ...
    if _C is not None:
        torch.library.register_fake(f"hypergrad::{_op.name}")(_op.fake)
del _op


def build_info():
    """What is in use: a dict with the torch and CUDA versions and which kernels are present."""
    return {
        "torch_version": torch.__version__,
        "torch_cuda_version": torch.version.cuda,
        "extension_loaded": _C is not None,
        "extension_enabled": has_extension(),
        "extension_error": EXTENSION_ERROR,
        "compiled_torch_version": _C.compiled_torch_version() if _C is not None else None,
        "compiled_cuda_version": (_C.compiled_cuda_version() or None) if _C is not None else None,
        "cpu_kernels": _C is not None,
        "cuda_kernels": _C is not None and _C.compiled_cuda_version() != "",
        "cuda_kernels_off": CUDA_MISMATCH,
        "cuda_device_available": torch.cuda.is_available(),
        "cuda_kernels_run_on_device_0": (cuda_kernel_problem(torch.device("cuda", 0)) is None
                                         if has_cuda_extension() and torch.cuda.is_available() else None),
        "ops": [op.name for op in OPS],
    }
