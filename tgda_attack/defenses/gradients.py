"""Passes over a training set's per-example cross-entropy losses, in batches, shared by the defenses that score
points by their gradients (influence, Sever): the directional derivative of every point's loss along one
direction of the parameters is one forward-mode torch.func.jvp a batch, with no per-example gradient stored."""
import torch
import torch.nn.functional as F
from torch.func import functional_call

from hypergrad.hvp import jvp, unflatten


def batches(x, y, batch_size, like):
    """(x_b, y_b) in order, moved to the parameters' device and floating dtype."""
    for i in range(0, len(y), batch_size):
        yield x[i:i + batch_size].to(like.device, like.dtype), y[i:i + batch_size].to(like.device)


def directional_derivatives(model, names, params, direction, x, y, batch_size):
    """grad_w l(z_i; w) . direction for every i: one forward-mode jvp of the per-example losses, in batches."""
    primals = dict(zip(names, (p.detach() for p in params)))
    tangents = dict(zip(names, unflatten(direction.detach(), params)))
    out = []
    for xb, yb in batches(x, y, batch_size, params[0]):
        def per_example(p):
            return F.cross_entropy(functional_call(model, p, (xb,)), yb, reduction="none")
        out.append(jvp(per_example, (primals,), (tangents,))[1])
    return torch.cat(out)
