"""torch.compile: hypergrad.solve (a fixed number of iterations, no host synchronisation: check_every >=
maxiter) compiles as one graph and gives the eager result, on a dense operator and on the structured
Hessian-vector product of a small network."""
import pytest
import torch

import hypergrad


def _structured_system():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    x, y = torch.randn(20, 6, dtype=torch.float64), torch.randint(0, 3, (20,))
    w = list(model.parameters())
    op = hypergrad.structured_hessian(hypergrad.ClassifierLoss(model, x, y), w)
    return op, torch.randn(op.n, dtype=torch.float64)


@pytest.mark.parametrize("method", ["cg", "minres", "cgnr"])
def test_a_fixed_length_solve_compiles_as_one_graph_and_matches_eager(method):
    g = torch.Generator().manual_seed(1)
    m = torch.randn(8, 8, generator=g, dtype=torch.float64)
    A, b = m @ m.T + torch.eye(8, dtype=torch.float64), torch.randn(8, generator=g, dtype=torch.float64)
    solver = hypergrad.Solver(method=method, maxiter=6, rtol=0.0, options={"check_every": 6})

    def fn(rhs):
        return solver(lambda v: v @ A, rhs)[0]

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(b), fn(b), rtol=1e-12, atol=1e-14)


def test_the_structured_product_solve_compiles_and_matches_eager():
    op, b = _structured_system()
    solver = hypergrad.Solver(method="minres", maxiter=5, rtol=0.0, options={"check_every": 5})

    def fn(rhs):
        return solver(op, rhs)[0]

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(b), fn(b), rtol=1e-10, atol=1e-12)
