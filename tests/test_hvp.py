"""hypergrad.hvp against the dense Hessian of a small MLP (torch.autograd.functional.hessian)."""
import pytest
import torch

import hypergrad


def _mlp_problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (16,), generator=g)
    shapes = [(7, 5), (7,), (3, 7), (3,)]
    params = [(0.5 * torch.randn(s, generator=g, dtype=torch.float64)).requires_grad_() for s in shapes]

    def loss_fn(w1, b1, w2, b2):
        h = torch.nn.functional.leaky_relu(x @ w1.T + b1, 0.2)
        h = torch.tanh(h)  # a smooth layer so that the Hessian has curvature in every block
        return torch.nn.functional.cross_entropy(h @ w2.T + b2, y)

    return loss_fn, params


def _dense_hessian(loss_fn, params):
    flat = hypergrad.flatten([p.detach() for p in params])
    return torch.autograd.functional.hessian(lambda f: loss_fn(*hypergrad.unflatten(f, params)), flat)


@pytest.mark.parametrize("mode", ["reverse", "forward"])
@pytest.mark.parametrize("batched", [False, True])
def test_hvp_matches_dense_hessian(mode, batched):
    loss_fn, params = _mlp_problem()
    H = _dense_hessian(loss_fn, params)
    n = H.shape[0]
    g = torch.Generator().manual_seed(3)
    V = torch.randn((4, n) if batched else (n,), generator=g, dtype=torch.float64)
    v = hypergrad.unflatten(V, params)
    loss = loss_fn if mode == "forward" else loss_fn(*params)
    out = hypergrad.hvp(loss, params, v, mode=mode)
    got = hypergrad.flatten(out, batched=batched)
    torch.testing.assert_close(got, V @ H, rtol=1e-10, atol=1e-12)


def test_operator_reuses_one_gradient_graph_for_many_products():
    loss_fn, params = _mlp_problem(seed=1)
    calls = {"n": 0}

    def counting(*p):
        calls["n"] += 1
        return loss_fn(*p)

    op = hypergrad.HessianOperator.reverse(counting(*params), params)
    H = _dense_hessian(loss_fn, params)
    for seed in range(5):
        v = torch.randn(op.n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        torch.testing.assert_close(op(v), H @ v, rtol=1e-10, atol=1e-12)
    assert calls["n"] == 1  # one forward pass served every product


def test_batched_product_falls_back_to_a_loop_when_vmap_cannot_batch():
    # torch.autograd.grad(is_grads_batched=True) has no batching rule for every operation; the
    # operator must then loop over rows and still give the right answer.
    loss_fn, params = _mlp_problem(seed=2)
    op = hypergrad.HessianOperator.reverse(loss_fn(*params), params)
    real_grad = torch.autograd.grad

    def failing_batched(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            raise RuntimeError("no batching rule")
        return real_grad(*args, **kwargs)

    V = torch.randn(3, op.n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.autograd.grad, saved = failing_batched, torch.autograd.grad
    try:
        got = op(V)
    finally:
        torch.autograd.grad = saved
    torch.testing.assert_close(got, V @ _dense_hessian(loss_fn, params), rtol=1e-10, atol=1e-12)


def test_single_tensor_params_return_a_tensor():
    w = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64, requires_grad=True)
    out = hypergrad.hvp((w ** 3).sum(), w, torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(out, 6 * w.detach())


def test_bad_arguments():
    w = torch.ones(3, requires_grad=True)
    with pytest.raises(ValueError, match="shaped like params"):
        hypergrad.hvp((w ** 2).sum(), w, torch.ones(4))
    with pytest.raises(ValueError, match="mode"):
        hypergrad.hvp((w ** 2).sum(), w, torch.ones(3), mode="sideways")
    with pytest.raises(ValueError, match="scalar"):
        hypergrad.hvp(w ** 2, w, torch.ones(3))
    with pytest.raises(TypeError, match="function of the parameters"):
        hypergrad.hvp((w ** 2).sum(), w, torch.ones(3), mode="forward")
    # a loss_fn that ignores its arguments (a module's own parameters) had a zero Hessian to forward mode: every
    # product came back 0; reverse mode through the same closure gave the right one
    with pytest.raises(ValueError, match="does not depend on the tensor\\(s\\) at position \\[0\\]"):
        hypergrad.hvp(lambda v: (w ** 3).sum(), w, torch.ones(3), mode="forward")
    with pytest.raises(ValueError, match="scalar"):
        hypergrad.hvp(lambda v: v ** 2, w, torch.ones(3), mode="forward")
    # a float64 direction for float32 parameters is refused, not computed in float32 behind the caller's back
    with pytest.raises(ValueError, match="torch.float64 but the parameters are torch.float32"):
        hypergrad.hessian_operator((w ** 2).sum(), w)(torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="torch.float64 but the parameters are torch.float32"):
        hypergrad.solve(hypergrad.hessian_operator((w ** 2).sum(), w), torch.ones(3, dtype=torch.float64), damping=1e-3)


@pytest.mark.parametrize("mode", ["forward-hvp", "jvp"])
def test_forward_mode_gives_no_warning_of_torchs_own_code(mode):
    """torch (2.14) compiles forward-mode autodiff's decompositions with its deprecated torch.jit.script at a process's
    first jvp; that FutureWarning, about torch's code, reached `--defense sever` users as theirs. A fresh process, with
    every warning an error: the first forward-mode product is quiet and equals the closed form."""
    import subprocess
    import sys
    code = {
        "forward-hvp": "w = torch.tensor([1.0, 2.0]); "
                       "op = hypergrad.hessian_operator(lambda w: (w ** 3).sum(), w, mode='forward'); "
                       "assert torch.allclose(op.matvec(torch.ones(2)), 6 * w)",
        "jvp": "from hypergrad.hvp import jvp; "
               "assert torch.allclose(jvp(torch.sin, (torch.zeros(3),), (torch.ones(3),))[1], torch.ones(3))",
    }[mode]
    proc = subprocess.run([sys.executable, "-W", "error", "-c", f"import torch, hypergrad; {code}"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_a_scalar_parameter_is_a_parameter():
    """0-d tensors (a temperature, a log-regularisation weight) failed in unflatten: reshape() of no shape."""
    s = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    w = torch.tensor([1.0, -1.0], dtype=torch.float64, requires_grad=True)
    loss = s ** 3 + s * (w ** 2).sum()  # H = [[6 s, 2 w], [2 w, 2 s I]]
    hs, hw = hypergrad.hvp(loss, (s, w), (torch.tensor(1.0, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)))
    assert hs.shape == () and hs.item() == 12.0 and torch.equal(hw, 2 * w.detach())
    (theta,) = hypergrad.total_grad(lambda: (s - 3.0) ** 2, lambda: (s - 0.5 * w.sum()) ** 2 + (w ** 2).sum(), w, s,
                                    method="minres", rtol=1e-12)
    # s*(w) = 0.5 (w1 + w2): dl/dw = 2 (s* - 3) * 0.5 for each entry
    torch.testing.assert_close(theta, torch.full((2,), (s.detach() - 3.0).item(), dtype=torch.float64))


@pytest.mark.parametrize("batched", [False, True])
def test_a_loss_linear_in_some_parameters_has_zero_rows_in_its_hessian(batched):
    """Its gradient in those parameters is a constant without a graph: H v was an error telling the user to pass
    create_graph=True, which they had not called. Against the dense Hessian."""
    a = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    c = torch.tensor([0.5, -1.0, 3.0], dtype=torch.float64, requires_grad=True)
    v = (torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64))
    v = v if batched else (v[0][0], v[1][0])
    got = hypergrad.hvp((a ** 3).sum() + (2 * c).sum(), (a, c), v)
    dense = torch.autograd.functional.hessian(lambda x: (x[:2] ** 3).sum() + (2 * x[2:]).sum(),
                                              torch.cat([a, c]).detach())
    flat_v = torch.cat(v, dim=-1)
    torch.testing.assert_close(torch.cat(got, dim=-1), flat_v @ dense)
    (only_linear,) = (hypergrad.hvp((2 * c).sum(), c, v[1]),)
    assert not only_linear.any() and only_linear.shape == v[1].shape


def test_params_that_reverse_mode_cannot_differentiate_by_are_named():
    layer = torch.nn.Linear(3, 1).double()
    layer.bias.requires_grad_(False)
    x = torch.randn(4, 3, dtype=torch.float64)
    params = list(layer.parameters())
    with pytest.raises(ValueError, match=r"params\[1\] \(shape \[1\]\) does not require grad"):
        hypergrad.hvp(layer(x).pow(2).sum(), params, [torch.ones_like(p) for p in params])
    with pytest.raises(TypeError, match=r"got a dict: pass list\(d.values\(\)\)"):
        hypergrad.hvp(lambda w, b: w.sum(), dict(layer.named_parameters()), [torch.ones_like(p) for p in params])
    with pytest.raises(TypeError, match=r"calls loss_fn\(\*params\) with the 2 parameter"):
        hypergrad.hvp(lambda w: w.sum(), params, [torch.ones_like(p) for p in params], mode="forward")
