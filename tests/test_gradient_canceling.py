"""Gradient Canceling (Lu, Kamath and Yu, ICML 2023) on a tiny logistic regression, against an
independent computation of its objective and at a target that a budget of poisons can reach."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tgda_attack.attacks import ATTACKS, GradientCancelingAttack


def _tiny(seed=0, n=40, classes=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 2, 2, generator=g, dtype=torch.float64) * 2 - 1
    y = torch.randint(0, classes, (n,), generator=g)
    torch.manual_seed(seed)
    defender = nn.Sequential(nn.Flatten(), nn.Linear(4, classes)).double()
    return x, y, defender


def _fit(model, x, y, steps=200):
    """w minimising the mean cross-entropy on (x, y), by L-BFGS to a vanishing gradient."""
    model = copy.deepcopy(model)
    opt = torch.optim.LBFGS(model.parameters(), max_iter=steps, tolerance_grad=1e-12, tolerance_change=0,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    return model


def _mean_gradient_norm(model, x, y):
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    return torch.cat([g.flatten() for g in grads]).norm().item()


def test_objective_is_the_squared_mean_gradient_on_the_union():
    x, y, defender = _tiny()
    attack = GradientCancelingAttack(defender, 0.1, target=defender.state_dict(), steps=0, num_classes=3)
    x_p, y_p = x[:4] + 0.1, (2 - y[:4])
    params = {k: v.detach() for k, v in defender.named_parameters()}
    g_clean = attack.clean_gradient(defender, params, x, y)
    objective = attack.objective(defender, params, g_clean, x_p, y_p, 1.0 / 44)
    expected = _mean_gradient_norm(defender, torch.cat([x, x_p]), torch.cat([y, y_p])) ** 2
    assert objective.item() == pytest.approx(expected, rel=1e-10)


def test_poisons_keep_budget_flipped_labels_and_pixel_range():
    x, y, defender = _tiny()
    attack = GradientCancelingAttack(defender, 0.1, steps=20, lr=0.5, target_epochs=5, num_classes=3)
    x_p, y_p = attack.poison(x, y)
    assert x_p.shape == (4, 1, 2, 2) and torch.equal(y_p, 2 - y[:4])
    assert x_p.min() >= -1 and x_p.max() <= 1 and not torch.equal(x_p, x[:4])
    assert attack.source_indices_.tolist() == [0, 1, 2, 3]
    assert attack.history[-1]["gradient_norm"] < attack.history[0]["gradient_norm"]  # the norm it minimises falls


def test_a_reachable_target_is_reached():
    x, y, defender = _tiny()
    g = torch.Generator().manual_seed(1)
    x_star = (x[:4] + 0.3 * torch.randn(x[:4].shape, generator=g, dtype=torch.float64)).clamp(-1, 1)
    y_star = 2 - y[:4]
    target = _fit(defender, torch.cat([x, x_star]), torch.cat([y, y_star]))
    assert _mean_gradient_norm(target, torch.cat([x, x_star]), torch.cat([y, y_star])) < 1e-8
    attack = GradientCancelingAttack(defender, 0.1, target=target.state_dict(), steps=3000, lr=0.01, num_classes=3)
    x_p, y_p = attack.poison(x, y)
    start, end = attack.history[0]["gradient_norm"], attack.history[-1]["gradient_norm"]
    assert end < 1e-3 * start  # w_t made (nearly) stationary on D_tr U D_p
    assert _mean_gradient_norm(target, torch.cat([x, x_p]), torch.cat([y, y_p])) == pytest.approx(end, rel=1e-6)


def test_registered_and_checked():
    assert ATTACKS["gradient-canceling"] is GradientCancelingAttack
    x, y, defender = _tiny()
    for kwargs, message in (({"target_epsilon": 0}, "target_epsilon"), ({"steps": -1}, "steps"),
                            ({"lr": 0}, "step sizes"), ({"init": "middle"}, "init")):
        with pytest.raises(ValueError, match=message):
            GradientCancelingAttack(defender, 0.1, **kwargs)
    with pytest.raises(ValueError, match="defender"):
        GradientCancelingAttack(None, 0.1)
