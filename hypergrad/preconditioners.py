"""Diagonal (Jacobi) preconditioners for hypergrad.solve, from products v -> A v alone.

Hutchinson's estimator (Bekas, Kokiopoulou & Saad 2007): for Rademacher vectors z (entries +-1),
E[z * (A z)] = diag(A), so k products give an unbiased estimate of the diagonal; the k products are
one batched call of the operator ([k, n]), which the batched Hessian-vector products serve at once.
jacobi() makes a positive diagonal M ~ A + damping I of it: |estimate|, raised to at least
`floor` times its mean (a Hessian's diagonal may be zero or negative where A is indefinite: the
absolute value keeps M positive definite, which CG and MINRES need of a preconditioner).
"""
import torch


def hutchinson_diagonal(matvec, n, *, samples=32, dtype=torch.float64, device="cpu", seed=0):
    """An unbiased estimate of diag(A) [n] from `samples` Rademacher products, one batched matvec."""
    if not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive integer, got {samples!r}")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    z = (torch.randint(0, 2, (samples, n), generator=generator) * 2 - 1).to(device=device, dtype=dtype)
    try:
        products = matvec(z)
    except RuntimeError as exc:  # A @ v of a [samples, n] batch: matmul's shape error, named with what to do
        raise ValueError(f"matvec failed on a batch of row vectors [{samples}, {n}] ({exc}); it must map each row v to "
                         "A v (for a symmetric matrix A: lambda v: v @ A)") from exc
    if not torch.is_tensor(products) or products.shape != z.shape:
        raise ValueError(f"matvec must map a batch of row vectors [{samples}, {n}] to their products A v, one a row, "
                         f"of the same shape; it returned {_shape(products)} (for a symmetric matrix A: lambda v: v @ A)")
    if samples == n and not _rows_are_products(matvec, z, products):
        raise ValueError(f"matvec does not take row vectors: the products of a batch [{samples}, {n}] differ from those "
                         "of its rows one at a time (lambda v: A @ v multiplies columns; for a symmetric matrix A use "
                         "lambda v: v @ A)")
    return (z * products).mean(0)


def _shape(value):
    return list(value.shape) if torch.is_tensor(value) else type(value).__name__


def _rows_are_products(matvec, z, products):
    """Whether matvec(z) is matvec of each row of z, checked on the first row: with as many samples as unknowns a
    column-wise A @ z has the shape of the row-wise z @ A and only this tells them apart (otherwise the shapes do)."""
    try:
        first = matvec(z[:1])
    except RuntimeError:  # A @ v of a [1, n] row: matmul's shape error
        return False
    if not torch.is_tensor(first) or first.shape != z[:1].shape:
        return False
    scale = products[0].norm() + first[0].norm()
    return bool((first[0] - products[0]).norm() <= 1e-4 * scale + torch.finfo(z.dtype).tiny)


def jacobi(matvec, n, *, samples=32, floor=1e-2, damping=0.0, dtype=torch.float64, device="cpu", seed=0):
    """A positive diagonal M ~ A + damping I for hypergrad.solve(preconditioner=M): the Hutchinson estimate
    of diag(A) in absolute value, at least `floor` times its mean, plus damping."""
    if not floor > 0:
        raise ValueError(f"floor must be positive (the diagonal must stay positive), got {floor!r}")
    estimate = hutchinson_diagonal(matvec, n, samples=samples, dtype=dtype, device=device, seed=seed).abs()
    least = floor * estimate.mean().clamp(min=torch.finfo(dtype).tiny)
    return torch.maximum(estimate, least) + damping
