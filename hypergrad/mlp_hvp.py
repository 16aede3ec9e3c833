"""Structured Hessian-vector products for classifiers that are chains of linear layers and one
pointwise activation under the mean softmax cross-entropy: the logistic-regression and
fully connected defenders of Lu, Kamath & Yu (TMLR 2022), whose Hessian H_ww the total derivative
(eq. 15-17) inverts.

`ClassifierLoss(model, inputs, targets)` is a follower loss that says what it computes. When its
model is such a chain, `structured_hessian` builds a HessianOperator that runs Pearlmutter's
R-operator in one op of the extension (csrc/mlp_hvp.cpp; the twin in hypergrad/_reference.py) for
a batch of directions at once, reusing one forward and backward pass for every product of a
solve instead of differentiating the gradient graph again for each. `total_grad` picks it
automatically (hvp_mode="auto") and falls back to autograd for any other model.

Recognised models: nn.Linear (with bias), or nn.Sequential of an optional leading nn.Flatten,
then Linear, activation, Linear, ..., Linear, one activation kind throughout: nn.ReLU,
nn.LeakyReLU, nn.Tanh, nn.Sigmoid or nn.Identity.
"""
import torch
import torch.nn.functional as F
from torch import nn

from . import _ops
from .hvp import HessianOperator


class ClassifierLoss:
    """f = mean cross-entropy of model(inputs) against the class indices `targets`, callable with no
    arguments. The inputs may carry a graph to other parameters (the poisons to the attacker's).

    inputs and targets may also be sequences of parts, concatenated in order, e.g. (clean points,
    poisons) and their labels. Then `graph_part()` is the share of f from the parts that carry a
    graph, the only rows through which f can depend on a leader: with the structured product,
    total_grad differentiates the mixed term through those rows alone.
    """

    def __init__(self, model, inputs, targets):
        self.parts = None
        if isinstance(inputs, (list, tuple)):
            if not isinstance(targets, (list, tuple)) or len(targets) != len(inputs) or not inputs:
                raise ValueError("inputs given as a sequence of parts need targets as a sequence of as many parts")
            for i, (x, y) in enumerate(zip(inputs, targets)):
                if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
                    raise TypeError(f"part {i} of inputs and targets must be tensors, got {type(x).__name__} and "
                                    f"{type(y).__name__}")
                if x.dim() == 0 or y.dim() == 0 or len(x) != len(y):  # the totals alone would let labels shift parts
                    raise ValueError(f"part {i} has {len(x) if x.dim() else 'no'} input rows and "
                                     f"{len(y) if y.dim() else 'no'} targets: every part needs one target a row")
            self.parts = list(zip(inputs, targets))
            inputs, targets = torch.cat(list(inputs)), torch.cat(list(targets))
        elif not isinstance(targets, torch.Tensor):
            raise TypeError(f"targets must be a tensor of class indices (or a sequence of parts when inputs is one), "
                            f"got {type(targets).__name__}")
        if isinstance(targets, torch.Tensor) and targets.dtype in (torch.int32, torch.int16, torch.int8, torch.uint8):
            targets = targets.long()  # cross-entropy reads int64 class indices (int32 ones: "expected Long")
        self.model, self.inputs, self.targets = model, inputs, targets

    def __call__(self):
        return F.cross_entropy(self.model(self.inputs), self.targets)

    def graph_part(self):
        """(1/N) times the summed cross-entropy of the rows of the parts that require grad (N: all rows),
        so f minus it cannot depend on any leader; f itself when the inputs are one tensor; None when
        no part requires grad."""
        if self.parts is None:
            return self()
        parts = [(x, y) for x, y in self.parts if x.requires_grad]
        if not parts:
            return None
        x, y = torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts]).to(self.targets.dtype)
        return F.cross_entropy(self.model(x), y, reduction="sum") / len(self.targets)


# The activation modules by their exact type: a subclass may compute anything in its forward (tanh(2x) as a Tanh)
_ACTIVATIONS = {nn.ReLU: "relu", nn.LeakyReLU: "leaky_relu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid",
                nn.Identity: "identity"}


def _activation_of(module):
    kind = _ACTIVATIONS.get(type(module))
    if kind is None:
        return None
    return kind, float(module.negative_slope) if kind == "leaky_relu" else 0.0


def _hooked(model):
    """Whether a forward hook (the model's, a layer's or a global one) may change what the model computes."""
    from torch.nn.modules import module as torch_module
    if any(getattr(torch_module, name, None) for name in ("_global_forward_hooks", "_global_forward_pre_hooks")):
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def linear_chain(model):
    """(linear layers, activation name, negative slope) when `model` is a supported chain, else None: an
    nn.Sequential itself (a subclass may have a forward of its own: a residual connection), of exact nn.Linear
    layers and activation types, with no forward hook."""
    if not isinstance(model, nn.Module) or _hooked(model):
        return None
    modules = list(model) if type(model) is nn.Sequential else [model]
    if modules and isinstance(modules[0], nn.Flatten):
        if modules[0].start_dim != 1 or modules[0].end_dim != -1:
            return None
        modules = modules[1:]
    linears, activations = modules[0::2], modules[1::2]
    if not linears or len(linears) != len(activations) + 1:
        return None
    if not all(type(m) is nn.Linear and m.bias is not None for m in linears):
        return None
    kinds = {_activation_of(m) for m in activations}
    if None in kinds or len(kinds) > 1:
        return None
    activation, slope = kinds.pop() if kinds else ("identity", 0.0)
    return linears, activation, slope


def structured_hessian(loss, params):
    """The structured HessianOperator of a ClassifierLoss w.r.t. params, or None when the model is not
    a supported chain, the targets are not class indices, or params are not exactly the model's
    parameters (weight, bias per layer, in order)."""
    if not isinstance(loss, ClassifierLoss):
        return None
    chain = linear_chain(loss.model)
    if chain is None or loss.targets.dim() != 1 or loss.targets.dtype not in (torch.int64, torch.int32):
        return None
    linears, activation, slope = chain
    flattens = type(loss.model) is nn.Sequential and type(loss.model[0]) is nn.Flatten
    if loss.inputs.dim() != 2 and not flattens:
        return None
    params = list(params)
    expected = [p for m in linears for p in (m.weight, m.bias)]
    if len(params) != len(expected) or any(p is not q for p, q in zip(params, expected)):
        return None
    classes = linears[-1].out_features
    if len(loss.targets) != len(loss.inputs) or (len(loss.targets) and (int(loss.targets.min()) < 0
                                                                          or int(loss.targets.max()) >= classes)):
        # cross-entropy would refuse them where it runs: a short part, or -1 as class C-1, read silently here
        raise ValueError(f"the ClassifierLoss targets must be one class index 0 .. {classes - 1} per input row; got "
                         f"{len(loss.targets)} targets for {len(loss.inputs)} rows, from "
                         f"{loss.targets.min().item() if len(loss.targets) else '-'} to "
                         f"{loss.targets.max().item() if len(loss.targets) else '-'}")
    inputs, pre, grads, deltas, probs = _forward_backward(linears, activation, slope, loss.inputs.detach(),
                                                          loss.targets)
    weights = [m.weight.detach() for m in linears]
    return StructuredHessian(tuple(params), weights, inputs, pre, grads, deltas, probs, activation, slope)


class StructuredHessian(HessianOperator):
    """H v by the R-operator op (csrc/mlp_hvp.cpp) from the weights and one cached forward and backward pass.

    A product reads nothing but the tensors of `state()`, so a solve recorded with one operator (a
    CUDA graph, hypergrad.SolveGraphCache) replays for another of the same layout after
    `load_state(other)` copies the other's tensors into this one's.
    """

    def __init__(self, params, weights, inputs, pre_activations, grad_activations, deltas, probs, activation,
                 negative_slope):
        super().__init__(params, self._structured_product)
        self.weights, self.inputs, self.pre_activations = list(weights), list(inputs), list(pre_activations)
        self.grad_activations, self.deltas, self.probs = list(grad_activations), list(deltas), probs
        self.activation, self.negative_slope = activation, negative_slope
        self._versions = self._weight_versions()

    def _weight_versions(self):
        return [w._version for w in self.weights]  # a detached view shares its parameter's version counter

    def _structured_product(self, v):
        if not torch.compiler.is_compiling() and self._weight_versions() != self._versions:  # (no guard on versions
            # inside a torch.compile graph) its cached forward pass is of the weights before
            raise RuntimeError("the model's weights changed in place since this structured Hessian was built (an "
                               "optimizer step): build it again (hypergrad.structured_hessian) for the new weights")
        return _ops.mlp_ce_hvp(self.weights, self.inputs, self.pre_activations, self.grad_activations, self.deltas,
                               self.probs, v.contiguous(), self.activation, self.negative_slope)

    def state(self):
        """Every tensor a product reads, in a fixed order."""
        return [*self.weights, *self.inputs, *self.pre_activations, *self.grad_activations, *self.deltas, self.probs]

    def layout(self):
        """What must match for load_state: activation, and each state tensor's shape, dtype and device."""
        return (self.activation, self.negative_slope, tuple((tuple(t.shape), t.dtype, t.device) for t in self.state()))

    def clone(self):
        """An operator with its own copy of the state (the parameters are shared, not copied)."""
        def copies(tensors):
            return [t.clone() for t in tensors]

        return StructuredHessian(self.params, copies(self.weights), copies(self.inputs), copies(self.pre_activations),
                                 copies(self.grad_activations), copies(self.deltas), self.probs.clone(),
                                 self.activation, self.negative_slope)

    def load_state(self, other):
        """Copies another structured operator's state into this one's tensors (in place)."""
        if not isinstance(other, StructuredHessian) or other.layout() != self.layout():
            raise ValueError("load_state needs a StructuredHessian of the same model layout, batch size, dtype and "
                             "device")
        with torch.no_grad():
            for mine, theirs in zip(self.state(), other.state()):
                mine.copy_(theirs)
        self._versions = self._weight_versions()  # its own copies, written here


def _forward_backward(linears, activation, slope, x, targets):
    """The forward and backward quantities every product reuses: the layers' inputs a_k, the hidden
    pre-activations z_k, the gradients g_k = dL/da_{k+1}, delta_k = dL/dz_k and the softmax p."""
    with torch.no_grad():
        inputs, pre = [x.reshape(x.shape[0], -1).contiguous()], []
        for k, m in enumerate(linears):
            z = F.linear(inputs[-1], m.weight, m.bias)
            if k + 1 < len(linears):
                pre.append(z)
                inputs.append(_apply(activation, slope, z))
        probs = torch.softmax(z, dim=1)
        delta = probs.clone()
        delta[torch.arange(len(targets), device=delta.device), targets] -= 1
        delta /= len(targets)
        deltas, grads = [delta], []
        for k in range(len(linears) - 1, 0, -1):
            g = deltas[0] @ linears[k].weight
            grads.insert(0, g)
            deltas.insert(0, _ops.activation_jvp(pre[k - 1], g, activation, slope))  # sigma'(z) g, through the kernel
    return inputs, pre, grads, deltas, probs.contiguous()


def _apply(activation, slope, z):
    if activation == "relu":
        return F.relu(z)
    if activation == "leaky_relu":
        return F.leaky_relu(z, slope)
    if activation == "tanh":
        return torch.tanh(z)
    if activation == "sigmoid":
        return torch.sigmoid(z)
    return z
