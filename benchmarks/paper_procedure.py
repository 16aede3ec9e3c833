"""The paper's own total-gradient procedure, reimplemented as the baseline of our benchmarks.

It follows what the authors' released code does for one leader step of TGDA (Lu, Kamath & Yu,
TMLR 2022, Algorithm 1 line 4, after Zhang et al. 2021): parameters kept as lists of tensors;
conjugate gradient on the normal equations H^T H v = H^T b (two Hessian-vector products per
iteration); every Hessian-vector product rebuilds the follower's forward pass and gradient graph;
every dot product is a Python float (.item(), a host synchronisation). It is not part of the
library: it exists to be measured against hypergrad.total_grad and to agree with it to rounding.
"""
import torch


def _dot(xs, ys):
    return sum((x * y).sum() for x, y in zip(xs, ys)).item()


def _hvp(follower_loss, w, vs):
    """H v with a fresh forward pass and gradient graph, as in the paper's code."""
    g = torch.autograd.grad(follower_loss(), w, create_graph=True)
    return [h.detach() for h in torch.autograd.grad(g, w, vs)]


def paper_total_grad(leader_loss, follower_loss, theta, w, *, iterations=16, damping=0.0):
    """D_theta l by the paper's procedure: normal-equation CG with `iterations` steps."""
    theta, w = list(theta), list(w)
    dl = torch.autograd.grad(leader_loss(), theta + w, allow_unused=True)
    dl = [torch.zeros_like(p) if g is None else g for g, p in zip(dl, theta + w)]
    dl_theta, b = dl[:len(theta)], dl[len(theta):]

    def A(vs):
        return [h + damping * v for h, v in zip(_hvp(follower_loss, w, vs), vs)]

    # CG on A^T A x = A^T b from x = 0 (A symmetric, so A^T = A).
    x = [torch.zeros_like(t) for t in b]
    r = [t.clone() for t in b]
    z = A(r)
    p = [t.clone() for t in z]
    zz = _dot(z, z)
    for _ in range(iterations):
        Ap = A(p)
        alpha = zz / _dot(Ap, Ap)
        x = [xi + alpha * pi for xi, pi in zip(x, p)]
        r = [ri - alpha * api for ri, api in zip(r, Ap)]
        z = A(r)
        zz_new = _dot(z, z)
        p = [zi + (zz_new / zz) * pi for zi, pi in zip(z, p)]
        zz = zz_new
    g = torch.autograd.grad(follower_loss(), w, create_graph=True)
    mixed = torch.autograd.grad(g, theta, x, allow_unused=True)
    return [d if m is None else d - m for d, m in zip(dl_theta, mixed)]
