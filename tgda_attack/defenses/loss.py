"""The loss defense (Koh, Steinhardt & Liang, "Stronger data poisoning attacks break data sanitization
defenses", 2018, Section 2; Lu, Kamath & Yu, TMLR 2022, Section 5.6 (a) and Table 10): train a defender
on the poisoned training set and remove the share of points (3%) on which its cross-entropy loss
l(w; x, y) is largest; the defender is then retrained on the rest.
"""
import torch
import torch.nn.functional as F

from .base import FRACTION, PoisonFilter, keep_all_but_largest


@torch.no_grad()
def per_example_loss(model, x, y, batch_size=2000):
    """The cross-entropy of every point under `model`, in batches."""
    model.eval()
    return torch.cat([F.cross_entropy(model(x[i:i + batch_size]), y[i:i + batch_size], reduction="none")
                      for i in range(0, len(y), batch_size)])


class LossFilter(PoisonFilter):
    name = "loss"
    uses_model = True
    settings = (FRACTION,)

    def detect_poison(self, x, y, *, model=None, fit=None, x_val=None, y_val=None):
        model, x = self._model(x, y, model, fit)
        losses = per_example_loss(model, x, y)
        is_clean = keep_all_but_largest(losses, self.fraction)
        removed = losses[~is_clean.to(losses.device)]
        return {"score": "cross-entropy under a defender trained on the poisoned set",
                "threshold": removed.min().item() if len(removed) else None}, is_clean
