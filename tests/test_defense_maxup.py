"""The MaxUp defense (tgda_attack/defenses/maxup.py): its loss against a per-copy, per-point computation by
hand, its degenerate case (one copy, no noise) against plain cross-entropy training, the pixel range of the
copies, determinism in the seed, and the checks of its parameters."""
import copy
import math
import types

import pytest
import torch
import torch.nn.functional as F

from tgda_attack.defenses.maxup import MaxUpTraining, maxup_loss, noise_generator, perturbed_copies
from tgda_attack.training import train_classifier

SHAPE = (1, 4, 4)


def _data(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand((n, *SHAPE), generator=g, dtype=torch.float64) * 2 - 1)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


def _model(seed=0, hidden=6):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, hidden), torch.nn.Tanh(),
                               torch.nn.Linear(hidden, 3)).double()


def _same(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


class _CountingModel(torch.nn.Module):
    """The model, recording the batch size of every forward pass."""

    def __init__(self, model):
        super().__init__()
        self.model, self.batches = model, []

    def forward(self, x):
        self.batches.append(len(x))
        return self.model(x)


def test_maxup_loss_is_the_mean_over_points_of_the_worst_copy_by_hand():
    x, y = _data(n=7)
    model, m, sigma = _CountingModel(_model()), 5, 0.4
    loss = maxup_loss(model, x, y, copies=m, noise=sigma, generator=torch.Generator().manual_seed(3))
    assert model.batches == [m * len(y)]  # the m copies go through the model as one batch

    # The same copies, drawn again from the same generator one normal per pixel, copy after copy; each copy of
    # each point scored alone.
    z = torch.randn((m, *x.shape), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    per_copy = [[F.cross_entropy(model.model((x[i] + sigma * z[c, i]).clamp(-1, 1)[None]), y[i:i + 1]).item()
                 for c in range(m)] for i in range(len(y))]
    worst = [max(losses) for losses in per_copy]
    assert loss.item() == pytest.approx(sum(worst) / len(worst), rel=1e-12)
    # The max is per point, not over the copies' mean losses: on these data it differs from both.
    mean_per_copy = [sum(per_copy[i][c] for i in range(len(y))) / len(y) for c in range(m)]
    assert loss.item() > max(mean_per_copy) + 1e-3

    # Its gradient is that of the cross-entropy of every point's worst copy (training on the worst augmentation).
    params = list(model.parameters())
    grads = torch.autograd.grad(loss, params)
    argmax = [max(range(m), key=lambda c: per_copy[i][c]) for i in range(len(y))]
    x_worst = torch.stack([(x[i] + sigma * z[argmax[i], i]).clamp(-1, 1) for i in range(len(y))])
    expected = torch.autograd.grad(F.cross_entropy(model.model(x_worst), y), params)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-14)


def test_the_defense_trains_with_maxup_loss_and_its_settings():
    x, y = _data()
    defense = MaxUpTraining(copies=3, noise=0.3)
    kw = dict(epochs=2, batch_size=8, lr=0.1, seed=5)
    trained = defense.train(_model(), x, y, **kw)
    assert not trained.training  # returned in eval mode, as train_classifier returns its model
    loss = lambda model, xb, yb, g=noise_generator(5, x.device): maxup_loss(model, xb, yb, copies=3, noise=0.3,
                                                                              generator=g)
    assert _same(trained, train_classifier(_model(), x, y, loss_fn=loss, **kw))


@pytest.mark.parametrize("copies", [1, 3])
def test_without_noise_maxup_is_plain_cross_entropy_training(copies):
    # All copies are the point itself: the worst is the point's own loss, and training is the retraining's.
    x, y = _data()
    kw = dict(epochs=3, batch_size=8, lr=0.5, seed=2)
    plain = train_classifier(_model(), x, y, **kw)
    maxup = MaxUpTraining(copies=copies, noise=0.0).train(_model(), x, y, **kw)
    for p, q in zip(plain.parameters(), maxup.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-12, atol=1e-12)
    assert not _same(plain, MaxUpTraining(copies=copies, noise=0.3).train(_model(), x, y, **kw))


def test_perturbed_pixels_stay_in_range_and_are_gaussian_inside_it():
    x, _ = _data(n=50)
    x[0] = -1.0  # a point at the bounds, as the MNIST background
    x[1] = 1.0
    big = perturbed_copies(x, 4, 3.0, torch.Generator().manual_seed(0))
    assert big.shape == (4, *x.shape) and big.min() >= -1 and big.max() <= 1
    assert (big == -1).any() and (big == 1).any()  # large noise is clipped, not rescaled
    assert (big[:, 0] > -1).float().mean() == pytest.approx(0.5, abs=0.2)  # moved inward only

    # Away from the bounds the copies are x + sigma z with z standard normal.
    x0 = torch.zeros(2000, *SHAPE, dtype=torch.float64)
    small = perturbed_copies(x0, 2, 0.1, torch.Generator().manual_seed(1))
    assert small.abs().max() < 1  # 10 standard deviations: never clipped
    assert small.mean().item() == pytest.approx(0.0, abs=3e-3) and small.std().item() == pytest.approx(0.1, rel=0.02)


def test_same_seed_same_model_and_the_seed_drives_the_noise():
    x, y = _data()
    kw = dict(epochs=2, batch_size=8, lr=0.1)
    defense = MaxUpTraining()
    first = defense.train(_model(), x, y, seed=7, **kw)
    assert _same(first, defense.train(_model(), x, y, seed=7, **kw))
    assert not _same(first, defense.train(_model(), x, y, seed=8, **kw))
    # The noise is not the batch shuffle's stream (train_classifier seeds that with the seed itself).
    z = torch.randn(5, generator=noise_generator(7, "cpu"), dtype=torch.float64)
    assert not torch.equal(z, torch.randn(5, generator=torch.Generator().manual_seed(7), dtype=torch.float64))


def test_settings_map_to_the_constructor_and_defaults_are_the_documented_ones():
    assert MaxUpTraining.name == "maxup" and MaxUpTraining.kind == "training"
    defense = MaxUpTraining.from_config(types.SimpleNamespace(maxup_copies=2, maxup_noise=0.25))
    assert (defense.copies, defense.noise) == (2, 0.25)
    defaults = {s.name: s.default for s in MaxUpTraining.settings}
    assert defaults == {"maxup_copies": 4, "maxup_noise": 0.5}
    assert (MaxUpTraining().copies, MaxUpTraining().noise) == (4, 0.5)
    for setting in MaxUpTraining.settings:
        assert setting.problem(setting.default) is None
    assert MaxUpTraining.settings[0].problem(0) and MaxUpTraining.settings[1].problem(-0.1)
    assert MaxUpTraining.settings[0].problem(64) is None and "from 1 to 64" in MaxUpTraining.settings[0].problem(65)


@pytest.mark.parametrize("kwargs, message", [
    ({"copies": 0}, "copies is m"), ({"copies": 65}, "from 1 to 64"), ({"copies": 2.5}, "copies is m"), ({"copies": True}, "copies is m"),
    ({"noise": -0.1}, "std of the Gaussian pixel noise"), ({"noise": math.nan}, "std of the Gaussian pixel noise"),
    ({"noise": math.inf}, "finite number >= 0"), ({"noise": "0.5"}, "std of the Gaussian pixel noise"),
])
def test_bad_parameters_raise_a_helpful_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MaxUpTraining(**kwargs)


def test_training_refuses_bad_training_arguments_like_the_retraining():
    x, y = _data()
    with pytest.raises(ValueError, match="batch_size"):
        MaxUpTraining().train(_model(), x, y, epochs=1, batch_size=0, lr=0.1, seed=0)


def test_train_returns_the_model_it_was_given_trained():
    x, y = _data()
    model = _model()
    before = copy.deepcopy(model)
    assert MaxUpTraining().train(model, x, y, epochs=1, batch_size=8, lr=0.1, seed=0) is model
    assert not _same(model, before)
