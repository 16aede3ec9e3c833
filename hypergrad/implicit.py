"""Implicit differentiation through the solution of an inner problem, for any bilevel problem.

If w*(theta) minimises an inner loss f(w, theta) (grad_w f(w*, theta) = 0), the implicit function theorem
gives its derivative dw*/dtheta = -(grad2_ww f)^-1 grad2_{w theta} f, so for an outer loss L(w*) the
vector-Jacobian product is

    dL/dtheta = -grad2_{theta w} f . (grad2_ww f + damping I)^-1 . dL/dw*

(the second term of hypergrad.total_grad; Lu, Kamath & Yu, TMLR 2022, eq. 15-17, for TGDA). In the spirit
of torchopt's custom_root, `implicit_argmin(inner_loss, w_star, theta)` returns w* as tensors that carry
this derivative through torch.autograd: solve the inner problem with any method (detached), pass its
solution here, and differentiate any loss of the result with .backward() or torch.autograd.grad. The
solve is hypergrad.solve (a hypergrad.Solver, any method and preconditioner) on reverse-over-reverse
Hessian-vector products of the inner loss; a network's loss at given parameters is written with
torch.func.functional_call (README, "Implicit differentiation").
"""
import warnings

import torch

from .hvp import HessianOperator, as_tuple, flatten, unflatten
from .solvers import Solver, warn_negative_curvature


UNSOLVED = 1e-3  # a solve that ends above its rtol and this relative residual is warned about (rounding keeps a
# float64 CG of 100 iterations near 1e-7 on the README's problem, short of the default rtol 1e-8: not worth a warning)


class _ImplicitSolution(torch.autograd.Function):
    @staticmethod
    def forward(ctx, inner_loss, solver, n_w, *tensors):
        w_star, theta = tensors[:n_w], tensors[n_w:]
        ctx.inner_loss, ctx.solver, ctx.n_w = inner_loss, solver, n_w
        ctx.save_for_backward(*w_star, *theta)
        return tuple(w.clone() for w in w_star)

    @staticmethod
    def backward(ctx, *grad_w):
        saved = ctx.saved_tensors
        w_star, theta = saved[:ctx.n_w], saved[ctx.n_w:]
        with torch.enable_grad():
            w = tuple(p.detach().requires_grad_(True) for p in w_star)
            th = tuple(p.detach().requires_grad_(True) for p in theta)
            f = ctx.inner_loss(w, th)
            if not isinstance(f, torch.Tensor) or f.numel() != 1:
                raise ValueError("inner_loss(w, theta) must return the scalar inner loss as a tensor")
            g_w = torch.autograd.grad(f, w, create_graph=True)
            hessian = HessianOperator.from_gradient(g_w, w)
            b = flatten([torch.zeros_like(p) if g is None else g for g, p in zip(grad_w, w)])
            v, info = ctx.solver(hessian, b)
            warn_negative_curvature(info, "implicit_argmin", "grad2_ww f + damping I",
                                    "w_star is not at a minimum of inner_loss", stacklevel=4)
            relative = float(info.residual_norm.max()) / max(float(b.norm()), 1e-300)
            if not info.negative_curvature.any() and not bool(info.converged.all()) and relative > UNSOLVED:
                warnings.warn(f"implicit_argmin: the solve of (grad2_ww f + damping I) v = dL/dw* stopped after "
                              f"{int(info.iterations.max())} iterations with relative residual {relative:.2g}, above "
                              f"the solver's rtol {ctx.solver.rtol:g}: the gradient to theta is approximate; give the "
                              "Solver a larger maxiter, damping, or method='minres' for an indefinite or singular "
                              "Hessian", RuntimeWarning, stacklevel=2)
            mixed = torch.autograd.grad(g_w, th, unflatten(v, w), allow_unused=True)
        grads = tuple(None if m is None else -m for m in mixed)
        return (None, None, None, *([None] * ctx.n_w), *grads)


def implicit_argmin(inner_loss, w_star, theta, *, solver=None):
    """w* re-attached to theta through the implicit function theorem (module docstring).

    Args:
        inner_loss: (w, theta) -> the scalar inner loss f(w, theta) at the tensors w and theta (tuples
            shaped like w_star and theta); called in the backward pass.
        w_star: the inner solution, a tensor or a sequence of tensors (its graph, if any, is ignored).
        theta: the outer parameters, a tensor or a sequence of tensors that require grad.
        solver: the hypergrad.Solver of (grad2_ww f + damping I) v = dL/dw*. A solve ending above its rtol
            and a relative residual of 1e-3 is warned about (RuntimeWarning) in the backward pass. (default:
            cg, 100 iterations, rtol 1e-8)

    Returns:
        A tuple of tensors equal to w_star whose gradient flows to theta.
    """
    w_star, theta = as_tuple(w_star, "w_star"), as_tuple(theta, "theta")
    if not all(p.requires_grad for p in theta):
        raise ValueError("every tensor of theta must require grad: it is what the solution is differentiated by")
    solver = solver or Solver(method="cg", maxiter=100, rtol=1e-8)
    if not isinstance(solver, Solver):
        raise ValueError(f"solver must be a hypergrad.Solver, got {type(solver).__name__}")
    return _ImplicitSolution.apply(inner_loss, solver, len(w_star), *(p.detach() for p in w_star), *theta)
