"""The structured Hessian-vector product (hypergrad.mlp_hvp, csrc/mlp_hvp.cpp) against autograd's dense
Hessian in float64, its fused pieces against autograd derivatives, and its use inside total_grad."""
import pytest
import torch
from torch import nn

import hypergrad
from hypergrad import _ops, _reference
from hypergrad.mlp_hvp import ClassifierLoss, linear_chain, structured_hessian
from testing import BACKENDS, DEVICES, DTYPES, needs_extension, tol

ACTIVATION_MODULES = {"identity": nn.Identity(), "relu": nn.ReLU(), "leaky_relu": nn.LeakyReLU(0.2),
                      "tanh": nn.Tanh(), "sigmoid": nn.Sigmoid()}


def _autograd_derivatives(name, z):
    """sigma'(z), sigma''(z) by autograd: the oracle of both implementations."""
    module = ACTIVATION_MODULES[name]
    z = z.detach().requires_grad_(True)
    (first,) = torch.autograd.grad(module(z).sum(), z, create_graph=True)
    if not first.requires_grad:  # piecewise linear: sigma'' = 0
        return first.detach(), torch.zeros_like(z)
    (second,) = torch.autograd.grad(first.sum(), z)
    return first.detach(), second


def _chain(activation, sizes=(12, 7, 5, 4), dtype=torch.float64, device="cpu", seed=0, rows=9):
    torch.manual_seed(seed)
    layers = [nn.Flatten()]
    for k, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        if k:
            layers.append(ACTIVATION_MODULES[activation])
        layers.append(nn.Linear(a, b))
    model = nn.Sequential(*layers).to(device, dtype)
    x = torch.randn(rows, 3, 4, dtype=dtype, device=device)
    y = torch.randint(0, sizes[-1], (rows,), device=device)
    return model, x, y


def _dense_hessian(model, x, y):
    params = tuple(model.parameters())
    names = [n for n, _ in model.named_parameters()]

    def loss(*flat_parts):
        out = torch.func.functional_call(model, dict(zip(names, flat_parts)), (x,))
        return nn.functional.cross_entropy(out, y)

    blocks = torch.autograd.functional.hessian(loss, params)
    n = sum(p.numel() for p in params)
    rows = [torch.cat([blocks[i][j].reshape(params[i].numel(), params[j].numel()) for j in range(len(params))], 1)
            for i in range(len(params))]
    return torch.cat(rows, 0).reshape(n, n)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", sorted(ACTIVATION_MODULES))
@pytest.mark.parametrize("rows", [9, 1])  # one data row: its blocks stack differently (a former crash of _C)
def test_structured_product_equals_dense_hessian(activation, device, backend, rows):
    model, x, y = _chain(activation, device=device, rows=rows)
    hessian = _dense_hessian(model, x, y)
    op = structured_hessian(ClassifierLoss(model, x, y), tuple(model.parameters()))
    assert op is not None
    v = torch.randn(3, op.n, dtype=torch.float64, device=device)
    with hypergrad.use_extension(backend):
        batched, single = op(v), op(v[1])
    torch.testing.assert_close(batched, v @ hessian.T, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(single, hessian @ v[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_structured_product_on_the_defenders_matches_autograd(dtype, backend):
    from tgda_attack.models import make_defender

    torch.manual_seed(1)
    for name in ("lr", "nn"):
        model = make_defender(name, (1, 28, 28)).to(dtype)
        x, y = torch.rand(20, 1, 28, 28, dtype=dtype) * 2 - 1, torch.randint(0, 10, (20,))
        loss = ClassifierLoss(model, x, y)
        params = tuple(model.parameters())
        reference = hypergrad.HessianOperator.reverse(loss(), params)
        op = structured_hessian(loss, params)
        v = torch.randn(2, op.n, dtype=dtype)
        with hypergrad.use_extension(backend):
            torch.testing.assert_close(op(v), reference(v), **tol(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 6), (37, 1001)], ids=["small", "parallel"])  # 3 x 37037 elements: the
@pytest.mark.parametrize("activation", sorted(ACTIVATION_MODULES))  # CPU threads' chunks start inside a row
def test_pointwise_pieces_match_autograd_derivatives(activation, shape, dtype, device, backend):
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(*shape, generator=g, dtype=dtype) * 2).to(device)
    rz, rg = (torch.randn(3, *shape, generator=g, dtype=dtype).to(device) for _ in range(2))
    grad_a = torch.randn(*shape, generator=g, dtype=dtype).to(device)
    first, second = _autograd_derivatives(activation, z)
    slope = 0.2 if activation == "leaky_relu" else 0.0
    with hypergrad.use_extension(backend):
        torch.testing.assert_close(_ops.activation_jvp(z, rz, activation, slope), first * rz, **tol(dtype))
        torch.testing.assert_close(_ops.activation_jvp(z, rz[0], activation, slope), first * rz[0], **tol(dtype))
        torch.testing.assert_close(_ops.activation_hvp_backward(z, rz, grad_a, rg, activation, slope),
                                   second * rz * grad_a + first * rg, **tol(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ["identity", "relu", "leaky_relu"])
def test_a_piecewise_linear_activation_does_not_read_its_zero_curvature_term(activation, device, backend):
    """sigma'' = 0: an inf in R z or grad_a (a diverging direction) leaves the product finite, as in autograd's double
    backward, on every backend (the CPU kernel skipped the term; the twin and the CUDA kernel made 0 * inf = nan)."""
    z = torch.tensor([[-1.0, 2.0, 0.5]], device=device)
    rz = torch.tensor([[[float("inf"), 1.0, -float("inf")]]], device=device)
    grad_a, rg = torch.full_like(z, float("inf")), torch.ones_like(rz)
    first, _ = _autograd_derivatives(activation, z)  # autograd: no second-derivative term at all (see its oracle)
    slope = 0.2 if activation == "leaky_relu" else 0.0
    with hypergrad.use_extension(backend):
        got = _ops.activation_hvp_backward(z, rz, grad_a, rg, activation, slope)
    torch.testing.assert_close(got, first * rg)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_piece_matches_the_dense_softmax_hessian(dtype, device, backend):
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(4, 7, generator=g, dtype=dtype), 1).to(device)
    rz = torch.randn(2, 4, 7, generator=g, dtype=dtype).to(device)
    dense = torch.diag_embed(probs) - probs.unsqueeze(2) * probs.unsqueeze(1)  # [N, C, C]
    expected = 0.25 * torch.einsum("ncd,bnd->bnc", dense, rz)
    with hypergrad.use_extension(backend):
        torch.testing.assert_close(_ops.softmax_ce_hvp(probs, rz, 0.25), expected, **tol(dtype))


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(dtype, device):
    g = torch.Generator().manual_seed(0)
    z, grad_a = (torch.randn(5, 6, generator=g, dtype=dtype).to(device) for _ in range(2))
    rz, rg = (torch.randn(2, 5, 6, generator=g, dtype=dtype).to(device) for _ in range(2))
    torch.library.opcheck(torch.ops.hypergrad.activation_jvp.default, (z, rz, "tanh", 0.0))
    torch.library.opcheck(torch.ops.hypergrad.activation_hvp_backward.default, (z, rz, grad_a, rg, "leaky_relu", 0.2))
    torch.library.opcheck(torch.ops.hypergrad.softmax_ce_hvp.default, (torch.softmax(z, 1), rz, 0.5))


def _mlp_ce_hvp_args(dtype, device, directions):
    model, x, y = _chain("tanh", dtype=dtype, device=device)
    op = structured_hessian(ClassifierLoss(model, x, y), list(model.parameters()))
    v = torch.randn(*directions, op.n, dtype=dtype, device=device)
    return (op.weights, op.inputs, op.pre_activations, op.grad_activations, op.deltas, op.probs, v, op.activation,
            op.negative_slope)


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("directions", [(), (3,)])
def test_opcheck_structured_product(directions, dtype, device):
    torch.library.opcheck(torch.ops.hypergrad.mlp_ce_hvp.default, _mlp_ce_hvp_args(dtype, device, directions))


@pytest.mark.parametrize("directions", [(), (3,)])
def test_structured_product_fake_gives_the_twins_shape_and_checks_v(directions):
    args = _mlp_ce_hvp_args(torch.float64, "cpu", directions)
    op = next(op for op in _ops.OPS if op.name == "mlp_ce_hvp")
    expected = _reference.mlp_ce_hvp(*args)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake_args = [[mode.from_tensor(t) for t in a] if isinstance(a, list) else
                     mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        out = op.fake(*fake_args)
        assert out.shape == expected.shape and out.dtype == expected.dtype
        with pytest.raises(ValueError, match="entries per direction"):
            op.fake(*fake_args[:6], fake_args[6][..., 1:], *fake_args[7:])


def test_recognised_models():
    assert linear_chain(nn.Linear(4, 3)) is not None
    _, activation, slope = linear_chain(nn.Sequential(nn.Flatten(), nn.Linear(4, 5), nn.LeakyReLU(0.3), nn.Linear(5, 3)))
    assert (activation, slope) == ("leaky_relu", pytest.approx(0.3))
    unsupported = [
        nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3)),
        nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 3)),  # mixed
        nn.Sequential(nn.Linear(4, 5, bias=False), nn.ReLU(), nn.Linear(5, 3)),
        nn.Sequential(nn.Linear(4, 5), nn.ReLU()),  # ends in an activation
        nn.Sequential(nn.Linear(4, 5), nn.GELU(), nn.Linear(5, 3)),
    ]
    for model in unsupported:
        assert linear_chain(model) is None, model


class _Residual(nn.Sequential):
    def forward(self, z):
        return self[2](self[1](self[0](z)) + z)


class _SteepTanh(nn.Tanh):
    def forward(self, z):
        return torch.tanh(2 * z)


def test_a_chain_whose_forward_computes_something_else_is_not_structured():
    """A Sequential subclass with its own forward (a residual connection), an activation subclass, a forward hook:
    each passed as a chain and gave a product 60-140% off autograd's, silently; now they are not chains."""
    torch.manual_seed(0)
    hooked = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3)).double()
    hooked[0].register_forward_hook(lambda module, inputs, output: 2 * output)
    models = [_Residual(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3)).double(),
              nn.Sequential(nn.Linear(4, 4), _SteepTanh(), nn.Linear(4, 3)).double(), hooked]
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    for model in models:
        assert linear_chain(model) is None, model
        params = tuple(model.parameters())
        assert structured_hessian(ClassifierLoss(model, x, y), params) is None  # total_grad's auto: autograd


def test_structured_targets_must_be_one_class_index_per_row():
    """Nine labels for ten rows, or -1 (read as class C-1), passed the structured path, which cross-entropy would
    refuse: one ValueError now."""
    model, x, y = _chain("tanh")
    params = tuple(model.parameters())
    for targets in (y[:-1], torch.cat([y[:-1], torch.tensor([-1])]), torch.cat([y[:-1], torch.tensor([4])])):
        with pytest.raises(ValueError, match="one class index 0 .. 3 per input row"):
            structured_hessian(ClassifierLoss(model, x, targets), params)


def test_a_structured_hessian_refuses_weights_changed_since_it_was_built():
    model, x, y = _chain("relu")
    params = tuple(model.parameters())
    H = structured_hessian(ClassifierLoss(model, x, y), params)
    v = torch.randn(H.n, dtype=torch.float64)
    H.matvec(v)
    with torch.no_grad():
        params[0].add_(0.1)  # an optimizer step
    with pytest.raises(RuntimeError, match="changed in place since this structured Hessian was built"):
        H.matvec(v)
    fresh = structured_hessian(ClassifierLoss(model, x, y), params)
    torch.testing.assert_close(fresh.matvec(v), hypergrad.hessian_operator(ClassifierLoss(model, x, y)(), params).matvec(v))


def test_structured_hessian_declines_what_it_cannot_do():
    model, x, y = _chain("tanh")
    params = tuple(model.parameters())
    assert structured_hessian(lambda: model(x).sum(), params) is None  # not a ClassifierLoss
    assert structured_hessian(ClassifierLoss(model, x, y), params[:-1]) is None  # not every parameter
    assert structured_hessian(ClassifierLoss(model, x, y), params[::-1]) is None  # another order
    assert structured_hessian(ClassifierLoss(model, x, torch.rand(9, 4)), params) is None  # soft targets
    bare = nn.Linear(12, 4).double()
    assert structured_hessian(ClassifierLoss(bare, x, y), tuple(bare.parameters())) is None  # 3-D input


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_direction_is_a_clear_error(backend):
    model, x, y = _chain("relu")
    op = structured_hessian(ClassifierLoss(model, x, y), tuple(model.parameters()))
    with hypergrad.use_extension(backend), pytest.raises(ValueError, match="entries per direction"):
        op._product(torch.zeros(op.n + 1, dtype=torch.float64))
    with hypergrad.use_extension(backend), pytest.raises(ValueError, match="unknown activation"):
        _ops.activation_jvp(x, x, "swish", 0.0)


def _ridge_like_problem(activation):
    """A leader theta (the inputs' offsets) and a follower chain, for total_grad in each hvp mode."""
    model, x, y = _chain(activation, seed=3)
    theta = torch.zeros_like(x, requires_grad=True)
    x_val, y_val = torch.randn_like(x), torch.randint(0, 4, (9,))
    leader = lambda: nn.functional.cross_entropy(model(x_val), y_val)  # noqa: E731
    follower = ClassifierLoss(model, x + theta, y)
    return leader, follower, theta, tuple(model.parameters())


@pytest.mark.parametrize("activation", ["tanh", "leaky_relu"])
def test_total_grad_auto_uses_the_structured_product_and_agrees_with_autograd(activation, monkeypatch):
    leader, follower, theta, w = _ridge_like_problem(activation)
    kwargs = {"method": "minres", "maxiter": 400, "damping": 0.5, "rtol": 1e-12}  # not at a minimum: indefinite H
    reverse = hypergrad.total_grad(leader, follower, theta, w, hvp_mode="reverse", **kwargs)
    calls = []
    monkeypatch.setattr(_ops, "mlp_ce_hvp", lambda *a: calls.append(1) or _reference.mlp_ce_hvp(*a))
    auto = hypergrad.total_grad(leader, follower, theta, w, **kwargs)
    assert calls, "hvp_mode='auto' did not use the structured product"
    torch.testing.assert_close(auto[0], reverse[0], rtol=1e-9, atol=1e-12)


def test_total_grad_structured_mode_refuses_other_models():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3)).double()
    x, y = torch.randn(5, 1, 4, 4, dtype=torch.float64, requires_grad=True), torch.randint(0, 3, (5,))
    follower = ClassifierLoss(model, x, y)
    with pytest.raises(ValueError, match="structured"):
        hypergrad.total_grad(follower, follower, x, tuple(model.parameters()), hvp_mode="structured")
    auto = hypergrad.total_grad(follower, follower, x, tuple(model.parameters()), method="minres", maxiter=5,
                                damping=1.0)
    assert auto[0].shape == x.shape and torch.isfinite(auto[0]).all()


def _parts_problem(seed=4):
    """A tanh chain, 6 fixed clean rows and 3 rows shifted by the leader theta."""
    model, x, y = _chain("tanh", seed=seed)
    theta = torch.zeros(3, 3, 4, dtype=torch.float64, requires_grad=True)
    x_val, y_val = torch.randn_like(x), torch.randint(0, 4, (9,))
    leader = lambda: nn.functional.cross_entropy(model(x_val), y_val)  # noqa: E731
    return model, x[:6], y[:6], x[6:] + 0.0, y[6:], theta, leader


def test_graph_part_is_the_share_of_the_rows_with_a_graph():
    model, x_c, y_c, x_p, y_p, theta, _ = _parts_problem()
    loss = ClassifierLoss(model, (x_c, x_p + theta), (y_c, y_p))
    ce = nn.functional.cross_entropy
    torch.testing.assert_close(loss(), ce(model(torch.cat([x_c, x_p])), torch.cat([y_c, y_p])))
    torch.testing.assert_close(loss.graph_part(), loss() - ce(model(x_c), y_c) * 6 / 9)  # N = 9 rows
    assert ClassifierLoss(model, (x_c, x_p), (y_c, y_p)).graph_part() is None
    single = ClassifierLoss(model, x_c, y_c)
    torch.testing.assert_close(single.graph_part(), single())
    with pytest.raises(ValueError, match="parts"):
        ClassifierLoss(model, (x_c, x_p), y_c)
    # the totals match (9 = 9) but the labels would shift from one part to the next
    with pytest.raises(ValueError, match="part 0 has 6 input rows and 5 targets"):
        ClassifierLoss(model, (x_c, x_p), (y_c[:5], torch.cat([y_c[5:], y_p])))
    with pytest.raises(TypeError, match="targets must be a tensor"):
        ClassifierLoss(model, x_c, [y_c[:3], y_c[3:]])


def test_total_grad_through_parts_equals_the_whole_batch_and_autograd():
    model, x_c, y_c, x_p, y_p, theta, leader = _parts_problem()
    w = tuple(model.parameters())
    kwargs = {"method": "minres", "maxiter": 60, "rtol": 1e-12, "damping": 0.3}
    parts = hypergrad.total_grad(leader, ClassifierLoss(model, (x_c, x_p + theta), (y_c, y_p)), theta, w, **kwargs)
    whole = hypergrad.total_grad(leader, ClassifierLoss(model, torch.cat([x_c, x_p + theta]), torch.cat([y_c, y_p])),
                                 theta, w, **kwargs)
    reverse = hypergrad.total_grad(leader, ClassifierLoss(model, (x_c, x_p + theta), (y_c, y_p)), theta, w,
                                   hvp_mode="reverse", **kwargs)
    assert parts[0].abs().max() > 0
    torch.testing.assert_close(parts[0], whole[0], rtol=1e-10, atol=1e-13)
    # autograd's products round differently; 60 MINRES iterations carry that to 5e-10 of the norm
    assert ((parts[0] - reverse[0]).norm() / reverse[0].norm()).item() < 1e-8
    fixed = hypergrad.total_grad(leader, ClassifierLoss(model, (x_c, x_p), (y_c, y_p)), theta, w, **kwargs)
    assert torch.equal(fixed[0], torch.zeros_like(theta))  # nothing depends on theta: no mixed term


def test_int32_targets_and_a_generator_of_parameters_are_taken():
    model, x, y = _chain("tanh")
    loss = ClassifierLoss(model, x, y.int())
    assert loss.targets.dtype == torch.int64 and torch.isfinite(loss())
    assert structured_hessian(loss, model.parameters()) is not None  # a generator: a TypeError before
    model, x_c, y_c, x_p, y_p, theta, _ = _parts_problem()  # in parts too: graph_part read the int32 parts
    as_int = ClassifierLoss(model, (x_c, x_p + theta), (y_c.int(), y_p.int()))
    torch.testing.assert_close(as_int.graph_part(), ClassifierLoss(model, (x_c, x_p + theta), (y_c, y_p)).graph_part())


def test_forward_mode_with_a_classifier_loss_says_what_to_use():
    model, x, y = _chain("tanh")
    theta = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="a ClassifierLoss takes none"):
        hypergrad.total_grad(lambda: (theta * 0).sum() + model(x).sum(), ClassifierLoss(model, x, y), theta,
                             list(model.parameters()), hvp_mode="forward")
