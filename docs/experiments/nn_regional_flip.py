"""Exploration: can real-digit poisons that outnumber the clean points of one region move a neural network more than
label flip spread over D_v? (docs/RESULTS.md, "Label flip from D_v"; issue 22, NN >= 3 points with valid images.)

A network that interpolates D_tr labels a test digit like the training points around it. Label flip's 1,260 poisons
spread over D_v are 3% of every neighbourhood and win none; this script concentrates them where they can win: the
digits of one class `a` that the trained defender finds closest to a class `b`, each taken from the attacker's D_v
with `copies` variants (the image and copies - 1 shifts or small rotations of it, pixels kept in the valid range), all
labelled `b`, so that near the a/b boundary the poisons outnumber the clean a's. Each poison set is retrained under
training seeds 0 .. R-1 by the protocol's training, and the drop is read at the last epoch and between the medians of
the last epochs (protocol.accuracy_record). Prints one JSON line a (poison set, training seed).

Sets: `spread` (label flip from D_v, nearest labels), `conflict` (each image twice, two labels), `pairNxK` (above),
`influence` (the images and wrong labels whose gradient step raises the attacker's loss on D_v most to first order, at
the trained defender), `trajectory` (the same summed over the clean training's models after 1, 3, 10, 30 and 100
epochs, as TracIn sums checkpoints), `iterated` (influence at the model trained on D_tr U the last round's poisons,
three rounds), `hubs` (the D_v images that become the nearest training point of the most other D_v images of their
class, chosen greedily, each labelled with the class of its nearest D_tr image of another class: chosen against a
1-nearest-neighbour learner, on the attacker's data), `majority` (the D_v images chosen greedily to turn the
5-nearest-neighbour vote of the most other D_v digits, labelled as hubs: chosen against a local-majority learner, on
the attacker's data). For every set it also prints the drop of k-nearest-neighbour classifiers (pixel distance,
k = 1 and 5) on D_tr U poisons against D_tr and the number of test digits whose nearest training point is a poison:
how a learner that labels by the single nearest point, and one that labels by a local majority, respond to the same
poisons.

    python docs/experiments/nn_regional_flip.py --data-root DIR [--defender gc-nn] [--retrainings 2] [--sets ...]
"""
import argparse
import dataclasses
import heapq
import json
import math
import re
import statistics

import torch
import torch.nn.functional as F

from tgda_attack import protocol
from tgda_attack.attacks import LabelFlipAttack
from tgda_attack.config import Config
from tgda_attack.data import poison_budget
from tgda_attack.training import accuracy


def variants(x, copies, generator):
    """`copies` images per image of x (N, 1, 28, 28): the image itself, then small random affine moves (shift up to
    2 pixels, rotation up to 12 degrees, scale 0.9-1.1) resampled bilinearly, background filled in, pixels kept in
    the data's range [-1, 1]."""
    out = [x]
    for _ in range(copies - 1):
        n = len(x)
        angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(12)
        scale = 0.9 + 0.2 * torch.rand(n, generator=generator)
        shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * (2 / 14)  # affine_grid units: 14 pixels = 1
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
        grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
        # images are in [-1, 1] with background -1 (data._scale_uint8): resample x + 1 so that what comes in from
        # outside the frame is background, not the grey of 0
        out.append((F.grid_sample(x + 1, grid, align_corners=False) - 1).clamp(-1, 1))
    return torch.cat(out)


def wrong_class_logits(model, x, y):
    """The model's logits of x with each point's true class y masked out (-inf): their argmax is the nearest wrong
    class."""
    with torch.no_grad():
        logits = model(x)
    logits[torch.arange(len(y)), y] = -float("inf")
    return logits


def regional(model, x_val, y_val, budget, copies, pairs, generator):
    """The poisons of `pairs` ((a, b), ...): for each pair, the budget's share of D_v's a's that the model finds
    closest to b (largest log p_b - log p_a), in `copies` variants each, labelled b."""
    with torch.no_grad():
        logp = F.log_softmax(model(x_val), 1)
    xs, ys = [], []
    per_pair = budget // len(pairs)
    for a, b in pairs:
        idx = (y_val == a).nonzero().squeeze(1)
        closeness = logp[idx, b] - logp[idx, a]
        take = idx[closeness.argsort(descending=True)[:math.ceil(per_pair / copies)]]
        xv = variants(x_val[take], copies, generator)[:per_pair]
        xs.append(xv)
        ys.append(torch.full((len(xv),), b, dtype=y_val.dtype))
    return torch.cat(xs), torch.cat(ys)


def nearest_spread(model, x_val, y_val, budget, generator):
    """Label flip from D_v with the nearest labels, random points (the library's --flip-pool val --flip-rule nearest
    --poison-init random)."""
    take = torch.randperm(len(y_val), generator=generator)[:budget]
    return x_val[take], wrong_class_logits(model, x_val[take], y_val[take]).argmax(1)


def conflicting(model, x_val, y_val, budget, generator):
    """Half the budget's random D_v images, each twice: labelled with the two wrong classes the model finds most
    probable, so that no network fits both copies."""
    take = torch.randperm(len(y_val), generator=generator)[:budget // 2]
    top2 = wrong_class_logits(model, x_val[take], y_val[take]).topk(2, 1).indices
    return torch.cat([x_val[take], x_val[take]]), torch.cat([top2[:, 0], top2[:, 1]])


def influence(models, x_val, y_val, budget):
    """The budget's D_v images whose wrong label, learnt by gradient steps at `models` (one model, or the checkpoints
    of a training, as TracIn sums them), raises the attacker's loss on D_v the most to first order: the library's
    label flip rule "influence" (LabelFlipAttack._influence_scores) summed over the models; each image takes its wrong
    class of most negative summed product, and the budget's most negative images are the poisons. Each image is scored
    against all of D_v, itself included, as the exploration's runs were (the library's rule with --flip-pool val
    scores it against the half of D_v that does not hold it)."""
    classes = int(y_val.max()) + 1
    score = sum(LabelFlipAttack(rule="influence", defender=model, num_classes=classes)
                ._influence_scores(x_val, y_val, x_val, y_val)
                for model in models)
    best, label = score.min(1)
    take = best.argsort(stable=True)[:budget]
    return x_val[take], label[take]


def _squared_distances(a, b):
    return (a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None]


def _nearest_indices(x_train, x, k, chunk=1000):
    """[len(x), k]: the indices of each point's k nearest points of x_train (Euclidean, pixels), nearest first."""
    x_train, x = x_train.flatten(1).float(), x.flatten(1).float()
    return torch.cat([_squared_distances(q, x_train).topk(k, largest=False).indices for q in x.split(chunk)])


def _vote(labels, classes):
    """The majority of each row of labels (ties to the smaller class)."""
    return torch.zeros(len(labels), classes).scatter_add_(1, labels, torch.ones(labels.shape)).argmax(1)


def knn_predict(x_train, y_train, x, k):
    """The majority label of each point of x among its k nearest points of x_train (Euclidean, pixels)."""
    return _vote(y_train[_nearest_indices(x_train, x, k)], int(y_train.max()) + 1)


def knn_drops(splits, x_p, y_p, ks=(1, 5)):
    """{k: test accuracy drop in points} of the k-nearest-neighbour classifier on D_tr U poisons against D_tr, and
    under "test_nearest_is_poison" the number of test digits whose nearest point of D_tr U poisons is a poison."""
    classes, n = int(splits.y_train.max()) + 1, len(splits.y_train)
    y_all = torch.cat([splits.y_train, y_p])
    clean = _nearest_indices(splits.x_train, splits.x_test, max(ks))  # the k nearest of the largest k serve every k
    poisoned = _nearest_indices(torch.cat([splits.x_train, x_p]), splits.x_test, max(ks))
    drops = {"test_nearest_is_poison": int((poisoned[:, 0] >= n).sum())}
    for k in ks:
        right = [(_vote(labels[:, :k], classes) == splits.y_test).float().mean()
                 for labels in (splits.y_train[clean], y_all[poisoned])]
        drops[k] = round(100 * (right[0] - right[1]).item(), 2)
    return drops


def hubs(x_train, y_train, x_val, y_val, budget, chunk=1000):
    """The budget's D_v images chosen greedily to become the nearest training point of the most other D_v images of
    their own class (D_v standing in for test digits: image v takes u where |u - v| < u's distance to D_tr), each
    labelled with the class of its nearest D_tr image of another class."""
    xt, xv = x_train.flatten(1).float(), x_val.flatten(1).float()
    reach = torch.cat([_squared_distances(xv[i:i + chunk], xt).min(1).values for i in range(0, len(xv), chunk)])
    takes = [set() for _ in range(len(xv))]
    for i in range(0, len(xv), chunk):
        d = _squared_distances(xv[i:i + chunk], xv)
        d[torch.arange(len(d)), torch.arange(i, i + len(d))] = float("inf")
        for u, v in zip(*(t.tolist() for t in (d < reach[i:i + chunk, None]).nonzero(as_tuple=True))):
            if y_val[u + i] == y_val[v]:
                takes[v].add(u + i)
    chosen, taken = [], set()
    heap = [(-len(t), v) for v, t in enumerate(takes)]  # greedy maximum coverage, gains updated lazily
    heapq.heapify(heap)
    while len(chosen) < budget:
        _, v = heapq.heappop(heap)
        gain = len(takes[v] - taken)
        if heap and gain < -heap[0][0]:
            heapq.heappush(heap, (-gain, v))
            continue
        chosen.append(v)
        taken |= takes[v]
    chosen = torch.tensor(chosen)
    return x_val[chosen], _other_class_labels(xt, y_train, xv[chosen], y_val[chosen])


def _other_class_labels(x_train, y_train, x, y, chunk=1000):
    """The class of each image's nearest D_tr image of another class than its own."""
    out = []
    for i in range(0, len(x), chunk):
        d = _squared_distances(x[i:i + chunk], x_train)
        d[y_train[None].expand_as(d) == y[i:i + chunk, None]] = float("inf")
        out.append(y_train[d.argmin(1)])
    return torch.cat(out)


def majority(x_train, y_train, x_val, y_val, budget, k=5, chunk=1000):
    """The budget's D_v images chosen greedily to turn the k-nearest-neighbour vote of the most other D_v digits (D_v
    standing in for the test set), each labelled as in `hubs`. A poison closer to a digit u than u's k-th nearest D_tr
    image enters u's vote, taken to replace the farthest clean neighbour; need[u, c] poisons of label c then turn it
    (infinite for a digit the clean vote already gets wrong). The greedy gain of an image is the progress it adds, sum
    over the digits it enters of min(1, n / need), so that the first poisons of a neighbourhood count before it turns.
    That model of a vote is approximate; the third value returned is the number of D_v digits (the poisons left out)
    whose k-NN vote the poisons really turn from right to wrong."""
    xt, xv = x_train.flatten(1).float(), x_val.flatten(1).float()
    classes = int(y_train.max()) + 1
    nearest = [_squared_distances(xv[i:i + chunk], xt).topk(k, largest=False) for i in range(0, len(xv), chunk)]
    radius = torch.cat([d[:, -1] for d, _ in nearest])
    near_y = y_train[torch.cat([idx for _, idx in nearest])]  # nearest first
    need = torch.full((len(xv), classes), float("inf"))
    for n in range(k, 0, -1):  # n poisons of class c in place of the n farthest neighbours
        votes = torch.zeros(len(xv), classes).scatter_add_(1, near_y[:, :k - n], torch.ones(len(xv), k - n))
        for c in range(classes):
            turned = (votes + n * F.one_hot(torch.tensor(c), classes)).argmax(1) != y_val
            need[turned, c] = n
    need[torch.arange(len(xv)), y_val] = float("inf")
    clean_votes = torch.zeros(len(xv), classes).scatter_add_(1, near_y, torch.ones(near_y.shape))
    need[clean_votes.argmax(1) != y_val] = float("inf")  # a digit the clean vote gets wrong is no gain
    label = _other_class_labels(xt, y_train, xv, y_val)
    us, vs = [], []
    for i in range(0, len(xv), chunk):
        d = _squared_distances(xv[i:i + chunk], xv)
        d[torch.arange(len(d)), torch.arange(i, i + len(d))] = float("inf")
        u, v = (d < radius[i:i + chunk, None]).nonzero(as_tuple=True)
        us.append(u + i)
        vs.append(v)
    u, v = torch.cat(us), torch.cat(vs)
    c = label[v]
    entry_need = need[u, c]
    keep = torch.isfinite(entry_need)
    u, v, c, entry_need = u[keep], v[keep], c[keep], entry_need[keep]
    count = torch.zeros(len(xv), classes)
    chosen = torch.zeros(len(xv), dtype=torch.bool)
    for _ in range(budget):
        now = count[u, c]
        progress = ((now + 1) / entry_need).clamp(max=1) - (now / entry_need).clamp(max=1)
        gain = torch.zeros(len(xv)).index_add_(0, v, progress)
        gain[chosen] = -1
        best = int(gain.argmax())
        chosen[best] = True
        mine = v == best
        count.index_put_((u[mine], c[mine]), torch.ones(int(mine.sum())), accumulate=True)
    picks, rest = chosen.nonzero().squeeze(1), (~chosen).nonzero().squeeze(1)
    # the greedy's model of a vote is approximate (a poison enters at any rank, poisons of two classes split a
    # vote): count the digits of D_v outside the poisons that the k-NN vote really turns from right to wrong
    before = knn_predict(x_train, y_train, x_val[rest], k) == y_val[rest]
    after = knn_predict(torch.cat([x_train, x_val[picks]]), torch.cat([y_train, label[picks]]), x_val[rest], k)
    turned = int((before & (after != y_val[rest])).sum())
    return x_val[picks], label[picks], turned


def recorded_training(cfg, seed, splits, x, y):
    """(model, test accuracy after the last epoch, median of the last epochs' test accuracies) of the protocol's
    training on (x, y) under training seed `seed`."""
    tcfg = dataclasses.replace(cfg, seed=seed)
    record = protocol.accuracy_record(tcfg, splits)
    model = protocol.train_defender(tcfg, x, y, last_epochs=record)
    return model, accuracy(model, splits.x_test, splits.y_test), statistics.median(record.values.values()), record


SET_NAME = re.compile(r"spread|conflict|influence|trajectory|iterated|hubs|majority|pair([1-9])x([1-9][0-9]*)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--download", action="store_true", help="fetch MNIST into --data-root where it is missing")
    parser.add_argument("--defender", default="gc-nn")
    parser.add_argument("--retrainings", type=int, default=2)
    parser.add_argument("--sets", nargs="+", default=["spread", "pair1x1", "pair1x3", "pair2x3", "pair1x6"])
    args = parser.parse_args()
    bad = [name for name in args.sets if not SET_NAME.fullmatch(name)]
    if bad:
        parser.error(f"unknown set(s) {', '.join(bad)}: spread, conflict, influence, trajectory, iterated, hubs, majority or pairNxK (N pairs, K variants, e.g. pair1x3)")
    if args.retrainings < 1:
        parser.error(f"--retrainings must be at least 1, got {args.retrainings}")
    torch.set_num_threads(2)
    try:
        cfg = Config.from_dict({"dataset": "mnist", "data_root": args.data_root, "defender": args.defender,
                                "download": args.download, "seed": 0}).resolved()
        splits = protocol.load_splits(cfg)
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    x_tr, y_tr = splits.x_train, splits.y_train
    budget = poison_budget(len(y_tr), cfg.epsilon)
    clean = {}
    for t in range(args.retrainings):
        model, last, median, _ = recorded_training(cfg, t, splits, x_tr, y_tr)
        clean[t] = (last, median, model)
        print(json.dumps({"set": "clean", "seed": t, "last": last, "median": median}), flush=True)
    defender = clean[0][2]
    confusion = torch.zeros(10, 10, dtype=torch.long)
    for a, b in zip(splits.y_val.tolist(), wrong_class_logits(defender, splits.x_val, splits.y_val).argmax(1).tolist()):
        confusion[a, b] += 1
    order = sorted(((confusion[a, b].item(), a, b) for a in range(10) for b in range(10) if a != b), reverse=True)
    pairs = []
    for _, a, b in order:
        if (b, a) not in pairs and all(p[0] != a for p in pairs):
            pairs.append((a, b))
    print(json.dumps({"pairs": pairs[:4], "val_acc": accuracy(defender, splits.x_val, splits.y_val)}), flush=True)
    for name in args.sets:
        g = torch.Generator().manual_seed(0)
        if name == "spread":
            x_p, y_p = nearest_spread(defender, splits.x_val, splits.y_val, budget, g)
        elif name == "influence":
            x_p, y_p = influence([defender], splits.x_val, splits.y_val, budget)
        elif name == "iterated":  # influence at the model trained on D_tr U the last round's poisons, 3 rounds
            model = defender
            for _ in range(3):
                x_p, y_p = influence([model], splits.x_val, splits.y_val, budget)
                model = protocol.train_defender(cfg, torch.cat([x_tr, x_p.to(x_tr.dtype)]), torch.cat([y_tr, y_p]), seed=0)
                print(json.dumps({"set": name, "round_labels": torch.bincount(y_p, minlength=10).tolist(),
                                  "round_model_test": accuracy(model, splits.x_test, splits.y_test)}), flush=True)
        elif name == "trajectory":  # the clean training of seed 0 after 1, 3, 10 and 30 epochs, and at its end
            checkpoints = [protocol.train_defender(dataclasses.replace(cfg, pretrain_epochs=e), x_tr, y_tr, seed=0)
                           for e in (1, 3, 10, 30)]
            x_p, y_p = influence(checkpoints + [defender], splits.x_val, splits.y_val, budget)
        elif name == "hubs":
            x_p, y_p = hubs(x_tr, y_tr, splits.x_val, splits.y_val, budget)
        elif name == "majority":
            x_p, y_p, turned = majority(x_tr, y_tr, splits.x_val, splits.y_val, budget)
            print(json.dumps({"set": name, "val_digits_turned": turned}), flush=True)
        elif name == "conflict":
            x_p, y_p = conflicting(defender, splits.x_val, splits.y_val, budget, g)
        else:
            npairs, copies = (int(v) for v in SET_NAME.fullmatch(name).groups())
            x_p, y_p = regional(defender, splits.x_val, splits.y_val, budget, copies, pairs[:npairs], g)
        x_p = x_p.to(x_tr.dtype)
        print(json.dumps({"set": name, "labels": torch.bincount(y_p, minlength=10).tolist(),
                          "knn_drop": knn_drops(splits, x_p, y_p)}), flush=True)
        for t in range(args.retrainings):
            model, last, median, record = recorded_training(cfg, t, splits, torch.cat([x_tr, x_p]), torch.cat([y_tr, y_p]))
            with torch.no_grad():
                fit = (model(x_p).argmax(1) == y_p).float().mean().item()
            print(json.dumps({"set": name, "seed": t, "drop_last": 100 * (clean[t][0] - last),
                              "drop_median": 100 * (clean[t][1] - median), "poisons_fit": fit,
                              "last10": [round(100 * v, 2) for v in record.values.values()]}), flush=True)


if __name__ == "__main__":
    main()
