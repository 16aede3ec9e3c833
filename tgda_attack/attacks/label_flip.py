"""Label flip attacks (Biggio et al., 2011), the reference baseline of Lu, Kamath & Yu (TMLR 2022),
Table 2 and Appendix A.4: the poisons are epsilon*N real images, pixels unchanged, with their label
changed by one of four rules:
  * "reverse": y -> (K - 1) - y, the paper's 9 - y on 10 classes (for an odd K the middle class is its own
    reverse: its poisons keep their label, with a warning);
  * "random": a uniformly random other class;
  * "largest-loss": the class with the largest cross-entropy loss under the trained defender, i.e. the
    other class to which it gives the smallest probability (Appendix A.4);
  * "nearest" (beyond the paper): the other class to which the trained defender gives the largest
    probability, the wrong class the point is closest to;
  * "influence" (beyond the paper): the other class whose gradient step raises the attacker's loss on D_v most to
    first order under the trained defender: one step of learning rate lr on a poison (x, c) moves the parameters by
    -lr grad l(x, c) and the loss on D_v by -lr grad l(x, c) . grad L_val, and grad l(x, c) . v is
    (softmax(f(x)) - e_c) . (J_f(x) v), J_f(x) v the logits' derivative along v = grad L_val: one forward-mode pass
    (a Jacobian-vector product) scores every point of the pool and every class, as influence-function and TracIn
    attacks score training points (with the pool D_v, each point against the half of D_v that does not hold it).

The images come from one of two pools (beyond the paper, which copies D_tr[0:eps N]):
  * "train": copies of points of D_tr, each beside its original with the true label;
  * "val": points of the attacker's own D_v, images the defender never trains on.
and are chosen from it in one of three ways:
  * "spread": the pool's first (or, with init "random", seeded random) epsilon*N points, every class alike;
  * "confused-pairs" (with rule "nearest"): points of the fewest (class y, nearest wrong class y') pairs that hold
    the budget, the pairs the trained defender gives most often first and never both (a, b) and (b, a), so that
    every poison pushes one of few class boundaries, each one way (4 -> 9 and 9 -> 4 together undo each other:
    on the paper's NN, seed 0, 0.21 points where 4 -> 9 with 7 -> 9 gives 1.14);
  * "influence" (with rule "influence"): the pool's epsilon*N points of most negative product (the largest first-order
    rise of the loss on D_v), each with its class of most negative product.
Against the paper's NN on full MNIST, D_v's points with "nearest" labels are the strongest valid-image attack of this
library (1.71 +- 0.31 points at epoch 100 against the paper's label flip's 0.57 +- 0.39; docs/RESULTS.md, "Label flip
from D_v"): the retrained network fits few of them, and those it does not fit keep its training from settling, so
about half of that is the last epoch's swing (1.07 +- 0.15 between the medians of the last 10 epochs). Confused pairs
make that oscillation larger and the drop at one epoch more a matter of luck (0.63 +- 0.45 on the same NN). On the
GC paper's 784-128-10, "influence" points and labels raised the drop between the medians of spread label flip from
D_v by 1.4-2.3 times (docs/RESULTS.md, "Label flip by influence"), still under 2 points.
"""
import math
import warnings

import torch
import torch.nn.functional as F

from hypergrad.hvp import jvp

from ..data import DataTooSmallError, initial_poison_indices, poison_budget
from ..training import eval_mode
from .base import SOURCE_POOLS, PoisoningAttack, Setting

FLIP_RULES = ("reverse", "random", "largest-loss", "nearest", "influence")
FLIP_POOLS = SOURCE_POOLS
FLIP_SELECTIONS = ("spread", "confused-pairs", "influence")
DEFENDER_RULES = ("largest-loss", "nearest", "influence")  # the rules that read the trained defender
# the selections that choose by a rule's labels: {select: (its rule, what it takes)}
SELECTION_RULES = {"confused-pairs": ("nearest", "labels each point with its nearest wrong class"),
                   "influence": ("influence", "takes the points whose influence label raises the loss on D_v most")}


def _selection_needs_rule(select, rule, flag=False):
    """The error message where selection `select` needs another rule than `rule` (None where it does not); `flag`:
    named as the command line's options."""
    needed, why = SELECTION_RULES.get(select, (rule, ""))
    if rule == needed:
        return None
    if flag:
        return f"--flip-select {select} {why}: it needs --flip-rule {needed}, got {rule!r}"
    return f"select {select!r} {why}: it needs rule {needed!r}, got {rule!r}"


class LabelFlipAttack(PoisoningAttack):
    """Adds copies of epsilon*N training points with flipped labels.

    Args:
        epsilon: poison budget as a fraction of the training set. (default: 0.03)
        rule: one of FLIP_RULES. (default: "reverse")
        defender: the trained defender; needed by rules "largest-loss", "nearest" and "influence". (default: None)
        init: which points of the pool are taken: "first" (the paper's D_tr[0:eps N]) or "random". (default: "first")
        pool: where the images come from, one of FLIP_POOLS: "train" (D_tr, the paper's) or "val" (the attacker's
            D_v, given to `poison` as x_val, y_val). (default: "train")
        select: how the points are chosen from the pool, one of FLIP_SELECTIONS; "confused-pairs" needs rule
            "nearest", "influence" rule "influence". (default: "spread")
        num_classes: K. (default: 10)
        seed: seed of the random choices. (default: 0)
    """

    name = "label-flip"
    differentiates_defender = False  # it reads the defender's outputs (and their jvp), not gradients to its weights
    settings = (Setting("flip_pool", str, "train", FLIP_POOLS,
                        "where label flip's images come from: train (copies of D_tr points, the paper's) or val (points "
                        "of the attacker's D_v, which the defender never trains on)"),
                Setting("flip_select", str, "spread", FLIP_SELECTIONS,
                        "how label flip chooses its points from the pool: spread (the first, or random with "
                        "--poison-init random, of every class), confused-pairs (only the fewest (class, nearest wrong "
                        "class) pairs that hold the budget, the defender's most frequent first; needs --flip-rule "
                        "nearest) or influence (the points whose flipped label raises the attacker's loss on D_v most "
                        "to first order; needs --flip-rule influence)"))
    quick = {"flip_rule": "largest-loss"}  # the rule that needs the trained defender

    def __init__(self, epsilon=0.03, rule="reverse", *, defender=None, init="first", pool="train", select="spread",
                 num_classes=10, seed=0):
        super().__init__(epsilon, init=init, seed=seed)
        self.rule, self.defender, self.num_classes, self.select = rule, defender, num_classes, select
        self.source_pool = pool
        self._check_params()

    def _check_params(self):
        super()._check_params()
        if self.rule not in FLIP_RULES:
            raise ValueError(f"rule must be one of {FLIP_RULES}, got {self.rule!r}")
        if not isinstance(self.num_classes, int) or self.num_classes < 2:
            raise ValueError(f"num_classes must be an integer of at least 2, got {self.num_classes!r}")
        if self.rule in DEFENDER_RULES and self.defender is None:
            raise ValueError(f"rule {self.rule!r} needs the trained defender (defender=...)")
        if self.source_pool not in FLIP_POOLS:
            raise ValueError(f"pool must be one of {FLIP_POOLS}, got {self.source_pool!r}")
        if self.select not in FLIP_SELECTIONS:
            raise ValueError(f"select must be one of {FLIP_SELECTIONS}, got {self.select!r}")
        mismatch = _selection_needs_rule(self.select, self.rule)
        if mismatch:
            raise ValueError(mismatch)

    @classmethod
    def from_config(cls, cfg, *, defender=None, attacker=None, checkpoint=None, verbose=False):
        return cls(cfg.epsilon, cfg.flip_rule, defender=defender, init=cfg.poison_init, pool=cfg.flip_pool,
                   select=cfg.flip_select, seed=cfg.seed)

    @classmethod
    def check_config(cls, cfg):
        mismatch = _selection_needs_rule(cfg.flip_select, cfg.flip_rule, flag=True)
        if mismatch:
            raise ValueError(mismatch)
        if cfg.flip_pool == "val" and cfg.perfect_knowledge:
            raise ValueError("--flip-pool val with --perfect-knowledge would take the poisons from D_test (the attacker's "
                             "D_v under perfect knowledge): the defender would train on test images with wrong labels "
                             "and be tested on them; use one of the two")

    @classmethod
    def check_data(cls, cfg, n_train, n_val):
        n_poison = poison_budget(n_train, cfg.epsilon)
        if cfg.flip_pool == "val" and n_poison > n_val:
            raise DataTooSmallError(
                f"--flip-pool val takes the poisons from the attacker's D_v, {n_val} points: --epsilon {cfg.epsilon} of "
                f"{n_train} training points asks for {n_poison}; use --flip-pool train or --epsilon <= {n_val / n_train:.3f}")

    def poison(self, x, y, *, x_val=None, y_val=None):
        """(x_poison, y_poison): epsilon*len(y) points of the pool, (x, y) or (x_val, y_val), with flipped labels
        (rule "influence" scores them on (x_val, y_val) whatever the pool). Sets `source_indices_` (indices into the
        pool)."""
        n_poison = poison_budget(len(y), self.epsilon)
        if n_poison == 0:  # as every attack: no poison is no label-flip attack (an empty set came back)
            raise ValueError(f"epsilon={self.epsilon} of {len(y)} training points leaves no poison to flip")
        if self.source_pool == "val":
            if x_val is None or y_val is None:
                raise ValueError("pool 'val' takes the poisons from the attacker's D_v: pass x_val and y_val")
            if n_poison > len(y_val):
                raise ValueError(f"epsilon={self.epsilon} of {len(y)} training points asks for {n_poison} poisons, but "
                                 f"D_v has only {len(y_val)} points: use pool 'train' or a smaller epsilon")
            x, y = x_val, y_val
        elif self.rule == "influence" and (x_val is None or y_val is None):
            raise ValueError("rule 'influence' scores each label by its effect on the attacker's loss on D_v: pass "
                             "x_val and y_val")
        if self.select == "confused-pairs":
            return self._confused_pairs(x, y, n_poison)
        if self.rule == "influence":
            score = self._influence_scores(x, y, x_val, y_val, pool_is_val=self.source_pool == "val")
            best, labels = score.min(1)
            if self.select == "influence":
                idx = self.source_indices_ = best.argsort(stable=True)[:n_poison].cpu()
            else:
                idx = self.source_indices_ = initial_poison_indices(len(y), n_poison, self.init, self.seed)
            idx, labels = idx.to(y.device), labels.to(y.device)
            self.info_["pairs"] = self._pair_counts(y[idx], labels[idx])
            return x[idx].clone(), labels[idx]
        idx = self.source_indices_ = initial_poison_indices(len(y), n_poison, self.init, self.seed)
        idx = idx.to(y.device)
        y_p = y[idx].clone()
        if self.rule == "reverse":
            y_p = (self.num_classes - 1) - y_p
            kept = int((y_p == y[idx]).sum())
            if kept:  # an odd K: the middle class is its own reverse
                warnings.warn(f"label flip 'reverse' on {self.num_classes} classes maps class {self.num_classes // 2} "
                              f"onto itself: {kept} of {n_poison} poisons keep their true label (copies, not flips); "
                              "rule 'random' or 'nearest' flips every poison", RuntimeWarning, stacklevel=3)
        elif self.rule == "random":
            shift = torch.randint(1, self.num_classes, y_p.shape, generator=torch.Generator().manual_seed(self.seed))
            y_p = (y_p + shift.to(y_p.device)) % self.num_classes
        else:
            y_p = self._defender_labels(x[idx], y_p)
        if self.rule in ("reverse", "random") and int(y_p.max()) > int(y.max()):
            warnings.warn(f"label flip {self.rule!r} gave poisons labels up to {int(y_p.max())}, which no point of the "
                          f"data has (its labels are 0 .. {int(y.max())}; num_classes is {self.num_classes}): a model "
                          f"of {int(y.max()) + 1} classes cannot train on them; pass num_classes={int(y.max()) + 1} if "
                          "that is all the classes", RuntimeWarning, stacklevel=3)
        return x[idx].clone(), y_p

    def _confused_pairs(self, x, y, n_poison):
        """The poisons of select "confused-pairs": points of the pool whose (class, nearest wrong class) pair is among
        the fewest pairs that hold n_poison points (the most frequent first, a pair skipped where its reverse is
        chosen), taken by `init` from those points and labelled with their nearest wrong class. Sets
        `source_indices_` and info_["pairs"]."""
        k = self.num_classes
        nearest = self._defender_labels(x, y)
        pair = y * k + nearest
        counts = torch.bincount(pair, minlength=k ** 2).cpu()
        chosen, held = [], 0
        for p in torch.sort(counts, descending=True, stable=True).indices.tolist():
            if held >= n_poison or not counts[p]:
                break
            if (p % k) * k + p // k not in chosen:  # (b, a) where (a, b) is chosen would push its boundary back
                chosen.append(p)
                held += int(counts[p])
        if held < n_poison:
            # known only from the trained defender's predictions, so after stage 1: a usage error, not a traceback
            raise DataTooSmallError(f"the pool's confused pairs, one direction each, hold {held} points, fewer than "
                                    f"the {n_poison} poisons: use select 'spread' (--flip-select spread) or an epsilon "
                                    f"of at most {math.floor(1e4 * held * self.epsilon / (n_poison + 1)) / 1e4:g} (a new "
                                    "run: another --out, or --overwrite)")
        candidates = torch.isin(pair.cpu(), torch.tensor(chosen, dtype=pair.dtype)).nonzero()[:, 0]
        idx = self.source_indices_ = candidates[initial_poison_indices(len(candidates), n_poison, self.init, self.seed)]
        self.info_["pairs"] = [[p // k, p % k, int(counts[p])] for p in chosen]
        idx = idx.to(y.device)
        return x[idx].clone(), nearest[idx]

    def _pair_counts(self, y, labels):
        """[[class, label, count], ...] of the poisons, the most frequent first."""
        counts = torch.bincount(y.cpu() * self.num_classes + labels.cpu(), minlength=self.num_classes ** 2)
        order = torch.sort(counts, descending=True, stable=True).indices.tolist()
        return [[p // self.num_classes, p % self.num_classes, int(counts[p])] for p in order if counts[p]]

    def _influence_scores(self, x, y, x_val, y_val, *, pool_is_val=False, batch_size=2000):
        """[len(y), K]: grad l(x_i, c) . grad L_val under the trained defender (rule "influence"), l the cross-entropy
        of point i labelled c and L_val the mean cross-entropy on D_v; +inf at each point's true class. Computed as
        (softmax(f(x_i)) - e_c) . (J_f(x_i) v), v = grad L_val, by one Jacobian-vector product a batch, over the
        defender's trainable parameters. `pool_is_val`: the points are D_v's own, and each is scored against the
        gradient of the other half of D_v (the points of other parity), which does not hold its own loss: with it,
        a point's score would count the rise of its own loss on D_v, which says nothing of unseen data."""
        with eval_mode(self.defender) as model:
            params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
            if not pool_is_val:
                return self._scores_along(params, x, y, self._val_gradient(params, x_val, y_val, batch_size), batch_size)
            ref = next(iter(params.values()))
            score = torch.empty(len(y), self.num_classes, dtype=ref.dtype, device=ref.device)
            for half in (0, 1):
                scored, other = torch.arange(half, len(y), 2), torch.arange(1 - half, len(y), 2)
                v = self._val_gradient(params, x_val[other.to(x_val.device)], y_val[other.to(y_val.device)], batch_size)
                score[scored.to(score.device)] = self._scores_along(params, x[scored.to(x.device)],
                                                                    y[scored.to(y.device)], v, batch_size)
            return score

    def _val_gradient(self, params, x_val, y_val, batch_size):
        """{name: d L_val / d param}: the gradient of the defender's mean cross-entropy on (x_val, y_val)."""
        ref = next(iter(params.values()))
        v = {name: torch.zeros_like(p) for name, p in params.items()}
        for i in range(0, len(y_val), batch_size):
            live = {name: p.clone().requires_grad_(True) for name, p in params.items()}
            with torch.enable_grad():
                logits = torch.func.functional_call(self.defender, live,
                                                    (x_val[i:i + batch_size].to(ref.device, ref.dtype),))
                loss = F.cross_entropy(logits, y_val[i:i + batch_size].to(ref.device), reduction="sum") / len(y_val)
                for name, g in zip(live, torch.autograd.grad(loss, list(live.values()))):
                    v[name] += g
        return v

    @torch.no_grad()
    def _scores_along(self, params, x, y, v, batch_size):
        """[len(y), K]: (softmax(f(x_i)) - e_c) . (J_f(x_i) v) = grad l(x_i, c) . v, +inf at the true classes."""
        ref = next(iter(params.values()))
        scores = []
        for i in range(0, len(y), batch_size):
            xb = x[i:i + batch_size].to(ref.device, ref.dtype)
            logits, u = jvp(lambda p: torch.func.functional_call(self.defender, p, (xb,)), (params,), (v,))
            if logits.shape[1] != self.num_classes:
                raise ValueError(f"the defender gives {logits.shape[1]} classes, not num_classes={self.num_classes}")
            score = (F.softmax(logits, 1) * u).sum(1, keepdim=True) - u
            score[torch.arange(len(xb)), y[i:i + batch_size].to(score.device)] = float("inf")  # never the true label
            scores.append(score)
        return torch.cat(scores)

    @torch.no_grad()
    def _defender_labels(self, x_p, y_p, batch_size=2000):
        """The wrong class of the smallest logit ("largest-loss") or of the largest ("nearest") under the defender."""
        ref = next(self.defender.parameters())
        with eval_mode(self.defender) as model:
            logits = torch.cat([model(x_p[i:i + batch_size].to(ref.device, ref.dtype))
                                for i in range(0, len(y_p), batch_size)])
        if logits.shape[1] != self.num_classes:
            raise ValueError(f"the defender gives {logits.shape[1]} classes, not num_classes={self.num_classes}")
        rows = torch.arange(len(y_p))
        if self.rule == "nearest":
            logits[rows, y_p.to(logits.device)] = -float("inf")  # never the true label
            return logits.argmax(1).to(y_p.device)  # the most probable wrong class
        logits[rows, y_p.to(logits.device)] = float("inf")
        return logits.argmin(1).to(y_p.device)  # cross-entropy is largest where the logit is smallest
