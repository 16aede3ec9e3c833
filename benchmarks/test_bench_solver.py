"""pytest-benchmark suites of the solver's vector work and overhead (issue 4, parts a and e).

    .venv/bin/python -m pytest benchmarks/test_bench_solver.py --benchmark-only --benchmark-group-by=param:n

(a) one CG update (x += alpha p, r -= alpha q, new r.r) as the fused op, as plain torch operations
    (the reference twin) and as the paper's per-tensor-list code with a host sync, next to a torch
    copy of the same bytes (the machine's copy bandwidth, measured in the same run). Each test
    records its GB/s in extra_info.
(e) k CG iterations against k Hessian-vector products alone, on the LR defender's leader step.
"""
import pytest
import torch

import hypergrad
from hypergrad import _reference

SIZES = [10_000, 1_000_000, 10_000_000]
BATCHES = [1, 8]


def _vectors(n, batch, dtype=torch.float32):
    shape = (n,) if batch == 1 else (batch, n)
    g = torch.Generator().manual_seed(0)
    x, r, p, q = (torch.randn(shape, generator=g, dtype=dtype) for _ in range(4))
    rows = shape[:-1]
    ones = torch.ones(rows, dtype=torch.float64)
    return x, r, p, q, ones, 2 * ones, torch.ones(rows, dtype=torch.bool)


def _gbps(benchmark, nbytes):
    benchmark.extra_info["GB/s"] = nbytes / benchmark.stats.stats.median / 1e9


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("n", SIZES)
def test_copy_bandwidth(benchmark, n, batch):
    src = torch.randn(batch * n)
    dst = torch.empty_like(src)
    benchmark(dst.copy_, src)
    _gbps(benchmark, 2 * src.numel() * src.element_size())


@pytest.mark.parametrize("impl", ["fused", "torch", "paper_lists"])
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("n", SIZES)
def test_cg_update(benchmark, n, batch, impl):
    x, r, p, q, num, den, active = _vectors(n, batch)
    if impl == "fused":
        if not hypergrad.has_extension():
            pytest.skip("hypergrad._C is not built")
        benchmark(torch.ops.hypergrad.cg_step, x, r, p, q, num, den, active)
    elif impl == "torch":
        benchmark(_reference.cg_step, x, r, p, q, num, den, active)
    else:  # the paper's style: lists of tensors, new tensors each step, a Python float per dot
        xs, rs, ps, qs = ([t] for t in (x.view(-1), r.view(-1), p.view(-1), q.view(-1)))

        def step():
            alpha = 0.5
            new_x = [xi + alpha * pi for xi, pi in zip(xs, ps)]
            new_r = [ri - alpha * qi for ri, qi in zip(rs, qs)]
            return new_x, sum((ri * ri).sum() for ri in new_r).item()

        benchmark(step)
    _gbps(benchmark, 6 * x.numel() * x.element_size())  # reads x, r, p, q; writes x, r


def _lr_operator(batch=1000):
    from problems import leader_step_problem  # benchmarks/ is on sys.path (conftest.py)

    step = leader_step_problem("lr", batch=batch, dtype=torch.float64)
    grads = torch.autograd.grad(step.follower_loss(), step.w, create_graph=True)
    return hypergrad.HessianOperator.from_gradient(grads, step.w)


@pytest.mark.parametrize("what", ["16 matvecs", "cg 16 iterations"])
def test_solver_overhead(benchmark, what):
    op = _lr_operator()
    b = torch.randn(op.n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    damping = 1e-2  # the LR Hessian is singular; damping keeps CG from stopping before 16 iterations
    if what == "16 matvecs":
        benchmark(lambda: [op(b) + damping * b for _ in range(16)])
    else:
        _, info = hypergrad.solve(op, b, method="cg", maxiter=16, rtol=0.0, damping=damping)
        assert int(info.iterations) == 16, "CG stopped early: the comparison would not be at equal iterations"
        benchmark(lambda: hypergrad.solve(op, b, method="cg", maxiter=16, rtol=0.0, damping=damping))
