"""pytest-benchmark suites of one TGDA leader step (issue 4, parts b, c and d).

    .venv/bin/python -m pytest benchmarks/test_bench_leader_step.py --benchmark-only --benchmark-group-by=func,param:defender

(b) hypergrad.total_grad against the paper's procedure (benchmarks/paper_procedure.py) at equal
    method and iterations (cgnr, 16) in float64, for each defender at the paper's batch (smaller
    batches for the convolutional defenders on a CPU: problems.CPU_BATCH), and on a GPU for the LR
    and NN defenders also with the solve replayed as a CUDA graph; each result after the paper's is
    checked to agree with it to rounding (relative difference in extra_info);
(c) total_grad with the recommended settings (contenders.RECOMMENDED), extra_info holding the cosine
    of its hypergradient and of the paper's to a long float64 MINRES solve of the undamped system;
(d) torchopt.linear_solve.solve_cg against hypergrad.solve (cg) on the same Hessian operator and
    damped system at equal iterations; skipped when torchopt is not installed (pip install
    torchopt). Its solve_normal_cg is not compared: it forms A^T by a torch.func vjp of the matvec,
    which returns zeros for a Hessian product made with torch.autograd.grad (checked: relative
    difference 1.0), so it needs a different, third-order product and would not be a like-for-like run.
Settings: HYPERGRAD_BENCH_DEFENDERS (default "lr nn cnn cifar-cnn resnet18"), HYPERGRAD_BENCH_ROUNDS
(default 3), HYPERGRAD_BENCH_REFERENCE_ITERATIONS (default 200). Runs on CUDA when present.
"""
import functools
import os

import pytest
import torch

import contenders as c
import hypergrad
from problems import leader_step_problem

DEFENDERS = os.environ.get("HYPERGRAD_BENCH_DEFENDERS", "lr nn cnn cifar-cnn resnet18").split()
ROUNDS = int(os.environ.get("HYPERGRAD_BENCH_ROUNDS", "3"))
REFERENCE_ITERATIONS = int(os.environ.get("HYPERGRAD_BENCH_REFERENCE_ITERATIONS", "200"))
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (c) measures quality on a defender fitted by FIT_STEPS gradient steps (a realistic state); (b) times and
# compares at the initialisation, where both procedures agree to rounding (on a fitted NN, cgnr's 16
# iterations amplify rounding differences to about 1e-3 even between two float64 autograd runs).
FIT_STEPS = 100
_results = {}


@functools.cache
def _problem(defender, dtype, fitted=False):
    return leader_step_problem(defender, dtype=dtype, device=DEVICE, fit_steps=FIT_STEPS if fitted else 0)


@functools.cache
def _reference(defender):
    return c.reference_hypergradient(_problem(defender, torch.float64, True), REFERENCE_ITERATIONS)


def _run(benchmark, fn):
    result = benchmark.pedantic(fn, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return result


@pytest.mark.parametrize("impl", ["paper", "hypergrad", "hypergrad-cuda-graph"])
@pytest.mark.parametrize("defender", DEFENDERS)
def test_leader_step_equal_iterations(benchmark, defender, impl):
    step = _problem(defender, torch.float64)
    if impl == "hypergrad-cuda-graph":
        if DEVICE != "cuda" or hypergrad.linear_chain(step.follower_objective().model) is None:
            pytest.skip("a CUDA-graph solve needs a GPU and a linear-activation defender (LR, NN)")
        fn = c.hypergrad_leader_step(step, "cgnr", 16, graphs=hypergrad.SolveGraphCache())
        fn()  # records the graph outside the timed rounds
    else:
        fn = c.paper_leader_step(step) if impl == "paper" else c.hypergrad_leader_step(step, "cgnr", 16)
    _results[("b", defender, impl)] = result = _run(benchmark, fn)
    benchmark.extra_info.update(batch=step.batch, dtype="float64", method="cgnr", iterations=16, device=DEVICE)
    other = _results.get(("b", defender, "paper")) if impl != "paper" else _results.get(("b", defender, "hypergrad"))
    if other is not None:
        diff = c.relative_difference(result, other)
        benchmark.extra_info["relative_difference"] = diff
        assert diff < 1e-9, f"the paper's procedure and total_grad disagree: relative difference {diff:.2e}"


@pytest.mark.parametrize("defender", DEFENDERS)
def test_leader_step_recommended(benchmark, defender):
    settings = c.RECOMMENDED
    step = _problem(defender, settings["dtype"], True)
    fn = c.hypergrad_leader_step(step, settings["method"], settings["iterations"], settings["damping"])
    result = _run(benchmark, fn)
    reference = _reference(defender)
    paper = c.paper_leader_step(_problem(defender, torch.float64, True))()
    benchmark.extra_info.update(batch=step.batch, device=DEVICE, **{k: str(v) for k, v in settings.items()},
                                cosine_to_reference=c.cosine(result, reference),
                                paper_cosine_to_reference=c.cosine(paper, reference))


@pytest.mark.parametrize("impl", ["torchopt", "hypergrad"])
@pytest.mark.parametrize("defender", [d for d in DEFENDERS if d in ("lr", "nn")])
def test_solver_against_torchopt(benchmark, defender, impl):
    pytest.importorskip("torchopt", reason="torchopt is not installed (pip install torchopt) : part (d) skipped")
    step = _problem(defender, torch.float32)
    op, tree_matvec, b = c.hessian_system(step)
    damping = 1.0  # both solve the same damped system; enough damping that CG runs all 16 iterations
    fn = c.torchopt_cg(tree_matvec, b, step.w, 16, damping) if impl == "torchopt" else c.hypergrad_solve(op, b, "cg", 16, damping)
    _results[("d", defender, impl)] = result = _run(benchmark, fn)
    benchmark.extra_info.update(batch=step.batch, dtype="float32", iterations=16, damping=damping, device=DEVICE)
    other = _results.get(("d", defender, "hypergrad" if impl == "torchopt" else "torchopt"))
    if other is not None:
        diff = c.relative_difference(result, other)
        benchmark.extra_info["relative_difference"] = diff
        assert diff < 1e-3, f"torchopt and hypergrad.solve disagree: relative difference {diff:.2e}"
