"""Error-minimising noise (Huang et al., ICLR 2021; TMLR paper eq. 43) on tiny linear models: its PGD
against a hand-written loop with the closed-form input gradient, the stopping rule, the fresh model,
the label / budget / pixel-range invariants, and the two modes through the protocol."""
import json
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tgda_attack import cli, protocol
from tgda_attack.attacks import ATTACKS, ErrorMinimizingNoiseAttack
from tgda_attack.attacks.base import fresh_model


def _tiny(seed=0, n=20, classes=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 2, 2, generator=g, dtype=torch.float64) * 2 - 1
    x[0, 0, 0, 0], x[1, 0, 1, 1] = 1.0, -0.99  # points at / near the pixel range's edge
    y = torch.randint(0, classes, (n,), generator=g)
    torch.manual_seed(seed)
    defender = nn.Sequential(nn.Flatten(), nn.Linear(4, classes)).double()
    return x, y, defender


def _hand_pgd(weight, bias, x0, y, delta, eps, step, steps):
    """PGD by hand on a linear model: grad_x CE = W^T (softmax(Wx + b) - onehot(y)), per point."""
    x0f = x0.reshape(len(y), -1)
    x = (x0f + delta.reshape(len(y), -1)).clamp(-1, 1)
    onehot = F.one_hot(y, weight.shape[0]).double()
    for _ in range(steps):
        grad = (torch.softmax(x @ weight.T + bias, 1) - onehot) @ weight
        x = x - step * grad.sign()
        x = torch.minimum(torch.maximum(x, x0f - eps), x0f + eps).clamp(-1, 1)
    return (x - x0f).reshape(x0.shape)


def _per_point_loss(model, x, y):
    with torch.no_grad():
        return F.cross_entropy(model(x), y, reduction="none")


def test_first_pgd_step_is_minus_step_sign_gradient_projected():
    x, y, defender = _tiny()
    attack = ErrorMinimizingNoiseAttack(defender, 0.5, eps=0.3, pgd_steps=1, step_fraction=0.5)
    w, b = defender[1].weight.detach(), defender[1].bias.detach()
    delta = attack.perturb(defender, x, y, torch.zeros_like(x))
    grad = (torch.softmax(x.reshape(20, 4) @ w.T + b, 1) - F.one_hot(y, 3).double()) @ w  # by hand
    expected = (x.reshape(20, 4) - 0.15 * grad.sign()).clamp(-1, 1) - x.reshape(20, 4)
    assert torch.allclose(delta.reshape(20, 4), expected, atol=1e-15, rtol=0)
    assert delta[0, 0, 0, 0] <= 0  # a pixel at 1 cannot go up


def test_pgd_matches_a_hand_written_loop_and_stays_in_the_ball():
    x, y, defender = _tiny()
    attack = ErrorMinimizingNoiseAttack(defender, 0.5, eps=0.2, pgd_steps=15, step_fraction=0.1)
    start = torch.rand(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 0.4 - 0.2
    delta = attack.perturb(defender, x, y, start)
    w, b = defender[1].weight.detach(), defender[1].bias.detach()
    assert torch.allclose(delta, _hand_pgd(w, b, x, y, start, 0.2, 0.02, 15), atol=1e-12, rtol=0)
    assert delta.abs().max() <= 0.2 + 1e-12
    assert (x + delta).min() >= -1 and (x + delta).max() <= 1


def test_pgd_lowers_the_loss_of_every_point_under_a_fixed_model():
    x, y, _ = _tiny()
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    attack = ErrorMinimizingNoiseAttack(model, 0.5, eps=16 / 255)  # Huang's 20 steps of eps/10
    before = _per_point_loss(model, x, y)
    delta = attack.perturb(model, x, y, torch.zeros_like(x))
    after = _per_point_loss(model, x + delta, y)
    assert (after < before).all()
    assert delta.abs().max() <= 16 / 255 + 1e-12 and (x + delta).abs().max() <= 1
    for p in model.parameters():
        assert p.grad is None  # the model is fixed: no parameter gradient taken


def test_fresh_model_reinitialises_every_module_under_the_seed():
    _, _, defender = _tiny()
    state = torch.get_rng_state()
    model = fresh_model(defender, seed=7)
    assert torch.equal(torch.get_rng_state(), state)  # the global random state is untouched
    torch.manual_seed(7)
    reference = nn.Linear(4, 3, dtype=torch.float64)  # its constructor calls reset_parameters once
    assert torch.equal(model[1].weight, reference.weight) and torch.equal(model[1].bias, reference.bias)
    assert not torch.equal(model[1].weight, defender[1].weight) and model is not defender
    assert torch.equal(fresh_model(defender, 7)[1].weight, model[1].weight)


def _stop_run(x, y, defender, stop_accuracy, max_rounds):
    attack = ErrorMinimizingNoiseAttack(defender, 0.5, eps=0.05, pgd_steps=3, train_steps=2, lr=0.5, batch_size=5,
                                        max_rounds=max_rounds, stop_accuracy=stop_accuracy)
    return attack, attack.poison(x, y)


def test_the_accuracy_rule_stops_the_loop_at_the_first_round_reaching_it():
    x, y, defender = _tiny()
    free, _ = _stop_run(x, y, defender, 1.0, 12)  # a run the rule does not stop (100% is not reached)
    accs = [h["accuracy"] for h in free.history]
    assert free.rounds_ == 12 and not free.stopped_by_accuracy_ and max(accs) < 1
    first = accs.index(max(accs))
    assert first > 0 and max(accs) > accs[0]
    stopped, (x_p, y_p) = _stop_run(x, y, defender, max(accs), 12)
    assert stopped.stopped_by_accuracy_ and stopped.rounds_ == first + 1
    assert stopped.history == free.history[:first + 1]  # the same rounds until the rule stops them
    model = stopped.crafting_model_  # the round's model classifies that fraction of the returned points
    assert (model(x_p).argmax(1) == y_p).double().mean().item() == pytest.approx(max(accs))
    once, _ = _stop_run(x, y, defender, 1e-9, 12)
    assert once.rounds_ == 1 and once.stopped_by_accuracy_


def test_labels_budget_pixel_range_and_modes():
    x, y, defender = _tiny()
    kwargs = dict(eps=0.1, pgd_steps=4, max_rounds=3, init="random", seed=2)
    add = ErrorMinimizingNoiseAttack(defender, 0.25, **kwargs)
    unlearnable = ErrorMinimizingNoiseAttack(defender, 0.25, mode="unlearnable", **kwargs)
    assert not add.replaces_sources and unlearnable.replaces_sources
    (x_a, y_a), (x_u, y_u) = add.poison(x, y), unlearnable.poison(x, y)
    idx = add.source_indices_
    assert len(idx) == 5 and x_a.shape == (5, 1, 2, 2) and idx.tolist() != [0, 1, 2, 3, 4]
    assert torch.equal(y_a, y[idx]) and torch.equal(y_u, y[idx])  # clean label
    assert torch.equal(x_a, x_u) and torch.equal(unlearnable.source_indices_, idx)  # the same crafting
    assert (x_a - x[idx]).abs().max() <= 0.1 + 1e-12 and x_a.abs().max() <= 1 and not torch.equal(x_a, x[idx])
    assert torch.equal(x, _tiny()[0])  # D_tr itself is not modified
    everything = ErrorMinimizingNoiseAttack(defender, 1.0, mode="unlearnable", **kwargs)
    assert len(everything.poison(x, y)[1]) == 20  # epsilon 1: the whole training set


def test_the_crafting_model_starts_and_shuffles_apart_from_the_retrained_defender(monkeypatch):
    # the defender is retrained from the run's seed (protocol.new_defender): the attacker's model must share
    # neither its initialisation nor its batch order, which the attacker does not know
    from tgda_attack.attacks import emn

    seeds = {}

    def recording_fresh(model, seed):
        seeds["init"] = seed
        return fresh_model(model, seed)

    class RecordingBatches(emn._Batches):
        def __init__(self, n, batch_size, seed):
            seeds["batches"] = seed
            super().__init__(n, batch_size, seed)

    monkeypatch.setattr(emn, "fresh_model", recording_fresh)
    monkeypatch.setattr(emn, "_Batches", RecordingBatches)
    x, y, defender = _tiny()
    ErrorMinimizingNoiseAttack(defender, 0.25, eps=0.1, pgd_steps=1, max_rounds=1, seed=4).poison(x, y)
    assert seeds == {"init": emn.SURROGATE_SEED_OFFSET + 4, "batches": emn.SURROGATE_SEED_OFFSET + 4}
    assert not torch.equal(next(fresh_model(defender, 4).parameters()), next(fresh_model(defender, seeds["init"]).parameters()))


def test_protocol_replaces_exactly_the_source_rows_in_unlearnable_mode():
    x, y, defender = _tiny()
    for mode in ("unlearnable", "add"):
        attack = ErrorMinimizingNoiseAttack(defender, 0.3, mode=mode, eps=0.1, max_rounds=2, init="random", seed=1)
        x_p, y_p = attack.poison(x, y)
        poisons = {"x_poison": x_p, "y_poison": y_p, "source_indices": attack.source_indices_,
                   "replaces_sources": torch.tensor(attack.replaces_sources)}
        x_t, y_t = protocol.poisoned_training_set(x, y, poisons, x_p, y_p)
        if mode == "add":
            assert torch.equal(x_t, torch.cat([x, x_p])) and torch.equal(y_t, torch.cat([y, y_p]))
            continue
        idx = attack.source_indices_
        kept = torch.ones(20, dtype=torch.bool)
        kept[idx] = False
        assert x_t.shape == x.shape and torch.equal(y_t, y)
        assert torch.equal(x_t[idx], x_p) and torch.equal(x_t[kept], x[kept])
        assert (x_t[idx] != x[idx]).any(dim=(1, 2, 3)).all()  # every source row was changed


def test_unlearnable_run_through_the_cli(tmp_path):
    out = str(tmp_path)
    flags = ["--dataset", "mnist-sample", "--defender", "lr", "--pretrain-epochs", "1", "--pretrain-batch-size",
             "1000", "--epsilon", "0.5", "--emn-mode", "unlearnable", "--emn-max-rounds", "1", "--emn-pgd-steps", "2",
             "--quiet"]
    assert cli.main(["run", "--attack", "emn", *flags, "--out", out]) == 0
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert metrics["replaces_sources"] is True and metrics["n_poison"] == 1400
    poisons = torch.load(os.path.join(out, "poisons.pt"), weights_only=True)
    assert bool(poisons["replaces_sources"]) and len(poisons["source_indices"]) == 1400


def test_registered_and_checked():
    assert ATTACKS["emn"] is ErrorMinimizingNoiseAttack
    x, y, defender = _tiny()
    for kwargs, message in (({"mode": "replace"}, "mode"), ({"eps": 0}, "eps"), ({"pgd_steps": 0}, "pgd_steps"),
                            ({"step_fraction": -0.1}, "step_fraction"), ({"train_steps": -1}, "train_steps"),
                            ({"max_rounds": 0}, "max_rounds"), ({"stop_accuracy": 1.5}, "stop_accuracy"),
                            ({"stop_accuracy": 0}, "stop_accuracy"), ({"lr": 0}, "lr"),
                            ({"batch_size": 0}, "batch_size"), ({"pixel_range": (1, -1)}, "pixel_range"),
                            ({"init": "middle"}, "init")):
        with pytest.raises(ValueError, match=message):
            ErrorMinimizingNoiseAttack(defender, 0.1, **kwargs)
    with pytest.raises(ValueError, match="defender"):
        ErrorMinimizingNoiseAttack(None, 0.1)
    with pytest.raises(ValueError, match="emn-mode"):
        protocol.Config.from_dict({"attack": "emn", "emn_mode": "replace"}).resolved()
    with pytest.raises(ValueError, match="no poison"):
        ErrorMinimizingNoiseAttack(defender, 0.01).poison(x, y)
