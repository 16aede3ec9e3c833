"""Error-minimising noise (EMN; Huang, Ma, Erfani, Bailey & Wang, "Unlearnable examples: making personal
data unexploitable", ICLR 2021), the unlearnable-examples baseline of Lu, Kamath & Yu (TMLR 2022),
Section 3.2 (eq. 8) and Appendix B (B.1, eq. 43; B.2, Tables 12 and 13).

Sample-wise noise delta_i, ||delta_i||_inf <= eps, on the source points D_p^0 of D_tr, solving the
min-min problem (eq. 43)

    min_w  min_{delta}  L(D_tr with x_i -> x_i + delta_i for i in D_p^0,  w)

by alternating, round after round, on a model of the defender's architecture freshly initialised
(every module's reset_parameters, not the trained defender's weights) under a seed of its own,
SURROGATE_SEED_OFFSET + the run's seed, which also orders its batches: the defender is retrained from the
initialisation and batch order of the run's seed, which the attacker does not know (a surrogate that shared
them, as this one did up to 2026-12-07, trained like the victim step for step in the unlearnable mode):
  (a) `train_steps` steps of the protocol's mini-batch gradient descent (lr, batch_size; seeded
      shuffle, one pass after another) on D_tr with the current noise on its source points;
  (b) projected gradient DESCENT on every delta_i, the model fixed and in eval mode:
      x <- x - step * sign(grad_x l(x, y_i; w)),  then delta_i clipped to [-eps, eps] and x_i + delta_i
      clamped to the pixel range, `pgd_steps` times, step = step_fraction * eps, starting from the
      current delta_i (zero in the first round);
and stopping after the first round at whose end the model classifies at least `stop_accuracy` of the
perturbed points correctly (Huang's code stops once the error is at most 1%), or after `max_rounds`.
Labels are unchanged (clean label).

Two modes (B.2):
  * "add" (Table 12, the indiscriminate setting): the perturbed points are D_p, ADDED to D_tr;
  * "unlearnable" (Table 13): the perturbed points REPLACE their sources in D_tr
    (`replaces_sources = True`; epsilon = 1 perturbs the whole training set, the table's 100%).
The crafting is the same in both.

Defaults are Huang's CIFAR-10 sample-wise settings: eps 8/255 on [0, 1] images, i.e. 16/255 on this
library's [-1, 1] range; 20 PGD steps of eps/10; 10 model steps a round; stop at 99% accuracy.
Adapted: Huang initialises the model once (the architecture's own initialisation) and trains it with
its config's SGD (momentum 0.9, weight decay 5e-4) on unshuffled batches of 512; here the model is the
defender re-initialised under the seed and trained with the protocol's plain gradient descent
(pretrain_lr, pretrain_batch_size), the procedure the defender itself is trained with. Huang measures
the stopping accuracy on the whole (then entirely perturbed) training set; here on the perturbed points,
which is the same in the unlearnable mode at epsilon 1 and, at a small budget, the only set on which the
noise can be judged (a linear model never reaches 99% on all of MNIST). Huang's loop has no bound on
the rounds; `max_rounds` (default 100) bounds the run time (mnist-sample, epsilon 0.03, seed 0: the NN
defender's run stops by accuracy after 61 rounds, 108 s on 2 CPU cores; the LR's reaches 98.8% by round
41 but 100%, the first value >= 99% of 84 points, only in round 150, so it ends by the bound, 12 s, and
the retrained LR drops 0.7 points. Unlearnable mode at epsilon 1, LR: stops by accuracy after 40 rounds,
102 s, and the retrained LR loses nothing, 88.3% -> 88.3%: a linear model trained 100 epochs is not
made to learn the noise instead of the digits at this radius).
"""

import torch
import torch.nn.functional as F
from ..progress import progress_bar

from .base import PoisoningAttack, Setting, fresh_model

MODES = ("add", "unlearnable")
SURROGATE_SEED_OFFSET = 2_000_000  # the crafting model's seed: SURROGATE_SEED_OFFSET + the run's seed (docstring)


class ErrorMinimizingNoiseAttack(PoisoningAttack):
    """Sample-wise error-minimising noise (EMN, above) on epsilon*N training points.

    Args:
        defender: the trained defender; only its architecture is used (the attack re-initialises a copy).
        epsilon: budget as a fraction of |D_tr|: the points that get noise. (default: 0.03)
        mode: "add" (the noisy points are added to D_tr, Table 12) or "unlearnable" (they replace their
            sources in D_tr, Table 13). (default: "add")
        eps: L-infinity radius of the noise on the [-1, 1] pixel scale. (default: 16/255, Huang's 8/255 on [0, 1])
        pgd_steps: PGD steps on the noise a round. (default: 20)
        step_fraction: PGD step size as a fraction of eps. (default: 0.1)
        train_steps: gradient-descent steps of the crafting model a round. (default: 10)
        max_rounds: most rounds of (train, PGD). (default: 100)
        stop_accuracy: stop after a round whose model classifies at least this fraction of the noisy points
            correctly. (default: 0.99)
        lr: step size of the crafting model's gradient descent. (default: 0.1)
        batch_size: points per batch of that descent. (default: 100)
        random_start: start the noise uniform in [-eps, eps] (seeded) instead of at zero (Huang's
            default). (default: False)
        init: D_p^0 as the "first" epsilon*N points of D_tr or a seeded "random" choice. (default: "first")
        pixel_range: the noisy points are clamped to it. (default: (-1.0, 1.0))
        seed: seed of the model's initialisation, its batches and the random start. (default: 0)
        verbose: show a progress bar. (default: False)

    After `poison`, `history` has one entry a round: the crafting model's accuracy and mean loss on the
    noisy points after the PGD, and its last training batch's loss; `rounds_` is the number of rounds
    run, `stopped_by_accuracy_` whether the accuracy rule ended them and `crafting_model_` the model of
    the last round.
    """

    name = "emn"
    pgd_batch_size = 1000  # points a chunk in the PGD and the accuracy (their results do not depend on it)
    settings = (
        Setting("emn_mode", str, "add", MODES,
                "EMN: 'add' the noisy points to D_tr (Table 12) or let them replace their sources (Table 13)"),
        Setting("emn_eps", float, 16 / 255, "positive", "EMN: L-infinity radius of the noise on the [-1, 1] scale"),
        Setting("emn_pgd_steps", int, 20, "positive-count", "EMN: PGD steps on the noise a round"),
        Setting("emn_step_fraction", float, 0.1, "positive", "EMN: PGD step size as a fraction of emn-eps"),
        Setting("emn_train_steps", int, 10, "count", "EMN: gradient-descent steps of the crafting model a round"),
        Setting("emn_max_rounds", int, 100, "positive-count", "EMN: most rounds of (train, PGD)"),
        Setting("emn_stop_accuracy", float, 0.99, "fraction",
                "EMN: stop once the crafting model classifies this fraction of the noisy points correctly"),
    )
    quick = {"emn_max_rounds": 2, "emn_pgd_steps": 2}

    def __init__(self, defender, epsilon=0.03, *, mode="add", eps=16 / 255, pgd_steps=20, step_fraction=0.1,
                 train_steps=10, max_rounds=100, stop_accuracy=0.99, lr=0.1, batch_size=100, random_start=False,
                 init="first", pixel_range=(-1.0, 1.0), seed=0, verbose=False):
        super().__init__(epsilon, init=init, seed=seed)
        self.defender, self.mode, self.eps = defender, mode, eps
        self.pgd_steps, self.step_fraction, self.train_steps = pgd_steps, step_fraction, train_steps
        self.max_rounds, self.stop_accuracy, self.lr, self.batch_size = max_rounds, stop_accuracy, lr, batch_size
        self.random_start, self.pixel_range, self.verbose = random_start, pixel_range, verbose
        self._check_params()
        self.replaces_sources = mode == "unlearnable"

    def _check_params(self):
        super()._check_params()
        if self.defender is None:
            raise ValueError("EMN needs the defender (defender=...) for its architecture")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        self._check_counts("train_steps")
        self._check_counts("pgd_steps", "max_rounds", "batch_size", minimum=1)
        for name in ("eps", "step_fraction", "lr"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < float("inf"):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if not isinstance(self.stop_accuracy, (int, float)) or not 0 < self.stop_accuracy <= 1:
            raise ValueError(f"stop_accuracy must be a fraction in (0, 1], got {self.stop_accuracy!r}")
        lo, hi = self.pixel_range
        if not lo < hi:
            raise ValueError(f"pixel_range must be (low, high) with low < high, got {self.pixel_range!r}")

    @classmethod
    def from_config(cls, cfg, *, defender=None, attacker=None, checkpoint=None, verbose=False):
        return cls(defender, cfg.epsilon, mode=cfg.emn_mode, eps=cfg.emn_eps, pgd_steps=cfg.emn_pgd_steps,
                   step_fraction=cfg.emn_step_fraction, train_steps=cfg.emn_train_steps,
                   max_rounds=cfg.emn_max_rounds, stop_accuracy=cfg.emn_stop_accuracy, lr=cfg.pretrain_lr,
                   batch_size=cfg.pretrain_batch_size, init=cfg.poison_init, seed=cfg.seed, verbose=verbose)

    @property
    def step_size(self):
        return self.step_fraction * self.eps

    def poison(self, x, y, *, x_val=None, y_val=None):
        """(x_poison, y_poison): the source points plus their error-minimising noise, labels unchanged.
        D_v is not used."""
        model = fresh_model(self.defender, SURROGATE_SEED_OFFSET + self.seed)
        ref = next(model.parameters())
        x, y = x.to(ref.device, ref.dtype), y.to(ref.device)
        idx = self._craft_sources(len(y)).to(ref.device)
        x0, y_p = x[idx].clone(), y[idx].clone()
        if self.random_start:
            g = torch.Generator().manual_seed(self.seed + 1)
            delta = (torch.rand(x0.shape, generator=g, dtype=ref.dtype) * 2 - 1).to(ref.device) * self.eps
            delta = self._project(x0, x0 + delta) - x0
        else:
            delta = torch.zeros_like(x0)
        x_cur = x.clone()  # D_tr with the current noise on its source points: what the model trains on
        batches = _Batches(len(y), self.batch_size, SURROGATE_SEED_OFFSET + self.seed)
        params = [p for p in model.parameters() if p.requires_grad]
        self.history, self.stopped_by_accuracy_ = [], False
        bar = progress_bar(range(1, self.max_rounds + 1), desc="EMN rounds", disable=not self.verbose)
        for round_ in bar:
            x_cur[idx] = x0 + delta
            train_loss = self._train(model, params, x_cur, y, batches)
            delta = self.perturb(model, x0, y_p, delta)
            loss, acc = self._evaluate(model, x0 + delta, y_p)
            self.history.append({"round": round_, "accuracy": acc, "loss": loss, "train_loss": train_loss})
            bar.set_postfix(accuracy=f"{acc:.3f}", loss=f"{loss:.4f}")
            if acc >= self.stop_accuracy:
                self.stopped_by_accuracy_ = True
                break
        self.rounds_, self.crafting_model_ = len(self.history), model
        return (x0 + delta).detach(), y_p

    def _train(self, model, params, x, y, batches):
        """`train_steps` steps of w -= lr * grad of the mean cross-entropy on the next batches."""
        model.train()
        last = float("nan")
        for _ in range(self.train_steps):
            b = batches.next().to(x.device)
            loss = F.cross_entropy(model(x[b]), y[b])
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                for p, g in zip(params, grads):
                    p.sub_(self.lr * g)
            last = loss.item()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"EMN: the crafting model's gradient descent diverged (loss {last}) "
                                         f"with lr {self.lr}; use a smaller learning rate (--pretrain-lr)")
        model.eval()
        return last

    def perturb(self, model, x0, y, delta):
        """`pgd_steps` steps of projected sign-gradient descent on the per-point cross-entropy under the
        fixed `model` (eval mode), from x0 + delta; returns the new delta (|delta| <= eps, x0 + delta in
        the pixel range)."""
        model.eval()
        out = torch.empty_like(delta)
        for i in range(0, len(y), self.pgd_batch_size):
            xs, ys = x0[i:i + self.pgd_batch_size], y[i:i + self.pgd_batch_size]
            x_adv = self._project(xs, xs + delta[i:i + self.pgd_batch_size])
            for _ in range(self.pgd_steps):
                x_adv.requires_grad_(True)
                loss = F.cross_entropy(model(x_adv), ys, reduction="sum")  # a sum: each point's own gradient
                (grad,) = torch.autograd.grad(loss, x_adv)
                x_adv = self._project(xs, x_adv.detach() - self.step_size * grad.sign())
            out[i:i + self.pgd_batch_size] = x_adv - xs
        return out

    def _project(self, x0, x):
        """x clipped to the L-infinity ball of radius eps around x0, then to the pixel range."""
        x = torch.max(torch.min(x, x0 + self.eps), x0 - self.eps)
        return x.clamp(*self.pixel_range)

    @torch.no_grad()
    def _evaluate(self, model, x, y):
        """(mean cross-entropy, accuracy) of `model` on (x, y)."""
        model.eval()
        loss, correct = 0.0, 0
        for i in range(0, len(y), self.pgd_batch_size):
            logits = model(x[i:i + self.pgd_batch_size])
            ys = y[i:i + self.pgd_batch_size]
            loss += F.cross_entropy(logits, ys, reduction="sum").item()
            correct += (logits.argmax(1) == ys).sum().item()
        return loss / len(y), correct / len(y)


class _Batches:
    """Mini-batches of indices, a seeded shuffle each pass, drawn one at a time across rounds."""

    def __init__(self, n, batch_size, seed):
        self.n, self.batch_size = n, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.queue = []

    def next(self):
        if not self.queue:
            order = torch.randperm(self.n, generator=self.generator)
            self.queue = [order[i:i + self.batch_size] for i in range(0, self.n, self.batch_size)][::-1]
        return self.queue.pop()
