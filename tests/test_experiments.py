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


def test_nn_regional_flip_nearest_neighbour_sets_against_brute_force():
    """k-NN votes, the nearest-poison count, hubs' greedy coverage and majority's turned digits, each against a
    plain recount with torch.cdist."""
    from types import SimpleNamespace
    regional_flip = experiment("nn_regional_flip")
    g = torch.Generator().manual_seed(0)
    x_tr, y_tr = torch.randn(120, 1, 3, 3, generator=g), torch.randint(0, 3, (120,), generator=g)
    x_v, y_v = torch.randn(80, 1, 3, 3, generator=g), torch.randint(0, 3, (80,), generator=g)
    x_te, y_te = torch.randn(60, 1, 3, 3, generator=g), torch.randint(0, 3, (60,), generator=g)

    def vote(xt, yt, x, k):
        idx = torch.cdist(x.flatten(1), xt.flatten(1)).topk(k, largest=False).indices
        return torch.stack([torch.bincount(yt[i], minlength=3).argmax() for i in idx])

    for k in (1, 5):
        assert torch.equal(regional_flip.knn_predict(x_tr, y_tr, x_te, k), vote(x_tr, y_tr, x_te, k))
    x_p, y_p = x_v[:10], (y_v[:10] + 1) % 3
    drops = regional_flip.knn_drops(SimpleNamespace(x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te), x_p, y_p)
    x_all, y_all = torch.cat([x_tr, x_p]), torch.cat([y_tr, y_p])
    for k in (1, 5):
        right = [(vote(a, b, x_te, k) == y_te).float().mean() for a, b in ((x_tr, y_tr), (x_all, y_all))]
        assert drops[k] == round(100 * (right[0] - right[1]).item(), 2)
    nearest = torch.cdist(x_te.flatten(1), x_all.flatten(1)).argmin(1)
    assert drops["test_nearest_is_poison"] == int((nearest >= len(y_tr)).sum())

    # hubs: the first image taken is one of those that become the nearest training point of the most D_v digits of
    # their class, and its label is the class of its nearest D_tr image of another class
    x_h, y_h = regional_flip.hubs(x_tr, y_tr, x_v, y_v, 5)
    d_vv = torch.cdist(x_v.flatten(1), x_v.flatten(1)).fill_diagonal_(float("inf"))
    reach = torch.cdist(x_v.flatten(1), x_tr.flatten(1)).min(1).values
    takes = ((d_vv < reach[:, None]) & (y_v[:, None] == y_v[None])).sum(0)  # [v]: the digits u that v takes
    first = next(i for i in range(80) if torch.equal(x_v[i], x_h[0]))
    assert takes[first] == takes.max() > 0
    d_other = torch.cdist(x_h.flatten(1), x_tr.flatten(1))
    d_other[y_tr[None] == torch.tensor([y_v[next(i for i in range(80) if torch.equal(x_v[i], xh))]
                                         for xh in x_h])[:, None]] = float("inf")
    assert torch.equal(y_h, y_tr[d_other.argmin(1)])

    # majority: the digits it says it turns are those of D_v (the poisons left out) whose 5-NN vote its poisons turn
    x_m, y_m, turned = regional_flip.majority(x_tr, y_tr, x_v, y_v, 8)
    taken = torch.tensor([any(torch.equal(x_v[i], xm) for xm in x_m) for i in range(80)])
    rest = (~taken).nonzero().squeeze(1)
    before = vote(x_tr, y_tr, x_v[rest], 5) == y_v[rest]
    after = vote(torch.cat([x_tr, x_m]), torch.cat([y_tr, y_m]), x_v[rest], 5) != y_v[rest]
    assert len(y_m) == 8 and int(taken.sum()) == 8 and turned == int((before & after).sum())
