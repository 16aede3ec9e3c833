"""The Sever defense (tgda_attack.defenses.sever) on tiny float64 problems: its matrix-free operator and power
iteration against a materialised per-example gradient matrix and torch.linalg.svd; a planted cluster of
mislabelled points removed; its rounds (retraining between them, shares, total removed); its settings and errors."""
import types

import pytest
import torch
from torch import nn

from tgda_attack.defenses.sever import CentredGradients, SeverFilter, round_shares, sever_scores
from testing import tiny_classification, tiny_model
from tgda_attack.training import train_classifier


_data, _model = tiny_classification, tiny_model


def _dense_centred_gradients(model, x, y):
    """G_c: one torch.autograd.grad per point, flattened in named_parameters() order, minus the mean row."""
    params = list(model.parameters())
    rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(
        nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), params)]) for i in range(len(y))]
    G = torch.stack(rows)
    return G - G.mean(0)


@pytest.mark.parametrize("kind, batch_size", [("mlp", 7), ("mlp", 100), ("lr", 9)])
def test_operator_and_scores_equal_a_dense_svd(kind, batch_size):
    x, y = _data(30)
    model = _model(kind)
    Gc = _dense_centred_gradients(model, x, y)

    op = CentredGradients(model, x, y, batch_size)
    g = torch.Generator().manual_seed(1)
    u = torch.randn(Gc.shape[1], generator=g, dtype=torch.float64)
    r = torch.randn(Gc.shape[0], generator=g, dtype=torch.float64)
    assert op.shape == tuple(Gc.shape)
    torch.testing.assert_close(op.matvec(u), Gc @ u)
    torch.testing.assert_close(op.rmatvec(r), Gc.T @ r)

    _, S, Vh = torch.linalg.svd(Gc, full_matrices=False)
    assert S[1] / S[0] < 0.95  # a gap, so that the power iteration converges and the comparison means something
    expected = (Gc @ Vh[0]) ** 2  # squares: the sign of v does not matter
    scores, info = sever_scores(model, x, y, iterations=1000, rtol=1e-10, batch_size=batch_size, seed=3)
    assert info["converged"] and info["residual"] <= 1e-10
    torch.testing.assert_close(scores, expected, rtol=1e-7, atol=1e-12)
    assert info["top_singular_value"] == pytest.approx(S[0].item(), rel=1e-9)


def _planted_cluster():
    """Two separable blobs (class 0 left, class 1 right) and, deep in class 1's region, 6 points labelled 0
    placed together: their gradients are shifted together in one direction."""
    g = torch.Generator().manual_seed(0)
    n = 60
    x_clean = torch.cat([torch.randn(n, 2, generator=g, dtype=torch.float64) * 0.5 + torch.tensor([-2.0, 0.0]),
                         torch.randn(n, 2, generator=g, dtype=torch.float64) * 0.5 + torch.tensor([2.0, 0.0])])
    y_clean = torch.cat([torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.long)])
    x_bad = torch.tensor([3.0, 0.5], dtype=torch.float64) + 0.05 * torch.randn(6, 2, generator=g, dtype=torch.float64)
    y_bad = torch.zeros(6, dtype=torch.long)
    x, y = torch.cat([x_clean, x_bad]), torch.cat([y_clean, y_bad])
    planted = torch.zeros(len(y), dtype=torch.bool)
    planted[2 * n:] = True
    return x, y, planted


def _fit(calls=None):
    def fit(x, y):
        if calls is not None:
            calls.append((x.clone(), y.clone()))
        torch.manual_seed(0)
        return train_classifier(nn.Linear(2, 2).double(), x, y, epochs=200, batch_size=len(y), lr=0.5, seed=0)
    return fit


@pytest.mark.parametrize("rounds", [1, 2])
def test_removes_a_planted_cluster_of_mislabelled_points(rounds):
    x, y, planted = _planted_cluster()
    fit = _fit()
    fraction = planted.sum().item() / len(y)
    report, is_clean = SeverFilter(fraction, rounds=rounds).detect_poison(x, y, fit=fit)
    assert torch.equal(is_clean, ~planted)
    assert report["removed"] == planted.sum().item() and len(report["rounds"]) == rounds
    assert all(r["converged"] for r in report["rounds"])


def test_rounds_retrain_on_the_kept_points_and_remove_floor_fraction_n():
    x, y, _ = _planted_cluster()  # 126 points
    fraction = 0.1  # floor(12.6) = 12, in rounds of 4
    model = _fit()(x, y)
    calls = []
    report, is_clean = SeverFilter(fraction, rounds=3, iterations=200, rtol=1e-9).detect_poison(
        x, y, model=model, fit=_fit(calls))
    assert int((~is_clean).sum()) == 12 == report["removed"]
    assert [r["removed"] for r in report["rounds"]] == [4, 4, 4]
    assert [r["points"] for r in report["rounds"]] == [126, 122, 118]
    assert [len(cx) for cx, _ in calls] == [122, 118]  # round 1 used the model given

    # round 1 removed the top 4 of the scores under `model`; the first retraining saw exactly the rest
    scores = sever_scores(model, x, y, iterations=200, rtol=1e-9)[0]
    first = torch.sort(scores, descending=True, stable=True).indices[:4]
    kept = torch.ones(len(y), dtype=torch.bool)
    kept[first] = False
    assert torch.equal(calls[0][0], x[kept]) and torch.equal(calls[0][1], y[kept])
    assert int(is_clean[~kept].sum()) == 0  # what round 1 removed stays removed

    # without a model, fit also trains round 1's defender
    calls = []
    SeverFilter(fraction, rounds=3, iterations=5).detect_poison(x, y, fit=_fit(calls))
    assert [len(cx) for cx, _ in calls] == [126, 122, 118]


def test_round_shares_are_as_equal_as_integers_allow():
    assert round_shares(3, 2) == [2, 1]
    assert round_shares(10, 3) == [4, 3, 3]
    assert round_shares(1, 3) == [1, 0, 0]
    assert round_shares(0, 2) == [0, 0]
    # rounds that remove nothing neither retrain nor score: one share needs no fit
    x, y, _ = _planted_cluster()
    report, is_clean = SeverFilter(1.5 / len(y), rounds=3).detect_poison(x, y, model=_fit()(x, y))
    assert int((~is_clean).sum()) == 1 and len(report["rounds"]) == 1


@pytest.mark.parametrize("kwargs, match", [
    ({"rounds": 0}, "rounds must be a positive integer"),
    ({"rounds": 1.5}, "rounds must be a positive integer"),
    ({"iterations": 0}, "iterations must be a positive integer"),
    ({"batch_size": True}, "batch_size must be a positive integer"),
    ({"rtol": -1e-3}, "rtol is the power iteration's relative residual"),
    ({"seed": "0"}, "seed must be an integer"),
    ({"fraction": 0.0}, "fraction is the share"),
    ({"fraction": 1.0}, "fraction is the share"),
])
def test_bad_parameters_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SeverFilter(**kwargs)


def test_missing_model_or_fit_and_bad_data_raise():
    x, y, _ = _planted_cluster()
    model = _fit()(x, y)
    with pytest.raises(ValueError, match="retrains the defender between rounds"):
        SeverFilter(0.1, rounds=2).detect_poison(x, y, model=model)
    with pytest.raises(ValueError, match="pass model= or fit="):
        SeverFilter(0.1, rounds=1).detect_poison(x, y)
    with pytest.raises(ValueError, match="differ in length"):
        CentredGradients(model, x, y[:-1])
    with pytest.raises(ValueError, match="no trainable parameters"):
        CentredGradients(nn.Flatten(), x, y)


def test_settings_map_to_constructor_arguments():
    names = {s.name for s in SeverFilter.settings}
    assert names == {"defense_fraction", "sever_rounds", "sever_iterations", "sever_rtol", "sever_batch_size"}
    assert set(SeverFilter.quick) <= names
    for s in SeverFilter.settings:
        assert s.problem(s.default) is None
    dcfg = types.SimpleNamespace(defense_fraction=0.05, sever_rounds=3, sever_iterations=7, sever_rtol=0.0,
                                 sever_batch_size=64)
    f = SeverFilter.from_config(dcfg)
    assert (f.fraction, f.rounds, f.iterations, f.rtol, f.batch_size) == (0.05, 3, 7, 0.0, 64)
    assert SeverFilter.uses_model and SeverFilter.kind == "filter" and SeverFilter.name == "sever"
