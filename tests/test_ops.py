"""The fused solver ops of hypergrad._C against their pure-PyTorch twins and torch.library.opcheck."""
import inspect
import os

import pytest
import torch

import hypergrad
from hypergrad import _ops, _reference
from testing import DEVICES, DTYPES, needs_extension, tol

SHAPES = [(1,), (7,), (1001,), (100_003,), (3, 1), (4, 1001), (2, 70_001), (0, 5),  # (0, 5): no rows (CUDA: a division by 0)
          (66_000, 3)]  # more rows than a CUDA grid has in y (65,535): taken in turn by the same blocks


def _make(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = shape[:-1]
    vecs = [torch.randn(shape, generator=g, dtype=dtype).to(device) for _ in range(4)]
    num = torch.rand(rows, generator=g, dtype=torch.float64).to(device) + 0.5
    den = torch.rand(rows, generator=g, dtype=torch.float64).to(device) + 0.5
    active = (torch.rand(rows, generator=g) > 0.3).to(device)
    return vecs, num, den, active


def _closed_form(x, r, p, q, num, den, active):
    """The CG step written out in float64: the independent oracle of both implementations."""
    alpha = torch.where(active & (den > 0), num / den, torch.zeros_like(num)).unsqueeze(-1)
    x2 = x.double() + alpha * p.double()
    r2 = r.double() - alpha * q.double()
    return x2, r2, (r2 * r2).sum(-1)


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_row_dot_matches_float64_sum(shape, dtype, device):
    (a, b, _, _), *_ = _make(shape, dtype, device)
    expected = (a.double() * b.double()).sum(-1)
    kernel = torch.ops.hypergrad.row_dot(a, b)
    assert kernel.dtype == torch.float64 and kernel.shape == expected.shape
    torch.testing.assert_close(kernel, expected, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(_reference.row_dot(a, b), expected, rtol=1e-12, atol=1e-10)


def test_row_dot_accumulates_float32_in_float64():
    # 2^24 + n ones: a float32 accumulator stalls at 2^24, a float64 one does not.
    n = 1 << 12
    a = torch.ones(n, dtype=torch.float32)
    a[0] = 2.0 ** 12  # a[0]^2 = 2^24
    b = a.clone()
    expected = 2.0 ** 24 + (n - 1)
    assert _ops.row_dot(a, b).item() == expected
    assert _reference.row_dot(a, b).item() == expected


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_cg_step_matches_closed_form_and_twin(shape, dtype, device):
    (x, r, p, q), num, den, active = _make(shape, dtype, device)
    if len(shape) == 2 and shape[0]:
        den[0] = -1.0  # a row with non-positive curvature must not move
    x_ref, r_ref, rr_ref = _closed_form(x, r, p, q, num, den, active)
    xk, rk = x.clone(), r.clone()
    rr = torch.ops.hypergrad.cg_step(xk, rk, p, q, num, den, active)
    xt, rt = x.clone(), r.clone()
    rr_twin = _reference.cg_step(xt, rt, p, q, num, den, active)
    for got_x, got_r, got_rr in ((xk, rk, rr), (xt, rt, rr_twin)):
        torch.testing.assert_close(got_x.double(), x_ref, **tol(dtype))
        torch.testing.assert_close(got_r.double(), r_ref, **tol(dtype))
        torch.testing.assert_close(got_rr, (got_r.double() ** 2).sum(-1), rtol=1e-12, atol=1e-10)
        torch.testing.assert_close(got_rr, rr_ref, rtol=1e-4 if dtype == torch.float32 else 1e-10, atol=1e-8)
    inactive = ~(active & (den > 0))
    assert torch.equal(xk[inactive], x[inactive]) and torch.equal(rk[inactive], r[inactive])


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_cg_direction_matches_closed_form_and_twin(shape, dtype, device):
    (p, z, _, _), num_new, num_old, active = _make(shape, dtype, device)
    if len(shape) == 2 and shape[0]:
        num_old[-1] = 0.0  # beta defined as 0
    beta = torch.where(num_old != 0, num_new / num_old, torch.zeros_like(num_new)).unsqueeze(-1)
    expected = torch.where(active.unsqueeze(-1), z.double() + beta * p.double(), p.double())
    pk, pt = p.clone(), p.clone()
    torch.ops.hypergrad.cg_direction(pk, z, num_new, num_old, active)
    _reference.cg_direction(pt, z, num_new, num_old, active)
    torch.testing.assert_close(pk.double(), expected, **tol(dtype))
    torch.testing.assert_close(pt.double(), expected, **tol(dtype))


def _track_inputs(rows, device, seed=0):
    """den covering > 0, = 0, < 0 and nan; rr on both sides of tol2; every flag combination."""
    g = torch.Generator().manual_seed(seed)
    n = max(1, int(torch.tensor(rows).prod()))
    den = torch.tensor([1.0, 0.0, -2.0, float("nan"), 3.0, 0.5] * n, dtype=torch.float64)[:n].reshape(rows)
    rr = torch.rand(rows, generator=g, dtype=torch.float64)
    tol2 = torch.full(rows, 0.5, dtype=torch.float64)
    active = torch.rand(rows, generator=g) > 0.25
    iterations = torch.randint(0, 9, rows, generator=g)
    negative = torch.rand(rows, generator=g) > 0.8
    return [t.to(device) for t in (den, rr, tol2, active, iterations, negative)]


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows", [(), (1,), (40,)])
def test_cg_track_matches_the_rule_and_twin(rows, device):
    den, rr, tol2, active, iterations, negative = _track_inputs(rows, device)
    stepping = active & (den > 0)  # the rule written out: the oracle of both implementations
    expected = (stepping & (rr > tol2), iterations + stepping.long(), negative | (active & (den <= 0)))
    for op in (torch.ops.hypergrad.cg_track, _reference.cg_track):
        state = [active.clone(), iterations.clone(), negative.clone()]
        op(den, rr, tol2, *state)
        for got, want in zip(state, expected):
            assert torch.equal(got, want)


@pytest.mark.parametrize("backend", ["extension", "reference"])
def test_cg_track_bad_input_raises_clear_value_error(backend):
    if backend == "extension" and not hypergrad.has_extension():
        pytest.skip("hypergrad._C is not built")
    op = torch.ops.hypergrad.cg_track if backend == "extension" else _reference.cg_track
    den, rr, tol2, active, iterations, negative = _track_inputs((4,), "cpu")
    with pytest.raises(ValueError, match="iterations must be"):
        op(den, rr, tol2, active, iterations.int(), negative)
    with pytest.raises(ValueError, match="one value per row"):
        op(den, rr[:3], tol2, active, iterations, negative)
    with pytest.raises(ValueError, match="den must be"):
        op(den.float(), rr, tol2, active, iterations, negative)


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5,), (3, 17)])
def test_opcheck(shape, dtype, device):
    (x, r, p, q), num, den, active = _make(shape, dtype, device)
    torch.library.opcheck(torch.ops.hypergrad.row_dot.default, (x, r))
    torch.library.opcheck(torch.ops.hypergrad.cg_step.default, (x.clone(), r.clone(), p, q, num, den, active))
    torch.library.opcheck(torch.ops.hypergrad.cg_direction.default, (p.clone(), q, num, den, active))
    track = _track_inputs(shape[:-1], device)
    torch.library.opcheck(torch.ops.hypergrad.cg_track.default, (*track[:3], *(t.clone() for t in track[3:])))


def _bad_inputs(device):
    x = torch.randn(4, 10, device=device)
    rows = torch.ones(4, dtype=torch.float64, device=device)
    mask = torch.ones(4, dtype=torch.bool, device=device)
    cases = {
        "shape": ((x, torch.randn(4, 11, device=device)), "shape"),
        "rank": ((torch.randn(2, 2, 2, device=device), torch.randn(2, 2, 2, device=device)), r"\[n\]"),
        "dtype": ((x, x.double()), "one dtype"),
        "int dtype": ((x.int(), x.int()), "float32 or float64"),
        "non-contiguous": ((torch.randn(10, 4, device=device).t(), x), "contiguous"),
    }
    step_cases = {
        "scalar dtype": ((x.clone(), x.clone(), x, x, rows.float(), rows, mask), "num must be"),
        "scalar shape": ((x.clone(), x.clone(), x, x, rows[:3], rows, mask), "one value per row"),
        "mask dtype": ((x.clone(), x.clone(), x, x, rows, rows, rows), "active must be"),
    }
    return cases, step_cases


@pytest.mark.parametrize("device", DEVICES)  # on CUDA too: a shape in an error message once crashed there (issue 12)
@pytest.mark.parametrize("backend", ["extension", "reference"])
def test_bad_input_raises_clear_value_error(backend, device):
    if backend == "extension" and not hypergrad.has_extension():
        pytest.skip("hypergrad._C is not built")
    row_dot = torch.ops.hypergrad.row_dot if backend == "extension" else _reference.row_dot
    cg_step = torch.ops.hypergrad.cg_step if backend == "extension" else _reference.cg_step
    cases, step_cases = _bad_inputs(device)
    for args, message in cases.values():
        with pytest.raises(ValueError, match=message):
            row_dot(*args)
    for args, message in step_cases.values():
        with pytest.raises(ValueError, match=message):
            cg_step(*args)


@pytest.mark.cuda
@needs_extension
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mixed_devices_raise_clear_value_error():
    a = torch.randn(10, device="cuda")
    with pytest.raises(ValueError, match="device"):
        torch.ops.hypergrad.row_dot(a, a.cpu())
    with pytest.raises(ValueError, match="device"):
        _reference.row_dot(a, a.cpu())


def test_routing_follows_use_extension():
    a = torch.randn(3, 5)
    with hypergrad.use_extension(False):
        assert not hypergrad.has_extension()
        torch.testing.assert_close(_ops.row_dot(a, a), (a.double() ** 2).sum(-1))
    disabled = _ops._disabled_by_environment(os.environ)
    assert hypergrad.has_extension() == (hypergrad.build_info()["extension_loaded"] and not disabled)


@pytest.mark.parametrize("value, disabled", [("1", True), ("TRUE", True), ("on", True), ("yes", True), ("0", False),
                                             ("Off", False), ("", False), ("maybe", None)])
def test_the_disable_switch_reads_as_the_build_switches_do(value, disabled):
    if disabled is None:  # not a yes/no: a warning, the kernels stay on
        with pytest.warns(RuntimeWarning, match="HYPERGRAD_DISABLE_EXTENSION"):
            assert _ops._disabled_by_environment({"HYPERGRAD_DISABLE_EXTENSION": value}) is False
    else:
        assert _ops._disabled_by_environment({"HYPERGRAD_DISABLE_EXTENSION": value}) is disabled
    assert _ops._disabled_by_environment({}) is False


@pytest.mark.skipif(os.environ.get("HYPERGRAD_REQUIRE_EXTENSION") != "1", reason="HYPERGRAD_REQUIRE_EXTENSION is not set")
def test_required_extension_is_loaded():
    info = hypergrad.build_info()
    assert info["extension_loaded"] and hypergrad.has_extension(), info
    from hypergrad._toolchain import build_switches
    if build_switches(os.environ)[0]:
        assert info["cuda_kernels"], "HYPERGRAD_FORCE_CUDA=1 was set but the CUDA kernels were not compiled in"


def _valid_args(name):
    """Valid arguments of each op of the registration table (the structured product's are in test_mlp_hvp)."""
    (x, r, p, q), num, den, active = _make((3, 17), torch.float64, "cpu")
    z = torch.randn(5, 6, dtype=torch.float64)
    rz = torch.randn(2, 5, 6, dtype=torch.float64)
    return {
        "row_dot": (x, r),
        "cg_step": (x, r, p, q, num, den, active),
        "cg_direction": (p, q, num, den, active),
        "cg_track": tuple(_track_inputs((4,), "cpu")),
        "activation_jvp": (z, rz, "tanh", 0.0),
        "activation_hvp_backward": (z, rz, torch.randn_like(z), torch.randn_like(rz), "leaky_relu", 0.2),
        "softmax_ce_hvp": (torch.softmax(z, 1), rz, 0.5),
    }[name]


TABLE = [op for op in _ops.OPS if op.name != "mlp_ce_hvp"]


@pytest.mark.parametrize("op", TABLE, ids=lambda op: op.name)
def test_each_fake_gives_the_twins_output_shapes_and_dtypes(op):
    """The fakes stand in for the kernels under torch.compile: the same outputs as the twin, the
    same in-place behaviour (None), computed without touching data."""
    args = _valid_args(op.name)
    expected = op.twin(*[a.clone() if isinstance(a, torch.Tensor) else a for a in args])
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        out = op.fake(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
    if expected is None:
        assert out is None
    else:
        assert out.shape == expected.shape and out.dtype == expected.dtype


@pytest.mark.parametrize("op", TABLE, ids=lambda op: op.name)
def test_each_fake_rejects_a_mismatched_second_argument(op):
    args = list(_valid_args(op.name))
    args[1] = args[1][..., :-1] if args[1].dim() else args[1].reshape(1)  # one entry short, or a row too many
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        with pytest.raises(ValueError, match=f"hypergrad::{op.name}"):
            op.fake(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])


@pytest.mark.parametrize("op", _ops.OPS, ids=lambda op: op.name)
def test_every_router_has_its_twins_signature_and_runs_it_without_the_extension(op):
    router = getattr(_ops, op.name)
    assert inspect.signature(router) == inspect.signature(op.twin) and router.__name__ == op.name
    if op.name == "mlp_ce_hvp":
        return  # routed through the twin and the kernel in test_mlp_hvp
    args = _valid_args(op.name)
    with hypergrad.use_extension(False):
        got = router(*[a.clone() if isinstance(a, torch.Tensor) else a for a in args])
    want = op.twin(*[a.clone() if isinstance(a, torch.Tensor) else a for a in args])
    assert (got is None and want is None) or torch.equal(got, want)
    assert hypergrad.build_info()["ops"] == [op.name for op in _ops.OPS]


@pytest.mark.parametrize("backend", ["extension", "reference"])
def test_routers_take_keywords_and_the_twins_defaults(backend):
    if backend == "extension" and not hypergrad.has_extension():
        pytest.skip("hypergrad._C is not built")
    z, rz = torch.randn(5, 6, dtype=torch.float64), torch.randn(2, 5, 6, dtype=torch.float64)
    expected = _reference.activation_jvp(z, rz, "leaky_relu", 0.0)
    with hypergrad.use_extension(backend == "extension"):
        torch.testing.assert_close(_ops.activation_jvp(z, rz, "leaky_relu"), expected)  # negative_slope=0.0
        torch.testing.assert_close(_ops.activation_jvp(z, rz=rz, activation="leaky_relu", negative_slope=0.0), expected)


def test_the_activation_fakes_check_the_activation_and_dtypes():
    args = _valid_args("activation_hvp_backward")
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        z, rz, grad_a, r_grad_a = (mode.from_tensor(a) for a in args[:4])
        fake = next(op.fake for op in _ops.OPS if op.name == "activation_hvp_backward")
        with pytest.raises(ValueError, match="unknown activation 'swish'"):
            fake(z, rz, grad_a, r_grad_a, "swish", 0.0)
        with pytest.raises(ValueError, match="float64"):
            fake(z, rz, grad_a, r_grad_a.float(), "tanh", 0.0)


def test_a_cuda_major_mismatch_turns_the_cuda_kernels_off_with_a_rebuild_message(monkeypatch):
    assert _ops.cuda_major_mismatch("13.0", "13.2") is None
    assert _ops.cuda_major_mismatch("", "13.0") is None  # a CPU-only build
    assert _ops.cuda_major_mismatch("12.8", None) is None  # a CPU build of torch: no CUDA tensors to serve
    message = _ops.cuda_major_mismatch("12.8", "13.0")
    assert "CUDA 12.8" in message and "CUDA 13.0" in message and "pip install" in message
    monkeypatch.setattr(_ops, "CUDA_MISMATCH", message)  # what import sets when the majors differ
    assert not hypergrad.has_cuda_extension()
    assert hypergrad.build_info()["cuda_kernels_off"] == message


def test_a_gpu_the_kernels_have_no_image_for_takes_the_twins_with_one_warning(monkeypatch):
    """A library built for 8.0 / 9.0 (no GPU at build time) on a T4: CUDA's answer for the device, asked once, routes its
    tensors to the twins with a rebuild message instead of failing at the first launch. The library, the device and
    CUDA's answer are stand-ins here (the real query, cudaFuncGetAttributes, runs in the GPU check)."""
    import types
    import warnings
    asked = []

    def problem(index):
        asked.append(index)
        return {0: "", 1: "no kernel image is available for execution on the device"}[index]
    monkeypatch.setattr(_ops, "_C", types.SimpleNamespace(cuda_kernel_problem=problem))
    monkeypatch.setattr(_ops, "_device_problems", {})
    monkeypatch.setattr(_ops, "has_extension", lambda: True)
    monkeypatch.setattr(_ops, "has_cuda_extension", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: "Tesla T4")
    on = lambda index: types.SimpleNamespace(device=torch.device("cuda", index))  # noqa: E731
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _ops._kernel_for(on(0)) and not _ops._kernel_for(on(1)) and not _ops._kernel_for(on(1))
    assert asked == [0, 1]  # once a device
    assert len(caught) == 1 and "Tesla T4 (compute capability 7.5)" in str(caught[0].message)
    assert "TORCH_CUDA_ARCH_LIST=7.5" in str(caught[0].message) and "twins" in str(caught[0].message)
    assert _ops._kernel_for(types.SimpleNamespace(device=torch.device("cpu")))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # inside a trace: the answers kept, no new query
    assert not _ops._kernel_for(on(1)) and _ops._kernel_for(on(0)) and _ops._kernel_for(on(2)) and asked == [0, 1]


def test_the_build_switches_have_one_name_each_and_the_old_one_still_works(monkeypatch):
    from hypergrad._toolchain import build_switches
    assert build_switches({}) == (False, False, [])
    monkeypatch.delenv("HYPERGRAD_FORCE_CPU", raising=False)  # os.environ itself, as setup.py passes it
    monkeypatch.setenv("HYPERGRAD_FORCE_CUDA", "0")
    assert build_switches(os.environ) == (False, False, [])
    assert build_switches({"HYPERGRAD_FORCE_CUDA": "1"})[:2] == (True, False)
    force_cuda, force_cpu, notes = build_switches({"FORCE_CUDA": "1"})
    assert (force_cuda, force_cpu) == (True, False) and "HYPERGRAD_FORCE_CUDA" in notes[0]
    assert build_switches({"HYPERGRAD_FORCE_CPU": "yes"})[:2] == (False, True)
    force_cuda, force_cpu, notes = build_switches({"FORCE_CUDA": "1", "HYPERGRAD_FORCE_CPU": "1"})
    assert (force_cuda, force_cpu) == (False, True) and "HYPERGRAD_FORCE_CPU wins" in notes[-1]
    with pytest.raises(ValueError, match="HYPERGRAD_FORCE_CUDA"):
        build_switches({"HYPERGRAD_FORCE_CUDA": "maybe"})


def test_every_build_switch_reads_yes_no_the_same_way():
    from hypergrad._toolchain import switch
    assert switch({}, "HYPERGRAD_SKIP_COMPILER_PROBE") is False
    assert switch({"HYPERGRAD_SKIP_COMPILER_PROBE": " On "}, "HYPERGRAD_SKIP_COMPILER_PROBE") is True
    assert switch({"HYPERGRAD_SKIP_COMPILER_PROBE": "no"}, "HYPERGRAD_SKIP_COMPILER_PROBE") is False
    with pytest.raises(ValueError, match="HYPERGRAD_SKIP_COMPILER_PROBE='2'"):
        switch({"HYPERGRAD_SKIP_COMPILER_PROBE": "2"}, "HYPERGRAD_SKIP_COMPILER_PROBE")
    with pytest.raises(ValueError, match="FORCE_CUDA='maybe': HYPERGRAD_FORCE_CUDA takes"):
        switch({"FORCE_CUDA": "maybe"}, "FORCE_CUDA", read_as="HYPERGRAD_FORCE_CUDA")


def test_build_info_says_when_the_extension_is_not_built():
    import importlib.util
    if importlib.util.find_spec("hypergrad._C") is not None:
        pytest.skip("the extension is built here")
    info = hypergrad.build_info()
    assert info["extension_loaded"] is False  # it read "most likely due to a circular import"
    assert info["extension_error"].startswith("hypergrad._C is not built (pip install . builds it")
