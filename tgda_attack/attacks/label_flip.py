"""Label flip attacks (Biggio et al., 2011), the reference baseline of Lu, Kamath & Yu (TMLR 2022),
Table 2 and Appendix A.4: the poisons are epsilon*N points of D_tr, pixels unchanged, with their label
changed by one of three rules:
  * "reverse": y -> (K - 1) - y, the paper's 9 - y on 10 classes;
  * "random": a uniformly random other class;
  * "largest-loss": the class with the largest cross-entropy loss under the trained defender, i.e. the
    other class to which it gives the smallest probability (Appendix A.4).
"""
import torch

from ..data import poison_sources
from .base import PoisoningAttack

FLIP_RULES = ("reverse", "random", "largest-loss")


class LabelFlipAttack(PoisoningAttack):
    """Adds copies of epsilon*N training points with flipped labels.

    Args:
        epsilon: poison budget as a fraction of the training set. (default: 0.03)
        rule: one of FLIP_RULES. (default: "reverse")
        defender: the trained defender; needed by rule "largest-loss". (default: None)
        init: which points are copied: "first" (the paper's D_tr[0:eps N]) or "random". (default: "first")
        num_classes: K. (default: 10)
        seed: seed of the random choices. (default: 0)
    """

    name = "label-flip"
    quick = {"flip_rule": "largest-loss"}  # the rule that needs the trained defender

    def __init__(self, epsilon=0.03, rule="reverse", *, defender=None, init="first", num_classes=10, seed=0):
        super().__init__(epsilon, init=init, seed=seed)
        self.rule, self.defender, self.num_classes = rule, defender, num_classes
        self._check_params()

    def _check_params(self):
        super()._check_params()
        if self.rule not in FLIP_RULES:
            raise ValueError(f"rule must be one of {FLIP_RULES}, got {self.rule!r}")
        if not isinstance(self.num_classes, int) or self.num_classes < 2:
            raise ValueError(f"num_classes must be an integer of at least 2, got {self.num_classes!r}")
        if self.rule == "largest-loss" and self.defender is None:
            raise ValueError("rule 'largest-loss' needs the trained defender (defender=...)")

    @classmethod
    def from_config(cls, cfg, *, defender=None, attacker=None, checkpoint=None, verbose=False):
        return cls(cfg.epsilon, cfg.flip_rule, defender=defender, init=cfg.poison_init, seed=cfg.seed)

    def poison(self, x, y, *, x_val=None, y_val=None):
        """(x_poison, y_poison): the chosen points of (x, y) with flipped labels. Sets `source_indices_`."""
        idx = self.source_indices_ = poison_sources(len(y), self.epsilon, self.init, self.seed)
        idx = idx.to(y.device)
        y_p = y[idx].clone()
        if self.rule == "reverse":
            y_p = (self.num_classes - 1) - y_p
        elif self.rule == "random":
            shift = torch.randint(1, self.num_classes, y_p.shape, generator=torch.Generator().manual_seed(self.seed))
            y_p = (y_p + shift.to(y_p.device)) % self.num_classes
        else:
            y_p = self._largest_loss_labels(x[idx], y_p)
        return x[idx].clone(), y_p

    @torch.no_grad()
    def _largest_loss_labels(self, x_p, y_p, batch_size=2000):
        ref = next(self.defender.parameters())
        self.defender.eval()
        logits = torch.cat([self.defender(x_p[i:i + batch_size].to(ref.device, ref.dtype))
                            for i in range(0, len(y_p), batch_size)])
        if logits.shape[1] != self.num_classes:
            raise ValueError(f"the defender gives {logits.shape[1]} classes, not num_classes={self.num_classes}")
        logits[torch.arange(len(y_p)), y_p.to(logits.device)] = float("inf")  # never the true label
        return logits.argmin(1).to(y_p.device)  # cross-entropy is largest where the logit is smallest
