"""The influence defense (Koh & Liang, "Understanding black-box predictions via influence functions",
ICML 2017, eq. 2; Lu, Kamath & Yu, TMLR 2022, Section 5.6 (b) and Table 11): remove the share of
training points (3%) whose upweighting would raise the defender's validation loss most.

With w the parameters of a defender trained on the (poisoned) training set D = {(x_i, y_i)}_{i<N},
L(w) = (1/N) sum_i l(z_i; w) its mean cross-entropy, H = grad^2 L(w) and g_val the gradient of the mean
cross-entropy on the validation set (x_val, y_val), upweighting z by epsilon changes the validation loss
by epsilon * I(z) to first order, where (eq. 2, with Koh & Liang's damping lambda)

    I(z) = - g_val^T (H + lambda I)^{-1} grad_w l(z; w).

The points of largest I(z) are the most harmful: the filter removes the floor(fraction * N) of them.

Computation, so that it scales to full MNIST's poisoned training set (43,260 points; the NN defender has 1.24M
parameters):
  1. one linear system s = (H + lambda I)^{-1} g_val, solved by hypergrad.solve from Hessian-vector
     products of L; H v = sum_b grad^2 [(1/N) sum_{i in b} l_i] v is accumulated over batches of
     `batch_size` points (each batch's graph is freed before the next), so memory stays bounded;
  2. I(z_i) = -grad l_i . s for every i at once, without per-example gradients: -(d/dt) l_i(w + t s) at
     t = 0, one forward-mode torch.func.jvp of the vector of per-example losses along s, in batches.

Adapted (and why):
  * Koh & Liang solve the system by conjugate gradient or LiSSA; the default here is MINRES: the NN's
    Hessian is indefinite and the damping need not make H + lambda I positive definite. hypergrad's CG
    stops a system at the first direction of non-positive curvature, whereas MINRES solves symmetric
    indefinite systems and its residual decreases monotonically; `solver` chooses among hypergrad.METHODS.
    On mnist-sample with 3% label flips (2,884 points, NN defender, damping 0.01), CG stopped at iteration 4
    on negative curvature with residual 1.7, MINRES reached 0.14 in 100 products, CGNR 0.17 in 200.
  * The damping lambda = 0.01 by default, Koh & Liang's device for non-convex models: it also removes
    the exact null space of the softmax Hessian (adding one vector to every class's weights leaves the
    loss unchanged), which makes even the LR defender's H singular.
  * No validation set (x_val None): the "validation" objective falls back to the training set's own mean
    loss, g_val = grad L(w). At an exact minimiser of L that gradient is zero and every score is zero, so
    the filter is only meaningful with a validation set; the protocol always passes the defender's D_v.
"""
import math

import torch
import torch.nn.functional as F
from torch.func import functional_call

from hypergrad import METHODS, flatten, hessian_operator, solve

from ..attacks.base import Setting
from .base import FRACTION, PoisonFilter, in_dtype_of, keep_all_but_largest
from .gradients import batches, directional_derivatives


def _trainable(model):
    """(names, leaves): the model's trainable parameters as detached leaves that require grad (the model's
    own tensors are neither changed nor given .grad)."""
    named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameters to compute influences with")
    return [k for k, _ in named], tuple(p.detach().requires_grad_(True) for _, p in named)


def _summed_loss(model, names, x, y, scale):
    """params -> scale * sum_i l(z_i; params) over (x, y): the batch's share of a mean loss when scale = 1/N."""
    def loss(*params):
        return F.cross_entropy(functional_call(model, dict(zip(names, params)), (x,)), y, reduction="sum") * scale
    return loss


def mean_loss_gradient(model, names, params, x, y, batch_size):
    """grad_w (1/N) sum_i l(z_i; w), flat, accumulated over batches."""
    total = torch.zeros(sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
    for xb, yb in batches(x, y, batch_size, params[0]):
        total += flatten(torch.autograd.grad(_summed_loss(model, names, xb, yb, 1.0 / len(y))(*params), params))
    return total


def mean_loss_hessian_matvec(model, names, params, x, y, batch_size):
    """v -> H v, H the Hessian of (1/N) sum_i l(z_i; w): the sum of the batches' products (each batch's loss
    scaled by 1/N). One batch: its gradient graph is built once and reused by every product; several: each
    product rebuilds them one at a time, so that only one batch's graph is alive."""
    if len(y) <= batch_size:
        xb, yb = next(batches(x, y, batch_size, params[0]))
        return hessian_operator(_summed_loss(model, names, xb, yb, 1.0 / len(y)), params)

    def matvec(v):
        out = torch.zeros_like(v)
        for xb, yb in batches(x, y, batch_size, params[0]):
            out += hessian_operator(_summed_loss(model, names, xb, yb, 1.0 / len(y)), params)(v)
        return out
    return matvec


def influence_scores(model, x, y, x_val=None, y_val=None, *, damping=0.01, method="minres", maxiter=100, rtol=1e-3,
                     batch_size=2000):
    """I(z_i) = -g_val^T (H + damping I)^{-1} grad l(z_i; w) for every training point (Koh & Liang 2017, eq. 2).

    Args:
        model: the defender, trained on (x, y); its trainable parameters are w. It is put in eval mode.
        x, y: the training set (inputs, class indices); H is the Hessian of its mean cross-entropy at w.
        x_val, y_val: the validation set whose mean cross-entropy's gradient is g_val; None: the training
            set's own mean loss (see the module docstring). (default: None)
        damping: lambda added to H's diagonal. (default: 0.01)
        method: the hypergrad.solve method for (H + damping I) s = g_val. (default: "minres")
        maxiter: most solver iterations (Hessian-vector products for cg and minres). (default: 100)
        rtol: the solver's relative tolerance on ||g_val - (H + damping I) s||. (default: 1e-3)
        batch_size: most points per batch of the gradient, Hessian-vector and score passes. (default: 2000)

    Returns:
        (scores, solve_info): scores [N] in the parameters' dtype (larger: more harmful); solve_info a dict of
        Python numbers on the solve: iterations, hessian_vector_products, residual_norm
        ||g_val - (H + damping I) s||, gradient_norm ||g_val||, relative_residual (their ratio), converged
        (relative_residual <= rtol), negative_curvature (cg met p^T (H + damping I) p <= 0 and stopped).
    """
    if (x_val is None) != (y_val is None):
        raise ValueError("pass both x_val and y_val (the validation set), or neither")
    if len(x) != len(y) or (x_val is not None and len(x_val) != len(y_val)):
        lengths = "" if x_val is None else f", {len(x_val)} and {len(y_val)} validation"
        raise ValueError(f"inputs and labels differ in length: {len(x)} and {len(y)} training{lengths}")
    if len(y) == 0:
        raise ValueError("the training set is empty")
    model.eval()
    names, params = _trainable(model)
    if x_val is None:
        x_val, y_val = x, y
    g_val = mean_loss_gradient(model, names, params, x_val, y_val, batch_size)
    s, info = solve(mean_loss_hessian_matvec(model, names, params, x, y, batch_size), g_val, method=method,
                    maxiter=maxiter, rtol=rtol, damping=damping)
    scores = -directional_derivatives(model, names, params, s, x, y, batch_size).detach()
    residual, g_norm = float(info.residual_norm), float(g_val.norm())
    return scores, {"iterations": int(info.iterations), "hessian_vector_products": info.num_matvecs,
                    "residual_norm": residual, "gradient_norm": g_norm,
                    "relative_residual": residual / g_norm if g_norm > 0 else 0.0,
                    "converged": bool(info.converged), "negative_curvature": bool(info.negative_curvature)}


class InfluenceFilter(PoisonFilter):
    """Removes the `fraction` of training points of largest influence on the validation loss (see the module
    docstring); detect_poison trains a defender with `fit` unless `model` is given."""

    name = "influence"
    uses_model = True
    validates = True
    settings = (
        FRACTION,
        Setting("influence_damping", float, 0.01, "non-negative",
                "influence: lambda added to the Hessian's diagonal in (H + lambda I)^-1 g_val"),
        Setting("influence_solver", str, "minres", METHODS,
                "influence: hypergrad.solve method for (H + lambda I) s = g_val (minres: safe for indefinite H)"),
        Setting("influence_iterations", int, 100, "positive-count",
                "influence: most solver iterations (Hessian-vector products over the training set)"),
        Setting("influence_rtol", float, 1e-3, "non-negative",
                "influence: the solver's relative tolerance on the residual"),
        Setting("influence_batch_size", int, 2000, "positive-count",
                "influence: most points per batch of the gradient, Hessian-vector and score passes"),
    )
    quick = {"influence_iterations": 10}

    def __init__(self, fraction=0.03, *, damping=0.01, solver="minres", iterations=100, rtol=1e-3, batch_size=2000):
        self.damping, self.solver, self.iterations, self.rtol, self.batch_size = (damping, solver, iterations, rtol,
                                                                                   batch_size)
        super().__init__(fraction)

    def _check_params(self):
        super()._check_params()
        if not _is_number(self.damping) or not 0 <= self.damping < math.inf:
            raise ValueError(f"damping is the lambda added to the Hessian's diagonal, a finite number >= 0; "
                             f"got {self.damping!r}")
        if self.solver not in METHODS:
            raise ValueError(f"solver must be one of {METHODS} (hypergrad.solve's methods), got {self.solver!r}")
        for name in ("iterations", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not _is_number(self.rtol) or not 0 <= self.rtol < math.inf:
            raise ValueError(f"rtol is the solver's relative tolerance, a finite number >= 0; got {self.rtol!r}")

    def detect_poison(self, x, y, *, model=None, fit=None, x_val=None, y_val=None):
        model, x = self._model(x, y, model, fit)
        scores, info = influence_scores(model, x, y, in_dtype_of(model, x_val), y_val, damping=self.damping, method=self.solver,
                                        maxiter=self.iterations, rtol=self.rtol, batch_size=self.batch_size)
        is_clean = keep_all_but_largest(scores, self.fraction)
        removed = scores[~is_clean.to(scores.device)]
        return {"score": "influence of upweighting the point on the validation loss, -g_val^T (H + lambda I)^-1 grad l",
                "validation": "x_val" if x_val is not None else "the training set (no x_val given)",
                "solver": self.solver, "damping": self.damping, "rtol": self.rtol,
                **info,
                "threshold": removed.min().item() if len(removed) else None}, is_clean


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)
