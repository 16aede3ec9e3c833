"""Feasible sets of poisons: where a poison may lie so that the data-sanitisation defenses cannot tell it
from clean data (Steinhardt, Koh & Liang, NeurIPS 2017, "Certified defenses for data poisoning attacks";
Koh, Steinhardt & Liang 2018, "Stronger data poisoning attacks break data sanitization defenses",
Section 3), and the Euclidean projection onto them.

Two sets (`feasible_set`):
  * "box": the pixel range of the data, the only constraint of a valid image.
  * "sanitized": for a poison labelled j, the intersection of
      - the box: each pixel within the smallest and largest value it takes over the clean D_tr (an
        MNIST border pixel that is background in every training image stays background);
      - the sphere ||x - mu_j|| <= rho_j around the centroid mu_j of the clean points of class j, rho_j the
        `quantile` of those points' distances to it (their MNIST runs: the 90th percentile);
      - the slab |<v_j, x - mu_j>| <= s_j along the unit direction v_j from the centroid of the other
        classes' clean points to mu_j, s_j the `quantile` of |<v_j, x - mu_j>| over class j.
    The sphere and the slab are what this library's sphere and slab filters score
    (tgda_attack.defenses.centroid: the slab in its one-against-the-rest form for many classes), and a
    radius at the 90th percentile keeps a poison inside what a filter removing the 3% farthest points
    of each class leaves. The set is made from the clean D_tr, as Koh et al.'s min-max and KKT attacks do.

Read from kohpangwei/data-poisoning-journal-release (matlab/generateAttackTar.m: per-class centroid and
sphere radius at a quantile of the clean distances, box over the data; data_utils.py: the slab radius at
the same percentile along the normalised difference of centroids) and jsteinha/data-poisoning; not copied.
Their exact projection is a quadratic program (cvxpy); here it is Dykstra's alternating projections
(Boyle & Dykstra 1986), which converge to the Euclidean projection onto an intersection of convex sets,
each step in closed form: a clamp, a radial shrink, a clip along v_j; run until the iterate stops moving
(to 1e-7 a pixel). A point already inside is returned unchanged.

What a filter sees: the sets come from the clean D_tr, the filters score the poisoned training set. With a
small budget (3%) the centroids hardly move, and a point inside the 90% quantile of its class is below
what a filter removing that class's 3% farthest points takes (measured: min-max's sanitised poisons are
never removed); a filter removing more than 1 - quantile of a class, or poisons so many that they move
their class's centroid (a large epsilon heaped on few classes), can find them.
"""
import torch

from .base import Setting

FEASIBLE_SETS = ("box", "sanitized")
FEASIBLE_SETTINGS = (
    Setting("feasible_set", str, "box", FEASIBLE_SETS,
            "where a poison's pixels may lie: box (the pixel range) or sanitized (also inside its class's sphere "
            "and slab and the clean data's per-pixel range, so that sphere and slab filters cannot find it)"),
    Setting("feasible_quantile", float, 0.9, "fraction",
            "the sanitized set's sphere radius and slab width: this quantile of the clean points of each class"),
)


class FeasibleSet:
    """The set a poison of label j may lie in (module docstring); `project(x, y)` is the Euclidean projection
    of each x_i onto the set of its label y_i, `violation(x, y)` how far each point is outside it."""

    def __init__(self, lower, upper, centroids=None, radii=None, directions=None, widths=None, kind="box"):
        self.lower, self.upper, self.kind = lower, upper, kind
        self.centroids, self.radii, self.directions, self.widths = centroids, radii, directions, widths

    @classmethod
    def box(cls, pixel_range, n_features, device=None):
        lo, hi = pixel_range
        return cls(torch.full((n_features,), float(lo), dtype=torch.float64, device=device),
                   torch.full((n_features,), float(hi), dtype=torch.float64, device=device))

    @classmethod
    def sanitized(cls, x, y, *, quantile=0.9, pixel_range=(-1.0, 1.0), num_classes=10):
        """The sanitized set of the clean training data (x, y); every class 0 .. num_classes - 1 must occur."""
        if not 0 < quantile <= 1:
            raise ValueError(f"quantile must be a fraction in (0, 1], got {quantile!r}")
        flat = x.flatten(1).double()
        missing = [c for c in range(num_classes) if not bool((y == c).any())]
        if missing:
            raise ValueError(f"the sanitized feasible set needs clean points of every class; none of class(es) {missing}")
        lo, hi = pixel_range
        lower, upper = flat.min(0).values.clamp(lo, hi), flat.max(0).values.clamp(lo, hi)
        centroids, radii, directions, widths = [], [], [], []
        for c in range(num_classes):
            mine = flat[y == c]
            mu = mine.mean(0)
            v = mu - flat[y != c].mean(0)
            v = v / v.norm().clamp_min(1e-30)
            centroids.append(mu)
            radii.append(torch.quantile((mine - mu).norm(dim=1).cpu(), quantile).to(flat.device))
            directions.append(v)
            widths.append(torch.quantile(((mine - mu) @ v).abs().cpu(), quantile).to(flat.device))
        return cls(lower, upper, torch.stack(centroids), torch.stack(radii), torch.stack(directions),
                   torch.stack(widths), kind="sanitized")

    def project(self, x, y, *, iterations=500, tol=1e-7):
        """The Euclidean projection of each x_i onto the set of its label y_i (x shaped (N, ...), y (N,)), in x's
        dtype: Dykstra's algorithm until a round moves no pixel by more than `tol` and every point is within
        `tol` of each of the three sets (float64 inside; a float32 result is rounded to it), or `iterations`
        rounds, after which the result is clamped to the box (valid pixels even where the rounds were cut off;
        then it may lie slightly outside the sphere or slab); the box alone is a clamp."""
        shape, dtype = x.shape, x.dtype
        z = x.detach().flatten(1).double()
        if self.centroids is None:
            return torch.maximum(torch.minimum(z, self.upper), self.lower).to(dtype).view(shape)
        mu, rho, v, s = self.centroids[y], self.radii[y], self.directions[y], self.widths[y]
        increments = [torch.zeros_like(z) for _ in range(3)]
        steps = (lambda t: torch.maximum(torch.minimum(t, self.upper), self.lower),
                 lambda t: _into_sphere(t, mu, rho), lambda t: _into_slab(t, mu, v, s))
        for round_ in range(iterations):
            start = z
            for k, step in enumerate(steps):
                moved = step(z + increments[k])
                increments[k] = z + increments[k] - moved
                z = moved
            if round_ % 5 == 4 and float((z - start).abs().max()) <= tol \
                    and float(self._violation(z, mu, rho, v, s).max()) <= tol:
                break  # feasible and no longer moving: at the projection
        z = steps[0](z)  # rounds cut off before convergence end in the box all the same: always valid pixels
        return z.to(dtype).view(shape)

    def violation(self, x, y):
        """(N,) how far each point lies outside the set of its label (0 inside): the largest excess over the box
        (per pixel), the sphere (distance) and the slab."""
        z = x.detach().flatten(1).double()
        if self.centroids is None:
            return ((z - self.upper).clamp_min(0) + (self.lower - z).clamp_min(0)).max(1).values
        return self._violation(z, self.centroids[y], self.radii[y], self.directions[y], self.widths[y])

    def _violation(self, z, mu, rho, v, s):
        box = ((z - self.upper).clamp_min(0) + (self.lower - z).clamp_min(0)).max(1).values
        sphere = ((z - mu).norm(dim=1) - rho).clamp_min(0)
        slab = (((z - mu) * v).sum(1).abs() - s).clamp_min(0)
        return torch.maximum(box, torch.maximum(sphere, slab))

    def describe(self):
        """What the set is, for attack.json."""
        if self.centroids is None:
            return {"kind": "box", "pixel_range": [self.lower.min().item(), self.upper.max().item()]}
        return {"kind": "sanitized", "sphere_radii": [round(r, 4) for r in self.radii.tolist()],
                "slab_widths": [round(w, 4) for w in self.widths.tolist()],
                "fixed_pixels": int((self.lower == self.upper).sum())}


def _into_sphere(z, mu, rho):
    d = z - mu
    norm = d.norm(dim=1, keepdim=True)
    return torch.where(norm > rho[:, None], mu + d * (rho[:, None] / norm.clamp_min(1e-300)), z)


def _into_slab(z, mu, v, s):
    c = ((z - mu) * v).sum(1, keepdim=True)
    excess = c - c.clamp(-s[:, None], s[:, None])
    return torch.where(excess != 0, z - excess * v, z)


def check_feasible(kind, quantile):
    """ValueError unless `kind` is a feasible set and `quantile` a fraction (an attack's _check_params)."""
    if kind not in FEASIBLE_SETS:
        raise ValueError(f"feasible_set must be one of {FEASIBLE_SETS}, got {kind!r}")
    if not 0 < quantile <= 1:
        raise ValueError(f"feasible_quantile must be a fraction in (0, 1], got {quantile!r}")


def make_feasible_set(kind, x, y, *, quantile=0.9, pixel_range=(-1.0, 1.0), num_classes=10):
    """The FeasibleSet of `kind` ("box" or "sanitized") for the clean training data (x, y)."""
    check_feasible(kind, quantile)
    if kind == "box":
        return FeasibleSet.box(pixel_range, x[0].numel(), device=x.device)
    return FeasibleSet.sanitized(x, y, quantile=quantile, pixel_range=pixel_range, num_classes=num_classes)
