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
    retrained = _fit(defender, torch.cat([x, x_p]), torch.cat([y, y_p]))  # the defender trained on D_tr U D_p
    w_t, w_r = (torch.cat([p.detach().flatten() for p in m.parameters()]) for m in (target, retrained))
    assert (w_r - w_t).norm() < 1e-2 * w_t.norm()  # lands on the target (another set of poisons, the same optimum)


def _authors_by_definition(defender, target, x, y, n_poison, epochs, lr0, stop=1.0):
    """The authors' recipe written out for a softmax linear model (independent of the attack's code): in their
    coordinates z = a x + c, G(z) = sum_i (softmax(W z_i + b) - e_{y_i}) z_i^T, the objective ||G_clean + G(z_p)||,
    gradient descent with step lr0 (1 + cos(pi e / E)) / 2 while the objective is at least `stop`."""
    from tgda_attack.models import MnistStandardize

    a, c = MnistStandardize.SCALE, MnistStandardize.SHIFT
    model = copy.deepcopy(defender)
    model.load_state_dict(target)
    W, b = model[-1].weight.detach(), model[-1].bias.detach()

    def G(z, labels):
        z = z.flatten(1)
        return (torch.softmax(z @ W.T + b, 1) - F.one_hot(labels, W.shape[0]).to(z.dtype)).T @ z

    g_clean = G(x * a + c, y)
    z = (x[:n_poison] * a + c).clone()
    for epoch in range(epochs):
        z.requires_grad_(True)
        objective = (g_clean + G(z, y[:n_poison])).norm()
        if objective.item() < stop:
            break
        (grad,) = torch.autograd.grad(objective, z)
        z = (z - lr0 * 0.5 * (1 + math.cos(math.pi * epoch / epochs)) * grad).detach()
    return (z.detach() - c) / a


def test_the_authors_recipe_is_its_definition(monkeypatch):
    import tgda_attack.attacks.gradient_canceling as gc
    from tgda_attack.models import MnistStandardize

    # 20 epochs of the cosine schedule: lr-10 descent amplifies rounding (1e-14 apart after 20 epochs, 1e-6
    # after 100, chaos by 1,000), so the check of the definition runs a short schedule
    monkeypatch.setitem(gc.AUTHORS_SCHEDULE, "lr", (20, 10.0))
    x, y, _ = _tiny(n=60)
    torch.manual_seed(0)
    defender = nn.Sequential(MnistStandardize(), nn.Flatten(), nn.Linear(4, 3)).double()
    target = targets.authors_gradpc_target(defender, x, y, radius=0.5, seed=0)
    attack = GradientCancelingAttack(defender, 0.1, recipe="authors", target=target, batch_size=7)  # 7: sums over batches
    x_p, y_p = attack.poison(x, y)
    torch.testing.assert_close(x_p, _authors_by_definition(defender, target, x, y, 6, 20, 10.0), rtol=1e-12, atol=1e-12)
    assert torch.equal(y_p, y[:6])  # the first epsilon*N points, their true labels
    info = attack.info_
    assert info["objective"]["end"] < info["objective"]["start"] and info["target"]["parameter"] == "2.weight"
    pixels = (x_p + 1) / 2  # no projection: the reported range is the poisons' own
    assert info["pixels"]["min"] == pytest.approx(pixels.min().item()) and info["pixels"]["max"] == pytest.approx(pixels.max().item())
    assert info["pixels"]["max"] > 1  # out of the valid range

    stop = 0.99 * attack.history[1]["objective"]  # reached after a few epochs: the descent stops below it
    monkeypatch.setattr(gc, "AUTHORS_STOP", stop)
    early = GradientCancelingAttack(defender, 0.1, recipe="authors", target=target)
    x_e, _ = early.poison(x, y)
    assert early.history[-1]["objective"] < stop and early.info_["schedule"]["stopped_at"] < 20
    torch.testing.assert_close(x_e, _authors_by_definition(defender, target, x, y, 6, 20, 10.0, stop=stop))


def test_the_authors_target_starts_from_another_initialisation_than_the_retraining(monkeypatch):
    import tgda_attack.attacks.gradient_canceling as gc
    from tgda_attack.attacks.base import fresh_model
    monkeypatch.setitem(gc.AUTHORS_SCHEDULE, "lr", (2, 10.0))
    x, y, defender = _tiny(n=60)
    attack = GradientCancelingAttack(defender, 0.1, recipe="authors", seed=2)
    attack.poison(x, y)
    expected = targets.authors_gradpc_target(defender, x, y, radius=0.5, seed=gc.AUTHORS_TARGET_SEED_OFFSET + 2)
    for k, v in expected.items():
        assert torch.equal(attack.target_[k], v), k
    # the defender is retrained from fresh_model(defender, 2)'s initialisation (protocol.new_defender, seed 2)
    assert not torch.equal(fresh_model(defender, gc.AUTHORS_TARGET_SEED_OFFSET + 2)[1].weight, fresh_model(defender, 2)[1].weight)


def test_the_authors_target_is_gradpc_of_one_adadelta_epoch_within_its_ball():
    x, y, defender = _tiny(n=60)
    target = targets.authors_gradpc_target(defender, x, y, radius=0.5, seed=3)
    model = copy.deepcopy(defender)
    torch.manual_seed(3)
    model[1].reset_parameters()
    opt = torch.optim.Adadelta(model.parameters(), lr=1.0)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(3))
    for i in range(0, len(y), 64):
        opt.zero_grad()
        F.cross_entropy(model(x[order[i:i + 64]]), y[order[i:i + 64]]).backward()
        opt.step()
    trained = torch.cat([p.detach().flatten() for p in model.parameters()])
    corrupted = torch.cat([target[k].flatten() for k in ("1.weight", "1.bias")])
    assert (corrupted - trained).norm().item() == pytest.approx(0.5, rel=1e-9)  # one batch: one unit step, shrunk to 0.5
    expected = targets.gradpc_target(model, x, y, radius=0.5, batch_size=64, seed=3)
    torch.testing.assert_close(corrupted, torch.cat([expected[k].flatten() for k in ("1.weight", "1.bias")]))


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


def _mlp(seed=0, classes=3, hidden=5):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(4, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, classes)).double()


def _box_corners(d, lo=-1.0, hi=1.0):
    bits = torch.tensor([[(i >> j) & 1 for j in range(d)] for i in range(2 ** d)], dtype=torch.float64)
    return lo + (hi - lo) * bits


def test_the_feature_bound_of_one_layer_is_its_largest_value_over_the_box_corners():
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(4, 1), nn.ReLU()).double()
    corners = _box_corners(4, -1.0, 0.5)  # a ReLU of an affine map is largest at a corner of the box
    exact = layer(corners).abs().max().item()
    assert targets.feature_norm_bound(layer, (4,), (-1.0, 0.5), corners) == pytest.approx(exact, rel=1e-12)
    flat = targets.feature_norm_bound(nn.Sequential(nn.Flatten()), (1, 2, 2), (-1.0, 0.5), corners)
    assert flat == pytest.approx(math.sqrt(4) * 1.0, rel=1e-12)  # the identity: the farthest corner
    assert targets.feature_norm_bound(nn.Sequential(nn.Flatten(), nn.BatchNorm1d(4)), (1, 2, 2), (-1, 1), corners) is None


def test_the_feature_bound_holds_for_every_point_of_the_box_through_deeper_layers():
    g = torch.Generator().manual_seed(1)
    conv = nn.Sequential(nn.Conv2d(1, 3, 2, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(0.5), nn.Flatten(),
                         nn.Linear(3, 4), nn.Tanh()).double().eval()
    mlp = _mlp()[:-1]
    for layers, shape in ((conv, (1, 2, 2)), (mlp, (1, 2, 2))):
        bound = targets.feature_norm_bound(layers, shape, (-1.0, 1.0), next(layers.parameters()))
        points = torch.cat([_box_corners(4).view(-1, *shape), torch.rand(500, *shape, generator=g, dtype=torch.float64) * 2 - 1])
        assert layers(points).flatten(1).norm(dim=1).max().item() <= bound


def test_necessary_epsilon_of_a_network_is_the_lambert_bound_of_its_last_layer():
    x, y, _ = _tiny(classes=3)
    model = _mlp()
    last = list(model[-1].parameters())
    inner = [sum((gi * wi).sum() for gi, wi in zip(torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), last), last))
             for i in range(len(y))]
    bound = targets.lambert_w(2 / math.e)
    corners = _box_corners(4).view(-1, 1, 2, 2)
    for points in (x, corners):  # whatever the pixels, no point pulls the last layer harder than the bound
        for i in range(len(points)):
            zi = model(points[i:i + 1])
            p = zi.softmax(1)
            assert ((p * zi).sum() - zi.max()).item() >= -bound - 1e-12  # its most pulling label
    along = torch.stack(inner).mean().item() / bound
    features = targets.feature_norm_bound(model[:-1], (1, 2, 2), (-1.0, 1.0), x)
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), last)
    in_norm = torch.cat([g.flatten() for g in grads]).norm().item() / (math.sqrt(2) * math.sqrt(features ** 2 + 1))
    assert targets.necessary_epsilon(model, x, y) == pytest.approx(max(along, in_norm, 0.0), rel=1e-9)
    for points in (x, corners):  # no point's last-layer gradient is longer than the norm bound
        for i in range(len(points)):
            for c in range(3):
                g = torch.autograd.grad(F.cross_entropy(model(points[i:i + 1]), torch.tensor([c])), last)
                assert torch.cat([t.flatten() for t in g]).norm() <= math.sqrt(2) * math.sqrt(features ** 2 + 1)


def test_necessary_epsilon_sees_the_input_normalisation_of_the_authors_lr():
    from tgda_attack.models import MnistStandardize, make_defender
    torch.manual_seed(0)
    model = make_defender("gc-lr").double()
    x = torch.rand(20, 1, 28, 28, dtype=torch.float64) * 2 - 1
    widest = max(abs(MnistStandardize.SHIFT - MnistStandardize.SCALE), MnistStandardize.SHIFT + MnistStandardize.SCALE)
    assert targets.feature_norm_bound(model[:-1], (1, 28, 28), (-1.0, 1.0), x) == pytest.approx(28 * widest, rel=1e-12)


def test_necessary_epsilon_is_none_where_the_logits_are_not_a_final_linear_layer():
    x, y, _ = _tiny(classes=3)

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = _mlp()

        def forward(self, t):
            return self.inner(t)

    assert targets.necessary_epsilon(Wrapped(), x, y) is None
    assert targets.necessary_epsilon(nn.Sequential(_mlp(), nn.Softmax(1)), x, y) is None


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


def test_a_defender_out_of_the_budgets_reach_is_said_not_attacked_silently():
    """Untrained, the defender's own gradient needs more than a tiny budget: the bisection ends at radius 0 (the
    target is the defender itself) and the attack says so, in a warning and in its target's record."""
    x, y, defender = _tiny()
    attack = GradientCancelingAttack(defender, 1e-6, steps=1, num_classes=3)
    with pytest.warns(UserWarning, match="no GradPC target within reach of epsilon 1e-06"):
        attack._target_parameters(defender, x, y)
    info = attack.target_info_
    assert info["relative_radius"] == 0 and info["defender_needs_epsilon"] > 1e-6
    assert info["defender_needs_epsilon"] == pytest.approx(targets.necessary_epsilon(defender.eval(), x, y))


def test_the_default_gradpc_target_of_a_network_is_within_the_budget():
    x, y, _ = _tiny()
    defender = _fit(_mlp(), x, y)
    attack = GradientCancelingAttack(defender, 0.1, steps=1, num_classes=3)
    attack.poison(x, y)
    info = attack.target_info_
    assert info["kind"] == "gradpc" and 0 < info["relative_radius"] < 64
    assert info["necessary_epsilon"] <= 0.1
    loose = GradientCancelingAttack(defender, 0.1, steps=1, radius=2 * info["relative_radius"] + 0.5, num_classes=3)
    loose.poison(x, y)
    assert loose.target_info_["necessary_epsilon"] > 0.1



def test_the_reachability_bound_of_a_dropout_network_is_that_of_the_network_as_evaluated():
    x, y, _ = _tiny()
    torch.manual_seed(0)
    defender = nn.Sequential(nn.Flatten(), nn.Linear(4, 6), nn.ReLU(), nn.Dropout(0.5), nn.Linear(6, 3)).double()
    defender.train()  # as a training loop leaves it
    attack = GradientCancelingAttack(defender, 0.1, steps=1, num_classes=3)
    attack.poison(x, y)
    probe = copy.deepcopy(defender).eval()
    probe.load_state_dict(attack.target_)
    assert attack.target_info_["necessary_epsilon"] == pytest.approx(targets.necessary_epsilon(probe, x, y), rel=1e-12)


def _linear_gradients(target, x0, classes):
    """(n, K, P) closed form of a softmax linear model: grad_W l(x, c) = (p - e_c) x^T, grad_b = p - e_c, flattened
    as named_parameters orders them (weight, then bias)."""
    W, b = target[-1].weight.detach(), target[-1].bias.detach()
    z = x0.flatten(1)
    p = torch.softmax(z @ W.T + b, 1)
    out = []
    for c in range(classes):
        r = p - F.one_hot(torch.full((len(z),), c), classes).to(z.dtype)
        out.append(torch.cat([(r[:, :, None] * z[:, None, :]).flatten(1), r], 1))
    return torch.stack(out, 1)


def test_canceling_labels_are_the_greedy_minimiser_of_the_objective(monkeypatch):
    x, y, defender = _tiny()
    target = _fit(defender, x[:20], y[:20])  # a target D_tr alone does not make stationary
    attack = GradientCancelingAttack(defender, 0.3, target=target.state_dict(), labels="cancel", steps=0,
                                     num_classes=3)
    monkeypatch.setattr("tgda_attack.attacks.gradient_canceling.CANCEL_CHUNK_FLOATS", 40)  # several chunks
    x_p, y_p = attack.poison(x, y)
    params = {k: v.detach() for k, v in target.named_parameters()}
    g_clean = attack.clean_gradient(target, params, x, y).double()
    grads = _linear_gradients(target, x[attack.source_indices_], 3)
    residual, expected = g_clean.clone(), []
    for g in grads:  # the greedy rule, by brute force over the classes
        norms = [(residual + g[c]).norm().item() for c in range(3)]
        expected.append(min(range(3), key=norms.__getitem__))
        residual += g[expected[-1]]
    assert y_p.tolist() == expected
    assert attack.info_["label_counts"] == torch.bincount(y_p, minlength=3).tolist()
    scale = 1.0 / (len(y) + len(y_p))
    chosen, true, flipped = (attack.objective(target, params, g_clean, x_p, labels, scale).item()
                             for labels in (y_p, y[attack.source_indices_], 2 - y[attack.source_indices_]))
    assert chosen < true and chosen < flipped  # on this problem the chosen labels cancel best at the start


class _Killed(Exception):
    """Stands for a kill right after a checkpoint was written (nothing after it runs)."""


def _kill_after_save(monkeypatch, at_step):
    """Saves at every step (CHECKPOINT_SECONDS 0) and stops the process's attack right after the save at `at_step`."""
    import tgda_attack.attacks.gradient_canceling as gc

    monkeypatch.setattr(gc, "CHECKPOINT_SECONDS", 0.0)
    save = gc._Saver.at_step

    def save_then_die(self, step, *args):
        save(self, step, *args)
        if step == at_step:
            raise _Killed
    monkeypatch.setattr(gc._Saver, "at_step", save_then_die)
    return lambda: monkeypatch.setattr(gc._Saver, "at_step", save)


@pytest.mark.parametrize("recipe", ["valid", "authors"])
def test_a_descent_killed_midway_resumes_to_the_poisons_of_an_uninterrupted_one(tmp_path, monkeypatch, recipe):
    import tgda_attack.attacks.gradient_canceling as gc
    from tgda_attack.models import MnistStandardize

    monkeypatch.setitem(gc.AUTHORS_SCHEDULE, "lr", (20, 10.0))
    x, y, defender = _tiny(n=60)
    if recipe == "authors":
        torch.manual_seed(0)
        defender = nn.Sequential(MnistStandardize(), nn.Flatten(), nn.Linear(4, 3)).double()
    options = dict(recipe=recipe, steps=20, lr=0.05, num_classes=3, labels="true", radius=0.1)
    whole = GradientCancelingAttack(defender, 0.1, **options)
    x_whole, y_whole = whole.poison(x, y)
    checkpoint = str(tmp_path / "attack_checkpoint.pt")
    revive = _kill_after_save(monkeypatch, at_step=7)
    with pytest.raises(_Killed):
        GradientCancelingAttack(defender, 0.1, checkpoint=checkpoint, **options).poison(x, y)
    state = torch.load(checkpoint, weights_only=True)
    assert state["step"] == 7 and [h["step"] for h in state["history"]] == [0]  # the history of the steps before
    revive()
    evaluations = _count_objectives(monkeypatch, recipe)
    resumed = GradientCancelingAttack(defender, 0.1, checkpoint=checkpoint, **options)
    x_p, y_p = resumed.poison(x, y)
    assert len(evaluations) == 21 - 7  # steps 7 to 20: continued, not started again
    assert torch.equal(x_p, x_whole) and torch.equal(y_p, y_whole)  # the same trajectory, Adam's state included
    assert resumed.history == whole.history and resumed.earlier_seconds_ == state["seconds"] > 0
    assert resumed.info_ == whole.info_
    assert torch.load(checkpoint, weights_only=True)["step"] == 20  # saved at the end: a rerun returns at once
    evaluations.clear()
    again = GradientCancelingAttack(defender, 0.1, checkpoint=checkpoint, **options)
    assert torch.equal(again.poison(x, y)[0], x_whole) and len(evaluations) == 1 and again.history == whole.history


def _count_objectives(monkeypatch, recipe):
    """A list that grows by one at each evaluation of the descent's objective (with a graph to the poisons)."""
    calls = []
    if recipe == "valid":
        objective = GradientCancelingAttack.objective

        def counted(self, *args):
            calls.append(1)
            return objective(self, *args)
        monkeypatch.setattr(GradientCancelingAttack, "objective", counted)
    else:
        first_gradient = GradientCancelingAttack._first_gradient

        def counted(self, *args, create_graph):
            calls.extend([1] if create_graph else [])
            return first_gradient(self, *args, create_graph=create_graph)
        monkeypatch.setattr(GradientCancelingAttack, "_first_gradient", counted)
    return calls


def test_a_signal_stops_the_descent_at_a_step_end_with_its_progress_saved(tmp_path, monkeypatch):
    import signal

    import tgda_attack.attacks.gradient_canceling as gc

    x, y, defender = _tiny(n=60)
    options = dict(steps=12, lr=0.05, num_classes=3, labels="cancel", radius=0.1)
    whole = GradientCancelingAttack(defender, 0.1, **options).poison(x, y)
    objective, calls = GradientCancelingAttack.objective, []

    def signalled(self, *args):
        calls.append(1)
        if len(calls) == 5:
            signal.raise_signal(signal.SIGTERM)  # in the middle of step 4: it ends, then the attack saves and stops
        return objective(self, *args)
    monkeypatch.setattr(GradientCancelingAttack, "objective", signalled)
    checkpoint = tmp_path / "attack_checkpoint.pt"  # a pathlib.Path, as a Python caller may pass it
    with pytest.raises(KeyboardInterrupt, match="step 5 of 12 of Gradient Canceling; the checkpoint holds it"):
        GradientCancelingAttack(defender, 0.1, checkpoint=checkpoint, **options).poison(x, y)
    assert torch.load(checkpoint, weights_only=True)["step"] == 5
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler before is back
    monkeypatch.setattr(GradientCancelingAttack, "objective", objective)
    evaluations = _count_objectives(monkeypatch, "valid")
    resumed = GradientCancelingAttack(defender, 0.1, checkpoint=checkpoint, **options).poison(x, y)
    assert torch.equal(resumed[0], whole[0]) and torch.equal(resumed[1], whole[1])  # the chosen labels kept
    assert len(evaluations) == 13 - 5
    calls.clear()  # a signal in the last step stops the attack too (it went on into the retrainings), its end saved

    def signalled_last(self, *args):
        calls.append(1)
        if len(calls) == 13:
            signal.raise_signal(signal.SIGTERM)
        return objective(self, *args)
    monkeypatch.setattr(GradientCancelingAttack, "objective", signalled_last)
    last = tmp_path / "last.pt"
    with pytest.raises(KeyboardInterrupt, match="at the end of Gradient Canceling \\(step 12 of 12\\)"):
        GradientCancelingAttack(defender, 0.1, checkpoint=last, **options).poison(x, y)
    monkeypatch.setattr(GradientCancelingAttack, "objective", objective)
    assert torch.equal(GradientCancelingAttack(defender, 0.1, checkpoint=last, **options).poison(x, y)[0], whole[0])


def test_a_descent_checkpoint_is_resumed_only_by_the_attack_that_wrote_it(tmp_path, monkeypatch):
    from tgda_attack.rundir import RunFolderError

    x, y, defender = _tiny(n=60)
    checkpoint = str(tmp_path / "attack_checkpoint.pt")
    _kill_after_save(monkeypatch, at_step=3)
    with pytest.raises(_Killed):
        GradientCancelingAttack(defender, 0.1, radius=0.1, steps=10, checkpoint=checkpoint, num_classes=3).poison(x, y)
    with pytest.raises(RunFolderError, match=r"other settings \(lr\); it is resumed only by the settings that wrote it"):
        GradientCancelingAttack(defender, 0.1, radius=0.1, steps=10, lr=0.02, checkpoint=checkpoint, num_classes=3).poison(x, y)
    _, _, other = _tiny(seed=5, n=60)
    with pytest.raises(RunFolderError, match=r"start \(the pretrained models or the data"):
        GradientCancelingAttack(other, 0.1, radius=0.1, steps=10, checkpoint=checkpoint, num_classes=3).poison(x, y)
    with pytest.raises(RunFolderError, match=r"other settings \(radius, recipe, schedule, stop\)"):
        GradientCancelingAttack(defender, 0.1, recipe="authors", checkpoint=checkpoint, num_classes=3).poison(x, y)
    state = torch.load(checkpoint, weights_only=True)
    state["target"] = {"weight": torch.zeros(2, 2)}  # a crafted file under the right settings
    torch.save(state, checkpoint)
    with pytest.raises(RunFolderError, match="holds the target of another model"):
        GradientCancelingAttack(defender, 0.1, radius=0.1, steps=10, checkpoint=checkpoint, num_classes=3).poison(x, y)
    torch.save({"step": "3"}, checkpoint)
    with pytest.raises(RunFolderError, match="lacks 'step'"):
        GradientCancelingAttack(defender, 0.1, radius=0.1, steps=10, checkpoint=checkpoint, num_classes=3).poison(x, y)
