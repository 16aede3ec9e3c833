"""hypergrad.solve against dense solves (torch.linalg.solve) on SPD and indefinite systems."""
import pytest
import torch

import hypergrad
from testing import BACKENDS, DEVICES

REACHABLE = {torch.float64: 1e-12, torch.float32: 3e-5}  # relative residuals a well-conditioned system attains


def _spd(n, cond=50.0, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    eig = torch.logspace(0, torch.log10(torch.tensor(cond)).item(), n, dtype=torch.float64)
    return ((q * eig) @ q.T).to(dtype)


def _indefinite(n, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    eig = torch.linspace(1.0, 5.0, n, dtype=torch.float64) * torch.where(torch.arange(n) % 3 == 0, -1.0, 1.0)
    return ((q * eig) @ q.T).to(dtype)


def _rhs(shape, seed=1, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _rel_err(x, ref):
    return ((x.double() - ref).norm(dim=-1) / ref.norm(dim=-1)).max().item()


def _dense(A, b, damping=0.0):
    A = A.double() + damping * torch.eye(A.shape[0], dtype=torch.float64)
    return torch.linalg.solve(A, b.double().T).T if b.dim() == 2 else torch.linalg.solve(A, b.double())


@pytest.mark.parametrize("use_ext", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method", hypergrad.METHODS)
@pytest.mark.parametrize("shape", [(40,), (3, 40)])
def test_spd_solve_matches_dense(method, dtype, shape, device, use_ext):
    A = _spd(40, dtype=dtype).to(device)
    b = _rhs(shape, dtype=dtype).to(device)
    with hypergrad.use_extension(use_ext):
        x, info = hypergrad.solve(lambda v: v @ A, b, method=method, rtol=REACHABLE[dtype], maxiter=2000,
                                  damping=0.5)
    assert x.shape == b.shape and x.dtype == dtype
    assert _rel_err(x.cpu(), _dense(A.cpu(), b.cpu(), damping=0.5)) < (1e-9 if dtype == torch.float64 else 2e-4)
    assert bool(info.converged.all()) and not bool(info.negative_curvature.any())
    # the reported residual is the true one
    true_res = (b.double() - (x.double() @ A.double() + 0.5 * x.double())).norm(dim=-1)
    torch.testing.assert_close(info.residual_norm.cpu(), true_res.cpu(), rtol=0.1, atol=1e-3 if dtype == torch.float32 else 1e-9)


@pytest.mark.parametrize("use_ext", BACKENDS)
@pytest.mark.parametrize("method", ["cgnr", "minres"])
def test_indefinite_solve_matches_dense(method, use_ext):
    A = _indefinite(30)
    b = _rhs((2, 30))
    with hypergrad.use_extension(use_ext):
        x, info = hypergrad.solve(lambda v: v @ A, b, method=method, rtol=1e-12, maxiter=500)
    assert _rel_err(x, _dense(A, b)) < 1e-9
    assert bool(info.converged.all())


@pytest.mark.parametrize("use_ext", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rtol", [1e-10, 0.0])
def test_minres_on_a_singular_inconsistent_system_returns_a_least_squares_solution(rtol, dtype, use_ext):
    """No x solves it; MINRES's answer is a minimiser of ||b - A x||, as numpy's lstsq finds. Once the Krylov space
    held one, a further step divided rounding noise by a gamma of 1e-14 and x left for 1e16 (residual 7e15)."""
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))
    eig = torch.tensor([3.0, 2.0, 1.0, 0.0, 0.0, 0.5, -1.0, 0.0], dtype=torch.float64)  # null space of three
    exact = (q * eig) @ q.T
    A, b = exact.to(dtype), _rhs((2, 8), dtype=dtype)
    least = b.double() @ torch.linalg.pinv(exact, hermitian=True)  # rows: a minimiser of ||b - A x|| each
    best = (b.double() - least @ exact).norm(dim=-1)
    with hypergrad.use_extension(use_ext):
        x, info = hypergrad.solve(lambda v: v @ A, b, method="minres", rtol=rtol, maxiter=200)
    residual = (b.double() - x.double() @ exact.T).norm(dim=-1)
    assert torch.allclose(residual, best, rtol=1e-10 if dtype == torch.float64 else 1e-4)
    assert torch.allclose(info.residual_norm.double(), residual, rtol=1e-4) and not bool(info.converged.any())
    assert int(info.iterations.max()) <= 5  # the distinct eigenvalues: the Krylov space's largest dimension


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_minres_solves_an_ill_conditioned_nonsingular_system_to_its_tolerance(dtype):
    """Its least-squares stop is at rounding's scale, not at rtol: at rtol it ended a solve of condition 1e5 at a
    relative residual of 2e-2 (error 45%), reported not converged."""
    g = torch.Generator().manual_seed(2)
    q, _ = torch.linalg.qr(torch.randn(60, 60, generator=g, dtype=torch.float64))
    eig = torch.linspace(1.0, 10.0, 60, dtype=torch.float64)
    eig[:3] = torch.tensor([1e-4, 3e-4, 1e-3], dtype=torch.float64)
    A = (q * eig) @ q.T
    b = torch.randn(60, generator=g, dtype=torch.float64)
    x, info = hypergrad.solve(lambda v: v @ A.to(dtype), b.to(dtype), method="minres", rtol=1e-3, maxiter=600)
    assert _rel_err(x, _dense(A, b)) < 5e-3
    # (float32's true residual, of x's entries near 1e4, is rounding's: the same before the stop was added)
    assert bool(info.converged) or dtype == torch.float32


@pytest.mark.parametrize("check_every", [4, 400])
def test_minres_rows_that_stopped_stay_finite_while_others_go_on(check_every):
    """A row that stops early (converged, or at a least-squares solution) while the loop runs on, for the other rows
    or a recorded solve's fixed count (check_every = maxiter): its recurrences must not overflow into its x (NaN)."""
    A = torch.diag(torch.linspace(1.0, 1000.0, 40, dtype=torch.float64))
    b = torch.stack([torch.zeros(40, dtype=torch.float64).index_fill(0, torch.tensor([0, 39]), 1.0), _rhs(40)])
    x, info = hypergrad.solve(lambda v: v @ A, b, method="minres", rtol=1e-10, maxiter=400, check_every=check_every)
    assert bool(torch.isfinite(x).all()) and bool(info.converged.all())
    assert int(info.iterations[0]) <= 3 < int(info.iterations[1])
    assert _rel_err(x, _dense(A, b)) < 1e-8


@pytest.mark.parametrize("use_ext", BACKENDS)
def test_cg_stops_and_reports_negative_curvature(use_ext):
    A = -_spd(20)  # negative definite: the first direction already has p.Ap < 0
    b = torch.stack([_rhs(20), torch.zeros(20, dtype=torch.float64)])
    with hypergrad.use_extension(use_ext):
        x, info = hypergrad.solve(lambda v: v @ A, b, method="cg", maxiter=50)
    assert info.negative_curvature.tolist() == [True, False]
    assert info.converged.tolist() == [False, True]  # the zero right-hand side is solved by x = 0
    assert info.iterations.tolist() == [0, 0]
    assert torch.equal(x, torch.zeros_like(x))


@pytest.mark.parametrize("method", hypergrad.METHODS)
def test_maxiter_is_honoured(method):
    A = _spd(60, cond=1e4)
    b = _rhs((2, 60))
    x, info = hypergrad.solve(lambda v: v @ A, b, method=method, maxiter=3, rtol=1e-14)
    assert info.iterations.tolist() == [3, 3]
    assert not bool(info.converged.any())
    per_iteration = {"cg": 1, "cgnr": 2, "minres": 1, "neumann": 1}[method]
    setup = {"cg": 0, "cgnr": 1, "minres": 0, "neumann": 20}[method]  # neumann: power iteration
    assert info.num_matvecs == setup + 3 * per_iteration + 1  # + 1: the true residual at the end


@pytest.mark.parametrize("method", ["cg", "minres"])
def test_convergence_is_judged_on_the_true_residual(method):
    # float32 on a condition number of 1e5: the recurrences' residuals drift from the true one and stop
    # the iterations early (MINRES's read 1e-4 where the true relative residual was 0.10)
    A = _spd(200, cond=1e5, dtype=torch.float32)
    b = _rhs(200, dtype=torch.float32)
    x, info = hypergrad.solve(lambda v: v @ A, b, method=method, rtol=1e-4, maxiter=2000)
    true = (b.double() - x.double() @ A.double()).norm().item()
    torch.testing.assert_close(info.residual_norm.item(), true, rtol=1e-2, atol=0.0)
    tol = 1e-4 * b.double().norm().item()
    assert true > 2 * tol  # the case this test is about: the recurrence alone would call it converged
    assert not bool(info.converged)


def test_neumann_estimates_its_step_from_the_starting_residual():
    A = _spd(30, cond=100.0)
    x0 = _rhs(30, seed=3)
    # b = 0 with a warm start: the series expands r0 = -A x0 (from b the power iteration had nothing: nan)
    x, info = hypergrad.solve(lambda v: v @ A, torch.zeros(30, dtype=torch.float64), method="neumann", x0=x0,
                              maxiter=3000, atol=1e-8)
    assert bool(torch.isfinite(x).all()) and bool(info.converged)
    assert x.norm().item() < 1e-6


@pytest.mark.parametrize("method", hypergrad.METHODS)
def test_warm_start(method):
    A = _spd(50, cond=100.0)
    b = _rhs(50)
    exact = _dense(A, b)
    _, cold = hypergrad.solve(lambda v: v @ A, b, method=method, rtol=1e-8, maxiter=3000)
    x, info = hypergrad.solve(lambda v: v @ A, b, method=method, rtol=1e-8, maxiter=3000, x0=exact)
    assert info.iterations.item() == 0 and bool(info.converged)
    torch.testing.assert_close(x, exact)
    near = exact + 1e-4 * _rhs(50, seed=7)
    _, warm = hypergrad.solve(lambda v: v @ A, b, method=method, rtol=1e-8, maxiter=3000, x0=near)
    assert warm.iterations.item() < cold.iterations.item()


def test_each_system_converges_on_its_own():
    A = _spd(30, cond=1e3)
    b = torch.stack([_rhs(30), torch.zeros(30, dtype=torch.float64), _rhs(30, seed=5)])
    x, info = hypergrad.solve(lambda v: v @ A, b, method="cg", rtol=1e-10, maxiter=200)
    assert info.iterations[1].item() == 0
    assert bool(info.converged.all())
    assert _rel_err(x[[0, 2]], _dense(A, b[[0, 2]])) < 1e-8


@pytest.mark.parametrize("method", ["cg", "cgnr", "minres", "neumann"])
@pytest.mark.parametrize("check_every, syncs", [(8, 4), (1, 39), (40, 0)])
def test_host_synchronises_only_every_few_iterations(monkeypatch, method, check_every, syncs):
    from hypergrad import solvers

    calls = []
    monkeypatch.setattr(solvers, "_any_on_host", lambda flags: calls.append(1) or bool(flags.any()))
    A = _spd(40, cond=1e6)
    hypergrad.solve(lambda v: v @ A, _rhs(40), method=method, rtol=1e-30, maxiter=40, check_every=check_every,
                    neumann_scale=1e-3)
    assert len(calls) == syncs  # at k = 8, 16, 24, 32 (never at k = 0); none with check_every >= maxiter


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "gmres"}, "method"),
    ({"rtol": -1.0}, "rtol must be a finite number >= 0"),
    ({"x0": torch.zeros(3)}, "x0"),
    ({"maxiter": -2}, "maxiter"),
    ({"rtol": float("nan")}, "rtol must be a finite number"), ({"atol": float("nan")}, "atol must be a finite"),
    ({"damping": float("inf")}, "damping must be a finite"), ({"rtol": "1e-5"}, "rtol must be a finite"),
    ({"maxiter": 10.0}, "maxiter must be an integer"), ({"maxiter": float("nan")}, "maxiter must be an integer"),
    ({"check_every": 0}, "check_every must be an integer >= 1"), ({"x0": [0.0] * 4}, "x0 must be a tensor"),
    ({"method": "neumann", "neumann_scale": -1.0}, "neumann_scale must be a finite number > 0"),
    ({"method": "neumann", "neumann_scale": float("nan")}, "neumann_scale must be a finite number > 0"),
    ({"preconditioner": "jacobi"}, r"Solver\(preconditioner='jacobi'\)"),
    ({"preconditioner": torch.ones(3)}, r"shape \[4\] \(a diagonal\), got \[3\]"),
])
def test_bad_arguments(kwargs, message):
    """NaN tolerances once passed `rtol < 0` and returned x = 0 after no iteration, as if converged."""
    with pytest.raises(ValueError, match=message):
        hypergrad.solve(lambda v: v, torch.ones(4, dtype=torch.float64), **kwargs)
    with pytest.raises(ValueError, match="rtol must be a finite number >= 0"):
        hypergrad.Solver(rtol=float("nan"))
    with pytest.raises(ValueError, match="neumann_scale must be a finite number > 0"):  # when it is built, not solving
        hypergrad.Solver("neumann", options={"neumann_scale": -1.0})
    with pytest.raises(ValueError, match="check_every must be an integer >= 1"):
        hypergrad.Solver(options={"check_every": 0})
    with pytest.raises(ValueError, match="maxiter"):
        hypergrad.Solver(maxiter=True)


def test_numpy_numbers_are_numbers():
    import numpy as np
    A = torch.diag(torch.tensor([2.0, 4.0], dtype=torch.float64))
    x, _ = hypergrad.solve(lambda v: v @ A, torch.ones(2, dtype=torch.float64), maxiter=np.int64(5),
                           rtol=np.float32(1e-9))
    assert torch.allclose(x, torch.tensor([0.5, 0.25], dtype=torch.float64))
    assert hypergrad.Solver(maxiter=np.int64(4)).maxiter == 4


def test_a_matrix_or_a_non_tensor_product_is_a_type_error():
    A = torch.eye(3, dtype=torch.float64)
    with pytest.raises(TypeError, match="matvec must be a callable v -> A v"):
        hypergrad.solve(A, torch.ones(3, dtype=torch.float64))
    with pytest.raises(TypeError, match="matvec returned a ndarray"):
        hypergrad.solve(lambda v: (v @ A).numpy(), torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("method", hypergrad.METHODS)
def test_a_solve_is_not_differentiated_through_its_iterations(method):
    """A matrix or right-hand side that requires grad: the same x as without, with no graph (backward through the
    in-place iterations failed, or, for MINRES, gave gradients 2.5% off); the implicit derivative is total_grad's."""
    A = _spd(6, cond=5.0).requires_grad_(True)
    b = _rhs(6).requires_grad_(True)
    x, info = hypergrad.solve(lambda v: v @ A, b, method=method, rtol=1e-12, maxiter=300)
    assert not x.requires_grad and not info.x.requires_grad
    assert _rel_err(x, _dense(A.detach(), b.detach())) < 1e-8


def test_matvec_of_wrong_shape_is_reported():
    with pytest.raises(ValueError, match="matvec returned shape"):
        hypergrad.solve(lambda v: v[:-1], torch.ones(4, dtype=torch.float64))
    # a matvec that returns float32 for a float64 b: the matvec named, not the solver's kernels' view of b
    with pytest.raises(ValueError, match="matvec returned a torch.float32 tensor on cpu for a torch.float64 input"):
        hypergrad.solve(lambda v: (2 * v).float(), torch.ones(4, dtype=torch.float64))


def test_a_right_hand_side_the_matvec_cannot_take_is_named():
    A = 2 * torch.eye(5, dtype=torch.float64)
    for b in (torch.ones(6, dtype=torch.float64), torch.ones(5, dtype=torch.float32)):
        with pytest.raises(ValueError, match=r"matvec failed at the solve's first product, on a .* vector of shape .* \(b's\)"):
            hypergrad.solve(lambda v: v @ A, b)


def test_solver_options_must_be_a_dict():
    with pytest.raises(ValueError, match="options must be a dict"):
        hypergrad.Solver(options=None)
