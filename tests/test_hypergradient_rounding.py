"""TGDA's default hypergradient is a property of the problem, not of the order of floating-point sums
(issue 21).

A leader step solves (H_ww + damping I) v = grad_w l for a batch whose H_ww is singular (LR: 7,850
parameters, at most 9 nonzero eigenvalues a point). The paper's solver, 16 iterations of CG on the
normal equations, amplifies rounding on such a system: in float32 a one-ulp change of grad_w l moved
D_theta l by 1-13% of its norm on these batches (up to 46% on full MNIST), so another thread count, a
second process or the compiled kernels instead of their twins sent the attack elsewhere (full MNIST, LR,
seed 4: drops 2.78, 2.59 and 1.25 from one code). The default solver must keep that change small.

The perturbation is exact in its intent: the leader loss scaled by (1 + 2^-23) has the same solution
scaled by that factor, so what differs beyond the factor is rounding, amplified by the solve.
"""
import statistics

import torch
import torch.nn.functional as F

import hypergrad
from tgda_attack import data
from tgda_attack.attacks import TGDAAttack
from tgda_attack.models import make_attacker, make_defender
from tgda_attack.training import train_classifier

ULP = torch.finfo(torch.float32).eps


def _rounding_shares(attack, batches=6):
    """Relative change of D_theta l (beyond the exact factor) when l is scaled by 1 + ulp, for batches of
    1,000 clean points and 30 poisons of the embedded MNIST sample, against a trained LR defender."""
    s = data.load_dataset("mnist-sample")
    x, y, xv, yv = s.x_train, s.y_train, s.x_val, s.y_val
    torch.manual_seed(0)
    defender = train_classifier(make_defender("lr", s.image_shape), x, y, epochs=10, batch_size=100, lr=0.1, seed=0)
    torch.manual_seed(1)
    attacker = make_attacker("mlp", s.image_shape)
    w, theta = list(defender.parameters()), list(attacker.parameters())
    shares = []
    for batch in range(batches):
        g = torch.Generator().manual_seed(batch)
        tr, vv = torch.randperm(len(y), generator=g)[:1000], torch.randperm(len(yv), generator=g)[:1000]
        pp = torch.randperm(len(y), generator=g)[:30]

        def d_theta(scale):
            follower = hypergrad.ClassifierLoss(defender, (x[tr], attacker(x[pp], y[pp])), (y[tr], y[pp]))
            leader = lambda: F.cross_entropy(defender(xv[vv]), yv[vv]) * scale  # noqa: E731
            return hypergrad.flatten(hypergrad.total_grad(leader, follower, theta, w, solver=attack.solver_)).double()

        exact, scaled = d_theta(1.0), d_theta(1.0 + ULP)
        shares.append(((scaled / (1.0 + ULP) - exact).norm() / exact.norm()).item())
    return shares


def test_the_default_leader_step_does_not_hinge_on_rounding():
    defaults = TGDAAttack(torch.nn.Linear(1, 1), None)
    shares = _rounding_shares(defaults)
    # measured (median of the batches; the worst one): MINRES 16, the default, 5e-4 (2e-2); cgnr 16, the
    # paper's and the default before, 4e-2 (0.13)
    assert statistics.median(shares) < 5e-3, shares
