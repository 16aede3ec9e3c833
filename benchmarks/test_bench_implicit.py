"""pytest-benchmark: the implicit hypergradient of the L2 worked problem (l2_hyperparameters.py: per-parameter
L2 weights of the LR defender on mnist-sample, 7,850 weights, float64) by hypergrad.implicit_argmin and by
torchopt's implicit API (custom_root with solve_cg), the same CG budget; they must agree (issue 13).

    .venv/bin/python -m pytest benchmarks/test_bench_implicit.py --benchmark-only
"""
import pytest
import torch
import torch.nn.functional as F

import hypergrad
from l2_hyperparameters import fit, inner, validation
from tgda_attack import protocol

ITERATIONS = 300


@pytest.fixture(scope="module")
def problem():
    splits = protocol.load_splits(protocol.Config(dtype="float64").resolved())
    x, y = splits.x_train.flatten(1), splits.y_train
    eta = torch.full((10, x.shape[1] + 1), -4.0, dtype=torch.float64)
    return x, y, splits.x_val.flatten(1), splits.y_val, eta, fit(x, y, eta)


def hypergrad_hypergradient(problem):
    x, y, xv, yv, eta0, W = problem
    eta = eta0.clone().requires_grad_()
    (Ws,) = hypergrad.implicit_argmin(lambda w, t: inner(w, t, x, y), W, eta,
                                      solver=hypergrad.Solver(method="cg", maxiter=ITERATIONS, rtol=1e-10))
    return torch.autograd.grad(validation(Ws, xv, yv), eta)[0]


def torchopt_hypergradient(problem):
    torchopt = pytest.importorskip("torchopt")
    x, y, xv, yv, eta0, W = problem
    onehot = F.one_hot(y, 10).to(x.dtype)

    def optimality(Wc, eta):  # grad_W of the inner loss, in closed form (torchopt differentiates it)
        p = (x @ Wc[:, :-1].T + Wc[:, -1]).softmax(1) - onehot
        return torch.cat([p.T @ x, p.sum(0)[:, None]], 1) / len(y) + eta.exp() * Wc

    @torchopt.diff.implicit.custom_root(optimality, argnums=1,
                                        solve=torchopt.linear_solve.solve_cg(maxiter=ITERATIONS, rtol=1e-10))
    def solve(W0, eta):
        return W

    eta = eta0.clone().requires_grad_()
    return torch.autograd.grad(validation(solve(W.clone(), eta), xv, yv), eta)[0]


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("library", ["hypergrad", "torchopt"])
def test_implicit_hypergradient(benchmark, problem, library):
    fn = {"hypergrad": hypergrad_hypergradient, "torchopt": torchopt_hypergradient}[library]
    result = benchmark.pedantic(fn, args=(problem,), rounds=5, iterations=1)
    if library == "torchopt":
        reference = hypergrad_hypergradient(problem)
        difference = ((result - reference).norm() / reference.norm()).item()
        benchmark.extra_info["relative difference to hypergrad"] = difference
        assert difference < 1e-8
