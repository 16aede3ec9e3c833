"""MetaPoison (Huang, Geiping, Fowl, Taylor & Goldstein, "MetaPoison: practical general-purpose
clean-label data poisoning", NeurIPS 2020), the clean-label baseline of Lu, Kamath & Yu (TMLR 2022),
Section 5.1 "Baselines" and Table 3, which describe it (Section 3.2, "(1) A direct approach") as k-step
unrolled gradient descent ascent (UGDA, eq. 10-11) run for M models and averaged.

The poisons are D_p(delta) = {(x_p + delta_p, y_p)}: the epsilon*N points D_p^0 that `init` picks, their
labels unchanged (clean label), each perturbed within the L-infinity ball ||delta_p||_inf <= radius and
the pixel range. An ensemble of M models of the defender's architecture, each from a fresh seeded
initialisation, is trained with the pretrain procedure's plain gradient descent (step lr, batches of
train_batch_size points of D_tr U D_p(delta)) to staggered ages: model m = 0..M-1 to round(m / M * T)
steps, T the training length (train_epochs passes). Each of the outer steps then

  1. for every model m, unrolls K SGD steps from its parameters w_m on one batch, B clean points of D_tr
     (random) with all the poisons D_p(delta): w_m^[0] = w_m, w_m^[j+1] = w_m^[j] - lr grad_w L(batch, w_m^[j]),
     and takes the adversarial loss L(D_v batch, w_m^[K]), a batch of B points of D_v;
  2. ascends the ensemble's mean adversarial loss (1/M) sum_m L(D_v batch_m, w_m^[K]) by one Adam step on
     delta, its gradient taken through the K unrolled steps (the indiscriminate objective: MetaPoison's
     targeted adversarial loss replaced by the validation loss, maximised, eq. 7 of the TMLR paper),
     then projects delta onto the ball and the pixel range;
  3. trains every model one ordinary step on the next batch of D_tr U D_p(delta); a model that reaches
     the training length T restarts from a fresh initialisation (MetaPoison's staggering, which keeps the
     ensemble spread over the whole training trajectory).
With K = 0 the adversarial loss does not depend on delta and the poisons stay at D_p^0.

Adapted (and why):
  * Objective: the indiscriminate one (maximise the validation loss) instead of MetaPoison's targeted
    Carlini-Wagner loss on one target image, as the TMLR paper does for its comparison.
  * No ReColorAdv colour perturbation, no data augmentation in the unrolled steps: the L-inf additive
    perturbation only, the threat model the TMLR paper's unified architecture uses.
  * Every unrolled batch holds all the poisons with B random clean points of D_tr (a choice made here, so
    that every outer step moves every poison), and the same batch serves the K steps.
  * Training length T: 10 passes over D_tr U D_p by default, not the pretrain procedure's 100: the
    staggered ensemble costs about M/2 * T training steps before the first outer step (12 * 2,900 steps of
    the NN defender on mnist-sample with 100 passes, several times the whole defender's pretraining).
  * The paper's K = 2, 60 outer steps and M = 24 models are the defaults: a run on mnist-sample took 99 s
    with the NN defender on two lightly loaded CPU cores (the ensemble's training included).
"""
import math

import torch
from torch.func import grad
from ..progress import progress_bar

from .back_gradient import classifier_loss, unrolled_parameters
from .base import PoisoningAttack, Setting, fresh_model


class MetaPoisonAttack(PoisoningAttack):
    """Clean-label L-infinity perturbations crafted against an ensemble of staggered models (above).

    Args:
        defender: the trained defender; only its architecture is used (the ensemble's models are fresh
            initialisations of a copy of it: every submodule with reset_parameters is reset).
        epsilon: poison budget as a fraction of |D_tr|. (default: 0.03)
        radius: the L-infinity bound on each poison's perturbation, in pixel units. (default: 16/255, i.e.
            MetaPoison's 8/255 of a [0, 1] range on this library's [-1, 1] range)
        models: M, the ensemble's size. (default: 24, the paper's)
        unroll_steps: K, unrolled SGD steps per model and outer step. (default: 2, the paper's)
        steps: outer steps, each one Adam step on delta. (default: 60, the paper's)
        lr: Adam's step size on delta. (default: 0.01, a sixth of the default radius)
        train_epochs: the training length T in passes over D_tr U D_p. (default: 10)
        train_lr: the step of the models' gradient descent, unrolled and ordinary (the pretrain lr). (default: 0.1)
        train_batch_size: points per ordinary training step (the pretrain batch size). (default: 1000)
        batch_size: B, clean points of D_tr per unrolled batch and points of D_v per adversarial loss.
            (default: 1000)
        init: D_p^0 as the "first" epsilon*N points of D_tr or a seeded "random" choice. (default: "first")
        pixel_range: the poisons are clamped to it. (default: (-1.0, 1.0))
        seed: seed of the initialisations and batches. (default: 0)
        verbose: show a progress bar. (default: False)

    After `poison`, `delta_` is the perturbation and `history` the ensemble's mean adversarial loss at every
    `log_every`-th outer step (before that step's update) and at the end.
    """

    name = "metapoison"
    log_every = 5
    settings = (
        Setting("mp_radius", float, 16 / 255, "positive",
                "L-infinity bound of MetaPoison's perturbations, in pixel units of the [-1, 1] range"),
        Setting("mp_models", int, 24, "positive-count", "M: MetaPoison's ensemble size"),
        Setting("mp_unroll_steps", int, 2, "count", "K: MetaPoison's unrolled SGD steps per model"),
        Setting("mp_steps", int, 60, "positive-count", "MetaPoison's outer steps (Adam steps on the perturbation)"),
        Setting("mp_lr", float, 0.01, "positive", "Adam's step size on MetaPoison's perturbation"),
        Setting("mp_train_epochs", int, 10, "positive-count",
                "training length of MetaPoison's staggered ensemble, in passes over D_tr U D_p"),
    )
    quick = {"mp_models": 2, "mp_steps": 2, "mp_train_epochs": 1}

    def __init__(self, defender, epsilon=0.03, *, radius=16 / 255, models=24, unroll_steps=2, steps=60, lr=0.01,
                 train_epochs=10, train_lr=0.1, train_batch_size=1000, batch_size=1000, init="first",
                 pixel_range=(-1.0, 1.0), seed=0, verbose=False):
        super().__init__(epsilon, init=init, seed=seed)
        self.defender, self.radius, self.models = defender, radius, models
        self.unroll_steps, self.steps = unroll_steps, steps
        self.lr, self.train_epochs, self.train_lr = lr, train_epochs, train_lr
        self.train_batch_size, self.batch_size = train_batch_size, batch_size
        self.pixel_range, self.verbose = pixel_range, verbose
        self._check_params()

    def _check_params(self):
        super()._check_params()
        if self.defender is None:
            raise ValueError("metapoison needs the defender, for its architecture (defender=...)")
        self._check_counts("unroll_steps", "steps")
        self._check_counts("models", "train_epochs", "train_batch_size", "batch_size", minimum=1)
        if not self.radius > 0:
            raise ValueError(f"radius, the L-infinity bound of the perturbations, must be positive, got {self.radius}")
        if not self.lr > 0 or not self.train_lr > 0:
            raise ValueError(f"the step sizes lr and train_lr must be positive, got lr={self.lr}, "
                             f"train_lr={self.train_lr}")
        if self.pixel_range[0] >= self.pixel_range[1]:
            raise ValueError(f"pixel_range must be (low, high) with low < high, got {self.pixel_range}")

    @classmethod
    def from_config(cls, cfg, *, defender=None, attacker=None, checkpoint=None, verbose=False):
        return cls(defender, cfg.epsilon, radius=cfg.mp_radius, models=cfg.mp_models,
                   unroll_steps=cfg.mp_unroll_steps, steps=cfg.mp_steps, lr=cfg.mp_lr,
                   train_epochs=cfg.mp_train_epochs, train_lr=cfg.pretrain_lr,
                   train_batch_size=cfg.pretrain_batch_size, batch_size=cfg.attack_batch_size,
                   init=cfg.poison_init, seed=cfg.seed, verbose=verbose)

    def poison(self, x, y, *, x_val=None, y_val=None):
        """(x_poison, y_poison): D_p^0 + delta with D_p^0's labels. D_v = (x_val, y_val); without it a seeded
        30% of (x, y) serves as D_v (base._defender_and_data)."""
        net, x, y, x_val, y_val = self._defender_and_data(x, y, x_val, y_val)
        ref = next(net.parameters())
        idx = self._craft_sources(len(y)).to(ref.device)
        x0, y_p = x[idx].clone(), y[idx].clone()
        delta = torch.zeros_like(x0, requires_grad=True)
        optimizer = torch.optim.Adam([delta], lr=self.lr, maximize=True)
        net.train()

        n_all = len(y) + len(y_p)
        length = self.train_epochs * math.ceil(n_all / self.train_batch_size)  # T, in steps
        self._inits = 0
        gen = torch.Generator().manual_seed(self.seed)
        ensemble = []
        for m in range(self.models):  # model m trained to round(m / M * T) steps
            member = self._fresh(net)
            for _ in range(round(m * length / self.models)):
                self._train_step(net, member, x, y, x0, y_p)
            ensemble.append(member)

        self.history = []
        for step in progress_bar(range(self.steps + 1), desc="metapoison", disable=not self.verbose):
            total = 0.0
            for member in ensemble:
                x_p = x0 + delta
                clean = torch.randperm(len(y), generator=gen)[:self.batch_size].to(ref.device)
                val = torch.randperm(len(y_val), generator=gen)[:self.batch_size].to(ref.device)
                with torch.set_grad_enabled(step < self.steps):  # the last pass only measures
                    adversarial = self.adversarial_loss(net, member["params"], x[clean], y[clean], x_p, y_p,
                                                        x_val[val], y_val[val]) / len(ensemble)
                if adversarial.requires_grad:
                    adversarial.backward(retain_graph=False)  # sums the ensemble's mean into delta.grad
                total += adversarial.item()
            if not math.isfinite(total):
                raise FloatingPointError(f"metapoison's adversarial loss became {total} at outer step {step}; rerun "
                                         "with a smaller train_lr. No poisons were returned.")
            if step % self.log_every == 0 or step == self.steps:
                self.history.append({"step": step, "adversarial_loss": total})
            if step == self.steps:
                break
            if delta.grad is not None:
                optimizer.step()
            optimizer.zero_grad()
            with torch.no_grad():
                self._project(delta, x0)
            for member in ensemble:  # one ordinary step each; past the training length, a fresh model
                self._train_step(net, member, x, y, x0 + delta.detach(), y_p)
                if member["age"] >= length:
                    member.update(self._fresh(net))
        self.delta_ = delta.detach()
        return (x0 + self.delta_).clamp(*self.pixel_range), y_p

    def adversarial_loss(self, net, params, x_b, y_b, x_p, y_p, xv_b, yv_b):
        """L(D_v batch, w^[K]): the validation loss after K unrolled SGD steps from `params` on the batch
        (x_b, y_b) U (x_p, y_p), differentiable in x_p."""
        w_k, _ = unrolled_parameters(net, params, torch.cat([x_b, x_p]), torch.cat([y_b, y_p]),
                                     self.unroll_steps, self.train_lr)
        return classifier_loss(net, w_k, xv_b, yv_b)

    def _project(self, delta, x0):
        """delta onto the L-infinity ball and the pixel range, in place."""
        delta.clamp_(-self.radius, self.radius)
        delta.copy_((x0 + delta).clamp(*self.pixel_range) - x0)

    def _fresh(self, net):
        """A model of the defender's architecture at a fresh seeded initialisation, with its batch stream."""
        self._inits += 1
        model = fresh_model(net, self.seed * 1_000_003 + self._inits)
        params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
        stream = torch.Generator().manual_seed(self.seed * 7 + self._inits)  # the model's batch order
        return {"params": params, "age": 0, "order": [], "gen": stream}

    def _train_step(self, net, member, x, y, x_p, y_p):
        """One step of the pretrain procedure's gradient descent on the member's next batch of D_tr U D_p."""
        if not member["order"]:
            n_all = len(y) + len(y_p)
            perm = torch.randperm(n_all, generator=member["gen"])
            member["order"] = list(perm.split(self.train_batch_size))
        batch = member["order"].pop(0).to(x.device)
        clean, poison = batch[batch < len(y)], batch[batch >= len(y)] - len(y)
        xb, yb = torch.cat([x[clean], x_p[poison]]), torch.cat([y[clean], y_p[poison]])
        params = member["params"]
        g = grad(lambda p: classifier_loss(net, p, xb, yb))(params)
        member["params"] = {k: (params[k] - self.train_lr * g[k]).detach() for k in params}
        member["age"] += 1
