"""The total derivative of a leader's loss through its follower's optimum.

For a leader with parameters theta and a follower with parameters w that minimises f(theta, w),
the leader's loss l(theta, w) has the total derivative (Lu, Kamath & Yu, TMLR 2022, eq. 15-17;
Fiez et al. 2020; Algorithm 1 line 4 of TGDA):

    D_theta l = grad_theta l - grad2_{theta w} f . (grad2_{ww} f + damping I)^-1 . grad_w l

Flow of one call (shared/DESIGN.md, "one TGDA leader step"):
  1. f is evaluated once and g_w = grad_w f is built with create_graph=True (its graph reaches
     both w and theta); with the structured product, which needs no graph, only over the rows of
     f that carry a graph (ClassifierLoss.graph_part: the poisons, not the clean points);
  2. b = grad_w l (and grad_theta l) from one backward pass of l;
  3. v solves (H_ww + damping I) v = b by hypergrad.solve (or its CUDA-graph replay,
     hypergrad.graphs), each matvec one structured R-operator
     product (hypergrad/mlp_hvp.py, for a ClassifierLoss of a linear-activation chain), one
     backward pass through g_w (reverse mode) or a forward-over-reverse product (forward mode);
  4. the mixed term grad_theta <g_w, v> is one more backward pass through g_w;
  5. D_theta l = grad_theta l - mixed.
"""
import torch

from .hvp import HessianOperator, as_tuple, check_takes_params, flatten, unflatten
from .mlp_hvp import ClassifierLoss, structured_hessian
from .solvers import Solver, warn_negative_curvature

HVP_MODES = ("auto", "structured", "reverse", "forward")
_KEYWORD_DEFAULTS = {"method": "cg", "maxiter": 100, "rtol": 1e-6, "atol": 0.0, "damping": 0.0, "check_every": 4}
_STRUCTURED = ("follower_loss to be a hypergrad.ClassifierLoss of a chain of linear layers and one activation "
               "(hypergrad.mlp_hvp) with follower_params its parameters in order")


def total_grad(leader_loss, follower_loss, leader_params, follower_params, *, method=None, maxiter=None,
               rtol=None, atol=None, damping=None, hvp_mode="auto", x0=None, return_info=False,
               check_every=None, graphs=None, check_finite=True, sharded=None, solver=None):
    """D_theta l: the derivative of the leader loss through the follower's optimum.

    Args:
        leader_loss: zero-argument callable returning the scalar l at the current theta and w.
        follower_loss: zero-argument callable returning the scalar f at the current theta and w,
            e.g. a hypergrad.ClassifierLoss(model, inputs, targets). With hvp_mode="forward" it is called as follower_loss(*w) with the follower parameters,
            and must compute f from those arguments (forward-over-reverse needs f as a function).
        leader_params: theta, a tensor or a sequence of tensors that require grad.
        follower_params: w, a tensor or a sequence of tensors that require grad.
        method: solver of (H_ww + damping I) v = grad_w l: "cg", "cgnr", "minres" or "neumann".
            (default: "cg")
        maxiter: most solver iterations. (default: 100)
        rtol: relative tolerance of the solve. (default: 1e-6)
        atol: absolute tolerance of the solve. (default: 0.0)
        damping: added to the Hessian's diagonal. (default: 0.0)
        hvp_mode: "auto" (structured when follower_loss is a ClassifierLoss of a supported model
            and w its parameters, else reverse), "structured" (an error if unsupported), "reverse"
            (reverse-over-reverse, reusing the gradient graph) or "forward" (forward-over-reverse
            through torch.func). (default: "auto")
        x0: warm start for v, e.g. info.x of the previous call. (default: zeros)
        return_info: also return the solver's SolveInfo. A solve that stops at maxiter above its
            tolerance is not warned about (a truncated solve, as TGDA's 16 iterations, is a choice):
            read info.converged and info.residual_norm. Nor is a w away from the follower's optimum
            (TGDA evaluates D_theta l at its current w). (default: False)
        check_every: solver iterations between host synchronisations. (default: 4)
        graphs: a hypergrad.SolveGraphCache: the solve runs exactly maxiter iterations, recorded as a
            CUDA graph on the first call of each layout and replayed on later calls (eager on a
            CPU). Needs the structured product (hvp_mode "auto" or "structured" on a supported
            ClassifierLoss). (default: None, hypergrad.solve with early stopping)
        solver: a hypergrad.Solver holding every setting of the solve (method, maxiter, rtol, atol,
            damping, a preconditioner, options), instead of the keywords method ... check_every.
            (default: None, the keywords)
        sharded: a hypergrad.distributed.ShardedMean when each rank of a torch.distributed group holds a
            shard of the data (the losses being means over the rank's shard): grad_w l, every Hessian-vector
            product and the mixed term are summed over the ranks with the shard's weights, so every rank
            returns the global D_theta l. Not with graphs. (default: None)
        check_finite: raise FloatingPointError, naming the first non-finite term (leader loss, the
            right-hand side grad_w l, the solve, the result), instead of returning NaN or inf; costs
            one host synchronisation a call (a loop that checks its own losses can turn it off); with
            method "cg", also warns (RuntimeWarning) when CG met non-positive curvature, which cuts its
            solve short. (default: True)

    Returns:
        A tuple of tensors shaped like leader_params holding D_theta l (no sign flipped: an
        attacker ascends along it), and the SolveInfo when return_info is True.
    """
    given = {k: v for k, v in (("method", method), ("maxiter", maxiter), ("rtol", rtol), ("atol", atol),
                                ("damping", damping), ("check_every", check_every)) if v is not None}
    if solver is None:
        settings = {**_KEYWORD_DEFAULTS, **given}
        solver = Solver(**{k: v for k, v in settings.items() if k != "check_every"},
                        options={"check_every": settings["check_every"]})
    elif not isinstance(solver, Solver):
        raise ValueError(f"solver must be a hypergrad.Solver (e.g. hypergrad.Solver(method='minres')), got {solver!r}")
    elif given:  # even at their defaults: method="cg" beside a MINRES Solver was silently MINRES
        raise ValueError(f"pass the solve's settings either as solver=hypergrad.Solver(...) or as the keywords method, "
                         f"maxiter, rtol, atol, damping, check_every, not both (given: {', '.join(given)})")
    for name, loss in (("leader_loss", leader_loss), ("follower_loss", follower_loss)):
        if not callable(loss):  # a loss computed once cannot be evaluated again at the follower's parameters
            raise TypeError(f"{name} must be a callable returning the scalar loss (e.g. lambda: loss_fn(model(x), y)), "
                            f"got {type(loss).__name__}")
    theta = as_tuple(leader_params, "leader_params")
    w = as_tuple(follower_params, "follower_params")
    if hvp_mode not in HVP_MODES:
        raise ValueError(f"hvp_mode must be one of {HVP_MODES}, got {hvp_mode!r}")
    if hvp_mode == "forward" and isinstance(follower_loss, ClassifierLoss):
        raise ValueError("hvp_mode='forward' calls follower_loss(*w) with the follower's parameters; a ClassifierLoss "
                         "takes none (it reads its model's): use hvp_mode 'auto' (its structured product) or 'reverse'")
    if hvp_mode == "forward":
        check_takes_params(follower_loss, len(w), "follower_loss")
    for name, group in (("leader_params", theta), ("follower_params", w)):
        if not all(p.requires_grad for p in group):
            raise ValueError(f"every tensor of {name} must require grad")
    hessian = structured_hessian(follower_loss, w) if hvp_mode in ("auto", "structured") else None
    if hessian is None and hvp_mode == "structured":
        raise ValueError(f"hvp_mode='structured' needs {_STRUCTURED}; use hvp_mode='auto' to fall back to autograd")
    if graphs is not None and sharded is not None:
        raise ValueError("graphs (a recorded solve) cannot all-reduce across ranks: use sharded without graphs")
    if graphs is not None and hessian is None:
        raise ValueError(f"graphs (a recorded solve) needs the structured product: {_STRUCTURED}, and hvp_mode "
                         "'auto' or 'structured'")
    if hessian is not None:  # the structured products need no gradient graph; the mixed term needs one only
        f = follower_loss.graph_part()  # through the rows that can depend on theta
    else:
        f = follower_loss(*w) if hvp_mode == "forward" else follower_loss()
        _check_scalar("follower_loss", f)
    g_w = None if f is None else torch.autograd.grad(f, w, create_graph=True, allow_unused=True)
    if g_w is not None and any(g is None for g in g_w):
        raise ValueError("follower_loss does not depend on every follower parameter")
    l = leader_loss()
    _check_scalar("leader_loss", l)
    # the leader loss may share a graph with the follower's inputs (a penalty on the poisons): kept for the mixed term
    dl = torch.autograd.grad(l, theta + w, allow_unused=True, retain_graph=g_w is not None)
    dl = tuple(torch.zeros_like(p) if g is None else g for g, p in zip(dl, theta + w))
    dl_theta, dl_w = dl[:len(theta)], dl[len(theta):]

    if hvp_mode == "forward":
        hessian = HessianOperator.forward(follower_loss, w)
    elif hessian is None:  # g_w is ours, built with create_graph: a tensor of it without a graph is constant (f is
        hessian = HessianOperator.from_gradient(g_w, w, constant_ok=True)  # linear in that w: its rows of H are zero)
    b = flatten(dl_w)
    if sharded is not None:  # the global right-hand side, and a matvec of the global Hessian
        dl_theta, b = tuple(sharded.leader(d) for d in dl_theta), sharded.leader(b)
        local_hessian = hessian
        hessian = lambda v: sharded.follower(local_hessian(v))  # noqa: E731
    if x0 is not None:
        if not isinstance(x0, torch.Tensor) or x0.numel() != b.numel():
            raise ValueError(f"x0 must be a flat tensor of the follower's {b.numel()} parameter entries (info.x of an "
                             f"earlier call), got {list(x0.shape) if isinstance(x0, torch.Tensor) else type(x0).__name__}")
        x0 = x0.detach().reshape(b.shape).to(b.dtype)
    if graphs is not None:
        v, info = graphs.solve(hessian, b, solver=solver, x0=x0)
    else:
        v, info = solver(hessian, b, x0=x0)
    live = [] if g_w is None else [i for i, g in enumerate(g_w) if g.requires_grad]  # a constant g: no theta in it
    if not live:  # no row of the follower loss carries a graph: it does not depend on theta
        mixed = (None,) * len(theta)
    else:
        vs = unflatten(v, w)
        mixed = torch.autograd.grad([g_w[i] for i in live], theta, [vs[i] for i in live], allow_unused=True)
    if sharded is not None:  # a rank without poison rows still joins the sum, with zeros
        mixed = tuple(sharded.follower(torch.zeros_like(p) if m is None else m) for m, p in zip(mixed, theta))
    out = tuple(d if m is None else d - m for d, m in zip(dl_theta, mixed))
    if check_finite:
        _check_finite(None if sharded is not None else l, b, x0, v, info.residual_norm, out)  # l: this rank's alone
        warn_negative_curvature(info, "total_grad", "H_ww + damping I", "w is not at a minimum of the follower loss")
    return (out, info) if return_info else out


def _check_finite(l, b, x0, v, residual, out):
    """One host synchronisation when all is finite; on failure names the first non-finite term. (A Hessian
    product that is NaN can leave the solution at zero with a NaN residual: the residual is checked too.)"""
    zero = b.new_zeros(())
    terms = (("the leader loss l", zero if l is None else l.detach()), ("grad_w l (the solve's right-hand side)", b),
             ("the warm start x0", zero if x0 is None else x0), ("the solve's solution (H_ww + damping I)^-1 grad_w l", v),
             ("the solve's residual", residual), ("D_theta l", flatten(out)))
    sums = torch.stack([t.detach().sum().to(torch.float64) for _, t in terms])
    if bool(torch.isfinite(sums).all()):
        return
    first = next(name for name, t in terms if not bool(torch.isfinite(t).all()))
    advice = ("the losses overflowed or took a NaN input: check the data and parameters for NaN/inf" if "loss" in first
              or "right-hand" in first else "pass a finite x0 (info.x of an earlier call that was finite) or none"
              if "x0" in first else "the follower loss's Hessian products are not finite, or the Hessian is "
              "singular or indefinite for this solver: check the follower loss, add damping, or use method='minres' or 'cgnr'")
    raise FloatingPointError(f"total_grad: {first} is not finite; {advice}")


def _check_scalar(name, value):
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        raise ValueError(f"{name} must return a scalar tensor (one element)")
    if not value.requires_grad:
        raise ValueError(f"{name} returned a tensor without a graph: compute it from the parameters")
