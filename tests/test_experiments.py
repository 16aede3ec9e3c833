"""The scripts of docs/experiments, on a run of seconds."""
import importlib.util
import json
import os

import pytest
import torch
import torch.nn.functional as F

from tgda_attack import cli

EXPERIMENTS = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "experiments")


def experiment(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(EXPERIMENTS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_poison_fit_reads_a_run_and_agrees_with_its_metrics(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert cli.main(["run", "--attack", "min-max", "--mm-rounds", "2", "--mm-steps", "2", "--follower-steps", "2",
                     "--pretrain-epochs", "2", "--out", out, "--quiet"]) == 0
    poison_fit = experiment("poison_fit")
    rows = {name: rest for name, *rest in poison_fit.fit_report(out)}
    assert set(rows) == {"defender_pretrained", "defender_attacked", "defender_poisoned"}
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert rows["defender_pretrained"][0] == pytest.approx(metrics["clean_accuracy"], abs=1e-6)
    assert rows["defender_poisoned"][0] == pytest.approx(metrics["poisoned_accuracy"], abs=1e-6)
    # min-max labels each poison with its class of largest loss under the clean model: the clean model fits none
    assert rows["defender_pretrained"][2] == 0.0 and rows["defender_pretrained"][3] > 0
    capsys.readouterr()
    assert poison_fit.main([out, str(tmp_path / "missing")]) == 2
    captured = capsys.readouterr()
    assert f"| {out} | defender_poisoned |" in captured.out
    assert "missing lacks config.json" in captured.err and "\n" not in captured.err.strip()


def test_nn_regional_flip_poison_sets_keep_the_pixel_range_and_their_labels():
    regional_flip = experiment("nn_regional_flip")
    g = torch.Generator().manual_seed(0)
    x = -torch.ones(40, 1, 28, 28)  # background -1, as data._scale_uint8 gives
    x[:, :, 8:20, 12:16] = torch.rand(40, 1, 12, 4, generator=g) * 2 - 1
    y = torch.arange(40) % 4
    v = regional_flip.variants(x, 3, g)
    assert v.shape == (120, 1, 28, 28) and torch.equal(v[:40], x)
    assert v.min() >= -1 and v.max() <= 1
    assert (v[40:, :, :4] == -1).all()  # the frame's edge stays background: nothing grey comes in from outside
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 4))
    x_p, y_p = regional_flip.regional(model, x, y, 12, 3, [(0, 1), (2, 3)], g)
    assert len(y_p) == 12 and (y_p[:6] == 1).all() and (y_p[6:] == 3).all()
    with torch.no_grad():
        logp = torch.log_softmax(model(x), 1)
    zeros = (y == 0).nonzero().squeeze(1)
    closest = zeros[(logp[zeros, 1] - logp[zeros, 0]).argsort(descending=True)[:2]]
    assert torch.equal(x_p[:2], x[closest])  # the class-0 points the model finds closest to class 1, unmoved first
    x_c, y_c = regional_flip.conflicting(model, x, y, 10, g)
    assert torch.equal(x_c[:5], x_c[5:]) and (y_c[:5] != y_c[5:]).all()
    sources = [next(i for i in range(40) if torch.equal(x[i], xi)) for xi in x_c[:5]]
    assert all(int(y[i]) not in (int(a), int(b)) for i, a, b in zip(sources, y_c[:5], y_c[5:]))
    # influence summed over two models (as over a training's checkpoints), against per-sample reverse-mode products
    other = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 4))
    x_i, y_i = regional_flip.influence([model, other], x, y, 6)

    def product(m, i, c):
        params = list(m.parameters())
        g_val = torch.autograd.grad(F.cross_entropy(m(x), y), params)
        g_p = torch.autograd.grad(F.cross_entropy(m(x[i:i + 1]), torch.tensor([c])), params)
        return sum((a * b).sum() for a, b in zip(g_p, g_val)).item()

    score = torch.tensor([[product(model, i, c) + product(other, i, c) if c != y[i] else float("inf")
                           for c in range(4)] for i in range(40)])
    take = score.min(1).values.argsort()[:6]
    assert torch.equal(x_i, x[take]) and torch.equal(y_i, score[take].argmin(1))
