"""Hessian-vector products of a scalar loss, as reusable operators on flat vectors.

Two modes compute the same H v:
  * "reverse" (reverse-over-reverse): the gradient g = dL/dw is built once with create_graph=True;
    each product is one backward pass through g (the graph is reused, nothing is recomputed).
    This is the mode total_grad uses: the same graph also yields the mixed term of the total
    derivative (Lu, Kamath & Yu, TMLR 2022, eq. 15-17).
  * "forward" (forward-over-reverse, torch.func): H v = jvp(grad L, (w,), (v,)); it needs the loss
    as a function of the parameters, loss_fn(*params).

Batched products (v of shape [B, n]) run as one vectorised backward (is_grads_batched / vmap)
where the model's operations allow it and fall back to a loop over the rows otherwise.
"""
import functools
import inspect
import warnings

import torch

MODES = ("reverse", "forward")


@functools.cache
def _forward_mode_loaded():
    """Loads forward-mode autodiff's decompositions once, without the FutureWarning torch itself gives then: torch
    (2.14) compiles them with its deprecated torch.jit.script at a process's first jvp, and the warning, about
    torch's code, reached our users as theirs (one jvp of a scalar, under a filter of that one message)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
        torch.func.jvp(torch.sin, (torch.zeros(()),), (torch.ones(()),))
    return True


def jvp(fn, primals, tangents):
    """torch.func.jvp(fn, primals, tangents), forward-mode autodiff (its first call loads torch's decompositions
    without their FutureWarning: _forward_mode_loaded)."""
    _forward_mode_loaded()
    return torch.func.jvp(fn, primals, tangents)


def as_tuple(params, what="params"):
    """A tensor or a sequence of tensors as a tuple; raises a clear error for anything else."""
    if isinstance(params, torch.Tensor):
        return (params,)
    if isinstance(params, dict):  # iterating would give the names
        raise TypeError(f"{what} must be a tensor or a sequence of tensors, got a dict: pass list(d.values()) "
                        "(e.g. list(model.parameters()))")
    try:
        params = tuple(params)
    except TypeError:
        raise TypeError(f"{what} must be a tensor or a sequence of tensors, got {type(params).__name__}") from None
    if not params or not all(isinstance(p, torch.Tensor) for p in params):
        raise TypeError(f"{what} must be a non-empty sequence of tensors")
    return params


def flatten(tensors, batched=False):
    """Concatenates tensors into one flat vector [n], or [B, n] when batched (leading dim B kept)."""
    if batched:
        return torch.cat([t.reshape(t.shape[0], -1) for t in tensors], dim=1)
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(flat, like):
    """Splits a flat vector [n] (or [B, n]) into tensors shaped like `like` (with a leading B)."""
    sizes = [p.numel() for p in like]
    lead = flat.shape[:-1]
    return tuple(chunk.reshape((*lead, *p.shape)) for chunk, p in zip(flat.split(sizes, dim=-1), like))  # p 0-d too


def _zeros_for_unused(grads, params):
    return tuple(torch.zeros_like(p) if g is None else g for g, p in zip(grads, params))


class HessianOperator:
    """v -> H v for the Hessian of a scalar loss w.r.t. params, on flat vectors [n] or [B, n].

    Build it with `HessianOperator.reverse(loss, params)` (or `.from_gradient(grads, params)` when
    the gradient graph exists already) or `HessianOperator.forward(loss_fn, params)`. Calling the
    operator (or `.matvec`) on v returns H v of the same shape as v; v must have the parameters' dtype.
    """

    def __init__(self, params, product):
        self.params = params
        self.n = sum(p.numel() for p in params)
        self.dtype = params[0].dtype
        self.device = params[0].device
        self._product = product

    @classmethod
    def from_gradient(cls, grads, params, *, constant_ok=False):
        """Reverse-over-reverse operator on an existing gradient graph (create_graph=True). `constant_ok`: a
        gradient tensor without a graph is constant (the loss is linear in those parameters: its rows of H are
        zero), not a gradient taken without create_graph."""
        grads, params = as_tuple(grads, "grads"), as_tuple(params)
        live = [i for i, g in enumerate(grads) if g.requires_grad]
        if len(live) < len(grads) and not constant_ok:
            raise ValueError("the gradient has no graph: compute it with torch.autograd.grad(..., create_graph=True)")
        batching = {"vectorised": True}

        def product(v):
            batched = v.dim() == 2
            outs = unflatten(v, params)
            if not live:  # H = 0
                return torch.zeros_like(v)
            live_grads, live_outs = [grads[i] for i in live], [outs[i] for i in live]
            if batched and batching["vectorised"]:
                try:
                    hv = torch.autograd.grad(live_grads, params, live_outs, retain_graph=True, allow_unused=True,
                                             is_grads_batched=True)
                    return flatten(_zeros_for_unused_batched(hv, params, v.shape[0]), batched=True)
                except RuntimeError:
                    batching["vectorised"] = False  # an op without a batching rule: loop instead
            if batched:
                return torch.stack([product(row) for row in v])
            hv = torch.autograd.grad(live_grads, params, live_outs, retain_graph=True, allow_unused=True)
            return flatten(_zeros_for_unused(hv, params))

        return cls(params, product)

    @classmethod
    def reverse(cls, loss, params):
        """Reverse-over-reverse operator of the scalar tensor `loss` (its graph must reach params)."""
        params = as_tuple(params)
        _check_scalar_loss(loss)
        frozen = [f"params[{i}] (shape {list(p.shape)})" for i, p in enumerate(params) if not p.requires_grad]
        if frozen:
            raise ValueError(f"{', '.join(frozen)} does not require grad: reverse mode differentiates the loss by every "
                             "tensor of params; leave frozen ones out of params, or set requires_grad_(True)")
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        if any(g is None for g in grads):
            raise ValueError("the loss does not depend on every tensor in params")
        return cls.from_gradient(grads, params, constant_ok=True)  # a loss linear in a tensor: its rows of H are 0

    @classmethod
    def forward(cls, loss_fn, params):
        """Forward-over-reverse operator of loss_fn(*params) (torch.func.jvp of torch.func.grad)."""
        params = as_tuple(params)
        if not callable(loss_fn):
            raise TypeError("forward mode needs the loss as a function of the parameters: loss_fn(*params)")
        check_takes_params(loss_fn, len(params), "loss_fn")
        _forward_mode_loaded()
        primals = tuple(p.detach() for p in params)
        _check_reads_its_arguments(loss_fn, primals)
        argnums = tuple(range(len(params)))
        grad_fn = torch.func.grad(loss_fn, argnums=argnums)

        def single(v):
            return flatten(torch.func.jvp(lambda *w: grad_fn(*w), primals, unflatten(v, params))[1])

        def product(v):
            return torch.func.vmap(single)(v) if v.dim() == 2 else single(v)

        return cls(params, product)

    def matvec(self, v):
        """H v for v of shape [n] or [B, n] (n = total number of parameter entries)."""
        if v.dim() not in (1, 2) or v.shape[-1] != self.n:
            raise ValueError(f"v must have shape [{self.n}] or [B, {self.n}] (n = number of parameter "
                             f"entries), got {list(v.shape)}")
        if v.dtype != self.dtype:  # a cast would compute a float64 v's product in float32 without a word
            raise ValueError(f"v is {v.dtype} but the parameters are {self.dtype}: pass v in {self.dtype}, or make the "
                             f"parameters {v.dtype} for a product in that precision")
        return self._product(v)

    __call__ = matvec


def check_takes_params(loss_fn, count, name):
    """TypeError unless loss_fn can be called with `count` positional tensors (forward mode calls it as
    loss_fn(*params)); a callable whose signature Python cannot read is let through."""
    try:
        signature = inspect.signature(loss_fn)
    except (TypeError, ValueError):
        return
    try:
        signature.bind(*range(count))
    except TypeError:
        raise TypeError(f"forward mode calls {name}(*params) with the {count} parameter tensor(s), but {name} takes "
                        f"{signature}: write it as a function of them (e.g. lambda *w: loss at w through "
                        "torch.func.functional_call), or use the reverse mode, which calls it with no arguments") from None


def _check_reads_its_arguments(loss_fn, primals):
    """ValueError unless loss_fn(*primals) depends on every tensor passed to it. Forward mode differentiates the
    loss w.r.t. the tensors it is called with: one computed from a module's own parameters (loss_fn ignoring its
    arguments) has, to torch.func, a zero gradient, and every product came back 0 without a word. One evaluation
    with a backward pass, when the operator is built."""
    leaves = tuple(p.detach().requires_grad_(True) for p in primals)
    with torch.enable_grad():
        loss = loss_fn(*leaves)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError("loss_fn(*params) must return a scalar tensor (one element)")
        grads = torch.autograd.grad(loss, leaves, allow_unused=True) if loss.requires_grad else (None,) * len(leaves)
    unused = [i for i, g in enumerate(grads) if g is None]
    if unused:
        raise ValueError(f"loss_fn(*params) does not depend on the tensor(s) at position {unused} of params: forward "
                         "mode differentiates the loss w.r.t. the tensors it is called with, so compute it from them "
                         "(e.g. torch.func.functional_call(model, dict(zip(names, params)), x)), not from a module's "
                         "own parameters")


def _zeros_for_unused_batched(grads, params, batch):
    return tuple(p.new_zeros((batch, *p.shape)) if g is None else g for g, p in zip(grads, params))


def _check_scalar_loss(loss):
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError("loss must be a scalar tensor (one element)")
    if not loss.requires_grad:
        raise ValueError("loss has no graph: compute it from parameters that require grad")


def hvp(loss, params, v, *, mode="reverse"):
    """Hessian of the scalar `loss` w.r.t. `params` times v.

    Args:
        loss: a scalar tensor whose graph reaches params (mode "reverse"), or a callable
            loss(*params) returning one (either mode).
        params: a tensor or a sequence of tensors.
        v: shaped like params (a tensor, or a sequence matching params), or batched with a
            leading dimension B on every tensor.
        mode: "reverse" (reverse-over-reverse) or "forward" (forward-over-reverse). (default: "reverse")

    Returns:
        H v in the structure of v: a tensor when params is a tensor, else a tuple.

    Examples:
        >>> w = torch.randn(3, requires_grad=True)
        >>> hvp((w ** 3).sum(), w, torch.ones(3))  # 6 w
    """
    single_tensor = isinstance(params, torch.Tensor)
    params = as_tuple(params)
    vs = as_tuple(v, "v")
    if len(vs) != len(params):
        raise ValueError(f"v has {len(vs)} tensors but params has {len(params)}")
    batched = vs[0].dim() == params[0].dim() + 1
    for vi, p in zip(vs, params):
        expected = p.shape if not batched else (vs[0].shape[0], *p.shape)
        if tuple(vi.shape) != tuple(expected):
            raise ValueError(f"v must be shaped like params (or with one leading batch dimension): "
                             f"expected {list(expected)}, got {list(vi.shape)}")
    op = hessian_operator(loss, params, mode=mode)
    out = unflatten(op.matvec(flatten(vs, batched=batched)), params)
    return out[0] if single_tensor else out


def hessian_operator(loss, params, *, mode="reverse"):
    """The HessianOperator of `loss` w.r.t. params in the given mode (see `hvp` for the arguments)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    params = as_tuple(params)
    if mode == "forward":
        return HessianOperator.forward(loss, params)
    if callable(loss):
        loss = loss(*params)
    return HessianOperator.reverse(loss, params)
