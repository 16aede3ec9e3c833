"""Label flip attack (Biggio et al., 2011), the reference baseline of Lu, Kamath & Yu (TMLR 2022),
Table 2: the poisons are epsilon*N points of the training set with their labels changed, by the
paper's rule y -> (K - 1) - y (9 - y on 10 classes) or to a uniformly random other class."""
import torch

from ..data import poison_budget, poison_sources


class LabelFlipAttack:
    """Adds copies of epsilon*N training points with flipped labels.

    Args:
        epsilon: poison budget as a fraction of the training set. (default: 0.03)
        rule: "reverse" (y -> K-1-y, the paper's) or "random" (another class at random). (default: "reverse")
        init: which points are copied: "first" (the paper's D_tr[0:eps N]) or "random". (default: "first")
        num_classes: K. (default: 10)
        seed: seed of the random choices. (default: 0)
    """

    name = "label-flip"

    def __init__(self, epsilon=0.03, rule="reverse", init="first", num_classes=10, seed=0):
        if rule not in ("reverse", "random"):
            raise ValueError(f"rule must be 'reverse' or 'random', got {rule!r}")
        if num_classes < 2:
            raise ValueError("num_classes must be at least 2")
        poison_budget(1, epsilon)  # validates epsilon
        self.epsilon, self.rule, self.init, self.num_classes, self.seed = epsilon, rule, init, num_classes, seed

    def poison(self, x, y):
        """(x_poison, y_poison): the chosen points of (x, y) with flipped labels.

        After the call `source_indices_` holds the indices into (x, y) of the copied points.
        """
        idx = self.source_indices_ = poison_sources(len(y), self.epsilon, self.init, self.seed)
        y_p = y[idx].clone()
        if self.rule == "reverse":
            y_p = (self.num_classes - 1) - y_p
        else:
            shift = torch.randint(1, self.num_classes, y_p.shape, generator=torch.Generator().manual_seed(self.seed))
            y_p = (y_p + shift) % self.num_classes
        return x[idx].clone(), y_p
