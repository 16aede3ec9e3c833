"""hypergrad.Solver (every setting of a solve as one value) and diagonal preconditioning: Hutchinson's
estimate against the true diagonal, preconditioned solves against a dense solve, fewer iterations on a
badly scaled system, the same total gradient and attack whether settings come as keywords or a Solver."""
import pytest
import torch

import hypergrad
from hypergrad.preconditioners import hutchinson_diagonal, jacobi
from test_attacks import _attack, _tiny
from test_total_grad import _ridge_problem


def _badly_scaled(n=120, seed=0):
    """An SPD matrix whose rows and columns are scaled over four orders of magnitude (what Jacobi fixes)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    core = (q * torch.logspace(0, 1, n, dtype=torch.float64)) @ q.T
    scale = torch.logspace(-2, 2, n, dtype=torch.float64)[torch.randperm(n, generator=g)]
    return scale[:, None] * core * scale[None, :], torch.randn(n, generator=g, dtype=torch.float64)


def test_hutchinson_is_exact_on_a_diagonal_and_close_on_a_dense_matrix():
    d = torch.arange(1.0, 11.0, dtype=torch.float64)
    assert torch.equal(hutchinson_diagonal(lambda v: v * d, 10, samples=1), d)  # z * (d z) = d for z = +-1
    A, _ = _badly_scaled(n=40)
    estimate = hutchinson_diagonal(lambda v: v @ A, 40, samples=4000)
    assert ((estimate - A.diagonal()).norm() / A.diagonal().norm()).item() < 0.1
    M = jacobi(lambda v: v @ -A, 40, samples=64, damping=0.5)  # indefinite or not, the diagonal is positive
    assert bool((M >= 0.5).all())


@pytest.mark.parametrize("method", ["cg", "cgnr", "minres"])
def test_a_preconditioned_solve_is_the_dense_solve_in_fewer_iterations(method):
    A, b = _badly_scaled()
    exact = torch.linalg.solve(A + 0.1 * torch.eye(len(b), dtype=torch.float64), b)
    plain = hypergrad.Solver(method=method, maxiter=3000, rtol=1e-9, damping=0.1)
    pre = hypergrad.Solver(method=method, maxiter=3000, rtol=1e-9, damping=0.1, preconditioner="jacobi",
                           options={"jacobi_samples": 64})
    (x_plain, info_plain), (x_pre, info_pre) = plain(lambda v: v @ A, b), pre(lambda v: v @ A, b)
    torch.testing.assert_close(x_pre, exact, rtol=1e-5, atol=1e-7)
    assert info_pre.iterations.item() < info_plain.iterations.item() / 2
    true_residual = (b - (x_pre @ A + 0.1 * x_pre)).norm()
    assert info_pre.residual_norm.item() == pytest.approx(true_residual.item(), rel=1e-6)


def test_a_solver_value_gives_the_total_gradient_of_the_keywords():
    X, y, Xv, yv, yp, theta, w, follower, leader = _ridge_problem(seed=1)
    (keywords,) = hypergrad.total_grad(leader, follower, theta, w, method="minres", maxiter=50, rtol=1e-12)
    solver = hypergrad.Solver(method="minres", maxiter=50, rtol=1e-12)
    (value,) = hypergrad.total_grad(leader, follower, theta, w, solver=solver)
    torch.testing.assert_close(value, keywords)
    pre = hypergrad.Solver(method="cg", maxiter=50, rtol=1e-12, preconditioner="jacobi")
    (preconditioned,) = hypergrad.total_grad(leader, follower, theta, w, solver=pre)
    torch.testing.assert_close(preconditioned, keywords, rtol=1e-7, atol=1e-9)
    with pytest.raises(ValueError, match="not both"):
        hypergrad.total_grad(leader, follower, theta, w, solver=solver, maxiter=10)


def test_the_attack_takes_a_solver_value():
    x, y, xv, yv, defender, attacker = _tiny(seed=4)
    keywords = _attack(defender, attacker, solver="cg", solver_iterations=30).poison(x, y, x_val=xv, y_val=yv)
    attack = _attack(defender, attacker, solver=hypergrad.Solver(method="cg", maxiter=30, rtol=1e-6),
                     solver_iterations=16)
    torch.testing.assert_close(attack.poison(x, y, x_val=xv, y_val=yv)[0], keywords[0])
    with pytest.raises(ValueError, match="maxiter"):
        _attack(defender, attacker, solver=hypergrad.Solver(), solver_iterations=16)


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "lu"}, "method"), ({"rtol": -1.0}, "rtol must be a finite number >= 0"), ({"preconditioner": "ilu"}, "preconditioner"),
    ({"options": {"restart": 5}}, "unknown solver option"),
])
def test_bad_solver_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        hypergrad.Solver(**kwargs)


def test_a_preconditioner_must_be_a_positive_diagonal_of_the_right_size():
    A, b = _badly_scaled(n=10)
    with pytest.raises(ValueError, match="positive"):
        hypergrad.solve(lambda v: v @ A, b, preconditioner=-torch.ones(10, dtype=torch.float64))
    with pytest.raises(ValueError, match="shape"):
        hypergrad.solve(lambda v: v @ A, b, preconditioner=torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="no preconditioner"):
        hypergrad.SolveGraphCache().solve(None, b, solver=hypergrad.Solver(maxiter=4, preconditioner="jacobi"))


def test_hutchinson_refuses_a_matvec_of_columns_where_the_shapes_cannot_tell():
    """lambda v: A @ v multiplies the columns of a batch: with as many samples as unknowns its result has the right
    shape and would be a silently wrong diagonal; with other counts the shapes differ. Both are refused by name."""
    A = torch.randn(8, 8, dtype=torch.float64)
    A = A + A.T
    with pytest.raises(ValueError, match="does not take row vectors"):
        hutchinson_diagonal(lambda v: A @ v, 8, samples=8)
    with pytest.raises(ValueError, match="does not take row vectors"):
        jacobi(lambda v: A @ v.T, 8, samples=8)  # a [n, k] result: the shape is right only when k == n
    with pytest.raises(ValueError, match=r"failed on a batch of row vectors \[5, 8\] .*lambda v: v @ A"):
        hutchinson_diagonal(lambda v: A @ v, 8, samples=5)
    with pytest.raises(ValueError, match=r"returned \[8\]"):
        hutchinson_diagonal(lambda v: v.sum(0), 8, samples=3)
    # row-wise, at samples == n too: the estimate of the checked path equals the unchecked one's
    assert torch.allclose(hutchinson_diagonal(lambda v: v @ A, 8, samples=8),
                          (lambda z: (z * (z @ A)).mean(0))((torch.randint(0, 2, (8, 8), generator=torch.Generator()
                                                                           .manual_seed(0)) * 2 - 1).double()))
