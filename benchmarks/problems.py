"""One TGDA leader step on data shaped like the paper's (Section 5.1), for benchmarks and demos.

The follower is a defender of tgda_attack.models trained on one batch of D_tr plus the poisons of
that batch (epsilon = 3%), f = L(D_tr U D_p(theta), w); the leader is the matching attacker and
l = L(D_v, w) (the non-zero-sum loss). Random inputs stand in for the images: the cost of a step
does not depend on the pixel values.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tgda_attack.models import make_attacker, make_defender

IMAGE_SHAPE = {"lr": (1, 28, 28), "nn": (1, 28, 28), "cnn": (1, 28, 28), "cifar-cnn": (3, 32, 32),
               "resnet18": (3, 32, 32)}
PAPER_BATCH = {"lr": 1000, "nn": 1000, "cnn": 1000, "cifar-cnn": 256, "resnet18": 256}


@dataclass
class LeaderStep:
    leader_loss: object
    follower_loss: object
    theta: list
    w: list


def leader_step_problem(defender="nn", batch=None, dtype=torch.float64, device="cpu", epsilon=0.03, seed=0):
    """The callables and parameters of one leader step against `defender` at the paper's batch size."""
    shape = IMAGE_SHAPE[defender]
    batch = batch or PAPER_BATCH[defender]
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    n_p = max(1, int(epsilon * batch))

    def images(n):
        return (torch.rand(n, *shape, generator=g, dtype=torch.float64) * 2 - 1).to(device, dtype)

    def labels(n):
        return torch.randint(0, 10, (n,), generator=g).to(device)

    x_tr, y_tr, x_v, y_v, x_p0, y_p0 = images(batch), labels(batch), images(batch), labels(batch), images(n_p), labels(n_p)
    net = make_defender(defender, shape).to(device, dtype)
    attacker = make_attacker("mlp" if shape[0] == 1 else "autoencoder", shape).to(device, dtype)

    def follower_loss():
        x = torch.cat([x_tr, attacker(x_p0, y_p0)])
        return F.cross_entropy(net(x), torch.cat([y_tr, y_p0]))

    def leader_loss():
        return F.cross_entropy(net(x_v), y_v)

    return LeaderStep(leader_loss, follower_loss, list(attacker.parameters()), list(net.parameters()))
