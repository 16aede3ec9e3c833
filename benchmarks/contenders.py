"""What each benchmark compares, built in one place for the pytest-benchmark suites and summary.py.

Every builder returns a zero-argument callable that runs the timed work once and returns its
result, so that a suite can time it and then check the results against each other.
  (b) paper_leader_step vs hypergrad_leader_step at equal method and iterations;
  (c) hypergrad_leader_step with RECOMMENDED settings, its quality measured as the cosine to
      reference_hypergradient (a long float64 MINRES solve of the undamped system);
  (d) torchopt's CG vs hypergrad.solve on the same Hessian operator;
  (e) hypergrad.solve's k CG iterations vs k Hessian-vector products alone;
  (f) whole TGDA batches (Algorithm 1 with the paper's settings), for the end-to-end projection.
"""
import torch

import hypergrad
from paper_procedure import paper_total_grad

# The project's recommended leader-step settings (summary.py measures their speed and quality):
# MINRES on the undamped system (it needs one product per iteration, like CG, but does not stop at
# the negative curvature of a non-convex follower), 16 iterations, float32, the structured product
# where it applies. Chosen on the benchmark problems (fitted LR and NN defenders, 16 iterations,
# cosine to a 200-iteration float64 MINRES solve): cgnr (the paper's) 0.10 / 0.50, cg 0.87 / 0.77,
# minres 0.83 / 0.92, cg with damping 0.01 0.63 / 0.77, with damping 0.1 0.47 / 0.37.
RECOMMENDED = {"method": "minres", "iterations": 16, "damping": 0.0, "dtype": torch.float32}


def paper_leader_step(step, iterations=16):
    return lambda: hypergrad.flatten(paper_total_grad(step.leader_loss, step.follower_loss, step.theta, step.w,
                                                      iterations=iterations))


def hypergrad_leader_step(step, method="cgnr", iterations=16, damping=0.0, hvp_mode="auto", graphs=None):
    """total_grad on the step; with graphs (a hypergrad.SolveGraphCache) the solve is a recorded CUDA graph."""
    return lambda: hypergrad.flatten(hypergrad.total_grad(step.leader_loss, step.follower_objective(), step.theta,
                                                          step.w, method=method, maxiter=iterations, rtol=0.0,
                                                          damping=damping, hvp_mode=hvp_mode, graphs=graphs))


def reference_hypergradient(step, iterations=200):
    """D_theta l from MINRES on the undamped (indefinite) system, run to rtol 1e-10 or `iterations`."""
    return hypergrad.flatten(hypergrad.total_grad(step.leader_loss, step.follower_objective(), step.theta, step.w,
                                                  method="minres", maxiter=iterations, rtol=1e-10))


def cosine(a, b):
    a, b = a.double().flatten(), b.double().flatten()
    return (torch.dot(a, b) / (a.norm() * b.norm())).item()


def relative_difference(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def hessian_system(step):
    """The follower's Hessian (autograd, reverse-over-reverse on one gradient graph), the tree-shaped
    product torchopt expects, and a right-hand side b = grad_w l."""
    grads = torch.autograd.grad(step.follower_loss(), step.w, create_graph=True)
    op = hypergrad.HessianOperator.from_gradient(grads, step.w)
    b = hypergrad.flatten(torch.autograd.grad(step.leader_loss(), step.w))

    def tree_matvec(vs):
        return torch.autograd.grad(grads, step.w, vs, retain_graph=True)

    return op, tree_matvec, b


def hypergrad_solve(op, b, method="cg", iterations=16, damping=0.0):
    return lambda: hypergrad.solve(op, b, method=method, maxiter=iterations, rtol=0.0, damping=damping)[0]


def hypergrad_structured_solve(step, b, method="cg", iterations=16, damping=0.0, graphs=None):
    """hypergrad.solve on the structured product (hypergrad.mlp_hvp) of the step's follower; with graphs
    (a hypergrad.SolveGraphCache) replayed as a CUDA graph, recorded by the first call."""
    op = hypergrad.structured_hessian(step.follower_objective(), step.w)
    if graphs is not None:
        return lambda: graphs.solve(op, b, method=method, maxiter=iterations, rtol=0.0, damping=damping)[0]
    return hypergrad_solve(op, b, method, iterations, damping)


def torchopt_cg(tree_matvec, b, like, iterations=16, damping=0.0):
    """torchopt.linear_solve.solve_cg for `iterations` iterations (raises ImportError without torchopt)."""
    import torchopt

    solver = torchopt.linear_solve.solve_cg(ridge=damping or None, maxiter=iterations, rtol=0.0, atol=0.0)
    b_tree = hypergrad.unflatten(b, like)
    return lambda: hypergrad.flatten(solver(tree_matvec, b_tree))


def matvecs_alone(op, b, iterations=16, damping=0.0):
    return lambda: [op(b) + damping * b for _ in range(iterations)]


def cg_update_contenders(n, batch=1, dtype=torch.float32, device="cpu"):
    """(a) One CG vector update x += alpha p, r -= alpha q, new r.r, as the fused op, as plain torch
    operations (the twin) and as the paper's per-tensor-list code with a host sync, next to a copy
    of the same bytes. Returns {name: (callable, bytes moved)}."""
    from hypergrad import _reference

    shape = (n,) if batch == 1 else (batch, n)
    g = torch.Generator().manual_seed(0)
    x, r, p, q = (torch.randn(shape, generator=g, dtype=dtype).to(device) for _ in range(4))
    ones = torch.ones(shape[:-1], dtype=torch.float64, device=device)
    num, den, active = ones, 2 * ones, torch.ones(shape[:-1], dtype=torch.bool, device=device)
    update_bytes = 6 * x.numel() * x.element_size()  # reads x, r, p, q; writes x, r
    xs, rs, ps, qs = ([t.view(-1)] for t in (x, r, p, q))

    def paper_lists():  # new tensors every step, a Python float per dot product
        new_x = [xi + 0.5 * pi for xi, pi in zip(xs, ps)]
        new_r = [ri - 0.5 * qi for ri, qi in zip(rs, qs)]
        return new_x, sum((ri * ri).sum() for ri in new_r).item()

    src = torch.randn(3 * x.numel(), generator=g, dtype=dtype).to(device)  # a copy moving the same bytes:
    dst = torch.empty_like(src)  # reads 3 n, writes 3 n
    out = {"torch": (lambda: _reference.cg_step(x, r, p, q, num, den, active), update_bytes),
           "paper_lists": (paper_lists, update_bytes),
           "copy": (lambda: dst.copy_(src), update_bytes)}
    if hypergrad.has_extension():
        out["fused"] = (lambda: torch.ops.hypergrad.cg_step(x, r, p, q, num, den, active), update_bytes)
    return out


def tgda_batches(defender="nn", batches=2, cuda_graphs=False, dtype=torch.float32, device="cpu", batch_size=1000,
                 solver="cgnr", iterations=16, seed=0):
    """(f) One epoch of TGDAAttack.poison over `batches` batches of MNIST-shaped random data with the
    paper's settings (epsilon 3%, so 30 poisons a batch; 1 leader step with `solver` for `iterations`
    iterations; 20 follower steps), on a fresh defender and MLP attacker. The cost of a batch does
    not depend on the pixel values."""
    from problems import IMAGE_SHAPE
    from tgda_attack.attacks import TGDAAttack
    from tgda_attack.models import make_attacker, make_defender

    shape = IMAGE_SHAPE[defender]
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(batches * batch_size, *shape, generator=g) * 2 - 1).to(device, dtype)
    y = torch.randint(0, 10, (len(x),), generator=g).to(device)
    x_val = (torch.rand(batch_size, *shape, generator=g) * 2 - 1).to(device, dtype)
    y_val = torch.randint(0, 10, (batch_size,), generator=g).to(device)
    torch.manual_seed(seed)
    net = make_defender(defender, shape).to(device, dtype)
    attacker = make_attacker("mlp", shape).to(device, dtype)
    attack = TGDAAttack(net, attacker, 0.03, epochs=1, batch_size=batch_size, alpha=0.01, beta=0.1,
                        follower_steps=20, solver=solver, solver_iterations=iterations, cuda_graphs=cuda_graphs,
                        seed=seed)
    return lambda: attack.poison(x, y, x_val=x_val, y_val=y_val)[0]
