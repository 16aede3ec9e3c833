"""Gradient Canceling (Lu, Kamath and Yu, ICML 2023) on a tiny logistic regression, against an
independent computation of its objective and at a target that a budget of poisons can reach."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tgda_attack.attacks import ATTACKS, GradientCancelingAttack, targets


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


@pytest.mark.parametrize("target_kind", ["gradpc", "label-flip"])
def test_poisons_keep_budget_flipped_labels_and_pixel_range(target_kind):
    x, y, defender = _tiny()
    attack = GradientCancelingAttack(defender, 0.1, target_kind=target_kind, labels="reverse", steps=20, lr=0.5,
                                     target_epochs=5, num_classes=3)
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
    attack = GradientCancelingAttack(defender, 0.1, target=target.state_dict(), labels="reverse", steps=3000, lr=0.01,
                                     num_classes=3)
    x_p, y_p = attack.poison(x, y)
    start, end = attack.history[0]["gradient_norm"], attack.history[-1]["gradient_norm"]
    assert end < 1e-3 * start  # w_t made (nearly) stationary on D_tr U D_p
    assert _mean_gradient_norm(target, torch.cat([x, x_p]), torch.cat([y, y_p])) == pytest.approx(end, rel=1e-6)


def test_registered_and_checked():
    assert ATTACKS["gradient-canceling"] is GradientCancelingAttack
    x, y, defender = _tiny()
    for kwargs, message in (({"target_epsilon": 0}, "target_epsilon"), ({"steps": -1}, "steps"),
                            ({"target_kind": "gradpcx"}, "target_kind"), ({"radius": -1.0}, "radius"),
                            ({"labels": "sideways"}, "labels"),
                            ({"lr": 0}, "step sizes"), ({"init": "middle"}, "init")):
        with pytest.raises(ValueError, match=message):
            GradientCancelingAttack(defender, 0.1, **kwargs)
    with pytest.raises(ValueError, match="defender"):
        GradientCancelingAttack(None, 0.1)


def test_default_poisons_keep_their_true_labels():
    x, y, defender = _tiny()
    x_p, y_p = GradientCancelingAttack(defender, 0.1, steps=2, num_classes=3).poison(x, y)
    assert torch.equal(y_p, y[:4])


def test_gradpc_is_unit_gradient_ascent_projected_onto_the_ball():
    x, y, defender = _tiny()
    w0 = torch.cat([p.detach().flatten() for p in defender.parameters()])
    grads = torch.autograd.grad(F.cross_entropy(defender(x), y), list(defender.parameters()))
    g = torch.cat([t.flatten() for t in grads])
    one_batch = targets.gradpc_target(defender, x, y, radius=100.0, batch_size=len(y))  # one step, inside the ball
    w1 = torch.cat([one_batch[k].flatten() for k in ("1.weight", "1.bias")])
    assert torch.allclose(w1, w0 + g / g.norm(), atol=1e-12)
    small = targets.gradpc_target(defender, x, y, radius=0.05, batch_size=8)
    w2 = torch.cat([small[k].flatten() for k in ("1.weight", "1.bias")])
    assert (w2 - w0).norm().item() == pytest.approx(0.05, rel=1e-9)  # five unit steps, kept on the sphere


def test_necessary_epsilon_is_the_lambert_bound_of_a_linear_model():
    x, y, defender = _tiny(classes=3)
    w = list(defender.parameters())
    inner = [sum((gi * wi).sum() for gi, wi in zip(torch.autograd.grad(F.cross_entropy(defender(x[i:i + 1]), y[i:i + 1]), w), w))
             for i in range(len(y))]
    bound = targets.lambert_w(2 / math.e)  # K = 3
    assert min(v.item() for v in inner) >= -bound  # no point can pull harder than the bound
    along = torch.stack(inner).mean().item() / bound
    grads = torch.autograd.grad(F.cross_entropy(defender(x), y), w)
    in_norm = torch.cat([g.flatten() for g in grads]).norm().item() / (math.sqrt(2) * math.sqrt(4 + 1))
    assert targets.necessary_epsilon(defender, x, y) == pytest.approx(max(along, in_norm, 0.0), rel=1e-9)
    for i in range(len(y)):  # no point's gradient is longer than the norm bound's sqrt(2) ||[x; 1]||
        g = torch.autograd.grad(F.cross_entropy(defender(x[i:i + 1]), y[i:i + 1]), w)
        assert torch.cat([t.flatten() for t in g]).norm() <= math.sqrt(2) * math.sqrt(4 + 1)
    assert targets.necessary_epsilon(nn.Sequential(nn.Flatten(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3)), x, y) is None


def test_the_default_gradpc_target_is_within_the_budget():
    x, y, defender = _tiny()
    defender = _fit(defender, x, y)  # trained: its own gradient vanishes, so it needs no budget
    attack = GradientCancelingAttack(defender, 0.1, steps=1, num_classes=3)
    attack.poison(x, y)
    info = attack.target_info_
    assert info["kind"] == "gradpc" and 0 < info["relative_radius"]
    assert info["necessary_epsilon"] <= 0.1
    x2, y2, _ = _tiny()
    loose = GradientCancelingAttack(defender, 0.1, steps=1, radius=2 * info["relative_radius"] + 0.5, num_classes=3)
    loose.poison(x2, y2)
    assert loose.target_info_["necessary_epsilon"] > 0.1  # a larger corruption is out of this budget's reach
