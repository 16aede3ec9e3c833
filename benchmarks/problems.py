"""One TGDA leader step on data shaped like the paper's (Section 5.1), for benchmarks and demos.

The follower is a defender of tgda_attack.models on one batch of D_tr plus the poisons of that
batch (epsilon = 3%), f = L(D_tr U D_p(theta), w); the leader is the matching attacker and
l = L(D_v, w) (the non-zero-sum loss). Random inputs and labels stand in for the images: the cost
of a step does not depend on the pixel values. `fit_steps` gradient steps on f first move the
defender from its initialisation towards a fitted state (the state a leader step meets in the
attack), which matters for the quality of a hypergradient, not for its cost.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import hypergrad
from tgda_attack.models import make_attacker, make_defender

IMAGE_SHAPE = {"lr": (1, 28, 28), "nn": (1, 28, 28), "cnn": (1, 28, 28), "cifar-cnn": (3, 32, 32),
               "resnet18": (3, 32, 32)}
PAPER_BATCH = {"lr": 1000, "nn": 1000, "cnn": 1000, "cifar-cnn": 256, "resnet18": 256}
# The convolutional defenders in float64 at the paper's batch take minutes per leader step on 2 CPU
# cores: on a CPU the benchmarks use these batches instead (and record the batch they used).
CPU_BATCH = {"cnn": 100, "resnet18": 16}


def bench_batch(defender, device):
    return PAPER_BATCH[defender] if str(device).startswith("cuda") else CPU_BATCH.get(defender, PAPER_BATCH[defender])


@dataclass
class LeaderStep:
    leader_loss: object
    follower_loss: object
    follower_objective: object
    theta: list
    w: list
    batch: int


def leader_step_problem(defender="nn", batch=None, dtype=torch.float64, device="cpu", epsilon=0.03, seed=0,
                        fit_steps=0, fit_lr=0.1):
    """The callables and parameters of one leader step against `defender` (batch: bench_batch)."""
    shape = IMAGE_SHAPE[defender]
    batch = batch or bench_batch(defender, device)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    n_p = max(1, int(epsilon * batch))

    def images(n):  # built (and fitted) in float64, then cast: every dtype sees the same problem
        return (torch.rand(n, *shape, generator=g, dtype=torch.float64) * 2 - 1).to(device)

    def labels(n):
        return torch.randint(0, 10, (n,), generator=g).to(device)

    x_tr, y_tr, x_v, y_v, x_p0, y_p0 = images(batch), labels(batch), images(batch), labels(batch), images(n_p), labels(n_p)
    net = make_defender(defender, shape).to(device, torch.float64)
    attacker = make_attacker("mlp" if shape[0] == 1 else "autoencoder", shape).to(device, torch.float64)

    def follower_objective():  # f as a hypergrad.ClassifierLoss (structured products where supported)
        return hypergrad.ClassifierLoss(net, (x_tr, attacker(x_p0, y_p0)), (y_tr, y_p0))

    def follower_loss():  # f as a plain closure, recomputed from scratch at every call
        return F.cross_entropy(net(torch.cat([x_tr, attacker(x_p0, y_p0)])), torch.cat([y_tr, y_p0]))

    def leader_loss():
        return F.cross_entropy(net(x_v), y_v)

    w = list(net.parameters())
    for _ in range(fit_steps):
        grads = torch.autograd.grad(follower_loss(), w)
        with torch.no_grad():
            for p, gr in zip(w, grads):
                p.sub_(fit_lr * gr)
    net.to(dtype)
    attacker.to(dtype)
    x_tr, x_v, x_p0 = x_tr.to(dtype), x_v.to(dtype), x_p0.to(dtype)  # the closures read these names at call time
    w = list(net.parameters())
    return LeaderStep(leader_loss, follower_loss, follower_objective, list(attacker.parameters()), w, batch)
