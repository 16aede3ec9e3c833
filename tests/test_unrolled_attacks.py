"""The back-gradient (UGDA, eq. 10-11 of the TMLR paper) and MetaPoison attacks on tiny float64 models:
their gradients through the unrolled steps against central finite differences of a hand-written unroll,
the k = 0 and k = 1 cases against the formula, one outer step against a hand-written eq. 10-11 update,
and the budget, label, ball and pixel-range invariants."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tgda_attack.attacks import ATTACKS, BackGradientAttack, LabelFlipAttack, MetaPoisonAttack
from tgda_attack.config import Config

CLASSES = 3


def _tiny(seed=0, n=40, hidden=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 2, 2, generator=g, dtype=torch.float64) * 2 - 1
    y = torch.randint(0, CLASSES, (n,), generator=g)
    xv = torch.rand(n // 2, 1, 2, 2, generator=g, dtype=torch.float64) * 2 - 1
    yv = torch.randint(0, CLASSES, (n // 2,), generator=g)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, CLASSES)).double()
    return x, y, xv, yv, model


def _params(model):
    return {k: v.detach() for k, v in model.named_parameters()}


def _unrolled_val_loss(model, x_b, y_b, x_p, y_p, xv, yv, steps, lr):
    """Hand-written: `steps` steps of gradient descent on a copy of the model on (x_b U x_p), then the mean
    cross-entropy on (xv, yv). No graph to x_p is kept: a plain function of x_p for finite differences."""
    model = copy.deepcopy(model)
    xs, ys = torch.cat([x_b, x_p]), torch.cat([y_b, y_p])
    for _ in range(steps):
        grads = torch.autograd.grad(F.cross_entropy(model(xs), ys), list(model.parameters()))
        with torch.no_grad():
            for p, g in zip(model.parameters(), grads):
                p.sub_(lr * g)
    with torch.no_grad():
        return F.cross_entropy(model(xv), yv).item()


def _central_differences(fun, x, h=1e-5):
    out = torch.zeros_like(x)
    for i in range(x.numel()):
        e = torch.zeros_like(x).view(-1)
        e[i] = h
        e = e.view_as(x)
        out.view(-1)[i] = (fun(x + e) - fun(x - e)) / (2 * h)
    return out


def test_back_gradient_leader_gradient_matches_finite_differences():
    x, y, xv, yv, model = _tiny()
    attack = BackGradientAttack(model, 0.1, unroll_steps=4, beta=0.5, num_classes=CLASSES)
    x_p, y_p = x[:3].clone().requires_grad_(True), 2 - y[:3]
    loss, _ = attack.leader_objective(model, _params(model), x[3:20], y[3:20], x_p, y_p, xv, yv)
    assert loss.item() == pytest.approx(
        _unrolled_val_loss(model, x[3:20], y[3:20], x_p.detach(), y_p, xv, yv, 4, 0.5), rel=1e-12)
    (d_x,) = torch.autograd.grad(loss, x_p)
    fd = _central_differences(lambda z: _unrolled_val_loss(model, x[3:20], y[3:20], z, y_p, xv, yv, 4, 0.5),
                              x_p.detach())
    assert d_x.abs().max() > 1e-4  # a real signal, not zero against zero
    torch.testing.assert_close(d_x, fd, rtol=1e-6, atol=1e-9)


def test_back_gradient_k0_is_zero_and_k1_is_the_mixed_product():
    x, y, xv, yv, model = _tiny()
    params, beta = _params(model), 0.3
    x_b, y_b, y_p = x[3:20], y[3:20], 2 - y[:3]
    # k = 0: l^[0] = L(D_v, w) does not depend on the poisons, so the leader does not move them
    zero = BackGradientAttack(model, 0.1, unroll_steps=0, beta=beta, num_classes=CLASSES)
    _, x_next, _, _ = zero.step(model, params, x_b, y_b, x[:3], y_p, xv, yv)
    assert torch.equal(x_next, x[:3])
    # k = 1: grad_x L(D_v, w - beta grad_w f(x, w)) = -beta grad_x [grad_w f(x, w) . v], v = grad_w L(D_v, w~_1)
    one = BackGradientAttack(model, 0.1, unroll_steps=1, beta=beta, num_classes=CLASSES)
    x_p = x[:3].clone().requires_grad_(True)
    loss, _ = one.leader_objective(model, params, x_b, y_b, x_p, y_p, xv, yv)
    (d_x,) = torch.autograd.grad(loss, x_p)
    w = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    m1 = copy.deepcopy(model)
    f = F.cross_entropy(torch.func.functional_call(model, dict(zip(params, w)), (torch.cat([x_b, x[:3]]),)),
                        torch.cat([y_b, y_p]))
    with torch.no_grad():
        for p, g in zip(m1.parameters(), torch.autograd.grad(f, w)):
            p.sub_(beta * g)
    v = torch.autograd.grad(F.cross_entropy(m1(xv), yv), list(m1.parameters()))
    x_q = x[:3].clone().requires_grad_(True)
    f = F.cross_entropy(torch.func.functional_call(model, dict(zip(params, w)), (torch.cat([x_b, x_q]),)),
                        torch.cat([y_b, y_p]))
    g_w = torch.autograd.grad(f, w, create_graph=True)
    (expected,) = torch.autograd.grad(sum((g * u).sum() for g, u in zip(g_w, v)), x_q)
    torch.testing.assert_close(d_x, -beta * expected, rtol=1e-10, atol=1e-13)


def test_one_outer_step_is_the_hand_written_eq_10_11_update():
    x, y, xv, yv, model = _tiny()
    k, beta, eta = 3, 0.5, 200.0
    attack = BackGradientAttack(model, 0.1, unroll_steps=k, lr=eta, epochs=1, batch_size=1000, beta=beta,
                                num_classes=CLASSES)
    x_out, y_out = attack.poison(x, y, x_val=xv, y_val=yv)  # one batch: all of D_tr, all poisons, all of D_v
    # by hand: eq. 10 through k differentiable steps (torch.autograd, create_graph), eq. 11 one step at (x_t, w_t)
    x_p, y_p = x[:4].clone().requires_grad_(True), 2 - y[:4]
    xs, ys = torch.cat([x, x_p]), torch.cat([y, y_p])
    names = [n for n, _ in model.named_parameters()]
    w = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    w_t, first = w, None
    for _ in range(k):
        g = torch.autograd.grad(F.cross_entropy(torch.func.functional_call(model, dict(zip(names, w_t)), (xs,)), ys),
                                w_t, create_graph=True)
        first = g if first is None else first
        w_t = [p - beta * gi for p, gi in zip(w_t, g)]
    leader = F.cross_entropy(torch.func.functional_call(model, dict(zip(names, w_t)), (xv,)), yv)
    (d_x,) = torch.autograd.grad(leader, x_p)
    x_next = (x_p.detach() + eta * d_x).clamp(-1, 1)
    assert (x_p.detach() + eta * d_x).abs().max() > 1  # the projection is exercised
    torch.testing.assert_close(x_out, x_next, rtol=1e-9, atol=1e-11)
    assert torch.equal(y_out, y_p)
    for (name, p), w0, g in zip(attack.defender_.named_parameters(), w, first):
        torch.testing.assert_close(p, w0.detach() - beta * g.detach(), rtol=1e-10, atol=1e-12, msg=name)
    assert attack.history[0]["leader_loss"] == pytest.approx(leader.item(), rel=1e-10)


def test_back_gradient_budget_labels_and_pixel_range():
    x, y, xv, yv, model = _tiny()
    attack = BackGradientAttack(model, 0.1, unroll_steps=2, lr=50.0, epochs=2, batch_size=8, beta=0.5,
                                num_classes=CLASSES, init="random", seed=3)
    x_p, y_p = attack.poison(x, y, x_val=xv, y_val=yv)
    idx = attack.source_indices_
    assert x_p.shape == (4, 1, 2, 2) and len(idx) == 4
    assert torch.equal(y_p, 2 - y[idx]) and x_p.abs().max() <= 1 and not torch.equal(x_p, x[idx])
    assert [h["epoch"] for h in attack.history] == [1, 2] and attack.history[0]["batches"] == 5
    for rule in ("random", "largest-loss"):  # the run's flip rule, as the label flip attack applies it
        flipped = BackGradientAttack(model, 0.1, unroll_steps=0, epochs=0, flip_rule=rule, num_classes=CLASSES)
        _, labels = flipped.poison(x, y, x_val=xv, y_val=yv)
        expected = LabelFlipAttack(0.1, rule, defender=model, num_classes=CLASSES).poison(x, y)[1]
        assert torch.equal(labels, expected) and not torch.equal(labels, y[:4])
    with pytest.raises(ValueError, match="no poison"):
        BackGradientAttack(model, 0.01).poison(x, y, x_val=xv, y_val=yv)


@pytest.mark.parametrize("name", ["back-gradient", "metapoison"])
def test_without_d_v_the_budget_and_the_sources_are_those_of_the_whole_training_set(name):
    x, y, _, _, model = _tiny()
    attack = (BackGradientAttack(model, 0.1, unroll_steps=0, epochs=0, num_classes=CLASSES, init="random", seed=3)
              if name == "back-gradient" else MetaPoisonAttack(model, 0.1, models=1, unroll_steps=0, steps=1,
                                                                 train_epochs=1, init="random", seed=3))
    x_p, y_p = attack.poison(x, y)  # a seeded 30% of (x, y) serves as D_v; the poisons are still 10% of all 40
    idx = attack.source_indices_
    assert len(y_p) == 4 and torch.equal(x_p, x[idx])  # no step moves them (K = 0): they are x's own points
    assert torch.equal(y_p, 2 - y[idx] if name == "back-gradient" else y[idx])


def test_metapoison_gradient_matches_finite_differences_and_k0_is_zero():
    x, y, xv, yv, model = _tiny()
    attack = MetaPoisonAttack(model, 0.1, unroll_steps=2, train_lr=0.7)
    delta = torch.zeros_like(x[:3], requires_grad=True)
    loss = attack.adversarial_loss(model, _params(model), x[3:20], y[3:20], x[:3] + delta, y[:3], xv, yv)
    (d,) = torch.autograd.grad(loss, delta)
    fd = _central_differences(lambda z: _unrolled_val_loss(model, x[3:20], y[3:20], x[:3] + z, y[:3], xv, yv, 2, 0.7),
                              delta.detach())
    assert d.abs().max() > 1e-4
    torch.testing.assert_close(d, fd, rtol=1e-6, atol=1e-9)
    zero = MetaPoisonAttack(model, 0.1, unroll_steps=0)
    loss = zero.adversarial_loss(model, _params(model), x[3:20], y[3:20], x[:3] + delta, y[:3], xv, yv)
    assert loss.item() == pytest.approx(F.cross_entropy(model(xv), yv).item(), rel=1e-12)
    assert not loss.requires_grad  # L(D_v, w) has no path to delta: its gradient in delta is zero


def test_metapoison_ball_pixel_range_labels_and_budget():
    x, y, xv, yv, model = _tiny()
    x = x.sign() * (x.abs() * 0.2 + 0.8)  # most pixels near the range's ends, so the pixel range binds
    attack = MetaPoisonAttack(model, 0.1, radius=0.3, models=3, unroll_steps=2, steps=6, lr=0.2, train_epochs=2,
                              train_lr=0.5, train_batch_size=8, batch_size=10, init="random", seed=1)
    x_p, y_p = attack.poison(x, y, x_val=xv, y_val=yv)
    idx = attack.source_indices_
    assert x_p.shape == (4, 1, 2, 2) and torch.equal(y_p, y[idx])  # clean label
    change = x_p - x[idx]
    assert change.abs().max() <= 0.3 + 1e-12 and change.abs().max() > 0.1
    assert x_p.min() >= -1 and x_p.max() <= 1 and (x_p.abs() == 1).any()
    assert [h["step"] for h in attack.history] == [0, 5, 6]
    again = MetaPoisonAttack(model, 0.1, radius=0.3, models=3, unroll_steps=2, steps=6, lr=0.2, train_epochs=2,
                             train_lr=0.5, train_batch_size=8, batch_size=10, init="random", seed=1)
    assert torch.equal(again.poison(x, y, x_val=xv, y_val=yv)[0], x_p)  # seeded: the same poisons
    frozen = MetaPoisonAttack(model, 0.1, models=2, unroll_steps=0, steps=3, train_epochs=1, train_batch_size=8)
    x_f, _ = frozen.poison(x, y, x_val=xv, y_val=yv)
    assert torch.equal(x_f, x[:4])  # K = 0: no gradient reaches delta
    with pytest.raises(ValueError, match="no poison"):
        MetaPoisonAttack(model, 0.01).poison(x, y, x_val=xv, y_val=yv)


def test_metapoison_ensemble_is_staggered_and_fresh():
    x, y, xv, yv, model = _tiny()
    attack = MetaPoisonAttack(model, 0.1, models=4, steps=3, train_epochs=1, train_batch_size=11, batch_size=10)
    ages, original = [], attack._train_step

    def logged(net, member, *args):
        original(net, member, *args)
        ages.append(member["age"])

    attack._train_step = logged
    attack.poison(x, y, x_val=xv, y_val=yv)
    # T = 1 pass over 44 points in batches of 11 = 4 steps. Model m is pretrained round(m * 4 / 4) = m steps,
    # then every outer step trains models 0..3 one step each; a model reaching age T restarts fresh (age 0)
    assert ages == [1, 1, 2, 1, 2, 3,  1, 2, 3, 4,  2, 3, 4, 1,  3, 4, 1, 2]
    assert attack._inits == 4 + 3  # three restarts
    net = copy.deepcopy(model)
    first, second = attack._fresh(net), attack._fresh(net)
    assert all(not torch.equal(first["params"][k], second["params"][k]) for k in first["params"])
    assert all(not torch.equal(first["params"][k], v) for k, v in _params(model).items())


def test_registered_configured_and_checked():
    assert ATTACKS["back-gradient"] is BackGradientAttack and ATTACKS["metapoison"] is MetaPoisonAttack
    _, _, _, _, model = _tiny()
    cfg = Config.from_dict({"dataset": "mnist-sample", "bg_unroll_steps": 3, "bg_lr": 7.0, "mp_models": 5,
                            "mp_radius": 0.1, "flip_rule": "random"}).resolved()
    bg = BackGradientAttack.from_config(cfg, defender=model)
    assert (bg.unroll_steps, bg.lr, bg.beta, bg.epochs, bg.batch_size, bg.flip_rule) == \
        (3, 7.0, 0.05, 20, 100, "random")
    mp = MetaPoisonAttack.from_config(cfg, defender=model)
    assert (mp.models, mp.radius, mp.unroll_steps, mp.steps, mp.train_lr, mp.batch_size) == (5, 0.1, 2, 60, 0.1, 100)
    for kwargs, message in (({"unroll_steps": -1}, "unroll_steps"), ({"lr": 0}, "step sizes"),
                            ({"beta": -0.1}, "step sizes"), ({"flip_rule": "upside-down"}, "flip_rule"),
                            ({"epochs": 1.5}, "epochs"), ({"batch_size": 0}, "batch_size"),
                            ({"init": "middle"}, "init"), ({"pixel_range": (1.0, -1.0)}, "pixel_range")):
        with pytest.raises(ValueError, match=message):
            BackGradientAttack(model, 0.1, **kwargs)
    for kwargs, message in (({"radius": 0}, "radius"), ({"models": 0}, "models"),
                            ({"unroll_steps": -2}, "unroll_steps"),
                            ({"steps": -1}, "steps"), ({"lr": -1}, "step sizes"), ({"train_lr": 0}, "step sizes"),
                            ({"train_epochs": 0}, "train_epochs"), ({"batch_size": 0}, "batch_size")):
        with pytest.raises(ValueError, match=message):
            MetaPoisonAttack(model, 0.1, **kwargs)
    for cls in (BackGradientAttack, MetaPoisonAttack):
        with pytest.raises(ValueError, match="defender"):
            cls(None, 0.1)
        with pytest.raises(ValueError, match="epsilon"):
            cls(model, 1.5)
