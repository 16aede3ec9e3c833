"""hypergrad.total_grad against a closed form (ridge regression) and finite differences."""
import pytest
import torch

import hypergrad
from testing import BACKENDS

LAM = 0.3


def _ridge_problem(seed=0, n_tr=30, n_p=4, n_v=20, d=5):
    """Follower: ridge regression on D_tr U D_p, D_p = (theta, y_p); leader: squared loss on D_v."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    X, y, Xv, yv, yp = r(n_tr, d), r(n_tr), r(n_v, d), r(n_v), r(n_p)
    theta = r(n_p, d).requires_grad_()
    w = torch.zeros(d, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():  # the follower at its optimum w*(theta)
        Xa, ya = torch.cat([X, theta]), torch.cat([y, yp])
        w.copy_(torch.linalg.solve(Xa.T @ Xa + LAM * torch.eye(d, dtype=torch.float64), Xa.T @ ya))
    follower = lambda: 0.5 * ((X @ w - y) ** 2).sum() + 0.5 * ((theta @ w - yp) ** 2).sum() + 0.5 * LAM * (w ** 2).sum()  # noqa: E731
    leader = lambda: 0.5 * ((Xv @ w - yv) ** 2).sum()  # noqa: E731
    return X, y, Xv, yv, yp, theta, w, follower, leader


def _ridge_closed_form(X, y, Xv, yv, yp, theta, w):
    """D_theta_i l = -[(theta_i . u) w* + e_i u], u = (X^T X + lam I)^-1 grad_w l, e_i = theta_i.w* - y_i."""
    theta, w = theta.detach(), w.detach()
    Xa = torch.cat([X, theta])
    A = Xa.T @ Xa + LAM * torch.eye(X.shape[1], dtype=torch.float64)
    u = torch.linalg.solve(A, Xv.T @ (Xv @ w - yv))
    e = theta @ w - yp
    return -((theta @ u)[:, None] * w[None, :] + e[:, None] * u[None, :])


@pytest.mark.parametrize("use_ext", BACKENDS)
@pytest.mark.parametrize("method", ["cg", "cgnr", "minres"])
@pytest.mark.parametrize("hvp_mode", ["reverse", "forward"])
def test_ridge_matches_closed_form(method, hvp_mode, use_ext):
    X, y, Xv, yv, yp, theta, w, follower, leader = _ridge_problem()
    if hvp_mode == "forward":  # forward-over-reverse needs f as a function of w
        follower_fn = lambda w_: 0.5 * ((X @ w_ - y) ** 2).sum() + 0.5 * ((theta @ w_ - yp) ** 2).sum() + 0.5 * LAM * (w_ ** 2).sum()  # noqa: E731
    else:
        follower_fn = follower
    with hypergrad.use_extension(use_ext):
        (got,), info = hypergrad.total_grad(leader, follower_fn, [theta], [w], method=method, maxiter=200,
                                            rtol=1e-13, hvp_mode=hvp_mode, return_info=True)
    expected = _ridge_closed_form(X, y, Xv, yv, yp, theta, w)
    assert bool(info.converged)
    assert ((got - expected).norm() / expected.norm()).item() < 1e-9


def test_ridge_matches_autograd_through_the_exact_optimum():
    # An independent route: differentiate l(w*(theta)) with w*(theta) = solve(X^T X + lam I, X^T y).
    X, y, Xv, yv, yp, theta, w, follower, leader = _ridge_problem(seed=4)
    Xa, ya = torch.cat([X, theta]), torch.cat([y, yp])
    w_star = torch.linalg.solve(Xa.T @ Xa + LAM * torch.eye(X.shape[1], dtype=torch.float64), Xa.T @ ya)
    (expected,) = torch.autograd.grad(0.5 * ((Xv @ w_star - yv) ** 2).sum(), theta)
    (got,) = hypergrad.total_grad(leader, follower, theta, w, rtol=1e-13)
    assert ((got - expected).norm() / expected.norm()).item() < 1e-9


def _logistic_problem(seed=0):
    """Strongly convex follower: L2-regularised softmax regression on D_tr U D_p(theta)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(40, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (40,), generator=g)
    Xv = torch.randn(25, 4, generator=g, dtype=torch.float64)
    yv = torch.randint(0, 3, (25,), generator=g)
    yp = torch.tensor([0, 1, 2])
    theta = torch.randn(3, 4, generator=g, dtype=torch.float64).requires_grad_()
    W = torch.zeros(3, 4, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    ce = torch.nn.functional.cross_entropy

    def f_of(th, W_, b_):
        Xa, ya = torch.cat([X, th]), torch.cat([y, yp])
        return ce(Xa @ W_.T + b_, ya, reduction="sum") / 43 + 0.05 * ((W_ ** 2).sum() + (b_ ** 2).sum())

    def l_of(W_, b_):
        return ce(Xv @ W_.T + b_, yv)

    return theta, W, b, f_of, l_of


def _argmin(f_of, th, W, b):
    """The follower's optimum by Newton's method on the dense Hessian (to machine precision)."""
    flat = torch.zeros(W.numel() + b.numel(), dtype=torch.float64)
    split = lambda v: (v[:W.numel()].reshape(W.shape), v[W.numel():])  # noqa: E731
    obj = lambda v: f_of(th, *split(v))  # noqa: E731
    for _ in range(30):
        grad = torch.autograd.functional.jacobian(obj, flat)
        flat = flat - torch.linalg.solve(torch.autograd.functional.hessian(obj, flat), grad)
    return split(flat)


def test_logistic_matches_central_finite_differences():
    theta, W, b, f_of, l_of = _logistic_problem()
    with torch.no_grad():
        W_star, b_star = _argmin(f_of, theta.detach(), W, b)
        W.copy_(W_star)
        b.copy_(b_star)
    (got,), info = hypergrad.total_grad(lambda: l_of(W, b), lambda: f_of(theta, W, b), [theta], [W, b],
                                        method="cg", rtol=1e-14, maxiter=500, return_info=True)
    assert bool(info.converged)
    h = 1e-5
    fd = torch.zeros_like(theta)
    base = theta.detach()
    for idx in range(base.numel()):
        e = torch.zeros(base.numel(), dtype=torch.float64)
        e[idx] = h
        e = e.reshape(base.shape)
        up = l_of(*_argmin(f_of, base + e, W, b)).item()
        down = l_of(*_argmin(f_of, base - e, W, b)).item()
        fd.view(-1)[idx] = (up - down) / (2 * h)
    assert ((got - fd).norm() / fd.norm()).item() < 1e-6


def test_mixed_term_only_when_leader_loss_ignores_theta():
    # The leader loss of the paper (L(D_v, w)) does not depend on theta: D_theta l is then
    # -grad2_{theta w} f . v, and a leader loss that does depend on theta adds grad_theta l.
    X, y, Xv, yv, yp, theta, w, follower, leader = _ridge_problem(seed=2)
    (plain,) = hypergrad.total_grad(leader, follower, theta, w, rtol=1e-13)
    (shifted,) = hypergrad.total_grad(lambda: leader() + (theta ** 2).sum(), follower, theta, w, rtol=1e-13)
    torch.testing.assert_close(shifted - plain, 2 * theta.detach())


def test_warm_start_from_info():
    X, y, Xv, yv, yp, theta, w, follower, leader = _ridge_problem(seed=3)
    _, first = hypergrad.total_grad(leader, follower, theta, w, rtol=1e-10, return_info=True)
    _, second = hypergrad.total_grad(leader, follower, theta, w, rtol=1e-10, return_info=True, x0=first.x)
    assert first.iterations.item() > 0 and second.iterations.item() == 0


def test_bad_arguments():
    X, y, Xv, yv, yp, theta, w, follower, leader = _ridge_problem()
    with pytest.raises(ValueError, match="require grad"):
        hypergrad.total_grad(leader, follower, theta.detach(), w)
    with pytest.raises(ValueError, match="hvp_mode"):
        hypergrad.total_grad(leader, follower, theta, w, hvp_mode="sideways")
    with pytest.raises(ValueError, match="scalar"):
        hypergrad.total_grad(lambda: Xv @ w, follower, theta, w)


def test_a_non_finite_term_is_named_instead_of_returned():
    X, y, Xv, yv, yp, theta, w, follower, leader = _ridge_problem(seed=4)
    with pytest.raises(FloatingPointError, match="the leader loss l is not finite"):
        hypergrad.total_grad(lambda: leader() * float("nan"), follower, theta, w)
    broken = lambda: follower() + float("nan") * (w ** 2).sum()  # noqa: E731  (a NaN Hessian)
    with pytest.raises(FloatingPointError, match="the solve's"):  # cg stops at x = 0 with a NaN residual
        hypergrad.total_grad(leader, broken, theta, w, method="cg", maxiter=5)
    (unchecked,) = hypergrad.total_grad(lambda: leader() * float("nan"), follower, theta, w, check_finite=False)
    assert torch.isnan(unchecked).all()


def test_a_solver_with_solve_keywords_is_refused_even_at_their_defaults():
    """method="cg" beside a MINRES Solver was silently MINRES: an explicit keyword equal to its default went
    unnoticed."""
    X, y, Xv, yv, yp, theta, w, follower, leader = _ridge_problem(seed=6)
    minres = hypergrad.Solver(method="minres", rtol=1e-12)
    for keywords in ({"method": "cg"}, {"maxiter": 100}, {"damping": 0.0}):
        with pytest.raises(ValueError, match=f"not both \\(given: {next(iter(keywords))}\\)"):
            hypergrad.total_grad(leader, follower, theta, w, solver=minres, **keywords)
    with pytest.raises(ValueError, match="solver must be a hypergrad.Solver"):
        hypergrad.total_grad(leader, follower, theta, w, solver="minres")
    with pytest.raises(TypeError, match="leader_loss must be a callable"):
        hypergrad.total_grad(leader(), follower, theta, w)
    for x0 in ((torch.zeros_like(w),), torch.zeros(w.numel() + 1, dtype=w.dtype)):
        with pytest.raises(ValueError, match=f"x0 must be a flat tensor of the follower's {w.numel()} parameter"):
            hypergrad.total_grad(leader, follower, theta, w, solver=minres, x0=x0)
    (by_solver,) = hypergrad.total_grad(leader, follower, theta, w, solver=minres)
    (by_keywords,) = hypergrad.total_grad(leader, follower, theta, w, method="minres", rtol=1e-12)
    torch.testing.assert_close(by_solver, by_keywords)


def test_cg_warns_when_negative_curvature_cuts_its_solve_short():
    X, y, Xv, yv, yp, theta, w, follower, leader = _ridge_problem(seed=5)
    concave = lambda: -follower()  # noqa: E731  (w at a maximum: H_ww negative definite)
    with pytest.warns(RuntimeWarning, match="non-positive curvature"):
        (got,), info = hypergrad.total_grad(leader, concave, theta, w, method="cg", return_info=True)
    assert bool(info.negative_curvature) and not bool(info.converged)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # MINRES solves the indefinite system: no warning, the exact answer
        (exact,) = hypergrad.total_grad(leader, concave, theta, w, method="minres", rtol=1e-13)
    expected = _ridge_closed_form(X, y, Xv, yv, yp, theta, w)  # f -> -f flips H and the mixed term: D is the same
    assert ((exact - expected).norm() / expected.norm()).item() < 1e-9


def test_a_leader_loss_that_shares_a_graph_with_the_followers_inputs():
    """A penalty on the poisons in the leader's loss: its backward freed the graph the mixed term needs ("backward
    through the graph a second time"). The penalty's own gradient is the only difference it makes."""
    import torch.nn.functional as F
    from torch import nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    xv, yv = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    theta = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    w = list(model.parameters())
    results = {}
    for mode in ("auto", "reverse"):
        for penalty in (0.0, 0.1):
            poisons = torch.tanh(theta)  # the follower's inputs and the leader's penalty, one graph
            follower = hypergrad.ClassifierLoss(model, (x, poisons), (y, torch.tensor([0, 1])))
            (results[mode, penalty],) = hypergrad.total_grad(
                lambda: F.cross_entropy(model(xv), yv) + penalty * poisons.pow(2).sum(), follower, theta, w,
                hvp_mode=mode, method="minres", rtol=1e-13)
    torch.testing.assert_close(results["auto", 0.1], results["reverse", 0.1])
    t = torch.tanh(theta.detach())
    torch.testing.assert_close(results["auto", 0.1] - results["auto", 0.0], 0.1 * 2 * t * (1 - t ** 2))


def test_a_follower_loss_linear_in_one_follower_tensor_against_its_closed_form():
    """f = 0.5 ||u - a||^2 + 2 sum(c) has a constant gradient in c (its rows of H are zero): with damping 0.1,
    H = diag(1.1 on u, 0.1 on c), v_u = grad_u l / 1.1 and D_a l = -grad_a <g_u, v_u> = v_u, in every mode."""
    g = torch.Generator().manual_seed(0)
    u, c, a = (torch.randn(n, generator=g, dtype=torch.float64, requires_grad=True) for n in (3, 2, 3))
    expected = 2 * u.detach() / 1.1
    for mode, follower in (("reverse", lambda: 0.5 * ((u - a) ** 2).sum() + 2 * c.sum()),
                           ("forward", lambda uu, cc: 0.5 * ((uu - a) ** 2).sum() + 2 * cc.sum())):
        (d,) = hypergrad.total_grad(lambda: (u ** 2).sum() + c.sum(), follower, a, [u, c], damping=0.1, hvp_mode=mode)
        torch.testing.assert_close(d, expected)


def test_a_forward_mode_follower_loss_that_takes_no_parameters_is_named():
    a, u = (torch.randn(3, dtype=torch.float64, requires_grad=True) for _ in range(2))
    with pytest.raises(TypeError, match=r"calls follower_loss\(\*params\) with the 1 parameter"):
        hypergrad.total_grad(lambda: (u ** 2).sum(), lambda: ((u - a) ** 2).sum(), a, u, hvp_mode="forward")


def test_a_non_finite_warm_start_is_named():
    *_, theta, w, follower, leader = _ridge_problem()
    x0 = torch.full((w.numel(),), float("nan"), dtype=torch.float64)
    with pytest.raises(FloatingPointError, match="the warm start x0 is not finite"):
        hypergrad.total_grad(leader, follower, theta, w, x0=x0, maxiter=2)
