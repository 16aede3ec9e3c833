"""The TGDA and label-flip attacks: invariants, determinism, resume, and one leader update
against the total-derivative formula evaluated with a dense Hessian."""
import copy
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hypergrad
from tgda_attack.attacks import GradientCancelingAttack, LabelFlipAttack, TGDAAttack
from tgda_attack.data import DataTooSmallError


class TinyAttacker(nn.Module):
    """x_p = tanh(A x + c y): small enough for dense second derivatives."""

    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.label = nn.Parameter(torch.zeros(d))
        self.d = d

    def forward(self, x, y):
        return torch.tanh(self.lin(x.flatten(1)) + y.to(x.dtype)[:, None] * self.label).view(x.shape)


def _tiny(seed=0, n=40, d=4, classes=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 2, 2, generator=g, dtype=torch.float64) * 2 - 1
    y = torch.randint(0, classes, (n,), generator=g)
    xv = torch.rand(n // 2, 1, 2, 2, generator=g, dtype=torch.float64) * 2 - 1
    yv = torch.randint(0, classes, (n // 2,), generator=g)
    torch.manual_seed(seed)
    defender = nn.Sequential(nn.Flatten(), nn.Linear(d, classes)).double()
    attacker = TinyAttacker(d).double()
    return x, y, xv, yv, defender, attacker


def _attack(defender, attacker, **kw):
    settings = dict(epsilon=0.1, epochs=1, batch_size=1000, alpha=0.05, follower_steps=2, solver="cg",
                    solver_iterations=100, seed=0)
    settings.update(kw)
    return TGDAAttack(defender, attacker, **settings)


def test_budget_clean_label_and_pixel_range():
    x, y, xv, yv, defender, attacker = _tiny()
    attack = _attack(defender, attacker, epochs=2, alpha=5.0)
    x_p, y_p = attack.poison(x, y, x_val=xv, y_val=yv)
    assert len(y_p) == 4 and x_p.shape == (4, 1, 2, 2)
    assert torch.equal(y_p, y[:4])  # clean label: D_p^0 = D_tr[0:eps N], labels unchanged
    assert attack.source_indices_.tolist() == [0, 1, 2, 3]
    assert x_p.min() >= -1 and x_p.max() <= 1
    assert not torch.allclose(x_p, attacker(x[:4], y[:4]))  # the attacker moved
    assert len(attack.history) == 2
    n_batches = -(-len(y) // attack.batch_size)  # every epoch records its batches and wall time
    assert all(h["batches"] == n_batches and h["seconds"] > 0 for h in attack.history)


def test_same_seed_gives_the_same_poisons():
    x, y, xv, yv, defender, attacker = _tiny()
    a = _attack(defender, attacker, epochs=2, init="random", seed=3).poison(x, y, x_val=xv, y_val=yv)
    b = _attack(defender, attacker, epochs=2, init="random", seed=3).poison(x, y, x_val=xv, y_val=yv)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_one_leader_update_equals_the_dense_total_derivative():
    x, y, xv, yv, defender, attacker = _tiny(seed=1)
    damping = 0.1  # the softmax-regression Hessian is singular along the all-ones logit shift
    attack = _attack(defender, attacker, follower_steps=0, damping=damping, solver_rtol=1e-13)
    attack.poison(x, y, x_val=xv, y_val=yv)
    theta0 = hypergrad.flatten([p.detach() for p in attacker.parameters()])
    theta1 = hypergrad.flatten([p.detach() for p in attack.attacker_.parameters()])

    w0 = hypergrad.flatten([p.detach() for p in defender.parameters()])
    w_like, t_like = list(defender.parameters()), list(attacker.parameters())
    xp0, yp0 = x[:4], y[:4]

    def f(th, w):  # L(D_tr U D_p(theta), w)
        W, b = hypergrad.unflatten(w, w_like)
        lab, A, c = hypergrad.unflatten(th, t_like)  # parameters() lists `label` before `lin`
        xp = torch.tanh(xp0.flatten(1) @ A.T + c + yp0.double()[:, None] * lab)
        logits = torch.cat([x.flatten(1), xp]) @ W.T + b
        return F.cross_entropy(logits, torch.cat([y, yp0]))

    def l(w):  # L(D_v, w)
        W, b = hypergrad.unflatten(w, w_like)
        return F.cross_entropy(xv.flatten(1) @ W.T + b, yv)

    H = torch.autograd.functional.hessian(lambda w: f(theta0, w), w0) + damping * torch.eye(len(w0), dtype=torch.float64)
    grad_w_l = torch.autograd.functional.jacobian(l, w0)
    mixed = torch.autograd.functional.jacobian(
        lambda th: torch.autograd.functional.jacobian(lambda w: f(th, w), w0, create_graph=True), theta0)  # [w, theta]
    expected = -mixed.T @ torch.linalg.solve(H, grad_w_l)  # D_theta l (l does not depend on theta)
    torch.testing.assert_close(theta1 - theta0, 0.05 * expected, rtol=1e-7, atol=1e-12)


def test_resume_from_checkpoint_gives_the_same_result(tmp_path):
    x, y, xv, yv, defender, attacker = _tiny(seed=2)
    full = _attack(defender, attacker, epochs=2).poison(x, y, x_val=xv, y_val=yv)
    ckpt = str(tmp_path / "attack.pt")
    _attack(defender, attacker, epochs=1, checkpoint=ckpt).poison(x, y, x_val=xv, y_val=yv)
    resumed_attack = _attack(defender, attacker, epochs=2, checkpoint=ckpt)
    resumed = resumed_attack.poison(x, y, x_val=xv, y_val=yv)
    torch.testing.assert_close(resumed[0], full[0])
    assert [h["epoch"] for h in resumed_attack.history] == [1, 2]
    assert resumed_attack.earlier_seconds_ == resumed_attack.history[0]["seconds"] > 0  # counted in attack_seconds


def test_a_second_poison_call_keeps_a_record_of_its_own():
    x, y, xv, yv, defender, attacker = _tiny(seed=2)
    attack = _attack(defender, attacker, epochs=2)
    first = attack.poison(x, y, x_val=xv, y_val=yv)
    second = attack.poison(x, y, x_val=xv, y_val=yv)
    assert [h["epoch"] for h in attack.history] == [1, 2]  # was [1, 2, 1, 2]
    torch.testing.assert_close(first[0], second[0])


def test_a_checkpoint_is_resumed_only_by_the_settings_that_wrote_it(tmp_path):
    from tgda_attack.rundir import RunFolderError
    x, y, xv, yv, defender, attacker = _tiny(seed=2)
    ckpt = str(tmp_path / "attack.pt")
    _attack(defender, attacker, epochs=1, checkpoint=ckpt).poison(x, y, x_val=xv, y_val=yv)
    with pytest.raises(RunFolderError, match="alpha"):
        _attack(defender, attacker, epochs=1, alpha=0.5, checkpoint=ckpt).poison(x, y, x_val=xv, y_val=yv)
    _attack(defender, attacker, epochs=1, checkpoint=ckpt).poison(x, y, x_val=xv, y_val=yv)  # the same: resumed
    # the same settings from another starting point (another pretraining, another split of the data): refused
    _, _, _, _, other_defender, _ = _tiny(seed=3)
    with pytest.raises(RunFolderError, match="start \\(the pretrained models or the data"):
        _attack(other_defender, attacker, epochs=1, checkpoint=ckpt).poison(x, y, x_val=xv, y_val=yv)
    with pytest.raises(RunFolderError, match="start \\(the pretrained models or the data"):
        _attack(defender, attacker, epochs=1, checkpoint=ckpt).poison(x, y, x_val=xv[1:], y_val=yv[1:])


def test_a_crafted_or_foreign_checkpoint_is_refused_with_one_message(tmp_path):
    from tgda_attack.rundir import RunFolderError
    x, y, xv, yv, defender, attacker = _tiny(seed=2)
    ckpt = str(tmp_path / "attack.pt")
    torch.save({"epoch": 1, "defender": {"weight": torch.zeros(3, 3)}, "attacker": attacker.state_dict(),
                "history": []}, ckpt)
    with pytest.raises(RunFolderError, match="another run"):
        _attack(defender, attacker, epochs=2, checkpoint=ckpt).poison(x, y, x_val=xv, y_val=yv)
    torch.save({"epoch": "1"}, ckpt)
    with pytest.raises(RunFolderError, match="lacks 'epoch'"):
        _attack(defender, attacker, epochs=2, checkpoint=ckpt).poison(x, y, x_val=xv, y_val=yv)


@pytest.mark.parametrize("options", [{"leader": "defender"}, {"formulation": "zero-sum"}, {"warm_start": "cold"},
                                     {"solver": "cgnr", "solver_iterations": 4}, {"solver": "minres"}])
def test_paper_variants_run_and_keep_the_invariants(options):
    x, y, xv, yv, defender, attacker = _tiny(seed=3)
    x_p, y_p = _attack(defender, attacker, **options).poison(x, y, x_val=xv, y_val=yv)
    assert torch.equal(y_p, y[:4]) and x_p.min() >= -1 and x_p.max() <= 1 and torch.isfinite(x_p).all()


def test_cold_start_restarts_the_follower_from_the_pretrained_defender():
    x, y, xv, yv, defender, attacker = _tiny(seed=4)
    attack = _attack(defender, attacker, warm_start="cold", follower_steps=0, batch_size=10, epochs=2)
    attack.poison(x, y, x_val=xv, y_val=yv)
    for p, q in zip(defender.parameters(), attack.defender_.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("kwargs, message", [({"epsilon": 2.0}, "epsilon"), ({"alpha": 0.0}, "step sizes"),
                                             ({"solver": "lu"}, "solver"), ({"leader": "both"}, "leader"),
                                             ({"batch_size": 0}, "batch_size"), ({"epochs": -1}, "epochs")])
def test_bad_hyper_parameters_raise(kwargs, message):
    x, y, xv, yv, defender, attacker = _tiny()
    with pytest.raises(ValueError, match=message):
        _attack(defender, attacker, **kwargs)


def test_cuda_graphs_give_the_same_poisons_as_the_plain_solve():
    x, y, xv, yv, _, attacker = _tiny(seed=5)
    torch.manual_seed(5)
    defender = nn.Sequential(nn.Flatten(), nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    settings = dict(epochs=2, batch_size=15, solver="cgnr", solver_iterations=8, solver_rtol=0.0)
    plain = _attack(defender, attacker, **settings).poison(x, y, x_val=xv, y_val=yv)
    attack = _attack(defender, attacker, cuda_graphs=True, **settings)
    recorded = attack.poison(x, y, x_val=xv, y_val=yv)
    torch.testing.assert_close(recorded[0], plain[0], rtol=1e-9, atol=1e-9)
    assert len(attack._graphs) == 2  # batches of 15 + 1 and 10 + 2 points: two layouts, recorded once each


def test_cuda_graphs_need_a_linear_chain_defender_and_the_attacker_as_leader():
    x, y, xv, yv, defender, attacker = _tiny()
    with pytest.raises(ValueError, match="leader='attacker'"):
        _attack(defender, attacker, cuda_graphs=True, leader="defender")
    conv = nn.Sequential(nn.Conv2d(1, 2, 2), nn.Flatten(), nn.Linear(2, 3)).double()
    with pytest.raises(ValueError, match="chain of linear layers"):
        _attack(conv, attacker, cuda_graphs=True).poison(x, y, x_val=xv, y_val=yv)


def test_label_flip_rules():
    y = torch.arange(100) % 10
    x = torch.randn(100, 1, 2, 2)
    flip = LabelFlipAttack(0.1)
    x_p, y_p = flip.poison(x, y)
    assert torch.equal(x_p, x[:10]) and torch.equal(y_p, 9 - y[:10])
    assert flip.source_indices_.tolist() == list(range(10))
    _, y_r = LabelFlipAttack(0.1, rule="random", seed=1).poison(x, y)
    assert len(y_r) == 10 and bool((y_r != y[:10]).all())
    with pytest.raises(ValueError, match="rule"):
        LabelFlipAttack(rule="up")


def test_without_a_validation_set_30_percent_serves_as_d_v_and_the_budget_is_of_all_points():
    x, y, xv, yv, defender, attacker = _tiny(seed=5, n=100)
    attack = _attack(defender, attacker)
    x_p, y_p = attack.poison(x, y)
    assert len(y_p) == 10  # floor(0.1 * 100): the poisons are the caller's budget (it was 7, of a 70% subset)
    assert torch.equal(y_p, y[attack.source_indices_])  # the sources index the caller's x


def test_direct_pixel_attacker_keeps_the_invariants_and_follows_each_poisons_gradient():
    x, y, xv, yv, defender, _ = _tiny(seed=6)
    attack = _attack(defender, None, follower_steps=0, alpha=50.0, damping=0.5, solver_rtol=1e-13)
    x_p, y_p = attack.poison(x, y, x_val=xv, y_val=yv)
    assert attack.attacker_ is None and torch.equal(y_p, y[:4])
    assert x_p.min() >= -1 and x_p.max() <= 1
    # one leader step from D_p^0 (one batch, no follower steps): theta = D_p moves by alpha D_theta l,
    # projected onto the pixel range; D_theta l from an independent total_grad call with the poisons as theta
    poisons = x[:4].clone().requires_grad_(True)
    w = tuple(defender.parameters())
    follower = lambda: F.cross_entropy(defender(torch.cat([x, poisons])), torch.cat([y, y[:4]]))  # noqa: E731
    leader = lambda: F.cross_entropy(defender(xv), yv)  # noqa: E731
    (d,) = hypergrad.total_grad(leader, follower, poisons, w, method="cg", maxiter=100, damping=0.5, rtol=1e-13)
    # (the attack's single batch holds all of D_tr in a shuffled order: equal up to rounding)
    expected = (x[:4] + 50.0 * d).clamp(-1, 1)
    torch.testing.assert_close(x_p, expected, rtol=1e-8, atol=1e-10)
    assert not torch.allclose(x_p, x[:4])


def test_direct_pixel_attacker_resumes_exactly(tmp_path):
    x, y, xv, yv, defender, _ = _tiny(seed=7)
    full = _attack(defender, None, epochs=2, alpha=20.0).poison(x, y, x_val=xv, y_val=yv)
    ckpt = str(tmp_path / "ckpt.pt")
    _attack(defender, None, epochs=1, alpha=20.0, checkpoint=ckpt).poison(x, y, x_val=xv, y_val=yv)
    resumed = _attack(defender, None, epochs=2, alpha=20.0, checkpoint=ckpt).poison(x, y, x_val=xv, y_val=yv)
    assert torch.equal(full[0], resumed[0])


def test_a_diverging_follower_is_an_error_not_nan_poisons():
    x, y, xv, yv, defender, attacker = _tiny(seed=8)
    with pytest.raises(FloatingPointError, match="diverged"):
        _attack(defender, attacker, beta=1e6, follower_steps=5, epochs=2).poison(x, y, x_val=xv, y_val=yv)


@pytest.mark.parametrize("rule, pick", [("largest-loss", max), ("nearest", min)])
def test_defender_flips_take_the_other_class_of_largest_or_smallest_cross_entropy(rule, pick):
    x, y, _, _, defender, _ = _tiny()
    x_p, y_p = LabelFlipAttack(0.25, rule=rule, defender=defender, num_classes=3).poison(x, y)
    with torch.no_grad():
        logits = defender(x[:10])
    for i in range(10):  # the oracle: each wrong label's loss; "nearest" is the wrong class of least loss
        losses = {k: F.cross_entropy(logits[i:i + 1], torch.tensor([k])).item() for k in range(3) if k != y[i]}
        assert y_p[i].item() == pick(losses, key=losses.get)
    assert torch.equal(x_p, x[:10])
    with pytest.raises(ValueError, match="needs the trained defender"):
        LabelFlipAttack(0.1, rule=rule)


def test_reverse_on_an_odd_number_of_classes_says_how_many_poisons_keep_their_label():
    x, y, _, _, _, _ = _tiny()  # 3 classes: 1 is its own reverse
    middle = int((y[:10] == 1).sum())  # the first 10 points are the poisons' sources
    with pytest.warns(RuntimeWarning, match=f"maps class 1 onto itself: {middle} of 10 poisons keep their true label"):
        _, y_p = LabelFlipAttack(0.25, rule="reverse", num_classes=3).poison(x, y)
    assert int((y_p == y[:10]).sum()) == middle > 0
    with pytest.warns(RuntimeWarning, match="labels up to 3, which no point of the data has") as caught:
        LabelFlipAttack(0.25, rule="reverse", num_classes=4).poison(x, y)  # even K: every label flips (to a class 3
    assert not any("onto itself" in str(w.message) for w in caught)  # the data lack: said so too)


def test_images_in_zero_one_under_the_default_pixel_range_are_said():
    x, y, xv, yv, defender, attacker = _tiny(seed=2)
    with pytest.warns(UserWarning, match=r"range over \[0.\d+, 0.\d+\] but the attack keeps its poisons in pixel_range "
                                         r"\[-1, 1\].*pass pixel_range=\(0, 1\)"):
        _attack(defender, attacker).poison((x + 1) / 2, y, x_val=(xv + 1) / 2, y_val=yv)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _attack(defender, attacker, pixel_range=(0.0, 1.0)).poison((x + 1) / 2, y, x_val=(xv + 1) / 2, y_val=yv)


def test_labels_the_data_lack_are_said_and_all_the_classes_give_none():
    x, y = torch.rand(20, 1, 2, 2) * 2 - 1, torch.arange(20) % 2  # binary data, num_classes left at 10
    with pytest.warns(RuntimeWarning, match=r"up to 9, which no point of the data has \(its labels are 0 .. 1; "
                                            r"num_classes is 10\).*pass num_classes=2"):
        LabelFlipAttack(0.2).poison(x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, y_p = LabelFlipAttack(0.2, num_classes=2).poison(x, y)
    assert torch.equal(y_p, 1 - y[:4])


def test_the_validation_pool_takes_the_poisons_from_d_v_with_the_budget_of_d_tr():
    x, y, xv, yv, defender, _ = _tiny(n=40)  # D_tr 40 points, D_v 20
    flip = LabelFlipAttack(0.25, rule="reverse", pool="val", init="random", seed=3, num_classes=3)
    with pytest.warns(RuntimeWarning, match="onto itself"):
        x_p, y_p = flip.poison(x, y, x_val=xv, y_val=yv)
    idx = flip.source_indices_
    assert len(y_p) == 10 and flip.source_pool == "val"  # floor(0.25 * 40) points, taken from D_v's 20
    assert len(set(idx.tolist())) == 10 and int(idx.max()) < 20
    assert torch.equal(x_p, xv[idx]) and torch.equal(y_p, 2 - yv[idx])
    assert LabelFlipAttack(0.25).source_pool == "train"
    with pytest.raises(ValueError, match="pass x_val and y_val"):
        LabelFlipAttack(0.25, pool="val").poison(x, y)
    with pytest.raises(ValueError, match="D_v has only 20 points"):
        LabelFlipAttack(0.75, pool="val").poison(x, y, x_val=xv, y_val=yv)
    with pytest.raises(ValueError, match="pool must be one of"):
        LabelFlipAttack(0.25, pool="test")


def test_confused_pairs_take_the_fewest_most_frequent_class_pairs_that_hold_the_budget():
    # a defender whose nearest wrong class is fixed per point: one-hot inputs e_0, e_1, e_2 look like 1, 2, 0; the
    # inputs e_3 (class 1) and e_4 (class 0) like 0 and 1 (the reverse of the first two pairs, never chosen with them)
    defender = nn.Sequential(nn.Flatten(), nn.Linear(5, 3)).double()
    with torch.no_grad():
        defender[1].weight.copy_(torch.tensor([[2.0, 0, 1, 1, 2], [1, 2, 0, 2, 1], [0, 1, 2, 0, 0]]))
        defender[1].bias.zero_()
    y_val = torch.tensor([0] * 6 + [1] * 4 + [2] * 2 + [1] * 5)  # pairs (0, 1): 6, (1, 2): 4, (2, 0): 2, (1, 0): 5
    x_val = F.one_hot(torch.tensor([0] * 6 + [1] * 4 + [2] * 2 + [3] * 5), 5).double().view(-1, 1, 1, 5)
    x = torch.zeros(30, 1, 1, 5, dtype=torch.float64)
    y = torch.zeros(30, dtype=torch.long)

    def poison(epsilon, **kw):
        flip = LabelFlipAttack(epsilon, rule="nearest", defender=defender, pool="val", select="confused-pairs",
                               num_classes=3, **kw)
        x_p, y_p = flip.poison(x, y, x_val=x_val, y_val=y_val)
        return flip, x_p, y_p

    flip, x_p, y_p = poison(0.2)  # 6 poisons: pair (0, 1) alone holds them
    assert flip.source_indices_.tolist() == list(range(6)) and y_p.tolist() == [1] * 6
    assert torch.equal(x_p, x_val[:6]) and flip.info_["pairs"] == [[0, 1, 6]]
    flip, x_p, y_p = poison(0.3, init="random", seed=2)  # 9 poisons: pairs (0, 1) and (1, 2); (1, 0) undoes (0, 1)
    idx = flip.source_indices_
    assert len(set(idx.tolist())) == 9 and int(idx.max()) < 10 and torch.equal(y_p, (y_val[idx] + 1) % 3)
    assert flip.info_["pairs"] == [[0, 1, 6], [1, 2, 4]]
    with pytest.raises(DataTooSmallError, match="hold 12 points, fewer than the 15 poisons: use select 'spread' "
                       r"\(--flip-select spread\) or an epsilon of at most 0.375"):  # known after stage 1: exit 2
        poison(0.5)
    assert len(poison(0.375)[2]) == 11  # the advised epsilon fits
    with pytest.raises(ValueError, match="needs rule 'nearest'"):
        LabelFlipAttack(0.1, defender=defender, select="confused-pairs")


def _per_sample_oracle(defender, x_i, c, x_val, y_val):
    """grad l(x_i, c) . grad L_val by reverse mode, parameter by parameter: the influence rule's independent twin."""
    params = list(defender.parameters())
    g_val = torch.autograd.grad(F.cross_entropy(defender(x_val), y_val), params)
    g_p = torch.autograd.grad(F.cross_entropy(defender(x_i[None]), torch.tensor([c])), params)
    return sum((a * b).sum() for a, b in zip(g_p, g_val)).item()


@pytest.mark.parametrize("arch", ["linear", "cnn"])
def test_the_influence_rule_scores_each_wrong_label_by_its_gradient_steps_effect_on_the_loss_on_d_v(arch):
    x, y, xv, yv, defender, _ = _tiny()
    if arch == "cnn":  # a convolution, an activation and pooling: the forward-mode product through each
        torch.manual_seed(1)
        defender = nn.Sequential(nn.Conv2d(1, 3, 2, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                                 nn.Linear(3, 3)).double()
    flip = LabelFlipAttack(0.25, rule="influence", defender=defender, num_classes=3)
    score = flip._influence_scores(x, y, xv, yv, batch_size=7)  # batches that do not divide the points
    for i in range(6):
        for c in range(3):
            if c == y[i]:
                assert score[i, c] == float("inf")
            else:
                assert score[i, c].item() == pytest.approx(_per_sample_oracle(defender, x[i], c, xv, yv), rel=1e-9,
                                                           abs=1e-12)
    # what the score means: one small gradient step on (x_i, c) changes the loss on D_v by -lr times it
    i, c = 0, int(score[0].argmin())
    lr = 1e-5
    step = copy.deepcopy(defender)
    grads = torch.autograd.grad(F.cross_entropy(step(x[i:i + 1]), torch.tensor([c])), list(step.parameters()))
    with torch.no_grad():
        before = F.cross_entropy(step(xv), yv).item()
        for p, g in zip(step.parameters(), grads):
            p -= lr * g
        after = F.cross_entropy(step(xv), yv).item()
    assert (after - before) / lr == pytest.approx(-score[0, c].item(), rel=1e-3)
    # labels: each point's wrong class of most negative score; select "influence" takes the most negative points
    x_p, y_p = flip.poison(x, y, x_val=xv, y_val=yv)  # select "spread": D_tr's first 10 points
    assert torch.equal(x_p, x[:10]) and torch.equal(y_p, score[:10].argmin(1))
    chosen = LabelFlipAttack(0.25, rule="influence", select="influence", defender=defender, num_classes=3)
    x_p, y_p = chosen.poison(x, y, x_val=xv, y_val=yv)
    best = score.min(1).values
    assert torch.equal(chosen.source_indices_, best.argsort(stable=True)[:10])
    assert best[chosen.source_indices_].max() <= best.sort().values[9]
    assert torch.equal(x_p, x[chosen.source_indices_]) and torch.equal(y_p, score[chosen.source_indices_].argmin(1))
    assert sum(count for _, _, count in chosen.info_["pairs"]) == 10 and (y_p != y[chosen.source_indices_]).all()


def test_the_influence_rule_scores_d_v_points_against_the_half_of_d_v_that_does_not_hold_them():
    """With the pool D_v, a point's own loss is part of L_val: each point is scored against the other parity's half.
    The defender here has BatchNorm, Dropout and a frozen layer: scores are of eval mode and the trainable parameters,
    and the defender's mode is left as it was."""
    x, y, xv, yv, _, _ = _tiny(n=40)
    torch.manual_seed(2)
    defender = nn.Sequential(nn.Flatten(), nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Dropout(0.5),
                             nn.Linear(5, 3)).double()
    defender[1].requires_grad_(False)
    with torch.no_grad():
        defender(torch.randn(64, 4, dtype=torch.float64) * 3)  # running statistics of its own (train mode)
    flip = LabelFlipAttack(0.25, rule="influence", select="influence", pool="val", defender=defender, num_classes=3)
    x_p, y_p = flip.poison(x, y, x_val=xv, y_val=yv)
    assert defender.training  # as it was given
    defender.eval()
    trainable = [p for p in defender.parameters() if p.requires_grad]

    def oracle(i, c):
        other = torch.arange(1 - i % 2, len(yv), 2)
        g_val = torch.autograd.grad(F.cross_entropy(defender(xv[other]), yv[other]), trainable)
        g_p = torch.autograd.grad(F.cross_entropy(defender(xv[i:i + 1]), torch.tensor([c])), trainable)
        return sum((a * b).sum() for a, b in zip(g_p, g_val)).item()

    expected = torch.tensor([[oracle(i, c) if c != yv[i] else float("inf") for c in range(3)] for i in range(len(yv))],
                            dtype=torch.float64)
    best = expected.min(1).values
    assert torch.equal(flip.source_indices_, best.argsort(stable=True)[:10])
    assert torch.equal(x_p, xv[flip.source_indices_]) and torch.equal(y_p, expected[flip.source_indices_].argmin(1))
    defender.train()
    score = flip._influence_scores(xv, yv, xv, yv, pool_is_val=True, batch_size=3)
    assert torch.allclose(score[torch.isfinite(score)], expected[torch.isfinite(expected)], rtol=1e-9, atol=1e-13)


def test_the_influence_rule_and_selection_say_what_they_need():
    x, y, xv, yv, defender, _ = _tiny()
    with pytest.raises(ValueError, match="needs rule 'influence'"):
        LabelFlipAttack(0.1, rule="nearest", defender=defender, select="influence")
    with pytest.raises(ValueError, match="needs the trained defender"):
        LabelFlipAttack(0.1, rule="influence")
    with pytest.raises(ValueError, match="rule 'influence' scores each label .* pass x_val and y_val"):
        LabelFlipAttack(0.25, rule="influence", defender=defender, num_classes=3).poison(x, y)
    from tgda_attack.config import Config
    with pytest.raises(ValueError, match="--flip-select influence .* needs --flip-rule influence"):
        LabelFlipAttack.check_config(Config(attack="label-flip", flip_select="influence", flip_rule="nearest"))


def test_every_attack_follows_the_one_interface():
    import inspect

    from tgda_attack.attacks import ATTACKS, PoisoningAttack

    assert {"tgda", "label-flip", "gradient-canceling"} <= set(ATTACKS)
    for name, cls in ATTACKS.items():
        assert issubclass(cls, PoisoningAttack) and cls.name == name
        params = inspect.signature(cls.poison).parameters
        assert list(params)[:3] == ["self", "x", "y"]
        assert params["x_val"].kind is inspect.Parameter.KEYWORD_ONLY and params["y_val"].kind is inspect.Parameter.KEYWORD_ONLY


def test_attack_settings_become_checked_config_fields_and_must_agree():
    import dataclasses

    from tgda_attack.attacks import ATTACKS, PoisoningAttack
    from tgda_attack.attacks.base import Setting, registry
    from tgda_attack.config import Config

    fields = {f.name: f.default for f in dataclasses.fields(Config)}
    for cls in ATTACKS.values():
        for setting in cls.settings:
            assert fields[setting.name] == setting.default and setting.problem(setting.default) is None
        assert set(cls.quick) <= set(fields), cls.name
    assert Setting("k", int, 1, "positive-count").problem(0) == "k must be an integer >= 1, got 0"
    assert "choose one of a, b" in Setting("mode", str, "a", ("a", "b")).problem("c")

    class One(PoisoningAttack):
        name, settings = "one", (Setting("steps", int, 5, "count"),)

    class Two(PoisoningAttack):
        name, settings = "two", (Setting("steps", int, 7, "count"),)

    with pytest.raises(ValueError, match="declare setting 'steps' differently"):
        registry(One, Two)


def _bad_inputs(x, y):
    """(name, x, y, x_val, y_val, message) of mistakes a user makes calling poison() or a defense from Python."""
    nan = x.clone()
    nan[1, 0, 0, 0] = float("nan")
    return [
        ("0-255 images", (x + 1) * 127.5, y, None, None, "scale them to [-1, 1] (uint8 images: x / 127.5 - 1)"),
        ("a label of 10", x, torch.cat([y[:-1], torch.tensor([10])]), None, None, "class indices 0 .. 9; got values"),
        ("float labels", x, y.float(), None, None, "1-D tensor of integer class indices"),
        ("one-hot labels", x, F.one_hot(y, 10), None, None, "(one-hot rows: y.argmax(1))"),
        ("a NaN pixel", nan, y, None, None, "NaN or infinite pixels"),
        ("fewer labels", x, y[:-5], None, None, f"{len(x)} images but {len(y) - 5} labels"),
        ("x_val alone", x, y, x[:5], None, "as both x_val and y_val, or neither"),
    ]


@pytest.mark.parametrize("case", range(7))
@pytest.mark.parametrize("attack", ["label-flip", "gradient-canceling", "min-max", "emn", "tgda"])
def test_poison_checks_its_data_before_any_work(attack, case):
    """0-255 images were taken as images in [-1, 1] (gradient canceling returned near-black poisons), a label of 10
    was flipped to -1, x and y of other lengths gave 8 poisons for 300 points, a NaN pixel made every poison NaN,
    x_val without y_val was dropped: each is now one ValueError naming it, from every attack (PoisoningAttack
    wraps each subclass's poison)."""
    from tgda_attack import data, models
    from tgda_attack.attacks import ATTACKS
    sample = data.load_mnist_sample()
    x, y = sample.x_train[:60], sample.y_train[:60]
    name, bx, by, bxv, byv, message = _bad_inputs(x, y)[case]
    if attack == "label-flip" and name == "0-255 images":
        pytest.skip("label flip moves no pixel: its poisons are copies in the scale given")
    torch.manual_seed(0)
    defender = models.make_defender("lr")
    made = (LabelFlipAttack(0.1) if attack == "label-flip" else TGDAAttack(defender, None, epsilon=0.1, epochs=1)
            if attack == "tgda" else ATTACKS[attack](defender, 0.1))
    with pytest.raises(ValueError, match=re.escape(message)):
        made.poison(bx, by, x_val=bxv, y_val=byv)


@pytest.mark.parametrize("case", [1, 2, 4, 5])
@pytest.mark.parametrize("defense", ["loss", "sphere", "slab", "sever", "influence", "maxup"])
def test_a_defense_checks_its_data_before_any_work(defense, case):
    from tgda_attack import data, models
    from tgda_attack.defenses import DEFENSES
    from tgda_attack.training import train_classifier
    sample = data.load_mnist_sample()
    x, y = sample.x_train[:60], sample.y_train[:60]
    name, bx, by, _, _, message = _bad_inputs(x, y)[case]
    torch.manual_seed(0)
    model = train_classifier(models.make_defender("lr"), x, y, epochs=1, batch_size=30, lr=0.1, seed=0)
    made = DEFENSES[defense]()
    with pytest.raises(ValueError, match=re.escape(message)):
        if made.kind == "training":
            made.train(models.make_defender("lr"), bx, by, epochs=1, batch_size=30, lr=0.1, seed=0)
        else:
            made.detect_poison(bx, by, model=model, x_val=sample.x_val[:20], y_val=sample.y_val[:20])
    if defense == "maxup":  # it clamps its noisy copies to [-1, 1]: 0-255 images are refused too
        with pytest.raises(ValueError, match="scale them to \\[-1, 1\\]"):
            made.train(models.make_defender("lr"), (x + 1) * 127.5, y, epochs=1, batch_size=30, lr=0.1, seed=0)


def test_label_flip_of_no_poison_is_refused_as_every_attack_is():
    x, y = torch.zeros(30, 1, 1, 5), torch.arange(30) % 3
    for epsilon in (0.0, 0.01):  # 0 and below 1 / 30
        with pytest.raises(ValueError, match="leaves no poison to flip"):
            LabelFlipAttack(epsilon, num_classes=3).poison(x, y)


@pytest.mark.parametrize("recipe", ["valid", "authors"])
def test_gradient_canceling_of_no_poison_is_refused_before_its_target_is_trained(recipe, monkeypatch):
    from tgda_attack import models
    from tgda_attack.attacks import gradient_canceling
    def no_training(*args, **kwargs):
        raise AssertionError("the target was trained before the budget was checked")
    monkeypatch.setattr(GradientCancelingAttack, "_target_parameters", no_training)
    monkeypatch.setattr(gradient_canceling, "authors_gradpc_target", no_training)
    x, y = torch.zeros(30, 1, 28, 28), torch.arange(30) % 10
    defender = models.make_defender("gc-lr" if recipe == "authors" else "lr")
    with pytest.raises(ValueError, match="leaves no poison to craft"):
        GradientCancelingAttack(defender, epsilon=0.01, recipe=recipe).poison(x, y)


@pytest.mark.parametrize("defense", ["loss", "sever", "maxup"])
def test_a_defense_takes_images_of_another_float_dtype_than_its_model_and_refuses_integer_ones(defense):
    from tgda_attack import data, models
    from tgda_attack.defenses import DEFENSES
    from tgda_attack.training import train_classifier
    sample = data.load_mnist_sample()
    x, y = sample.x_train[:60], sample.y_train[:60]
    torch.manual_seed(0)
    model = train_classifier(models.make_defender("lr"), x, y, epochs=1, batch_size=30, lr=0.1, seed=0)
    made = DEFENSES[defense]()

    def run(images):
        if made.kind == "training":
            torch.manual_seed(0)
            trained = made.train(models.make_defender("lr"), images, y, epochs=1, batch_size=30, lr=0.1, seed=0)
            return next(trained.parameters()).detach()
        return made.detect_poison(images, y, model=model, fit=lambda a, b: model)[1]
    assert torch.equal(run(x.double()), run(x))  # cast to the model's float32, as the attacks cast theirs
    with pytest.raises(ValueError, match="a defense reads floating-point images"):
        run(((x + 1) * 127.5).byte())
