"""Target parameters for the model-targeted attacks (Koh, Steinhardt & Liang 2018; Lu, Kamath & Yu,
TMLR 2022, Appendix A.3, eq. 29-35): a model the attacker wants the defender to become, made by a
large-budget label flip: the trained defender trained further, with the pretrain procedure's gradient
descent, on D_tr U a label flip (y -> K - 1 - y) of target_epsilon * |D_tr| randomly chosen points.
Used by Gradient Canceling (its w_t) and the improved min-max attack (its w_tar of eq. 35)."""
import copy

import torch

from ..training import train_classifier
from .base import Setting
from .label_flip import LabelFlipAttack

TARGET_SETTINGS = (
    Setting("target_epsilon", float, 0.1, "fraction",
            "size of the label flip that makes the target parameters, as a fraction of D_tr"),
    Setting("target_epochs", int, 10, "count",
            "epochs of gradient descent from the trained defender on D_tr U that flip"),
)


def label_flip_target(defender, x, y, *, epsilon, epochs, lr, batch_size, num_classes=10, seed=0, verbose=False):
    """The target parameters (a state_dict of a copy of `defender`): the defender trained `epochs` more
    epochs on D_tr U a reverse label flip of `epsilon` of it (seeded random points)."""
    x_f, y_f = LabelFlipAttack(epsilon, init="random", num_classes=num_classes, seed=seed + 1).poison(x, y)
    x_t, y_t = torch.cat([x, x_f]), torch.cat([y, y_f])
    target = train_classifier(copy.deepcopy(defender), x_t, y_t, epochs=epochs, batch_size=batch_size, lr=lr,
                              seed=seed, verbose=verbose, desc="target parameters")
    return {k: v.detach().clone() for k, v in target.state_dict().items()}

