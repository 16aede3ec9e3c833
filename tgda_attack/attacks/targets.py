"""Target parameters for the model-targeted attacks (Koh, Steinhardt & Liang 2018; Lu, Kamath & Yu,
TMLR 2022, Appendix A.3, eq. 29-35), a model the attacker wants the defender to become, and whether a
budget of poisons can reach one.

* `label_flip_target`: a large-budget label flip: the trained defender trained further, with the
  pretrain procedure's gradient descent (its gradient-norm bound included), on D_tr U a label flip
  (y -> K - 1 - y) of target_epsilon * |D_tr| randomly chosen points. Used by the improved min-max
  attack (its w_tar of eq. 35) and as an option of Gradient Canceling.
* `gradpc_target`: gradient-based parameter corruption (GradPC; Lu, Kamath & Yu, ICML 2023, the target
  generator of Gradient Canceling): one pass of gradient ascent on the training loss over D_tr in
  mini-batches, each step the batch gradient scaled to unit L2 norm, the accumulated corruption
  projected onto an L2 ball of the given radius around the trained parameters.
* `authors_gradpc_target`: GradPC as the authors ran it, from a fresh model trained one epoch by
  Adadelta instead of from the trained defender.
* `necessary_epsilon`: for a softmax model whose logits are a final linear layer z = A h + c of features h
  (the LR defender, h = x; the NN and the CNN, h the last hidden layer), a lower bound on the budget that can
  make target parameters w_t stationary on D_tr U D_p. Stationary in all parameters means stationary in the
  last layer's (A, c): the poisons' last-layer gradients must sum to minus D_tr's,
  g = sum_{D_tr} grad_{A,c} l(x_i, y_i; w_t), so epsilon N >= (what D_tr needs) / (what one poison can give),
  by two bounds that hold for any poison:
    - along (A, c): the logits are linear in (A, c), so <grad_{A,c} l(x, y; w), (A, c)> = sum_k p_k z_k - z_y
      >= -W((K - 1) / e) (W: Lambert's function; 1.101 for K = 10), whatever the pixels and the layers below;
    - in norm: grad_{A,c} l = (p - e_y) [h; 1]^T, of norm <= sqrt(2) ||[h; 1]||, and ||h|| is bounded over the
      pixel box by interval arithmetic through the layers below (`feature_norm_bound`; for LR exactly
      sqrt(784) * 1, so sqrt(785) * sqrt(2) = 39.6 for MNIST in [-1, 1]).
  A target above its budget is out of reach: Gradient Canceling's objective then barely falls. (The bound
  is necessary, not sufficient: a target under it may still be out of reach through the other layers.)
"""
import copy
import math

import torch
import torch.nn.functional as F

from ..models import MnistStandardize
from ..training import train_classifier
from .base import Setting, fresh_model
from .label_flip import LabelFlipAttack

TARGET_SETTINGS = (
    Setting("target_epsilon", float, 0.1, "fraction",
            "size of the label flip that makes the target parameters, as a fraction of D_tr"),
    Setting("target_epochs", int, 10, "positive-count",
            "epochs of gradient descent from the trained defender on D_tr U that flip"),
)


def label_flip_target(defender, x, y, *, epsilon, epochs, lr, batch_size, max_grad_norm=0.0, num_classes=10, seed=0,
                      verbose=False):
    """The target parameters (a state_dict of a copy of `defender`): the defender trained `epochs` more
    epochs on D_tr U a reverse label flip of `epsilon` of it (seeded random points), each step's gradient
    scaled down to `max_grad_norm` where longer, as the defender's own training (0: plain gradient descent;
    without the bound of 5 the paper's NN diverged in the first epoch at lr 0.1 for one seed in three)."""
    x_f, y_f = LabelFlipAttack(epsilon, init="random", num_classes=num_classes, seed=seed + 1).poison(x, y)
    x_t, y_t = torch.cat([x, x_f]), torch.cat([y, y_f])
    target = train_classifier(copy.deepcopy(defender), x_t, y_t, epochs=epochs, batch_size=batch_size, lr=lr,
                              max_grad_norm=max_grad_norm, seed=seed, verbose=verbose, desc="target parameters")
    return {k: v.detach().clone() for k, v in target.state_dict().items()}



def gradpc_target(defender, x, y, *, radius, batch_size=64, seed=0):
    """The GradPC target (a state_dict of a copy of `defender`): w_0 + delta, delta accumulated over one
    seeded pass of D_tr in batches of unit-norm loss gradients and kept within ||delta||_2 <= radius."""
    model = copy.deepcopy(defender)
    params = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    delta = [torch.zeros_like(p) for p in params]
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed)).to(y.device)
    model.eval()
    for i in range(0, len(y), batch_size):
        idx = order[i:i + batch_size]
        grads = torch.autograd.grad(F.cross_entropy(model(x[idx]), y[idx]), params)
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        with torch.no_grad():
            for d, g in zip(delta, grads):
                d.add_(g / norm.clamp_min(1e-30))
            size = torch.sqrt(sum(d.pow(2).sum() for d in delta))
            shrink = (radius / size).clamp(max=1.0) if radius > 0 else torch.zeros(())
            for p, p0, d in zip(params, start, delta):
                d.mul_(shrink)
                p.copy_(p0 + d)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def authors_gradpc_target(defender, x, y, *, radius=0.5, seed=0, lr=1.0, batch_size=64):
    """The GradPC target as the Gradient Canceling authors made it (watml/plim, GradPC/grad_attack.py): a
    fresh, seeded initialisation of the defender's architecture trained one epoch by Adadelta (lr 1.0, mean
    cross-entropy, seeded shuffled batches of 64), then corrupted by gradpc_target within an L2 ball of
    `radius` (their files: 0.5). A state_dict."""
    model = fresh_model(defender, seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adadelta(params, lr=lr)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed)).to(y.device)
    model.train()
    for i in range(0, len(y), batch_size):
        idx = order[i:i + batch_size]
        optimizer.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        optimizer.step()
    return gradpc_target(model, x, y, radius=radius, batch_size=batch_size, seed=seed)


def lambert_w(z):
    """The principal branch of Lambert's W for z >= 0 (Newton's method on w e^w = z)."""
    w = math.log1p(z)
    for _ in range(50):
        w -= (w * math.exp(w) - z) / (math.exp(w) * (w + 1))
    return w


# Layers interval arithmetic passes through by mapping both ends: monotone maps, which take bounds to bounds
# (MnistStandardize: a positive scale and a shift).
_MONOTONE = (torch.nn.ReLU, torch.nn.LeakyReLU, torch.nn.Tanh, torch.nn.Sigmoid, torch.nn.MaxPool2d, torch.nn.Flatten,
             torch.nn.Identity, MnistStandardize)


def feature_norm_bound(layers, shape, pixel_range, like):
    """An upper bound on ||h|| for h = layers(x) over the box x in pixel_range^shape, by interval arithmetic
    (a linear or convolutional layer maps the centre and |weights| the radius; monotone layers map both
    ends; dropout is the identity, as in evaluation); None if a layer is not one of those. `like`: a tensor
    whose dtype and device to use."""
    lo = torch.full((1, *shape), float(pixel_range[0]), dtype=like.dtype, device=like.device)
    hi = torch.full_like(lo, float(pixel_range[1]))
    with torch.no_grad():
        for layer in layers:
            if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
                centre, radius = (hi + lo) / 2, (hi - lo) / 2
                if isinstance(layer, torch.nn.Linear):
                    centre, radius = layer(centre), radius @ layer.weight.abs().T
                else:
                    centre = layer(centre)
                    radius = torch.nn.functional.conv2d(radius, layer.weight.abs(), None, layer.stride, layer.padding,
                                                        layer.dilation, layer.groups)
                lo, hi = centre - radius, centre + radius
            elif isinstance(layer, _MONOTONE):
                lo, hi = layer(lo), layer(hi)
            elif isinstance(layer, torch.nn.Dropout):
                continue
            else:
                return None
    return torch.maximum(lo.abs(), hi.abs()).double().norm().item()


def logits_layer(model):
    """The final linear layer whose outputs are `model`'s logits (an nn.Sequential ending in one), else None:
    the models necessary_epsilon bounds."""
    if isinstance(model, torch.nn.Sequential) and len(model) and isinstance(model[-1], torch.nn.Linear):
        return model[-1]
    return None


def necessary_epsilon(model, x, y, pixel_range=(-1.0, 1.0), batch_size=2000):
    """A lower bound on the poison budget (fraction of |D_tr|) that can make `model`'s parameters stationary
    on D_tr U D_p, for an nn.Sequential ending in a linear layer (the logits): the larger of the bounds along
    the last layer's parameters and in norm (module docstring; the norm bound only where the features' norm
    can be bounded). None for other models (no such bound is known here)."""
    last = logits_layer(model)
    if last is None:
        return None
    params = list(last.parameters())
    along, total = 0.0, None
    for i in range(0, len(y), batch_size):
        z = model(x[i:i + batch_size])
        yb = y[i:i + batch_size]
        with torch.no_grad():
            p = z.softmax(1)
            along += ((p * z).sum(1) - z.gather(1, yb[:, None]).squeeze(1)).double().sum().item()
        grads = torch.autograd.grad(F.cross_entropy(z, yb, reduction="sum"), params)
        flat = torch.cat([g.flatten() for g in grads]).double()
        total = flat if total is None else total + flat
    bounds = [along / len(y) / lambert_w((last.out_features - 1) / math.e), 0.0]
    features = feature_norm_bound(model[:-1], tuple(x.shape[1:]), pixel_range, params[0])
    if features is not None:
        per_poison = math.sqrt(2.0) * math.sqrt(features ** 2 + (last.bias is not None))
        bounds.append(total.norm().item() / len(y) / per_poison)
    return max(bounds)
