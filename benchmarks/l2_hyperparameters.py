"""A second bilevel problem beside TGDA: per-parameter L2 regularisation of the LR defender on mnist-sample,
learned by hypergradient descent on the validation loss through hypergrad.implicit_argmin (issue 13).

    python benchmarks/l2_hyperparameters.py [--steps 10] [--out l2-hyperparameters]

Inner problem: W*(lambda) = argmin_W CE(D_tr; W) + 1/2 sum_ij lambda_ij W_ij^2 (7,850 weights, each with its
own lambda = exp(eta)), solved by L-BFGS; outer: the validation cross-entropy of W*, whose gradient in eta
comes from the implicit function theorem (one CG solve of the regularised Hessian per step). Checks the
hypergradient of its three largest entries against central finite differences (refitting to a gradient
norm of 1e-12), then takes `--steps`
normalised gradient steps on eta. Writes OUT.json and prints the validation loss and test accuracy before
and after (float64, CPU).
"""
import argparse
import json
import time

import torch
import torch.nn.functional as F

import hypergrad
from tgda_attack import protocol


def fit(x, y, log_lam, W0=None, iterations=3000):
    W = (torch.zeros(log_lam.shape, dtype=torch.float64) if W0 is None else W0.clone()).requires_grad_(True)
    opt = torch.optim.LBFGS([W], lr=1, max_iter=iterations, tolerance_grad=1e-12, tolerance_change=0.0,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = inner((W,), (log_lam,), x, y)
        loss.backward()
        return loss
    opt.step(closure)
    return W.detach()


def inner(w, theta, x, y):
    W = w[0]
    return F.cross_entropy(x @ W[:, :-1].T + W[:, -1], y) + 0.5 * (theta[0].exp() * W ** 2).sum()


def validation(W, x, y):
    return F.cross_entropy(x @ W[:, :-1].T + W[:, -1], y)


def accuracy(W, x, y):
    return ((x @ W[:, :-1].T + W[:, -1]).argmax(1) == y).double().mean().item()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1.0, help="step on eta, in units of the largest |gradient|")
    parser.add_argument("--out", default="l2-hyperparameters")
    args = parser.parse_args(argv)
    splits = protocol.load_splits(protocol.Config(dtype="float64").resolved())
    x, y = splits.x_train.flatten(1), splits.y_train
    xv, yv, xt, yt = splits.x_val.flatten(1), splits.y_val, splits.x_test.flatten(1), splits.y_test
    eta = torch.full((10, x.shape[1] + 1), -4.0, dtype=torch.float64, requires_grad=True)
    solver = hypergrad.Solver(method="cg", maxiter=300, rtol=1e-10)
    W = fit(x, y, eta.detach())
    report = {"start": {"validation_loss": validation(W, xv, yv).item(), "test_accuracy": accuracy(W, xt, yt)}}
    (Ws,) = hypergrad.implicit_argmin(lambda w, t: inner(w, t, x, y), W, eta, solver=solver)
    (grad,) = torch.autograd.grad(validation(Ws, xv, yv), eta)
    checks = []
    largest = grad.abs().flatten().topk(3).indices  # the entries the check can resolve best
    for index in [tuple(divmod(i.item(), grad.shape[1])) for i in largest]:
        h = 1e-2
        plus, minus = eta.detach().clone(), eta.detach().clone()
        plus[index] += h
        minus[index] -= h
        fd = (validation(fit(x, y, plus, W), xv, yv) - validation(fit(x, y, minus, W), xv, yv)).item() / (2 * h)
        checks.append({"entry": list(index), "implicit": grad[index].item(), "finite_difference": fd})
        print(f"d val / d eta{list(index)}: implicit {grad[index].item():.6e}, finite difference {fd:.6e}")
    report["finite_difference_checks"] = checks
    history = []
    for step in range(args.steps):
        start = time.perf_counter()
        W = fit(x, y, eta.detach(), W)
        (Ws,) = hypergrad.implicit_argmin(lambda w, t: inner(w, t, x, y), W, eta, solver=solver)
        loss = validation(Ws, xv, yv)
        (grad,) = torch.autograd.grad(loss, eta)
        with torch.no_grad():
            eta -= args.lr * grad / grad.abs().max().clamp(min=1e-30)
        history.append({"step": step, "validation_loss": loss.item(), "seconds": time.perf_counter() - start})
        print(f"step {step}: validation loss {loss.item():.4f} ({history[-1]['seconds']:.1f} s)")
    W = fit(x, y, eta.detach(), W)
    report["end"] = {"validation_loss": validation(W, xv, yv).item(), "test_accuracy": accuracy(W, xt, yt)}
    report["history"] = history
    print(f"validation loss {report['start']['validation_loss']:.4f} -> {report['end']['validation_loss']:.4f}, "
          f"test accuracy {100 * report['start']['test_accuracy']:.2f}% -> {100 * report['end']['test_accuracy']:.2f}%")
    with open(args.out + ".json", "w") as fh:
        json.dump(report, fh, indent=2)


if __name__ == "__main__":
    main()
