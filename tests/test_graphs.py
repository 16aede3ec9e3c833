"""Recorded fixed-iteration solves (hypergrad.graphs): every replay equals an independent
hypergrad.solve of the same system, for new operator states, right-hand sides and warm starts; on a
GPU the replay is a CUDA graph (the Python product is not called again)."""
import pytest
import torch
from torch import nn

import hypergrad
from hypergrad import mlp_hvp
from hypergrad.mlp_hvp import ClassifierLoss, structured_hessian
from testing import BACKENDS, DEVICES


def _problem(seed, batch=30, device="cpu", dtype=torch.float64, sizes=(10, 8, 4)):
    """A structured Hessian of a tanh MLP at random weights and data, and a right-hand side."""
    torch.manual_seed(0)  # one architecture; the weights and data below depend on the seed
    model = nn.Sequential(nn.Linear(sizes[0], sizes[1]), nn.Tanh(), nn.Linear(sizes[1], sizes[2])).to(device, dtype)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=dtype))
    x = torch.randn(batch, sizes[0], generator=generator, dtype=dtype).to(device)
    y = torch.randint(0, sizes[-1], (batch,), generator=generator).to(device)
    op = structured_hessian(ClassifierLoss(model, x, y), tuple(model.parameters()))
    b = torch.randn(op.n, generator=generator, dtype=dtype).to(device)
    return model, op, b


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["cg", "cgnr", "minres", "neumann"])
def test_every_replay_equals_an_independent_solve(method, device, backend):
    settings = {"method": method, "maxiter": 12, "rtol": 0.0, "damping": 0.5}
    graphs = hypergrad.SolveGraphCache()
    with hypergrad.use_extension(backend):
        for seed in (1, 2, 3):  # the first call records, the next two replay with new states and b
            _, op, b = _problem(seed, device=device)
            x, info = graphs.solve(op, b, **settings)
            expected, expected_info = hypergrad.solve(op, b, **settings)
            assert _rel(x, expected) < 1e-10
            assert torch.equal(info.iterations.cpu(), expected_info.iterations.cpu())
            assert abs(info.residual_norm.item() - expected_info.residual_norm.item()) <= 1e-8 * b.norm().item()
    assert len(graphs) == 1


@pytest.mark.parametrize("device", DEVICES)
def test_batched_right_hand_sides_and_warm_starts(device):
    graphs = hypergrad.SolveGraphCache()
    for seed in (4, 5):
        _, op, b = _problem(seed, device=device)
        rhs = torch.stack([b, 2 * b, torch.zeros_like(b)])
        x0 = torch.randn(rhs.shape, dtype=rhs.dtype, device=device)
        x, _ = graphs.solve(op, rhs, method="cg", maxiter=10, rtol=0.0, damping=1.0, x0=x0)
        expected, _ = hypergrad.solve(op, rhs, method="cg", maxiter=10, rtol=0.0, damping=1.0, x0=x0)
        assert _rel(x, expected) < 1e-10
    assert len(graphs) == 1


def test_a_solver_s_neumann_scale_is_recorded_with_it():
    graphs = hypergrad.SolveGraphCache()
    _, op, b = _problem(9)
    for scale in (0.01, 0.02):  # each scale its own recording, each equal to the eager solve with that scale
        x, _ = graphs.solve(op, b, solver=hypergrad.Solver("neumann", maxiter=5, options={"neumann_scale": scale}))
        assert _rel(x, hypergrad.solve(op, b, method="neumann", maxiter=5, neumann_scale=scale)[0]) < 1e-12
    assert len(graphs) == 2


def test_a_new_layout_or_setting_records_again_and_inputs_are_left_alone():
    graphs = hypergrad.SolveGraphCache()
    model, op, b = _problem(6)
    weights = [p.detach().clone() for p in model.parameters()]
    state = [t.clone() for t in op.state()]
    graphs.solve(op, b, method="cgnr", maxiter=4)
    _, other, c = _problem(7)
    graphs.solve(other, c, method="cgnr", maxiter=4)  # copies other's state into the recording's own buffers
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), weights))
    assert all(torch.equal(t, s) for t, s in zip(op.state(), state))
    assert len(graphs) == 1
    _, smaller, d = _problem(8, batch=20)
    x, _ = graphs.solve(smaller, d, method="cgnr", maxiter=4)
    assert _rel(x, hypergrad.solve(smaller, d, method="cgnr", maxiter=4)[0]) < 1e-10
    graphs.solve(smaller, d, method="cgnr", maxiter=5)
    assert len(graphs) == 3
    graphs.clear()
    assert len(graphs) == 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_a_replay_does_not_run_the_python_product(monkeypatch):
    graphs = hypergrad.SolveGraphCache()
    _, op, b = _problem(1, device="cuda")
    graphs.solve(op, b, method="cgnr", maxiter=8)  # records
    calls = []
    real = mlp_hvp.StructuredHessian._structured_product
    monkeypatch.setattr(mlp_hvp.StructuredHessian, "_structured_product",
                        lambda self, v: calls.append(1) or real(self, v))
    _, other, c = _problem(2, device="cuda")
    x, _ = graphs.solve(other, c, method="cgnr", maxiter=8)
    assert calls == []
    monkeypatch.undo()
    assert _rel(x, hypergrad.solve(other, c, method="cgnr", maxiter=8)[0]) < 1e-10


def test_bad_input_is_refused_with_what_to_do():
    graphs = hypergrad.SolveGraphCache()
    model, op, b = _problem(1)
    x = torch.randn(5, 10, dtype=torch.float64)
    reverse = hypergrad.HessianOperator.reverse(nn.functional.cross_entropy(model(x), torch.zeros(5, dtype=torch.long)),
                                                tuple(model.parameters()))
    with pytest.raises(ValueError, match="StructuredHessian"):
        graphs.solve(reverse, b)
    with pytest.raises(ValueError, match="maxiter"):
        graphs.solve(op, b, maxiter=None)
    with pytest.raises(ValueError, match="method"):
        graphs.solve(op, b, method="gmres")
    with pytest.raises(ValueError, match="b must be"):
        graphs.solve(op, b[:-1])
    with pytest.raises(ValueError, match="b must be"):
        graphs.solve(op, b.float())
    with pytest.raises(ValueError, match="warmup"):
        hypergrad.SolveGraphCache(warmup=0)
    _, smaller, _ = _problem(2, batch=20)
    with pytest.raises(ValueError, match="same model layout"):
        op.load_state(smaller)


def _poisoning_problem(device="cpu"):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 3)).to(device, torch.float64)
    x = torch.randn(20, 3, 4, dtype=torch.float64, device=device)
    y = torch.randint(0, 3, (20,), device=device)
    x_val = torch.randn(15, 3, 4, dtype=torch.float64, device=device)
    y_val = torch.randint(0, 3, (15,), device=device)
    shift = torch.zeros(3, 4, dtype=torch.float64, device=device, requires_grad=True)  # the leader: shifts 5 points
    w = tuple(model.parameters())

    def follower():
        return ClassifierLoss(model, torch.cat([x[:15], x[15:] + shift]), y)

    def leader():
        return nn.functional.cross_entropy(model(x_val), y_val)

    return model, shift, w, follower, leader


@pytest.mark.parametrize("device", DEVICES)
def test_total_grad_with_graphs_equals_total_grad_without(device):
    model, shift, w, follower, leader = _poisoning_problem(device)
    graphs = hypergrad.SolveGraphCache()
    for step in range(3):  # the leader moves: each call replays with a new state
        settings = {"method": "cgnr", "maxiter": 16, "rtol": 0.0}
        (recorded,) = hypergrad.total_grad(leader, follower(), shift, w, graphs=graphs, **settings)
        (plain,) = hypergrad.total_grad(leader, follower(), shift, w, **settings)
        assert _rel(recorded, plain) < 1e-9
        with torch.no_grad():
            shift.add_(0.1 * recorded)
    assert len(graphs) == 1


def test_total_grad_with_graphs_needs_the_structured_product():
    model, shift, w, follower, leader = _poisoning_problem()
    graphs = hypergrad.SolveGraphCache()
    with pytest.raises(ValueError, match="structured product"):
        hypergrad.total_grad(leader, follower(), shift, w, graphs=graphs, hvp_mode="reverse")
    with pytest.raises(ValueError, match="structured product"):
        hypergrad.total_grad(leader, lambda: follower()(), shift, w, graphs=graphs)
