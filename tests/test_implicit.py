"""hypergrad.implicit_argmin: the derivative of an outer loss through an inner solution against the closed
form of ridge regression and finite differences, and the worked problem of the README: per-parameter L2
regularisation of a logistic-regression defender learned by hypergradient descent on the validation loss."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import hypergrad


def _ridge(seed=0, n=30, d=4):
    g = torch.Generator().manual_seed(seed)
    X, y = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
    Xv, yv = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
    return X, y, Xv, yv


def _ridge_solution(X, y, log_lam):
    return torch.linalg.solve(X.T @ X + torch.diag(log_lam.exp()), X.T @ y)


def test_the_gradient_through_a_ridge_solution_is_the_closed_forms():
    X, y, Xv, yv = _ridge()
    log_lam = torch.tensor([0.1, -0.5, 1.0, 0.3], dtype=torch.float64, requires_grad=True)

    def inner(w, theta):
        return 0.5 * ((X @ w[0] - y) ** 2).sum() + 0.5 * (theta[0].exp() * w[0] ** 2).sum()

    w_star = _ridge_solution(X, y, log_lam.detach())
    (w,) = hypergrad.implicit_argmin(inner, w_star, log_lam)
    torch.testing.assert_close(w, w_star)
    outer = 0.5 * ((Xv @ w - yv) ** 2).sum()
    (implicit,) = torch.autograd.grad(outer, log_lam)
    exact_log_lam = log_lam.detach().requires_grad_()
    (exact,) = torch.autograd.grad(0.5 * ((Xv @ _ridge_solution(X, y, exact_log_lam) - yv) ** 2).sum(), exact_log_lam)
    torch.testing.assert_close(implicit, exact, rtol=1e-7, atol=1e-10)


def _lr_problem(n=200, d=12, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, d, generator=g, dtype=torch.float64) * 1.5
    y, yv = torch.randint(0, classes, (n,), generator=g), torch.randint(0, classes, (n,), generator=g)
    x = centres[y] + torch.randn(n, d, generator=g, dtype=torch.float64)
    xv = centres[yv] + torch.randn(n, d, generator=g, dtype=torch.float64)
    return x, y, xv, yv


def _fit(x, y, log_lam, steps=200):
    """The L2-regularised logistic regression's optimum, by L-BFGS (no graph to log_lam)."""
    W = torch.zeros(log_lam.shape, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W], lr=1, max_iter=steps, tolerance_grad=1e-13, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ W[:, :-1].T + W[:, -1], y) + 0.5 * (log_lam.exp() * W ** 2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    return W.detach()


def _inner(x, y):
    def loss(w, theta):
        W = w[0]
        return F.cross_entropy(x @ W[:, :-1].T + W[:, -1], y) + 0.5 * (theta[0].exp() * W ** 2).sum()
    return loss


def _validation(W, xv, yv):
    return F.cross_entropy(xv @ W[:, :-1].T + W[:, -1], yv)


def test_per_parameter_l2_hypergradient_matches_finite_differences():
    x, y, xv, yv = _lr_problem()
    log_lam = torch.full((3, 13), -3.0, dtype=torch.float64, requires_grad=True)
    (W,) = hypergrad.implicit_argmin(_inner(x, y), _fit(x, y, log_lam.detach()), log_lam,
                                     solver=hypergrad.Solver(method="cg", maxiter=200, rtol=1e-12))
    (hypergradient,) = torch.autograd.grad(_validation(W, xv, yv), log_lam)
    h = 1e-4
    for index in [(0, 0), (1, 5), (2, 12)]:
        plus, minus = log_lam.detach().clone(), log_lam.detach().clone()
        plus[index] += h
        minus[index] -= h
        fd = (_validation(_fit(x, y, plus), xv, yv) - _validation(_fit(x, y, minus), xv, yv)) / (2 * h)
        assert hypergradient[index].item() == pytest.approx(fd.item(), rel=1e-4, abs=1e-9)


def test_hypergradient_descent_on_the_l2_weights_lowers_the_validation_loss():
    x, y, xv, yv = _lr_problem(n=60, d=30, seed=1)  # few points, many features: regularisation matters
    log_lam = torch.full((3, 31), -6.0, dtype=torch.float64, requires_grad=True)
    losses = []
    for _ in range(15):
        (W,) = hypergrad.implicit_argmin(_inner(x, y), _fit(x, y, log_lam.detach()), log_lam)
        loss = _validation(W, xv, yv)
        (grad,) = torch.autograd.grad(loss, log_lam)
        losses.append(loss.item())
        with torch.no_grad():
            log_lam -= 2.0 * grad / grad.abs().max().clamp(min=1e-12)
    assert losses[-1] < 0.9 * losses[0]


def test_bad_arguments_are_named():
    X, y, Xv, yv = _ridge()
    with pytest.raises(ValueError, match="require grad"):
        hypergrad.implicit_argmin(lambda w, t: w[0].sum(), torch.zeros(4), torch.zeros(4))
    with pytest.raises(ValueError, match="Solver"):
        hypergrad.implicit_argmin(lambda w, t: w[0].sum(), torch.zeros(4), torch.zeros(4, requires_grad=True),
                                  solver="cg")


def test_cg_warns_when_the_inner_hessian_is_not_positive_definite():
    """At a maximum of the inner loss CG stops at its first direction and the hypergradient came back exactly 0,
    with no word (total_grad warned); MINRES solves the indefinite system: the closed form."""
    X, y, Xv, yv = _ridge()
    log_lam = torch.tensor([0.1, -0.5, 1.0, 0.3], dtype=torch.float64, requires_grad=True)

    def concave(w, theta):  # the ridge loss negated: the same stationary point, now a maximum
        return -(0.5 * ((X @ w[0] - y) ** 2).sum() + 0.5 * (theta[0].exp() * w[0] ** 2).sum())

    w_star = _ridge_solution(X, y, log_lam.detach())
    (w,) = hypergrad.implicit_argmin(concave, w_star, log_lam)
    with pytest.warns(RuntimeWarning, match="implicit_argmin: CG met non-positive curvature"):
        (cut,) = torch.autograd.grad(0.5 * ((Xv @ w - yv) ** 2).sum(), log_lam)
    assert not cut.any()
    (w,) = hypergrad.implicit_argmin(concave, w_star, log_lam, solver=hypergrad.Solver(method="minres", rtol=1e-12))
    (got,) = torch.autograd.grad(0.5 * ((Xv @ w - yv) ** 2).sum(), log_lam)
    exact_log_lam = log_lam.detach().requires_grad_()
    (exact,) = torch.autograd.grad(0.5 * ((Xv @ _ridge_solution(X, y, exact_log_lam) - yv) ** 2).sum(), exact_log_lam)
    torch.testing.assert_close(got, exact, rtol=1e-7, atol=1e-10)


def test_a_solve_stopped_short_of_its_tolerance_is_warned_about_and_only_then():
    X, y, Xv, yv = _ridge()
    lam = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    w_star = torch.linalg.solve(X.T @ X + 0.5 * torch.eye(4, dtype=torch.float64), X.T @ y)
    inner = lambda w, th: 0.5 * ((X @ w[0] - y) ** 2).sum() + 0.5 * th[0] * (w[0] ** 2).sum()  # noqa: E731
    (w,) = hypergrad.implicit_argmin(inner, w_star, lam, solver=hypergrad.Solver(maxiter=1))
    with pytest.warns(RuntimeWarning, match="stopped after 1 iterations with relative residual"):
        (0.5 * ((Xv @ w - yv) ** 2).sum()).backward()
    (w,) = hypergrad.implicit_argmin(inner, w_star, lam)  # the default solver: to rounding, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (0.5 * ((Xv @ w - yv) ** 2).sum()).backward()
