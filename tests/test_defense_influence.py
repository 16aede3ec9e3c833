"""The influence defense (tgda_attack.defenses.influence) on tiny float64 problems: its scores against a dense
Hessian, dense per-example gradients and a dense solve; their meaning (the derivative of the retrained model's
validation loss in a point's weight) by finite differences of retraining; a planted harmful point removed; its
settings and errors."""
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from hypergrad import flatten, unflatten
from tgda_attack.defenses.influence import InfluenceFilter, influence_scores
from testing import tiny_classification, tiny_model
from tgda_attack.training import train_classifier


_data, _model = tiny_classification, tiny_model


def _loss_at(model, w, x, y):
    """Mean cross-entropy of model with its parameters replaced by the flat vector w."""
    params = dict(zip([k for k, _ in model.named_parameters()], unflatten(w, list(model.parameters()))))
    return F.cross_entropy(functional_call(model, params, (x,)), y)


def _dense_scores(model, x, y, x_val, y_val, damping):
    """-g_val^T (H + damping I)^-1 grad l_i with H by autograd.functional.hessian and one gradient per point."""
    w = flatten([p.detach() for p in model.parameters()]).requires_grad_(True)
    H = torch.autograd.functional.hessian(lambda v: _loss_at(model, v, x, y), w.detach())
    per_point = torch.stack([torch.autograd.grad(_loss_at(model, w, x[i:i + 1], y[i:i + 1]), w)[0]
                             for i in range(len(y))])
    g_val = torch.autograd.grad(_loss_at(model, w, x_val, y_val), w)[0]
    A = H + damping * torch.eye(len(w), dtype=torch.float64)
    assert torch.linalg.eigvalsh(A).abs().min() > 1e-3  # a well-posed system, so the comparison means something
    return -per_point @ torch.linalg.solve(A, g_val)


@pytest.mark.parametrize("kind, method, batch_size, with_val", [
    ("mlp", "minres", 7, True),  # indefinite Hessian, uneven batches
    ("mlp", "minres", 100, True),  # one batch: the operator's graph is reused
    ("lr", "cg", 6, True),
    ("lr", "cgnr", 100, False),  # no validation set: the training set's own mean loss
])
def test_scores_equal_a_dense_hessian_solve_and_per_example_gradients(kind, method, batch_size, with_val):
    x, y = _data(20)
    x_val, y_val = _data(8, seed=1)
    model = _model(kind)
    damping = 0.1
    scores, info = influence_scores(model, x, y, x_val if with_val else None, y_val if with_val else None,
                                    damping=damping, method=method, maxiter=300, rtol=1e-12, batch_size=batch_size)
    expected = _dense_scores(model, x, y, x_val if with_val else x, y_val if with_val else y, damping)
    assert info["converged"] and info["relative_residual"] <= 1e-12
    assert torch.allclose(scores, expected, rtol=1e-7, atol=1e-10)


def test_a_score_is_the_derivative_of_the_retrained_validation_loss_in_the_points_weight():
    # Koh & Liang's eq. 2: with w(eps) = argmin (1/N) sum_i l_i + eps l_k + (lambda / 2) ||w||^2 (whose Hessian at
    # w(0) is H + lambda I), d/d eps L_val(w(eps)) at 0 is I(z_k). Checked by central differences of retraining.
    x, y = _data(20)
    x_val, y_val = _data(8, seed=1)
    model, damping = _model("lr"), 0.05
    w0 = flatten([p.detach() for p in model.parameters()])

    def retrain(k, eps):
        w = w0.clone().requires_grad_(True)
        opt = torch.optim.LBFGS([w], lr=1, max_iter=200, tolerance_grad=1e-11, tolerance_change=0,
                                line_search_fn="strong_wolfe")

        def objective():
            opt.zero_grad()
            loss = (_loss_at(model, w, x, y) + eps * _loss_at(model, w, x[k:k + 1], y[k:k + 1])
                    + damping / 2 * w.pow(2).sum())
            loss.backward()
            return loss
        opt.step(objective)
        return w.detach()

    w_star = retrain(0, 0.0)
    with torch.no_grad():
        for p, v in zip(model.parameters(), unflatten(w_star, list(model.parameters()))):
            p.copy_(v)
    scores, _ = influence_scores(model, x, y, x_val, y_val, damping=damping, method="cg", maxiter=200, rtol=1e-12)
    eps = 1e-4
    for k in (0, 13):
        up, down = (_loss_at(model, retrain(k, e), x_val, y_val).item() for e in (eps, -eps))
        assert scores[k].item() == pytest.approx((up - down) / (2 * eps), rel=1e-4, abs=1e-8)


def _blobs(n_per_class, seed):
    g = torch.Generator().manual_seed(seed)
    centres = 3.0 * torch.eye(3, 4, dtype=torch.float64)
    x = torch.cat([c + 0.5 * torch.randn(n_per_class, 4, generator=g, dtype=torch.float64) for c in centres])
    return x, torch.arange(3).repeat_interleave(n_per_class)


def test_the_filter_removes_planted_mislabelled_points_far_from_the_data():
    x, y = _blobs(40, seed=0)
    x_val, y_val = _blobs(20, seed=1)
    planted = [4, 71]
    x[planted] = torch.tensor([[9.0, 0, 0, 0], [0, 9.0, 0, 0]], dtype=torch.float64)  # deep in classes 0 and 1 ...
    y[planted] = torch.tensor([2, 0])  # ... labelled as another class
    fits = []

    def fit(xk, yk):
        torch.manual_seed(0)
        fits.append(train_classifier(nn.Linear(4, 3).double(), xk, yk, epochs=30, batch_size=len(yk), lr=0.5, seed=0))
        return fits[-1]

    report, is_clean = InfluenceFilter(fraction=2 / 120).detect_poison(x, y, fit=fit, x_val=x_val, y_val=y_val)
    assert len(fits) == 1  # without a model it trains one on (x, y)
    assert (~is_clean).nonzero().flatten().tolist() == planted
    scores, _ = influence_scores(fits[0], x, y, x_val, y_val)
    assert report["threshold"] == pytest.approx(scores[planted].min().item())
    assert report["converged"] and 1 <= report["iterations"] <= 100 and report["validation"] == "x_val"
    assert report["threshold"] > 0 and report["relative_residual"] <= 1e-3 and report["negative_curvature"] is False
    assert report["residual_norm"] == pytest.approx(report["relative_residual"] * report["gradient_norm"])


def test_without_a_model_or_fit_it_says_what_to_pass():
    x, y = _data(10)
    with pytest.raises(ValueError, match="model= or fit="):
        InfluenceFilter(fraction=0.1).detect_poison(x, y)
    with pytest.raises(ValueError, match="both x_val and y_val"):
        InfluenceFilter(fraction=0.1).detect_poison(x, y, model=_model("lr"), x_val=x)


@pytest.mark.parametrize("kwargs, message", [
    ({"fraction": 1.5}, "share of the training set"), ({"damping": -0.1}, "damping"),
    ({"damping": "0.01"}, "damping"), ({"solver": "lu"}, "solver must be one of"),
    ({"iterations": 0}, "iterations must be a positive integer"), ({"iterations": 2.5}, "iterations"),
    ({"rtol": -1e-3}, "rtol"), ({"batch_size": 0}, "batch_size must be a positive integer"),
])
def test_bad_parameters_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        InfluenceFilter(**kwargs)


def test_settings_map_to_constructor_keywords_and_their_defaults_pass_their_checks():
    values = {s.name: s.default for s in InfluenceFilter.settings} | InfluenceFilter.quick
    assert all(s.problem(values[s.name]) is None for s in InfluenceFilter.settings)
    f = InfluenceFilter.from_config(types.SimpleNamespace(**values))
    assert (f.fraction, f.damping, f.solver, f.iterations, f.rtol, f.batch_size) == (
        0.03, 0.01, "minres", InfluenceFilter.quick["influence_iterations"], 1e-3, 2000)
    assert InfluenceFilter.name == "influence" and InfluenceFilter.uses_model
