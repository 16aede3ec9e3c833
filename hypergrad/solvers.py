"""Krylov solvers for (A + damping I) x = b with batched right-hand sides and device-side scalars.

A is given only through products v -> A v (for example the Hessian-vector products of
hypergrad.hvp). In TGDA (Lu, Kamath & Yu, TMLR 2022, eq. 15-17, Algorithm 1 line 4) A is the
follower's Hessian H_ww and b = grad_w l; the paper's code uses conjugate gradient on the normal
equations ("cgnr" here).

b is [n] (one system) or [B, n] (B systems solved together, one per row, each with its own
convergence: a row that has converged, or met non-positive curvature, stops changing while the
others go on). Every per-row scalar (dot products, step sizes, flags) stays on the device in
float64; the host is synchronised only once every `check_every` iterations, to stop early when
every row is done. The vector work of CG and CGNR and their per-row bookkeeping (cg_track) run in
the fused kernels of hypergrad._C: four ops per iteration besides the products.

Methods:
  * "cg": conjugate gradient, for symmetric positive definite A. A direction with p.Ap <= 0 stops
    that row and sets info.negative_curvature.
  * "cgnr": CG on the normal equations A^T A x = A^T b (two products per iteration), safe for
    indefinite A; the reported residual is that of the original system.
  * "minres": MINRES (Paige & Saunders 1975) for symmetric, possibly indefinite A.
  * "neumann": truncated Neumann series x = x0 + eta sum_j (I - eta A)^j r0, for SPD A with
    eta < 2 / lambda_max (eta estimated by power iteration from r0 unless given).

After the iterations every method computes the true residual b - (A + damping I) x (one more product) and
judges convergence by it: the residual a recurrence carries drifts from the true one in floating point (in
float32 on an ill-conditioned A, a recurrence can read 1e-4 where the true relative residual is above 1).

Preconditioning: a positive diagonal M ~ A + damping I (hypergrad.preconditioners.jacobi estimates one
from Hutchinson products) is applied to any method by symmetric scaling, S = M^-1/2:
S (A + damping I) S y = S b, x = S y; the tolerances then apply to the scaled residual S r, and
info.residual_norm reports the true residual r of the original system.

The solution is not differentiable through the iterations (b and the products are detached): differentiate
through a solve with hypergrad.total_grad or hypergrad.implicit_argmin, which apply the implicit function theorem.

A Solver holds every setting of a solve (method, maxiter, rtol, atol, damping, preconditioner and the
options of one method) as one value, passed whole to hypergrad.total_grad and SolveGraphCache.
"""
import math
import numbers
import warnings
from dataclasses import dataclass, field

import torch

from . import _ops

METHODS = ("cg", "cgnr", "minres", "neumann")
LSQ_FLOOR = 64  # MINRES's least-squares test stops at ||A r|| <= LSQ_FLOOR eps ||A|| ||r|| (rounding's scale)


@dataclass
class SolveInfo:
    """What a solve did. Tensors are shaped like the rows of b ([] or [B]).

    Attributes:
        method: the method used.
        iterations: iterations each system took (int64).
        residual_norm: the true ||b - (A + damping I) x|| per system, computed from x.
        converged: whether each system's true residual met max(rtol ||b||, atol) (with a preconditioner:
            the scaled residual, ||S r|| <= max(rtol ||S b||, atol)).
        negative_curvature: whether CG met a direction with p.Ap <= 0 (always False otherwise).
        num_matvecs: the number of calls to matvec (one call serves every row of a batch).
        x: the solution, ready to warm-start the next solve (x0).
    """

    method: str
    iterations: torch.Tensor
    residual_norm: torch.Tensor
    converged: torch.Tensor
    negative_curvature: torch.Tensor
    num_matvecs: int
    x: torch.Tensor


class _Counted:
    """matvec with damping added, counting its calls."""

    def __init__(self, matvec, damping):
        self.matvec, self.damping, self.calls = matvec, damping, 0

    def __call__(self, v):
        self.calls += 1
        try:
            out = self.matvec(v)
        except RuntimeError as exc:  # at the first product: b of a length, dtype or device matvec does not take
            if self.calls > 1 or isinstance(exc, torch.OutOfMemoryError):
                raise
            raise ValueError(f"matvec failed at the solve's first product, on a {v.dtype} vector of shape "
                             f"{list(v.shape)} on {v.device} (b's): {str(exc).splitlines()[0]}; if matvec takes vectors "
                             "of another length, dtype or device, give b those") from exc
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"matvec returned a {type(out).__name__}; it must return A v as a tensor shaped like v")
        if out.shape != v.shape:
            raise ValueError(f"matvec returned shape {list(out.shape)} for input {list(v.shape)}; "
                             "it must return A v shaped like v")
        if out.dtype != v.dtype or out.device != v.device:
            raise ValueError(f"matvec returned a {out.dtype} tensor on {out.device} for a {v.dtype} input on {v.device}; "
                             "it must return A v in v's dtype and on its device (the solve runs in b's)")
        out = out.detach()  # a matrix that requires grad: the solve is not differentiated (module docstring)
        return out + self.damping * v if self.damping else out


def _col(s, like):
    """Per-row float64 scalars as a column broadcastable against vectors like `like`."""
    return s.to(like.dtype).unsqueeze(-1)


def _check_settings(*, method, maxiter, rtol, atol, damping, check_every, neumann_scale):
    """The checks of solve's settings, shared by solve and Solver (which makes them when it is built)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if maxiter is not None and (not _is_count(maxiter) or maxiter < 0):
        raise ValueError(f"maxiter must be an integer >= 0, or None for the method's default; got {maxiter!r}")
    for name, value in (("rtol", rtol), ("atol", atol), ("damping", damping)):
        if not _is_number(value) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if not _is_count(check_every) or check_every < 1:
        raise ValueError(f"check_every must be an integer >= 1, got {check_every!r}")
    if neumann_scale is not None and (not _is_number(neumann_scale) or not math.isfinite(neumann_scale)
                                      or neumann_scale <= 0):
        raise ValueError(f"neumann_scale must be a finite number > 0 (below 2 / the largest eigenvalue of A for the "
                         f"series to converge), or None to estimate one; got {neumann_scale!r}")


def solve(matvec, b, *, method="cg", x0=None, maxiter=None, rtol=1e-5, atol=0.0, damping=0.0,
          check_every=4, neumann_scale=None, preconditioner=None):
    """Solves (A + damping I) x = b for one or a batch of right-hand sides.

    Args:
        matvec: callable v -> A v for v of shape [n] or [B, n] (A symmetric).
        b: right-hand side [n], or [B, n] for B systems solved together.
        method: "cg", "cgnr", "minres" or "neumann". (default: "cg")
        x0: initial guess shaped like b, e.g. info.x of a previous solve. (default: zeros)
        maxiter: most iterations per system. (default: n for cg/cgnr/minres, 100 for neumann)
        rtol: relative tolerance on the residual norm, per system. (default: 1e-5)
        atol: absolute tolerance; a system stops when ||r|| <= max(rtol ||b||, atol). (default: 0.0)
        damping: Tikhonov damping added to A's diagonal. (default: 0.0)
        check_every: iterations between host synchronisations that test whether all systems are
            done. (default: 4)
        neumann_scale: eta of the Neumann series. (default: 1 / lambda_max by power iteration)
        preconditioner: a positive diagonal M ~ A + damping I, shaped [n] or like b (for example
            hypergrad.preconditioners.jacobi(matvec, n)), applied by symmetric scaling; the tolerances
            then apply to the scaled residual M^-1/2 r. (default: None)

    Returns:
        (x, info): x shaped like b, info a SolveInfo.

    Examples:
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> x, info = solve(lambda v: v @ A, torch.tensor([1.0, 2.0], dtype=torch.float64))
    """
    _check_settings(method=method, maxiter=maxiter, rtol=rtol, atol=atol, damping=damping, check_every=check_every,
                    neumann_scale=neumann_scale)
    if not callable(matvec):
        raise TypeError(f"matvec must be a callable v -> A v (e.g. lambda v: v @ A for a symmetric matrix A), "
                        f"got {type(matvec).__name__}")
    if not isinstance(b, torch.Tensor) or b.dim() not in (1, 2):
        raise ValueError("b must be a tensor of shape [n] or [B, n]")
    if b.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"b must be float32 or float64, got {b.dtype}")
    if x0 is not None and (not isinstance(x0, torch.Tensor) or x0.shape != b.shape or x0.device != b.device):
        raise ValueError(f"x0 must be a tensor shaped like b {list(b.shape)} on b's device {b.device}, got "
                         + (f"{list(x0.shape)} on {x0.device}" if isinstance(x0, torch.Tensor) else type(x0).__name__))
    if maxiter is None:
        maxiter = 100 if method == "neumann" else b.shape[-1]
    b = b.detach()  # A is an operator here, not differentiated: total_grad and implicit_argmin differentiate solves
    if preconditioner is not None:
        return _scaled_solve(matvec, b, preconditioner, method=method, x0=x0, maxiter=maxiter, rtol=rtol, atol=atol,
                             damping=damping, check_every=check_every, neumann_scale=neumann_scale)
    x, info, _ = _iterate(matvec, b, method=method, x0=x0, maxiter=maxiter, rtol=rtol, atol=atol, damping=damping,
                          check_every=check_every, neumann_scale=neumann_scale)
    return x, info


def _is_number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)  # numpy's numbers too


def _is_count(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _iterate(matvec, b, *, method, x0, maxiter, rtol, atol, damping, check_every, neumann_scale):
    """(x, info, r): the method's iterations, then the true residual r = b - (A + damping I) x, by which
    info.residual_norm and info.converged are set."""
    b = b.contiguous()
    A = _Counted(matvec, damping)
    x = torch.zeros_like(b) if x0 is None else x0.detach().to(b.dtype).clone().contiguous()
    r = b - A(x) if x0 is not None else b.clone()
    bnorm = _ops.row_dot(b, b).sqrt()
    tol2 = torch.clamp(bnorm * rtol, min=atol) ** 2
    run = {"cg": _cg, "cgnr": _cgnr, "minres": _minres, "neumann": _neumann}[method]
    iterations, _, negative = run(A, b, x, r, tol2, maxiter, check_every, neumann_scale)
    r = b - A(x)
    rr = _ops.row_dot(r, r)
    info = SolveInfo(method=method, iterations=iterations, residual_norm=rr.sqrt(), converged=rr <= tol2,
                     negative_curvature=negative, num_matvecs=A.calls, x=x)
    return x, info, r


def _scaled_solve(matvec, b, diagonal, *, method, x0, maxiter, rtol, atol, damping, check_every, neumann_scale):
    """solve with a diagonal preconditioner by symmetric scaling (module docstring)."""
    if isinstance(diagonal, str):
        raise ValueError(f"preconditioner must be a diagonal tensor; {diagonal!r} names one that a hypergrad.Solver "
                         f"estimates (Solver(preconditioner={diagonal!r})(matvec, b)), or make it with "
                         "hypergrad.preconditioners.jacobi(matvec, n, dtype=b.dtype)")
    shapes = " or ".join(dict.fromkeys(str(list(shape)) for shape in (b.shape[-1:], b.shape)))
    if not isinstance(diagonal, torch.Tensor) or diagonal.shape not in (b.shape[-1:], b.shape):
        raise ValueError(f"preconditioner must be a tensor of shape {shapes} (a diagonal), "
                         f"got {list(diagonal.shape) if isinstance(diagonal, torch.Tensor) else type(diagonal).__name__}")
    if not bool((diagonal > 0).all()) or not bool(torch.isfinite(diagonal).all()):
        raise ValueError("preconditioner must be a positive, finite diagonal (hypergrad.preconditioners.jacobi "
                         "makes one)")
    scale = diagonal.to(b.dtype).rsqrt()
    counted = _Counted(matvec, damping)
    y0 = None if x0 is None else x0.detach().to(b.dtype) / scale
    y, info, scaled_residual = _iterate(lambda v: scale * counted(scale * v), scale * b, method=method, x0=y0,
                                        maxiter=maxiter, rtol=rtol, atol=atol, damping=0.0, check_every=check_every,
                                        neumann_scale=neumann_scale)
    x = scale * y
    r = scaled_residual / scale  # S b - S (A + damping I) S y = S r
    info.residual_norm, info.num_matvecs, info.x = _ops.row_dot(r, r).sqrt(), counted.calls, x
    return x, info


@dataclass(frozen=True)
class Solver:
    """Every setting of a solve as one value: Solver(...)(matvec, b, x0=None) -> (x, info).

    Attributes:
        method: "cg", "cgnr", "minres" or "neumann". (default: "cg")
        maxiter: most iterations. (default: solve's: n, or 100 for neumann)
        rtol, atol: the stopping tolerances, as in solve. (default: 1e-5, 0.0)
        damping: added to A's diagonal. (default: 0.0)
        preconditioner: None, "jacobi" (estimated from the operator at each solve by
            hypergrad.preconditioners.jacobi with options jacobi_samples and jacobi_floor), or a
            positive diagonal tensor. (default: None)
        options: the options of one method or preconditioner: check_every, neumann_scale,
            jacobi_samples, jacobi_floor, jacobi_seed. (default: none)
    """

    method: str = "cg"
    maxiter: int = None
    rtol: float = 1e-5
    atol: float = 0.0
    damping: float = 0.0
    preconditioner: object = None
    options: dict = field(default_factory=dict)

    OPTIONS = ("check_every", "neumann_scale", "jacobi_samples", "jacobi_floor", "jacobi_seed")

    def __post_init__(self):
        if not isinstance(self.options, dict):
            raise ValueError(f"options must be a dict of a method's options (e.g. {{'check_every': 4}}), "
                             f"got {self.options!r}")
        unknown = sorted(set(self.options) - set(self.OPTIONS))
        if unknown:
            raise ValueError(f"unknown solver option(s) {', '.join(unknown)}; known: {', '.join(self.OPTIONS)}")
        _check_settings(method=self.method, maxiter=self.maxiter, rtol=self.rtol, atol=self.atol, damping=self.damping,
                        check_every=self.options.get("check_every", 4),
                        neumann_scale=self.options.get("neumann_scale"))
        if not (self.preconditioner is None or self.preconditioner == "jacobi"
                or isinstance(self.preconditioner, torch.Tensor)):
            raise ValueError(f"preconditioner must be None, 'jacobi' or a positive diagonal tensor, "
                             f"got {self.preconditioner!r}")

    def diagonal(self, matvec, b):
        """The preconditioner's diagonal for this system (None without one)."""
        if self.preconditioner is None or isinstance(self.preconditioner, torch.Tensor):
            return self.preconditioner
        from .preconditioners import jacobi
        return jacobi(matvec, b.shape[-1], dtype=b.dtype, device=b.device, damping=self.damping,
                      samples=self.options.get("jacobi_samples", 32), floor=self.options.get("jacobi_floor", 1e-2),
                      seed=self.options.get("jacobi_seed", 0))

    def __call__(self, matvec, b, x0=None):
        return solve(matvec, b, method=self.method, x0=x0, maxiter=self.maxiter, rtol=self.rtol, atol=self.atol,
                     damping=self.damping, check_every=self.options.get("check_every", 4),
                     neumann_scale=self.options.get("neumann_scale"), preconditioner=self.diagonal(matvec, b))


def warn_negative_curvature(info, caller, matrix, cause, stacklevel=3):
    """A RuntimeWarning where CG met non-positive curvature (info.negative_curvature): its solve stopped there, so an
    implicit term built from it is incomplete (one host synchronisation)."""
    if info.method == "cg" and bool(info.negative_curvature.any()):
        warnings.warn(f"{caller}: CG met non-positive curvature in {matrix} ({cause}, or the damping is too small), so "
                      f"its solve stopped early and the implicit term is incomplete; use method='minres' or 'cgnr' for "
                      f"an indefinite Hessian, or more damping", RuntimeWarning, stacklevel=stacklevel)


def _all_done(k, active, check_every):
    """The one host synchronisation of the loop: every `check_every` iterations, never before the first
    (a solve with check_every >= maxiter runs without any, as a CUDA graph needs)."""
    return k > 0 and k % check_every == 0 and not _any_on_host(active)


def _any_on_host(flags):
    return bool(flags.any())  # waits for the device


def _cg(A, b, x, r, tol2, maxiter, check_every, _):
    rows = b.shape[:-1]
    rs = _ops.row_dot(r, r)
    active = rs > tol2
    negative = torch.zeros(rows, dtype=torch.bool, device=b.device)
    iterations = torch.zeros(rows, dtype=torch.int64, device=b.device)
    p = r.clone()
    for k in range(maxiter):
        if _all_done(k, active, check_every):
            break
        Ap = A(p)
        pAp = _ops.row_dot(p, Ap)
        rr = _ops.cg_step(x, r, p, Ap, rs, pAp, active)  # alpha = rs / pAp on active rows with pAp > 0
        _ops.cg_track(pAp, rr, tol2, active, iterations, negative)  # in place; pAp <= 0 stops a row
        _ops.cg_direction(p, r, rr, rs, active)  # beta = rr / rs
        rs = rr
    return iterations, rs, negative


def _cgnr(A, b, x, r, tol2, maxiter, check_every, _):
    # CG on A^2 x = A b (A symmetric): z = A r is the normal-equation residual.
    rows = b.shape[:-1]
    rs = _ops.row_dot(r, r)
    active = rs > tol2
    iterations = torch.zeros(rows, dtype=torch.int64, device=b.device)
    singular = torch.zeros(rows, dtype=torch.bool, device=b.device)  # |A p| = 0: not negative curvature
    z = A(r)
    zz = _ops.row_dot(z, z)
    p = z.clone()
    for k in range(maxiter):
        if _all_done(k, active, check_every):
            break
        w = A(p)
        ww = _ops.row_dot(w, w)
        rs = _ops.cg_step(x, r, p, w, zz, ww, active)  # alpha = |z|^2 / |A p|^2
        _ops.cg_track(ww, rs, tol2, active, iterations, singular)
        z = A(r)
        zz_new = _ops.row_dot(z, z)
        _ops.cg_direction(p, z, zz_new, zz, active)
        zz = zz_new
    return iterations, rs, torch.zeros(rows, dtype=torch.bool, device=b.device)


def _minres(A, b, x, r, tol2, maxiter, check_every, _):
    # Paige & Saunders' MINRES without preconditioner, every scalar a float64 tensor per row.
    rows = b.shape[:-1]
    zeros = torch.zeros(rows, dtype=torch.float64, device=b.device)
    iterations = torch.zeros(rows, dtype=torch.int64, device=b.device)
    beta = _ops.row_dot(r, r).sqrt()
    phibar = beta.clone()
    active = phibar ** 2 > tol2
    r1, r2, y = r.clone(), r.clone(), r.clone()
    oldb, dbar, epsln, sn = zeros.clone(), zeros.clone(), zeros.clone(), zeros.clone()
    cs = torch.full(rows, -1.0, dtype=torch.float64, device=b.device)
    w, w2 = torch.zeros_like(b), torch.zeros_like(b)
    tiny = torch.finfo(torch.float64).tiny
    eps = torch.finfo(b.dtype).eps
    tnorm2 = zeros.clone()  # ||T_k||_F^2, the Lanczos matrix's: an estimate of ||A|| (as in Paige & Saunders)
    for k in range(maxiter):
        if _all_done(k, active, check_every):
            break
        v = _col(torch.where(beta > 0, 1.0 / beta.clamp(min=tiny), zeros), b) * y
        y = A(v)
        if k > 0:
            y = y - _col(torch.where(oldb > 0, beta / oldb.clamp(min=tiny), zeros), b) * r1
        alfa = _ops.row_dot(v, y)
        y = y - _col(torch.where(beta > 0, alfa / beta.clamp(min=tiny), zeros), b) * r2
        r1, r2 = r2, y
        oldb, beta = beta, _ops.row_dot(y, y).sqrt()
        tnorm2 = tnorm2 + alfa ** 2 + oldb ** 2 + beta ** 2
        oldeps = epsln
        delta = cs * dbar + sn * alfa
        gbar = sn * dbar - cs * alfa
        epsln = sn * beta
        dbar = -cs * beta
        anorm = tnorm2.sqrt()
        # ||A r|| / (||A|| ||r||) of the current x, Paige & Saunders' least-squares test, at rounding's scale (LSQ_FLOOR
        # eps: 4-22 eps measured at the breakdown, float32 and float64): x solves min ||b - A x|| (a singular,
        # inconsistent system), and the next step's direction, divided by a gamma of rounding noise, would send x to
        # infinity. The row stops without it. (At the user's rtol it stopped nonsingular solves of condition 1e4.)
        step = active & (torch.hypot(gbar, dbar) > LSQ_FLOOR * eps * anorm)
        gamma = torch.hypot(gbar, beta).clamp(min=tiny)  # every row's rotation stays normalised, stepping or not
        cs, sn = gbar / gamma, beta / gamma
        phi = cs * phibar
        phibar = torch.where(step, sn * phibar, phibar)
        w1, w2 = w2, w
        w = (v - _col(oldeps, b) * w1 - _col(delta, b) * w2) * _col(1.0 / gamma, b)
        # where, not a product with 0: a stopped row's w may overflow as the loop runs on (a recorded solve runs
        # every iteration), and 0 * inf would write NaN into its x
        x.add_(torch.where(step.unsqueeze(-1), _col(phi, b) * w, 0.0))
        iterations += step
        active = step & (phibar ** 2 > tol2) & (beta > 0)
    return iterations, phibar ** 2, torch.zeros(rows, dtype=torch.bool, device=b.device)


def _neumann(A, b, x, r, tol2, maxiter, check_every, scale):
    # x_k = x_0 + eta sum_{j<k} (I - eta A)^j r_0, whose residual b - A x_k is (I - eta A)^k r_0.
    rows = b.shape[:-1]
    iterations = torch.zeros(rows, dtype=torch.int64, device=b.device)
    if scale is None:
        eta = _power_iteration_scale(A, r)
    else:
        eta = torch.full(rows, float(scale), dtype=torch.float64, device=b.device)
    term = r.clone()  # the residual of the current x
    rs = _ops.row_dot(term, term)
    active = rs > tol2
    for k in range(maxiter):
        if _all_done(k, active, check_every):
            break
        step = _col(torch.where(active, eta, torch.zeros_like(eta)), b)
        x.add_(step * term)
        term = term - step * A(term)
        rs = _ops.row_dot(term, term)
        iterations += active
        active = active & (rs > tol2)
    return iterations, rs, torch.zeros(rows, dtype=torch.bool, device=b.device)


def _power_iteration_scale(A, r, steps=20):
    """eta = 1 / lambda_max(A) per row, lambda_max estimated by power iteration from the starting residual r,
    the vector the series expands (a row with r = 0 gets eta = 0: it has nothing to do)."""
    v = r / _col(_ops.row_dot(r, r).sqrt().clamp(min=torch.finfo(torch.float64).tiny), r)
    lam = torch.zeros(r.shape[:-1], dtype=torch.float64, device=r.device)
    for _ in range(steps):
        Av = A(v)
        lam = _ops.row_dot(v, Av).abs()
        v = Av / _col(_ops.row_dot(Av, Av).sqrt().clamp(min=torch.finfo(torch.float64).tiny), r)
    return torch.where(lam > 0, 1.0 / lam.clamp(min=torch.finfo(torch.float64).tiny), torch.zeros_like(lam))
