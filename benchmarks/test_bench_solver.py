"""pytest-benchmark suites of the solver's vector work and overhead (issue 4, parts a and e).

    .venv/bin/python -m pytest benchmarks/test_bench_solver.py --benchmark-only --benchmark-group-by=param:n

(a) one CG update (x += alpha p, r -= alpha q, new r.r) as the fused op, as plain torch operations
    (the reference twin) and as the paper's per-tensor-list code with a host sync, next to a torch
    copy of the same bytes (impl "copy": the machine's copy bandwidth, measured in the same run).
    Each test records its GB/s in extra_info (contenders.cg_update_contenders builds them).
(e) 16 CG iterations against 16 Hessian-vector products alone, on the LR and NN defenders' leader
    step (float32, the paper's batch).
"""
import pytest
import torch

import contenders
import hypergrad
from problems import leader_step_problem

SIZES = [10_000, 1_000_000, 10_000_000]
BATCHES = [1, 8]


def _gbps(benchmark, nbytes):
    benchmark.extra_info["GB/s"] = nbytes / benchmark.stats.stats.median / 1e9


@pytest.mark.parametrize("impl", ["copy", "fused", "torch", "paper_lists"])
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("n", SIZES)
def test_cg_update(benchmark, n, batch, impl):
    available = contenders.cg_update_contenders(n, batch)
    if impl not in available:
        pytest.skip("hypergrad._C is not built")
    fn, nbytes = available[impl]
    benchmark(fn)
    _gbps(benchmark, nbytes)


@pytest.mark.parametrize("what", ["16 matvecs", "cg 16 iterations"])
@pytest.mark.parametrize("defender", ["lr", "nn"])
def test_solver_overhead(benchmark, defender, what):
    op, _, b = contenders.hessian_system(leader_step_problem(defender, dtype=torch.float32))
    damping = 1.0  # keeps CG from stopping at the NN's negative curvature before 16 iterations
    if what == "16 matvecs":
        fn = contenders.matvecs_alone(op, b, 16, damping)
    else:
        _, info = hypergrad.solve(op, b, method="cg", maxiter=16, rtol=0.0, damping=damping)
        assert int(info.iterations) == 16, "CG stopped early: the comparison would not be at equal iterations"
        fn = contenders.hypergrad_solve(op, b, "cg", 16, damping)
    benchmark.pedantic(fn, rounds=5, iterations=1, warmup_rounds=1)
