"""The back-gradient attack (Muñoz-González et al., "Towards poisoning of deep learning algorithms with
back-gradient optimization", AISec 2017), in the form Lu, Kamath & Yu (TMLR 2022) give it in Section 3.2,
"(1) A direct approach": k-step unrolled gradient descent ascent (UGDA, Metz et al. 2017), eq. 10-11,

    x_{t+1} = Pi[ x_t + eta * grad_x l^[k](x_t, w_t) ]                                           (10)
    w_{t+1} = w_t - beta * grad_w f(x_t, w_t)                                                     (11)

with f = L(D_tr U D_p, w), the defender's training loss (mean cross-entropy), and l^[k](x, w) =
L(D_v, w~_k) the attacker's validation loss at the end of k steps of gradient descent on f started from
the current w: w~_0 = w, w~_{j+1} = w~_j - beta * grad_w f(x, w~_j). grad_x l^[k] is the derivative through
the k steps (the graph of every step is kept and differentiated; torch.func.grad makes the steps). Pi
clamps to the pixel range. Both updates use (x_t, w_t): grad_w f(x_t, w_t) of eq. 11 is the first unrolled
step's gradient, reused. With k = 0, l^[0] = L(D_v, w) does not depend on x and the leader's step is zero:
the "zero gradients in practice" the TMLR paper names as the reason to unroll.

The leader x is the poisons' pixels, starting at D_p^0 (the epsilon*N points of D_tr that `init` picks)
with labels flipped by the run's flip rule (tgda_attack.attacks.label_flip; Muñoz-González et al. flip
the labels of their initial points) and kept.

Adapted (and why):
  * The original crafts one poison at a time, each by gradient ascent with its own line search, against a
    learner retrained (T iterations unrolled and reversed by back-gradient) for every point. That cannot
    run at the scale of the TMLR paper's D_tr (42,000 points; the paper ran the authors' code, Table 2).
    Here all poisons are crafted together in the schedule of the TGDA attack (tgda.py): attack epochs over
    D_tr in batches, each batch taking one leader step (eq. 10) on its share of the poisons, against a
    batch of D_v, and one follower step (eq. 11).
  * The derivative through the k steps is taken by reverse-mode autodiff of the stored steps, not by
    back-gradient's reversal of the learning trajectory (which recomputes the w~_j backwards to save
    memory, at a loss of precision); the two compute the same derivative, up to that rounding.
  * Fixed leader step eta instead of a line search (eq. 10 as the TMLR paper writes it).
"""
import math
import time

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad
from ..progress import progress_bar

from .base import PoisoningAttack, Setting
from .feasible import FEASIBLE_SETTINGS, check_feasible, make_feasible_set
from .label_flip import FLIP_RULES, LabelFlipAttack


def classifier_loss(model, params, x, y):
    """Mean cross-entropy of model(x) with the parameters `params` (a dict name -> tensor). A batch-norm layer in
    training mode normalises by the batch's statistics, as in a training step, and updates no running statistics
    (torch.func cannot differentiate a function that updates them in place: MetaPoison and back-gradient against a
    network with batch norm, ResNet-18, stopped inside torch)."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for m in norms:
        m.track_running_stats = False
    try:
        return F.cross_entropy(functional_call(model, params, (x,)), y)
    finally:
        for m in norms:
            m.track_running_stats = True


def unrolled_parameters(model, params, x, y, steps, lr):
    """k = `steps` steps of gradient descent on the mean cross-entropy of (x, y) from `params`, every step
    differentiable (in x and in params): returns (w~_k, grad at w~_0), the latter None for 0 steps."""
    step_grad = grad(lambda p: classifier_loss(model, p, x, y))
    first = None
    for _ in range(steps):
        g = step_grad(params)
        first = g if first is None else first
        params = {k: params[k] - lr * g[k] for k in params}
    return params, first


class BackGradientAttack(PoisoningAttack):
    """Poisons crafted by k-step unrolled gradient descent ascent (eq. 10-11 above).

    Args:
        defender: the trained defender (an nn.Module; the attack works on a copy).
        epsilon: poison budget as a fraction of |D_tr|. (default: 0.03)
        unroll_steps: k, the defender's gradient-descent steps the leader differentiates through; 0 gives
            zero leader gradients. (default: 10, the usual choice; Muñoz-González et al. unroll whole
            training runs. mnist-sample, NN defender: the attack took 87-168 s on two lightly loaded CPU cores)
        lr: eta, the leader's step size on the pixels (plain gradient ascent). The leader gradient of a
            mean validation loss through k steps of size beta on a batch of B points is of order
            k * beta / B (per-pixel magnitudes 3e-4 to 5e-3 on mnist-sample), so eta is large. Measured on
            mnist-sample (seed 0, one run each, accuracy drops): LR 4.0 with eta 100, 5.8 with 1000 (label
            flip 4.3); NN 0.4 with 100, -1.4 with 1000 (saturated poisons). (default: 100.0)
        epochs: passes over D_tr. (default: 200)
        batch_size: points of D_tr (and of D_v) per step. (default: 1000)
        beta: the defender's step size, in the unrolled steps and in eq. 11. (default: 0.1)
        flip_rule: the labels of the poisons, a rule of label_flip.FLIP_RULES. (default: "reverse")
        num_classes: K, for the label flip. (default: 10)
        init: D_p^0 as the "first" epsilon*N points of D_tr or a seeded "random" choice. (default: "first")
        pixel_range: the poisons are clamped to it. (default: (-1.0, 1.0))
        seed: seed of the batch order and the random choices. (default: 0)
        verbose: show a progress bar. (default: False)

    After `poison`, `defender_` is the defender at the end of the game and `history` holds, per epoch, the
    mean leader loss l^[k], the mean follower loss f, the seconds and the number of batches.
    """

    name = "back-gradient"
    settings = (
        Setting("bg_unroll_steps", int, 10, "positive-count",
                "k: the defender's gradient-descent steps the back-gradient leader differentiates through"),
        Setting("bg_lr", float, 100.0, "positive", "eta: the back-gradient leader's step size on the poisons' pixels"),
    ) + FEASIBLE_SETTINGS
    quick = {"bg_unroll_steps": 2}

    def __init__(self, defender, epsilon=0.03, *, unroll_steps=10, lr=100.0, epochs=200, batch_size=1000, beta=0.1,
                 flip_rule="reverse", num_classes=10, init="first", pixel_range=(-1.0, 1.0), seed=0, verbose=False,
                 feasible_set="box", feasible_quantile=0.9):
        super().__init__(epsilon, init=init, seed=seed)
        self.defender = defender
        self.feasible_set, self.feasible_quantile, self.feasible_ = feasible_set, feasible_quantile, None
        self.unroll_steps, self.lr, self.epochs, self.batch_size, self.beta = unroll_steps, lr, epochs, batch_size, beta
        self.flip_rule, self.num_classes = flip_rule, num_classes
        self.pixel_range, self.verbose = pixel_range, verbose
        self._check_params()

    def _check_params(self):
        super()._check_params()
        if self.defender is None:
            raise ValueError("back-gradient needs the trained defender (defender=...)")
        self._check_counts("unroll_steps", "epochs")
        self._check_counts("batch_size", minimum=1)
        if not self.lr > 0 or not self.beta > 0:
            raise ValueError(f"the step sizes lr and beta must be positive, got lr={self.lr}, beta={self.beta}")
        if self.flip_rule not in FLIP_RULES:
            raise ValueError(f"flip_rule must be one of {FLIP_RULES}, got {self.flip_rule!r}")
        if not isinstance(self.num_classes, int) or self.num_classes < 2:
            raise ValueError(f"num_classes must be an integer of at least 2, got {self.num_classes!r}")
        if self.pixel_range[0] >= self.pixel_range[1]:
            raise ValueError(f"pixel_range must be (low, high) with low < high, got {self.pixel_range}")
        check_feasible(self.feasible_set, self.feasible_quantile)

    @classmethod
    def from_config(cls, cfg, *, defender=None, attacker=None, checkpoint=None, verbose=False):
        return cls(defender, cfg.epsilon, unroll_steps=cfg.bg_unroll_steps, lr=cfg.bg_lr, epochs=cfg.attack_epochs,
                   batch_size=cfg.attack_batch_size, beta=cfg.beta, flip_rule=cfg.flip_rule, init=cfg.poison_init,
                   seed=cfg.seed, verbose=verbose, feasible_set=cfg.feasible_set, feasible_quantile=cfg.feasible_quantile)

    def poison(self, x, y, *, x_val=None, y_val=None):
        """(x_poison, y_poison) by UGDA on D_tr = (x, y) against D_v = (x_val, y_val); without D_v, a seeded
        30% of (x, y) serves as D_v (base._defender_and_data)."""
        model, x, y, x_val, y_val = self._defender_and_data(x, y, x_val, y_val)
        ref = next(model.parameters())
        self._craft_sources(len(y))
        flip = LabelFlipAttack(self.epsilon, self.flip_rule, defender=model, init=self.init,
                               num_classes=self.num_classes, seed=self.seed)
        x_p, y_p = flip.poison(x, y, x_val=x_val, y_val=y_val)  # D_v: the influence rule scores labels on it
        model.train()
        y_p = y_p.to(ref.device)
        self.feasible_ = make_feasible_set(self.feasible_set, x, y, quantile=self.feasible_quantile,
                                           pixel_range=self.pixel_range, num_classes=self.num_classes)
        self.info_ = {"feasible_set": self.feasible_.describe()}
        x_p = self.feasible_.project(x_p, y_p)  # a flipped point moves into its new label's set
        n_poison = len(y_p)
        params = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}

        self.history = []
        n_batches = math.ceil(len(y) / self.batch_size)
        bar = progress_bar(range(self.epochs), desc="back-gradient attack", disable=not self.verbose)
        for epoch in bar:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(len(y), generator=g).to(ref.device)
            p_order = torch.randperm(n_poison, generator=g).to(ref.device)
            v_order = torch.randperm(len(y_val), generator=g).to(ref.device)
            stats, start = [], time.perf_counter()
            for b in range(n_batches):
                tr = order[b * self.batch_size:(b + 1) * self.batch_size]
                pp = p_order[b * n_poison // n_batches:(b + 1) * n_poison // n_batches]
                vv = v_order.roll(-b * self.batch_size)[:self.batch_size]
                params, x_new, leader, follower = self.step(model, params, x[tr], y[tr], x_p[pp], y_p[pp],
                                                            x_val[vv], y_val[vv])
                x_p[pp] = x_new
                if not (math.isfinite(leader) and math.isfinite(follower)):
                    raise FloatingPointError(
                        f"back-gradient attack diverged in epoch {epoch + 1}, batch {b + 1} of {n_batches} (leader "
                        f"loss {leader}, follower loss {follower}); rerun with a smaller beta or lr. No poisons were "
                        "returned.")
                stats.append((leader, follower))
            record = {"epoch": epoch + 1, "leader_loss": sum(s[0] for s in stats) / len(stats),
                      "follower_loss": sum(s[1] for s in stats) / len(stats),
                      "seconds": time.perf_counter() - start, "batches": n_batches}
            self.history.append(record)
            bar.set_postfix(leader_loss=f"{record['leader_loss']:.4f}", follower_loss=f"{record['follower_loss']:.4f}")
        with torch.no_grad():
            for k, v in model.named_parameters():
                if k in params:
                    v.copy_(params[k])
        model.eval()
        self.defender_ = model
        return x_p.detach(), y_p

    def leader_objective(self, model, params, x_b, y_b, xp_b, yp_b, xv_b, yv_b):
        """(l^[k], grad_w f at w): the validation loss after k unrolled steps on f = L(batch U poisons, w)
        from `params`, differentiable in xp_b; the gradient of eq. 11 (None when k = 0)."""
        x_f, y_f = torch.cat([x_b, xp_b]), torch.cat([y_b, yp_b])
        w_k, first = unrolled_parameters(model, params, x_f, y_f, self.unroll_steps, self.beta)
        return classifier_loss(model, w_k, xv_b, yv_b), first

    def step(self, model, params, x_b, y_b, xp_b, yp_b, xv_b, yv_b):
        """One batch of eq. 10-11 from (x_t, w_t) = (xp_b, params): returns (w_{t+1}, x_{t+1}, l^[k], f)."""
        xp = xp_b.detach().clone().requires_grad_(len(yp_b) > 0 and self.unroll_steps > 0)
        leader, first = self.leader_objective(model, params, x_b, y_b, xp, yp_b, xv_b, yv_b)
        if xp.requires_grad:
            (d_x,) = torch.autograd.grad(leader, xp)
        else:
            d_x = torch.zeros_like(xp)  # l^[0] = L(D_v, w) does not depend on the poisons
        x_f, y_f = torch.cat([x_b, xp.detach()]), torch.cat([y_b, yp_b])
        if first is None:
            first = grad(lambda p: classifier_loss(model, p, x_f, y_f))(params)
        with torch.no_grad():
            x_next = self._project(xp.detach() + self.lr * d_x, yp_b)
            w_next = {k: params[k] - self.beta * first[k].detach() for k in params}
            follower = classifier_loss(model, params, x_f, y_f).item()
        return w_next, x_next, leader.item(), follower
