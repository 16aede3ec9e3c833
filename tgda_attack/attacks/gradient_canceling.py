"""Gradient Canceling (Lu, Kamath and Yu, ICML 2023, "Exploring the limits of model-targeted
indiscriminate data poisoning attacks"), the strongest attack its authors found after TGDA.

A model-targeted attack: given target parameters w_t (a model the attacker wants the defender to
become), the poisons D_p = {(x_p, y_p)} are chosen so that w_t is a stationary point of the defender's
training loss on D_tr U D_p, i.e. so that the gradient of the mean training loss vanishes at w_t:

    min_{x_p in [lo, hi]^d}  || (1 / (N + n_p)) [ sum_{i in D_tr} grad_w l(x_i, y_i; w_t)
                                                 + sum_{p in D_p} grad_w l(x_p, y_p; w_t) ] ||^2      (GC)

The first sum is constant and computed once; the objective's gradient in x_p is a mixed second
derivative (one double backward a step). It is minimised by projected Adam on the poisons' pixels,
clamped to the valid pixel range after every step (the authors' released code omits the projection).
The poisons start at D_p^0, the epsilon*N chosen points of D_tr, with their true labels (as in the
authors' code), labels flipped by the paper's rule y -> K - 1 - y, or labels the attack chooses to cancel
D_tr's gradient ("cancel", `canceling_labels`): poison by poison, the class c whose gradient
grad_w l(x_p, c; w_t) leaves the running sum g_clean + sum_{earlier poisons} g the smallest (a greedy
minimisation of (GC) over the labels at the starting pixels). They keep those labels.
Measured on full MNIST (LR, epsilon 0.03, the default GradPC target, seeds 0 1 2): drops 1.16 / 0.82 / 1.73
with "cancel" against 0.58 +- 0.27 with true labels; the greedy rule gives nearly every poison one class.

Target parameters (attacks/targets.py): given explicitly (`target`, a state_dict of the defender), or
made from the trained defender by GradPC, the authors' generator (gradient-ascent corruption of the
parameters within an L2 ball), or by a large-budget label flip. A target must be within the budget's
reach: for a defender whose logits are a final linear layer (LR, NN, CNN) `necessary_epsilon` bounds the
budget any target needs (through that layer's parameters), and the GradPC
radius is chosen, by default, as the largest whose target needs at most epsilon. (A 10% label-flip
target needs about 3.3 times a 3% budget: on full MNIST its objective fell only 10% and the attack
did no better than a label flip.)

Two recipes (`recipe`, --gc-recipe):
  * "valid" (the default): the above, every poison kept in the pixel range of the data.
  * "authors": the attack as watml/plim runs it on MNIST (_poison_as_authors): their GradPC target (a fresh
    model trained one epoch by Adadelta, corrupted within an L2 ball of 0.5), their objective (the first
    parameter tensor's gradient only, sum-reduced, its norm), full-batch gradient descent with a cosine step
    in their input coordinates (models.MnistStandardize), no projection. With their defenders (gc-lr, gc-nn,
    gc-cnn) and their evaluation (`--pretrain-batch-size 10000`, 1000 for the CNN; 100 epochs of lr 0.1) it
    is their experiment on our split of D_tr. As in their code the target's network starts from an
    initialisation of its own (AUTHORS_TARGET_SEED_OFFSET), not the retrained defender's. Measured on full
    MNIST, epsilon 0.03, over 15 retrainings (3 seeds x 5 training seeds): gc-lr drops 19.91 +- 9.61 (theirs
    21.1) with poison pixels from -289 to 334 in [0, 1] image units, 50-58% of them outside [0, 1]; gc-nn
    0.15 +- 1.75 (theirs 5.3; one retraining of the 15 drops 6.44). docs/RESULTS.md, "Gradient Canceling as its authors
    ran it".
"""
import copy
import logging
import math
import time
import warnings

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from ..models import MnistStandardize
from ..progress import progress_bar
from ..rundir import RunFolderError, save_atomic
from ..training import accuracy, tensor_digest, weights_digest
from .base import PoisoningAttack, Setting, StopSignals, kept_progress
from .feasible import FEASIBLE_SETTINGS, check_feasible, make_feasible_set
from .targets import (TARGET_SETTINGS, authors_gradpc_target, gradpc_target, label_flip_target, logits_layer,
                      necessary_epsilon)

TARGETS = ("gradpc", "label-flip")
LABELS = ("true", "reverse", "cancel")
CANCEL_CHUNK_FLOATS = 2 ** 24  # per-example, per-class gradients held at once when labels are chosen
RECIPES = ("valid", "authors")  # valid pixels (ours, the default) or the authors' code as they ran it
DEFAULT_RELATIVE_RADIUS = 0.1  # GradPC radius / ||w|| where no reachability bound applies (no final linear layer)
CHECKPOINT_SECONDS = 60.0  # with a checkpoint, the descent saves its progress at least this often (and when stopped)

logger = logging.getLogger(__name__)

# The authors' recipe (watml/plim GC/mnist_{lr,nn,cnn}-0.03*.py): by defender kind, the epochs of full-batch
# gradient descent on the poisons and its initial step (cosine-decayed), in their input coordinates.
AUTHORS_SCHEDULE = {"lr": (1000, 10.0), "nn": (2000, 10.0), "cnn": (2000, 5.0)}
AUTHORS_RADIUS = 0.5  # GradPC's L2 ball (their target files mnist_gd_{nn,cnn}_5e-1.pt)
AUTHORS_STOP = 1.0  # they stop once the objective is below 1
# The target's network starts from an initialisation of its own, seed AUTHORS_TARGET_SEED_OFFSET + the run's seed, not
# the one the defender is retrained from (the run's seed): in their code the target comes from GradPC/grad_attack.py,
# another process under seed 1, and the evaluation network is built afresh under seed 0. Sharing the initialisation
# made our drop on gc-lr 35.25 +- 21.64 where 12 retrainings from other initialisations gave 14.13 +- 4.42 (docs/RESULTS.md).
AUTHORS_TARGET_SEED_OFFSET = 1_000_000


def defender_kind(model):
    """"cnn" if the model has a convolution, "lr" if it is one linear layer, else "nn"."""
    modules = list(model.modules())
    if any(isinstance(m, torch.nn.Conv2d) for m in modules):
        return "cnn"
    return "lr" if sum(isinstance(m, torch.nn.Linear) for m in modules) == 1 else "nn"


class GradientCancelingAttack(PoisoningAttack):
    """Poisons that make target parameters a stationary point of the training loss (GC, above).

    Args:
        defender: the trained defender (an nn.Module; the attack works on a copy).
        epsilon: poison budget as a fraction of |D_tr|. (default: 0.03)
        target: the target parameters as a state_dict of the defender, or None to make them by a
            large-budget label flip (target_epsilon, target_epochs, target_lr, batch_size). (default: None)
        target_epsilon: size of that label flip as a fraction of |D_tr|. A target the poisons cannot reach
            leaves the objective nearly where it started: on mnist-sample (LR, epsilon 0.03, seed 0) a flip of
            100% moved the norm 6.8 -> 6.4 and dropped accuracy 2.8 points, one of 10% moved it 1.09 -> 0.75
            and dropped it 4.6 (label flip: 4.3). (default: 0.1)
        target_epochs: epochs of gradient descent from the trained defender on D_tr U the flip. (default: 10)
        target_lr: its step size. (default: 0.1)
        target_max_grad_norm: its gradient-norm bound, each step's gradient scaled down to it where longer (0:
            none; from_config passes the defender training's pretrain_max_grad_norm). (default: 0.0)
        steps: Adam steps on the poisons' pixels. (default: 500)
        lr: Adam's step size. (default: 0.01)
        batch_size: points per batch when D_tr's gradient and the target are computed. (default: 1000)
        num_classes: K, for the label flip of D_p^0. (default: 10)
        init: D_p^0 as the "first" epsilon*N points of D_tr or a seeded "random" choice. (default: "first")
        pixel_range: the poisons are clamped to it. (default: (-1.0, 1.0))
        seed: seed of the random choices. (default: 0)
        verbose: show a progress bar. (default: False)
        checkpoint: file to keep the descent's progress in (the target, the labels, the poisons, Adam's state) and to
            resume from: written when the descent starts, every CHECKPOINT_SECONDS, at its end and when SIGINT/SIGTERM
            stops it at a step's end (KeyboardInterrupt; before the descent a signal acts at once); a resume
            continues the same trajectory. (default: None)

    After `poison`, `target_` holds the target state_dict and `history` the objective's square root
    (the norm of the mean gradient at w_t) every `log_every` steps, from step 0.
    """

    name = "gradient-canceling"
    log_every = 10
    settings = TARGET_SETTINGS + (
        Setting("gc_steps", int, 500, "positive-count", "Adam steps of gradient canceling on the poisons' pixels"),
        Setting("gc_lr", float, 0.01, "positive", "Adam's step size in gradient canceling"),
        Setting("gc_target", str, "gradpc", TARGETS, "how gradient canceling makes its target parameters"),
        Setting("gc_radius", float, 0.0, "non-negative",
                "GradPC's L2 radius relative to ||w||; 0: the largest the budget can reach (LR), else 0.1"),
        Setting("gc_labels", str, "true", LABELS, "the poisons' labels: their sources', flipped (9 - y), or each the class that best cancels D_tr's "
                "gradient at the target (greedy)"),
        Setting("gc_recipe", str, "valid", RECIPES,
                "valid: poisons kept in the pixel range (ours); authors: Gradient Canceling as watml/plim runs it "
                "(its GradPC target, first-layer objective, gradient descent without projection)"),
    ) + FEASIBLE_SETTINGS
    quick = {"gc_steps": 3, "target_epochs": 1}

    def __init__(self, defender, epsilon=0.03, *, target=None, target_kind="gradpc", radius=0.0, labels="true",
                 target_epsilon=0.1, target_epochs=10, target_lr=0.1, steps=500, lr=0.01, batch_size=1000,
                 num_classes=10, init="first", pixel_range=(-1.0, 1.0), seed=0, verbose=False, recipe="valid",
                 feasible_set="box", feasible_quantile=0.9, target_max_grad_norm=0.0, checkpoint=None):
        super().__init__(epsilon, init=init, seed=seed)
        self.defender, self.target, self.recipe, self.checkpoint = defender, target, recipe, checkpoint
        self.feasible_set, self.feasible_quantile, self.feasible_ = feasible_set, feasible_quantile, None
        self.target_kind, self.radius, self.labels = target_kind, radius, labels
        self.target_epsilon, self.target_epochs, self.target_lr = target_epsilon, target_epochs, target_lr
        self.target_max_grad_norm = target_max_grad_norm
        self.steps, self.lr, self.batch_size, self.num_classes = steps, lr, batch_size, num_classes
        self.pixel_range, self.verbose = pixel_range, verbose
        self._check_params()

    def _check_params(self):
        super()._check_params()
        if self.defender is None:
            raise ValueError("gradient canceling needs the trained defender (defender=...)")
        if self.target_kind not in TARGETS or self.labels not in LABELS or self.recipe not in RECIPES:
            raise ValueError(f"target_kind must be one of {TARGETS}, labels one of {LABELS} and recipe one of "
                             f"{RECIPES}, got {self.target_kind!r}, {self.labels!r} and {self.recipe!r}")
        if self.recipe == "authors" and (self.labels != "true" or self.init != "first" or self.target_kind != "gradpc"):
            raise ValueError("the authors' recipe poisons the first epsilon*N points of D_tr with their true labels "
                             "toward a GradPC target: use labels='true', init='first', target_kind='gradpc'")
        check_feasible(self.feasible_set, self.feasible_quantile)
        if self.recipe == "authors" and self.feasible_set != "box":
            raise ValueError("the authors' recipe projects onto no set at all: use feasible_set='box' with it")
        if not self.radius >= 0:
            raise ValueError(f"radius must be >= 0 (0: chosen from the budget), got {self.radius}")
        if not 0 < self.target_epsilon <= 1:
            raise ValueError(f"target_epsilon is a fraction of the training set in (0, 1], got {self.target_epsilon}")
        self._check_counts("target_epochs", "steps")
        self._check_counts("batch_size", minimum=1)
        if self.lr <= 0 or self.target_lr <= 0:
            raise ValueError("the step sizes lr and target_lr must be positive")
        if not self.target_max_grad_norm >= 0:
            raise ValueError(f"target_max_grad_norm must be >= 0 (0: no bound), got {self.target_max_grad_norm!r}")

    @classmethod
    def check_config(cls, cfg):
        if cfg.gc_recipe == "authors" and (cfg.gc_labels != "true" or cfg.poison_init != "first"
                                           or cfg.gc_target != "gradpc"):
            raise ValueError("gc-recipe authors poisons the first epsilon*N training points with their true labels "
                             "toward a GradPC target: drop --gc-labels, --poison-init and --gc-target")
        if cfg.gc_recipe == "authors" and cfg.feasible_set != "box":
            raise ValueError("gc-recipe authors projects onto no feasible set: drop --feasible-set")
        if cfg.gc_recipe == "authors" and not cfg.dataset.startswith("mnist"):
            raise ValueError(f"gc-recipe authors is the authors' MNIST recipe (their pixel normalisation and schedules); "
                             f"dataset {cfg.dataset} needs --gc-recipe valid")

    @classmethod
    def unread_settings(cls, cfg):
        """The authors' recipe has its own schedule, step and radius (AUTHORS_SCHEDULE, AUTHORS_RADIUS)."""
        return ("gc_steps", "gc_lr", "gc_radius") if cfg.gc_recipe == "authors" else ()

    @classmethod
    def from_config(cls, cfg, *, defender=None, attacker=None, checkpoint=None, verbose=False):
        return cls(defender, cfg.epsilon, target_kind=cfg.gc_target, radius=cfg.gc_radius, labels=cfg.gc_labels,
                   target_epsilon=cfg.target_epsilon, target_epochs=cfg.target_epochs,
                   target_lr=cfg.pretrain_lr, steps=cfg.gc_steps, lr=cfg.gc_lr, batch_size=cfg.pretrain_batch_size,
                   init=cfg.poison_init, seed=cfg.seed, verbose=verbose, recipe=cfg.gc_recipe,
                   feasible_set=cfg.feasible_set, feasible_quantile=cfg.feasible_quantile,
                   target_max_grad_norm=cfg.pretrain_max_grad_norm, checkpoint=checkpoint)

    def poison(self, x, y, *, x_val=None, y_val=None):
        """(x_poison, y_poison) minimising (GC) at the target parameters. D_v is not used."""
        model = copy.deepcopy(self.defender)
        ref = next(model.parameters())
        x, y = x.to(ref.device, ref.dtype), y.to(ref.device)
        idx = self._craft_sources(len(y)).to(ref.device)  # a budget of no poison is refused before any training
        self._start = None if not self.checkpoint else [  # what a kept checkpoint began from (a given target too)
            weights_digest(model), tensor_digest(x), tensor_digest(y),
            None if self.target is None else weights_digest(self.target)]
        self._began, self.earlier_seconds_ = time.perf_counter(), 0.0
        kept = self._resume(model)
        if self.recipe == "authors":
            return self._poison_as_authors(model, x, y, idx, kept)
        if kept is None:
            self.target_ = self._target_parameters(model, x, y)
        else:  # the target (and what was measured of it) as the interrupted attack made it
            self.target_, self.info_ = {k: v.to(ref.device) for k, v in kept["target"].items()}, dict(kept["info"])
            self.target_info_ = self.info_["target"]
        model.load_state_dict(self.target_)
        model.eval()
        params = {k: v.detach() for k, v in model.named_parameters()}

        self.feasible_ = make_feasible_set(self.feasible_set, x, y, quantile=self.feasible_quantile,
                                           pixel_range=self.pixel_range, num_classes=self.num_classes)
        self.info_["feasible_set"] = self.feasible_.describe()
        g_clean = self.clean_gradient(model, params, x, y)
        if kept is not None:
            y_p = kept["labels"].to(ref.device)
        elif self.labels == "cancel":
            y_p = self.canceling_labels(model, params, g_clean, x[idx])
        else:
            y_p = y[idx].clone() if self.labels == "true" else (self.num_classes - 1) - y[idx]
        self.info_["label_counts"] = torch.bincount(y_p, minlength=self.num_classes).tolist()
        return self.descend(model, params, g_clean, self._project(x[idx], y_p), y_p, len(y), kept), y_p

    def descend(self, model, params, g_clean, x_start, y_p, n_clean, kept=None):
        """Projected Adam on the poisons' pixels from x_start (`steps` steps of `lr`) minimising (GC) at the
        target loaded in `model`, D_tr's gradient sum g_clean over n_clean points; logs `history`. The poisons.
        `kept`: a checkpoint's progress (_resume) to continue from."""
        x_p = (x_start if kept is None else kept["poisons"].to(x_start)).clone().requires_grad_(True)
        scale = 1.0 / (n_clean + len(y_p))
        optimizer = torch.optim.Adam([x_p], lr=self.lr)
        if kept is not None:
            optimizer.load_state_dict(kept["optimizer"])
        self.history = [] if kept is None else list(kept["history"])
        first = 0 if kept is None else kept["step"]
        with _Saver(self, y_p, self.steps, first, fresh=kept is None) as saver:
            for step in progress_bar(range(first, self.steps + 1), desc="gradient canceling", disable=not self.verbose,
                                     initial=first, total=self.steps + 1):
                saver.at_step(step, x_p, optimizer)
                objective = self.objective(model, params, g_clean, x_p, y_p, scale)
                if step % self.log_every == 0 or step == self.steps:
                    self.history.append({"step": step, "gradient_norm": objective.detach().sqrt().item()})
                if step == self.steps:
                    break
                optimizer.zero_grad()
                objective.backward()
                optimizer.step()
                with torch.no_grad():
                    x_p.copy_(self._project(x_p, y_p))
            saver.finish(step, x_p, optimizer)
        return x_p.detach()

    def _settings(self):
        """What the descent's trajectory depends on, stored in its checkpoint (a resume under others is refused)."""
        settings = {"recipe": self.recipe, "epsilon": self.epsilon, "init": self.init, "seed": self.seed,
                    "batch_size": self.batch_size, "log_every": self.log_every, "start": getattr(self, "_start", None)}
        if self.recipe == "authors":
            return {**settings, "schedule": {k: list(v) for k, v in AUTHORS_SCHEDULE.items()},
                    "radius": AUTHORS_RADIUS, "stop": AUTHORS_STOP}
        if self.target is None:  # how the target is made
            settings.update(target_kind=self.target_kind, radius=self.radius, target_epsilon=self.target_epsilon,
                            target_epochs=self.target_epochs, target_lr=self.target_lr,
                            target_max_grad_norm=self.target_max_grad_norm)
        if self.feasible_set != "box":
            settings.update(feasible_set=self.feasible_set, feasible_quantile=self.feasible_quantile)
        return {**settings, "labels": self.labels, "steps": self.steps, "lr": self.lr, "num_classes": self.num_classes,
                "pixel_range": list(self.pixel_range)}

    def _resume(self, model):
        """The kept progress of an interrupted attack under these settings (its `target`, `info`, `labels`,
        `poisons`, `step`, `history`, `seconds` and, for the valid recipe, Adam's `optimizer` state), or None."""
        required = {"step": int, "target": dict, "info": dict, "labels": torch.Tensor, "poisons": torch.Tensor,
                    "history": list, "seconds": float}
        state = kept_progress(self.checkpoint, self._settings(),
                              {**required, **({"optimizer": dict} if self.recipe == "valid" else {})})
        if state is None:
            return None
        shapes = lambda state: {k: tuple(v.shape) for k, v in state.items()}  # noqa: E731 (what load_state_dict checks)
        if not all(isinstance(v, torch.Tensor) for v in state["target"].values()) or \
                shapes(state["target"]) != shapes(model.state_dict()):
            raise RunFolderError(f"{self.checkpoint} holds the target of another model (other parameters or shapes); "
                                 "remove it to restart the attack")
        self.earlier_seconds_ = state["seconds"]
        logger.info("resuming Gradient Canceling from %s at step %d", self.checkpoint, state["step"])
        return state

    def _poison_as_authors(self, model, x, y, idx, kept=None):
        """The authors' recipe (watml/plim): their GradPC target (targets.authors_gradpc_target, radius 0.5);
        the first epsilon*N points of D_tr (idx, poison's D_p^0) with their true labels; the objective
        ||g_clean + g_poison||_2 of sum-reduced cross-entropy gradients of the *first parameter tensor* only (for
        LR its weight, for the NN the first layer's weight, for the CNN conv1's weight); full-batch gradient descent
        on the poisons in their input coordinates (z = (x01 - 0.1307) / 0.3081, models.MnistStandardize) with the
        step lr0 * (1 + cos(pi e / E)) / 2 for E epochs (AUTHORS_SCHEDULE), stopping once the objective is below 1,
        and no projection: the poisons may leave the pixel range (info_["pixels"] says how far).

        The objective is the norm, as in their first upload of the scripts (90dadc3); the commit a minute later
        (bd328e2, their HEAD) squares it, and with lr 10 the squared objective's first steps (gradients of
        order 2 ||g|| = 7e4 a poison) overflow to nan in float32 and float64 alike (measured on mnist-sample,
        gc-lr: 1.3e9, 4.5e69, 1.4e130 at steps 0, 10, 20), so no result can come from it.
        `kept`: a checkpoint's progress (_resume) to continue from."""
        kind = defender_kind(model)
        epochs, lr0 = AUTHORS_SCHEDULE[kind]
        if kept is not None:
            self.target_ = {k: v.to(x.device) for k, v in kept["target"].items()}
        elif self.target is not None:
            self.target_ = {k: v.to(x.device) for k, v in self.target.items()}
        else:
            self.target_ = authors_gradpc_target(model, x, y, radius=AUTHORS_RADIUS,
                                                 seed=AUTHORS_TARGET_SEED_OFFSET + self.seed)
        model.load_state_dict(self.target_)
        model.eval()
        name = next(iter(model.named_parameters()))[0]
        params = {k: v.detach() for k, v in model.named_parameters()}
        y_p = y[idx].clone()
        a, c = MnistStandardize.SCALE, MnistStandardize.SHIFT
        z = (x[idx] * a + c if kept is None else kept["poisons"].to(x)).detach().clone()  # in the authors' coordinates
        g_clean = self._first_gradient(model, params, name, x, y, create_graph=False)
        self.history, reached = ([] if kept is None else list(kept["history"])), None
        first = 0 if kept is None else kept["step"]
        with _Saver(self, y_p, epochs, first, fresh=kept is None) as saver:
            for epoch in progress_bar(range(first, epochs + 1), desc="gradient canceling (authors)",
                                      disable=not self.verbose, initial=first, total=epochs + 1):
                saver.at_step(epoch, z)
                z.requires_grad_(True)
                objective = (g_clean + self._first_gradient(model, params, name, (z - c) / a, y_p, create_graph=True)
                             ).norm()
                if not math.isfinite(objective.item()):
                    raise FloatingPointError(f"gradient canceling (the authors' recipe) diverged at epoch {epoch} of "
                                             f"{epochs}: the objective became {objective.item()}; no poisons were returned")
                if epoch % self.log_every == 0 or epoch == epochs or objective.item() < AUTHORS_STOP:
                    self.history.append({"step": epoch, "objective": objective.item()})
                if objective.item() < AUTHORS_STOP or epoch == epochs:
                    reached = objective.item()
                    break
                (grad,) = torch.autograd.grad(objective, z)
                with torch.no_grad():
                    z = z - lr0 * 0.5 * (1 + math.cos(math.pi * epoch / epochs)) * grad
            saver.finish(epoch, z)
        x_p = ((z.detach() - c) / a)
        image = (x_p + 1) / 2  # the poisons as images in [0, 1]
        self.info_ = {"recipe": "authors", "target": {"kind": "gradpc (authors)", "radius": AUTHORS_RADIUS,
                                                      "parameter": name, "train_accuracy": accuracy(model, x, y)},
                      "schedule": {"epochs": epochs, "lr": lr0, "stopped_at": self.history[-1]["step"]},
                      "objective": {"start": self.history[0]["objective"], "end": reached},
                      "pixels": {"min": image.min().item(), "max": image.max().item(),
                                 "outside_share": ((image < 0) | (image > 1)).double().mean().item()}}
        return x_p, y_p

    def _first_gradient(self, model, params, name, x, y, create_graph):
        """The gradient of the summed cross-entropy w.r.t. the parameter tensor `name` only (others fixed)."""
        leaves = dict(params)
        leaves[name] = params[name].detach().requires_grad_(True)
        total = None
        for i in range(0, len(y), self.batch_size):
            loss = F.cross_entropy(functional_call(model, leaves, (x[i:i + self.batch_size],)), y[i:i + self.batch_size],
                                   reduction="sum")
            (g,) = torch.autograd.grad(loss, leaves[name], create_graph=create_graph)
            total = g if total is None else total + g
        return total if create_graph else total.detach()

    def _target_parameters(self, model, x, y):
        """The target state_dict; sets target_info_ (how it was made, the budget it needs where known)."""
        self.target_info_ = {}
        if self.target is not None:
            target = {k: v.to(next(model.parameters()).device) for k, v in self.target.items()}
        elif self.target_kind == "gradpc":
            target = self._gradpc(model, x, y)
        else:
            target = label_flip_target(model, x, y, epsilon=self.target_epsilon, epochs=self.target_epochs,
                                       lr=self.target_lr, batch_size=self.batch_size,
                                       max_grad_norm=self.target_max_grad_norm, num_classes=self.num_classes,
                                       seed=self.seed, verbose=self.verbose)
        probe = copy.deepcopy(model).eval()  # dropout off: the bound of the model as it is evaluated
        probe.load_state_dict(target)
        self.target_info_.update(kind="given" if self.target is not None else self.target_kind,
                                 necessary_epsilon=necessary_epsilon(probe, x, y, self.pixel_range),
                                 train_accuracy=accuracy(probe, x, y))
        self.info_ = {"target": self.target_info_}
        return target

    def _gradpc(self, model, x, y):
        """GradPC at radius * ||w||; radius 0: where necessary_epsilon applies, the largest radius whose target
        needs at most epsilon (bisection on it), else DEFAULT_RELATIVE_RADIUS."""
        size = torch.sqrt(sum(p.detach().pow(2).sum() for p in model.parameters())).item()
        make = lambda r: gradpc_target(model, x, y, radius=r * size, seed=self.seed)  # noqa: E731
        self.target_info_["weight_norm"] = size
        if self.radius > 0 or logits_layer(model) is None:
            self.target_info_["relative_radius"] = self.radius or DEFAULT_RELATIVE_RADIUS
            return make(self.target_info_["relative_radius"])
        probe = copy.deepcopy(model).eval()  # dropout off: the bound of the model as it is evaluated

        def needs(r):
            probe.load_state_dict(make(r))
            return necessary_epsilon(probe, x, y, self.pixel_range)

        low, high = 0.0, 1.0
        while needs(high) <= self.epsilon and high < 64:
            low, high = high, 2 * high
        for _ in range(12):
            mid = (low + high) / 2
            low, high = (mid, high) if needs(mid) <= self.epsilon else (low, mid)
        self.target_info_["relative_radius"] = low
        if low == 0.0:  # no corruption within reach: GC would aim at the model it attacks
            own = self.target_info_["defender_needs_epsilon"] = needs(0.0)
            why = (f"the trained defender itself needs {own:.4g} (it is not at an optimum of D_tr)" if own > self.epsilon
                   else f"the smallest corruption tried (radius {high:.2g} of ||w||) already needs {needs(high):.4g}")
            warnings.warn(f"Gradient Canceling: no GradPC target within reach of epsilon {self.epsilon}: {why}, so "
                          "the target is the defender unchanged and the attack can do little; choose a radius "
                          "(--gc-radius) or another target (--gc-target label-flip)", stacklevel=2)
        return make(low)

    def clean_gradient(self, model, params, x, y):
        """sum_{i in D_tr} grad_w l(x_i, y_i; w_t), flattened (float64 accumulation)."""
        total = None
        for i in range(0, len(y), self.batch_size):
            g = self._flat_gradient(model, params, x[i:i + self.batch_size], y[i:i + self.batch_size], create_graph=False)
            total = g.double() if total is None else total + g.double()
        return total.to(next(iter(params.values())).dtype)

    def canceling_labels(self, model, params, g_clean, x0):
        """Labels for poisons starting at x0 (each projected onto its class's feasible set first): poison by
        poison, the class c minimising ||r + grad_w l(x_i, c; w_t)||, r the running sum of D_tr's gradient and
        the earlier poisons' (module docstring). Per-example gradients by torch.func.vmap, in chunks."""
        leaves = {k: v.detach() for k, v in params.items()}

        def loss_of_one(p, xi, ci):
            return F.cross_entropy(functional_call(model, p, (xi[None],)), ci[None], reduction="sum")

        per_example = vmap(grad(loss_of_one), in_dims=(None, 0, 0))
        size = sum(v.numel() for v in leaves.values())
        chunk = max(1, CANCEL_CHUNK_FLOATS // (self.num_classes * size))
        residual = g_clean.double().clone()
        labels = torch.empty(len(x0), dtype=torch.long, device=x0.device)
        for start in range(0, len(x0), chunk):
            grads = []  # (chunk, K, P): each poison's gradient for each class, at its class's projected start
            for c in range(self.num_classes):
                classes = torch.full((min(chunk, len(x0) - start),), c, dtype=torch.long, device=x0.device)
                points = self._project(x0[start:start + chunk], classes)
                g = per_example(leaves, points, classes)
                grads.append(torch.cat([g[k].reshape(len(classes), -1) for k in leaves], 1))
            grads = torch.stack(grads, 1).double()
            for i in range(grads.shape[0]):
                best = (residual[None] + grads[i]).pow(2).sum(1).argmin()
                labels[start + i] = best
                residual += grads[i, best]
        return labels

    def objective(self, model, params, g_clean, x_p, y_p, scale):
        """(GC): the squared norm of the mean training-loss gradient at w_t over D_tr U D_p."""
        g = g_clean + self._flat_gradient(model, params, x_p, y_p, create_graph=True)
        return (scale * g).pow(2).sum()

    @staticmethod
    def _flat_gradient(model, params, x, y, create_graph):
        leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        loss = F.cross_entropy(functional_call(model, leaves, (x,)), y, reduction="sum")
        grads = torch.autograd.grad(loss, list(leaves.values()), create_graph=create_graph)
        return torch.cat([g.reshape(-1) for g in grads])


class _Saver:
    """Keeps a Gradient Canceling descent's progress in the attack's checkpoint (none: does nothing). `at_step` is
    called at the start of each step, before its objective, with the poisons (and Adam) as they enter it: it saves
    them at the descent's first step (the target and labels made, the work before the descent), once
    CHECKPOINT_SECONDS have passed since the last save, or when SIGINT/SIGTERM asked the attack to stop, and then
    raises KeyboardInterrupt (a second signal acts at once). `finish` saves the step the descent ended at, so that a
    rerun returns its poisons at once. The history kept is that of the steps before the saved one: a resume continues
    the same trajectory and record."""

    def __init__(self, attack, labels, steps, first, fresh):
        self.attack, self.labels, self.steps, self.first, self.fresh = attack, labels, steps, first, fresh

    def __enter__(self):
        self.signals = StopSignals() if self.attack.checkpoint else None
        if self.signals is not None:
            self.signals.__enter__()
        self.last = time.perf_counter()
        return self

    def at_step(self, step, poisons, optimizer=None):
        if self.signals is None:
            return
        stopping = self.signals.flag
        if stopping or (step == self.first and self.fresh) or (
                step > self.first and time.perf_counter() - self.last >= CHECKPOINT_SECONDS):
            self._save(step, poisons, optimizer)
        if stopping:
            raise KeyboardInterrupt(f"stopped by a signal at step {step} of {self.steps} of Gradient Canceling; the "
                                    "checkpoint holds it")

    def finish(self, step, poisons, optimizer=None):
        if self.signals is None:
            return
        self._save(step, poisons, optimizer)
        if self.signals.flag:  # asked during the last step: the run stops here too (its poisons are in the checkpoint)
            raise KeyboardInterrupt(f"stopped by a signal at the end of Gradient Canceling (step {step} of {self.steps}); "
                                    "the checkpoint holds it")

    def _save(self, step, poisons, optimizer):
        attack = self.attack
        seconds = attack.earlier_seconds_ + time.perf_counter() - attack._began
        save_atomic({"step": step, "settings": attack._settings(), "target": attack.target_,
                     "info": attack.info_ if attack.recipe == "valid" else {}, "labels": self.labels,
                     "poisons": poisons.detach(), "history": [h for h in attack.history if h["step"] < step],
                     "seconds": seconds, **({} if optimizer is None else {"optimizer": optimizer.state_dict()})},
                    attack.checkpoint)  # never a half-written checkpoint
        self.last = time.perf_counter()

    def __exit__(self, *exc):
        if self.signals is not None:
            self.signals.__exit__(*exc)
        return False
