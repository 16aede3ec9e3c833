"""The Sever defense (Diakonikolas, Kamath, Kane, Li, Steinhardt & Stewart, "Sever: A robust meta-algorithm
for stochastic optimization", ICML 2019, Algorithm 1; Lu, Kamath & Yu, TMLR 2022, Section 5.6 (b) and
Table 11: "removes 3% of training points with the highest outlier scores, defined using the top singular
value in the matrix of gradients").

One round, on the points S still kept, with w the parameters of a defender trained on S and
l_i(w) the cross-entropy of point i:

    G = [grad_w l_i(w)]_{i in S}                  (|S| x d, every trainable parameter)
    g_mean = (1/|S|) sum_i grad_w l_i(w),   G_c = G - 1 g_mean^T
    v = the top right singular vector of G_c,     sigma = its singular value
    tau_i = ((grad_w l_i(w) - g_mean) . v)^2      (the outlier score)

and the points of largest tau are removed. Points whose gradients are shifted together in one
direction (a coordinated attack, which is what moves w) dominate the top singular direction of the
centred gradients, so they score highest.

Scale: full MNIST's poisoned training set (D_tr 42,000 + 1,260 poisons = 43,260 points) with the NN defender
(1.24M parameters) gives a G of 54 billion entries, so G is never materialised. v comes from power iteration
on G_c^T G_c, each step two passes over the data in batches of `batch_size`:
  * G u (u in R^d), the directional derivatives of the per-example losses along u: one forward-mode
    torch.func.jvp of the vector of per-example losses (torch.func.functional_call over the parameters);
  * G^T r (r in R^n), the gradient of sum_i r_i l_i: one reverse pass;
  * centring without forming G_c: G_c u = G u - (g_mean . u) 1 and G_c^T r = G^T r - g_mean sum(r).
A power step u -> G_c^T (G_c u) is one pass of each kind. The scores are the squares of G_c v, which the last
power step has already computed, so no further pass is needed. (Fusing the two passes, a jvp whose primal
output keeps its autograd graph for the backward pass, was measured no faster on the CPU and is not used.)

Adapted (and why):
  * Sever's Filter removes points at random with probability tau_i / max tau (or above a threshold) and
    repeats until nothing changes; here, as for the paper's other filters (Lu et al.: "removes 3%"), round
    r removes a fixed share of floor(fraction * n) points, the highest tau (ties by index), over `rounds`
    rounds (default 2), shares as equal as integers allow, the defender retrained with the protocol's
    `fit` on the kept points between rounds.
  * v by power iteration (Sever computes an exact SVD of the materialised G): `iterations` steps at most
    (default 30), stopped early once the relative residual ||M u - lambda u|| / lambda of M = G_c^T G_c,
    lambda = ||G_c u||^2, is at most `rtol` (default 1e-3). The error in u shrinks like
    (sigma_2 / sigma_1)^(2k) after k steps: 30 steps take a singular-value ratio of 0.8 to ~1e-6. A step
    (one jvp and one reverse pass over the kept points) costs about as much as one or two epochs of
    training, so 30 cost less than the defender's 100-epoch (re)training that each round needs anyway.
    The residual bounds the sine of the angle between u and v by rtol * sigma_1^2 / (sigma_1^2 - sigma_2^2):
    1e-3 gives scores accurate to a percent or so unless the top two directions are nearly tied, in which
    case the top direction is itself ill-defined. The start is a seeded Gaussian vector (`seed`, default
    0, a constructor argument, not a setting), drawn on the CPU so every device gives the same one.
"""
import math

import torch
import torch.nn.functional as F
from torch.func import functional_call

from hypergrad import flatten

from ..attacks.base import Setting
from ..data import DataTooSmallError
from .base import FRACTION, PoisonFilter, in_dtype_of
from .gradients import directional_derivatives


class CentredGradients:
    """The centred per-example gradient matrix G_c = G - 1 g_mean^T of the cross-entropy of `model` on
    (x, y), as an operator (never materialised). The model is put in eval mode and left unchanged.

    Args:
        model: the defender; G is taken w.r.t. all its trainable parameters, flattened in
            named_parameters() order.
        x, y: the points (inputs, class indices), one row of G each.
        batch_size: most points per batch of every pass over the data. (default: 2000)
    """

    def __init__(self, model, x, y, batch_size=2000):
        if len(x) != len(y):
            raise ValueError(f"inputs and labels differ in length: {len(x)} and {len(y)}")
        if len(y) == 0:
            raise ValueError("no points to compute gradients of")
        named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no trainable parameters to take gradients with respect to")
        model.eval()
        self.model, self.x, self.y, self.batch_size = model, x, y, batch_size
        self.names = [k for k, _ in named]
        self.params = tuple(p.detach() for _, p in named)  # the primals of the jvp passes
        self.leaves = tuple(p.detach().requires_grad_(True) for _, p in named)  # the reverse passes' inputs
        self.shape = (len(y), sum(p.numel() for p in self.params))
        like = self.params[0]
        self.mean = self.gradient_rmatvec(torch.full((len(y),), 1.0 / len(y), dtype=like.dtype, device=like.device))

    def _batches(self):
        """(slice, per_example_losses) per batch: params dict -> l_i for the batch's points."""
        like = self.params[0]
        for i in range(0, len(self.y), self.batch_size):
            xb = self.x[i:i + self.batch_size].to(like.device, like.dtype)
            yb = self.y[i:i + self.batch_size].to(like.device)

            def losses(params, xb=xb, yb=yb):
                return F.cross_entropy(functional_call(self.model, params, (xb,)), yb, reduction="none")
            yield slice(i, i + len(yb)), losses

    def _reverse(self, losses, r):
        """G_b^T r_b: the gradient of sum_i r_i l_i over one batch's graph."""
        grads = torch.autograd.grad(losses, self.leaves, r, allow_unused=True)
        return flatten([torch.zeros_like(p) if g is None else g for g, p in zip(grads, self.leaves)])

    def gradient_matvec(self, u):
        """G u: grad l_i . u for every i, one forward-mode jvp a batch (uncentred)."""
        return directional_derivatives(self.model, self.names, self.params, u, self.x, self.y, self.batch_size)

    def gradient_rmatvec(self, r):
        """G^T r = grad_w sum_i r_i l_i, one reverse pass a batch (uncentred)."""
        params = dict(zip(self.names, self.leaves))
        out = torch.zeros(self.shape[1], dtype=self.params[0].dtype, device=self.params[0].device)
        for rows, losses in self._batches():
            out += self._reverse(losses(params), r[rows].detach())
        return out

    def matvec(self, u):
        """G_c u = G u - (g_mean . u) 1."""
        return self.gradient_matvec(u) - self.mean @ u

    def rmatvec(self, r):
        """G_c^T r = G^T r - g_mean sum(r)."""
        return self.gradient_rmatvec(r) - self.mean * r.sum()


def top_singular_direction(op, *, iterations=30, rtol=1e-3, seed=0):
    """Power iteration on G_c^T G_c for the top right singular vector of G_c (a CentredGradients).

    Args:
        op: the operator (a CentredGradients: matvec, rmatvec, mean, shape (n, d)).
        iterations: most power steps (passes over the data). (default: 30)
        rtol: stop once ||M u - lambda u|| / lambda <= rtol, M = G_c^T G_c, lambda = ||G_c u||^2. (default: 1e-3)
        seed: seed of the Gaussian start vector, drawn on the CPU. (default: 0)

    Returns:
        (v, G_c v, info): v [d] of unit norm (sign arbitrary), G_c v [n], and info a dict with
        "top_singular_value" (||G_c v||), "power_iterations", "residual" (the relative residual of v) and
        "converged" (residual <= rtol).
    """
    like = op.mean
    u = torch.randn(op.shape[1], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    u = (u / u.norm()).to(like.device, like.dtype)
    for step in range(1, iterations + 1):
        a = op.matvec(u)
        w = op.rmatvec(a)
        lam = a @ a
        if lam == 0:  # every gradient equals the mean (or u is orthogonal to all of them): nothing to rank
            residual = 0.0
            break
        residual = ((w - lam * u).norm() / lam).item()
        if residual <= rtol or step == iterations:
            break
        u = w / w.norm()
    sigma = math.sqrt(lam.item())
    return u, a, {"top_singular_value": sigma, "power_iterations": step, "residual": residual,
                  "converged": residual <= rtol}


def sever_scores(model, x, y, *, iterations=30, rtol=1e-3, batch_size=2000, seed=0):
    """Sever's outlier scores tau_i = ((grad l_i - g_mean) . v)^2 under `model` (see the module docstring).

    Returns:
        (scores, info): scores [n] in the parameters' dtype, info as top_singular_direction's.
    """
    _, a, info = top_singular_direction(CentredGradients(model, x, y, batch_size), iterations=iterations,
                                        rtol=rtol, seed=seed)
    return (a ** 2).detach(), info


def round_shares(n_remove, rounds):
    """How many points each round removes: n_remove split into `rounds` shares as equal as integers allow,
    the larger shares first."""
    return [n_remove // rounds + (1 if r < n_remove % rounds else 0) for r in range(rounds)]


class SeverFilter(PoisonFilter):
    """Removes floor(fraction * n) points over `rounds` rounds of Sever: each round scores the kept points
    by their centred gradients' projection on the top singular direction (see the module docstring),
    removes its share of the highest, and the next round scores under a defender retrained on the rest."""

    name = "sever"
    uses_model = True
    settings = (
        FRACTION,
        Setting("sever_rounds", int, 2, "positive-count",
                "sever: rounds of scoring and removal, the defender retrained between them; each removes an "
                "equal share of the fraction"),
        Setting("sever_iterations", int, 30, "positive-count",
                "sever: most power iterations for the top singular vector (each a jvp and a reverse pass)"),
        Setting("sever_rtol", float, 1e-3, "non-negative",
                "sever: stop the power iteration once its relative residual is at most this (0: run them all)"),
        Setting("sever_batch_size", int, 2000, "positive-count",
                "sever: most points per batch of the gradient passes"),
    )
    quick = {"sever_iterations": 5}

    def __init__(self, fraction=0.03, *, rounds=2, iterations=30, rtol=1e-3, batch_size=2000, seed=0):
        self.rounds, self.iterations, self.rtol, self.batch_size, self.seed = rounds, iterations, rtol, batch_size, seed
        super().__init__(fraction)

    def _check_params(self):
        super()._check_params()
        for name in ("rounds", "iterations", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.rtol, (int, float)) or isinstance(self.rtol, bool) or not self.rtol >= 0:
            raise ValueError(f"rtol is the power iteration's relative residual to stop at, a number >= 0; "
                             f"got {self.rtol!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")

    def check_size(self, n):
        super().check_size(n)
        if self.rounds > self.points_removed(n):
            raise DataTooSmallError(f"--sever-rounds {self.rounds}: --defense-fraction {self.fraction} of {n} training "
                                    f"points removes {self.points_removed(n)}, so some rounds would remove nothing; "
                                    f"use at most {self.points_removed(n)} rounds or a larger fraction")

    def detect_poison(self, x, y, *, model=None, fit=None, x_val=None, y_val=None):
        n = len(y)
        shares = round_shares(self.points_removed(n), self.rounds)
        if fit is None and sum(1 for s in shares if s) > 1:
            raise ValueError(f"Sever retrains the defender between rounds ({self.rounds} rounds): pass fit=")
        kept = torch.arange(n)
        rounds = []
        for r, share in enumerate(shares):
            if share == 0:
                continue
            x_kept, y_kept = x[kept.to(x.device)], y[kept.to(y.device)]
            defender = self._model(x, y, model, fit)[0] if r == 0 else fit(x_kept, y_kept)
            scores, info = sever_scores(defender, in_dtype_of(defender, x_kept), y_kept, iterations=self.iterations, rtol=self.rtol,
                                        batch_size=self.batch_size, seed=self.seed)
            scores = scores.double().cpu()
            scores = torch.where(torch.isfinite(scores), scores, torch.full_like(scores, float("inf")))
            order = torch.sort(scores, descending=True, stable=True).indices
            rounds.append({"round": r + 1, "points": len(kept), "removed": share,
                           "threshold": scores[order[share - 1]].item(), **info})
            keep = torch.ones(len(kept), dtype=torch.bool)
            keep[order[:share]] = False
            kept = kept[keep]
        is_clean = torch.zeros(n, dtype=torch.bool)
        is_clean[kept] = True
        return {"score": "squared projection of the centred per-example gradient on the top singular vector "
                         "of the centred gradient matrix",
                "removed": n - len(kept), "rounds": rounds}, is_clean
