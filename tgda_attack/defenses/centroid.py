"""The sphere and slab defenses (Koh, Steinhardt & Liang, "Stronger data poisoning attacks break data
sanitization defenses", 2018, Section 2; Steinhardt, Koh & Liang 2017): data-only filters that need no
model. With mu_c the centroid of the points labelled c in the (poisoned) training set:

- sphere: a point (x, y) scores ||x - mu_y||_2, its distance to its class centroid;
- slab: a point scores |<x - mu_y, mu_y - mu_not_y>| / ||mu_y - mu_not_y||, its distance to mu_y along
  the line from the centroid of the other classes' points to mu_y (Koh et al. define the slab for two
  classes, along mu_1 - mu_-1; this is its one-against-the-rest form for many classes).

Koh et al. set each class's radius at a quantile of that class's scores; here, as for the other filters
of the paper, a share `fraction` of the points is removed, taken in every class in proportion to its
size: the floor(fraction * n_c) highest scores of class c (rounding leftovers go to the highest
remaining scores overall), so that a class of many poisons cannot shield the others.
"""
import torch

from .base import FRACTION, PoisonFilter


def class_centroids(x, y):
    """{class: centroid (flattened)} of the points of each label present in y."""
    flat = x.flatten(1).double()
    return {int(c): flat[y == c].mean(0) for c in torch.unique(y)}


def sphere_scores(x, y):
    centroids = class_centroids(x, y)
    flat = x.flatten(1).double()
    mu = torch.stack([centroids[int(c)] for c in y])
    return (flat - mu).norm(dim=1)


def slab_scores(x, y):
    flat = x.flatten(1).double()
    scores = torch.zeros(len(y), dtype=torch.float64, device=flat.device)
    for c in torch.unique(y):
        mine = y == c
        if bool(mine.all()):  # one class only: no line to project on
            continue
        mu, rest = flat[mine].mean(0), flat[~mine].mean(0)
        direction = mu - rest
        norm = direction.norm()
        if norm > 0:
            scores[mine] = ((flat[mine] - mu) @ direction).abs() / norm
    return scores


def keep_per_class(scores, y, fraction):
    """is_clean removing the highest-scoring floor(fraction * n) points, each class's share in proportion."""
    scores, y = scores.detach().double().cpu(), y.cpu()
    n_remove = int(fraction * len(y) + 1e-9)
    is_clean = torch.ones(len(y), dtype=torch.bool)
    for c in torch.unique(y):
        idx = (y == c).nonzero().flatten()
        k = int(fraction * len(idx) + 1e-9)
        order = torch.sort(scores[idx], descending=True, stable=True).indices
        is_clean[idx[order[:k]]] = False
    left = n_remove - int((~is_clean).sum())
    if left > 0:
        remaining = torch.where(is_clean, scores, torch.full_like(scores, -float("inf")))
        is_clean[torch.sort(remaining, descending=True, stable=True).indices[:left]] = False
    return is_clean


class SphereFilter(PoisonFilter):
    name = "sphere"
    settings = (FRACTION,)

    def detect_poison(self, x, y, *, model=None, fit=None, x_val=None, y_val=None):
        return {"score": "L2 distance to the class centroid"}, keep_per_class(sphere_scores(x, y), y, self.fraction)


class SlabFilter(PoisonFilter):
    name = "slab"
    settings = (FRACTION,)

    def detect_poison(self, x, y, *, model=None, fit=None, x_val=None, y_val=None):
        return ({"score": "distance to the class centroid along the line to the other classes' centroid"},
                keep_per_class(slab_scores(x, y), y, self.fraction))
