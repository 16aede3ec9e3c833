"""The game solvers of Appendix C for the TGDA attack (TGDAAttack(game_solver=...)): follow the ridge
(eq. 48-49) and gradient descent Newton (eq. 50-51), against closed forms on a quadratic game and
against dense second derivatives (torch.autograd.functional) on tiny LR / NN defenders."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import hypergrad
from tgda_attack.attacks import ATTACKS, TGDAAttack
from tgda_attack.config import Config


class QuadraticDefender(nn.Module):
    """Two logits whose cross-entropy against class 0 is exactly q(w, x) = 0.5 (w - M x)^T A (w - M x) + 1
    (the logits are -q and log(1 - e^-q), whose logsumexp is 0). Over rows x_i,
    f = mean_i q(w, x_i) is a quadratic game with best response w*(x) = M mean_i(x_i), linear in the poisons."""

    def __init__(self, M, A, w0):
        super().__init__()
        self.w = nn.Parameter(w0.clone())
        self.register_buffer("M", M)
        self.register_buffer("A", A)

    def forward(self, x):
        r = self.w - x.flatten(1) @ self.M.T
        q = 0.5 * ((r @ self.A) * r).sum(1) + 1.0
        return torch.stack([-q, torch.log(-torch.expm1(-q))], dim=1)


def _quadratic_game(seed=0, n=12, k=3):
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, 1, 2, 2, generator=g, dtype=torch.float64) - 0.5)  # in [-0.5, 0.5]: no clamping below
    xv = torch.rand(6, 1, 2, 2, generator=g, dtype=torch.float64) - 0.5
    y, yv = torch.zeros(n, dtype=torch.int64), torch.zeros(6, dtype=torch.int64)
    M = torch.randn(k, 4, generator=g, dtype=torch.float64)
    B = torch.randn(k, k, generator=g, dtype=torch.float64)
    A = B @ B.T + 0.5 * torch.eye(k, dtype=torch.float64)  # SPD, not the identity
    return x, y, xv, yv, M, A


def _ridge(M, x, poisons):
    """w*(theta): the minimiser of mean q over D_tr U D_p."""
    return M @ torch.cat([x, poisons]).flatten(1).mean(0)


def _quadratic_attack(defender, game_solver, **kw):
    settings = dict(epsilon=0.25, epochs=2, batch_size=100, alpha=0.2, follower_steps=0, solver="cg",
                    solver_iterations=50, solver_rtol=1e-14, game_solver=game_solver)
    settings.update(kw)
    return TGDAAttack(defender, None, **settings)


def test_the_quadratic_defender_is_the_quadratic():
    x, y, _, _, M, A = _quadratic_game()
    w = torch.randn(3, dtype=torch.float64)
    d = QuadraticDefender(M, A, w)
    r = w - x.flatten(1) @ M.T
    torch.testing.assert_close(F.cross_entropy(d(x), y), (0.5 * ((r @ A) * r).sum(1) + 1).mean())


@pytest.mark.parametrize("solver", ["cg", "cgnr", "minres"])
def test_follow_the_ridge_keeps_the_follower_on_the_ridge_of_a_quadratic_game(solver):
    x, y, xv, yv, M, A = _quadratic_game()
    theta0 = x[:3]  # D_p^0: the first epsilon*N points
    w0 = _ridge(M, x, theta0)  # the game starts on the ridge
    defender = QuadraticDefender(M, A, w0)

    fr = _quadratic_attack(defender, "fr", solver=solver)
    theta1, _ = fr.poison(x, y, x_val=xv, y_val=yv)
    assert (theta1 - theta0).abs().max() > 1e-2  # the leader moved the poisons (2 batches, no follower steps)
    assert theta1.abs().max() < 1  # and no projection interfered
    torch.testing.assert_close(fr.defender_.w.detach(), _ridge(M, x, theta1), rtol=1e-10, atol=1e-10)

    tgda = _quadratic_attack(defender, "tgda", solver=solver)
    theta1_tgda, _ = tgda.poison(x, y, x_val=xv, y_val=yv)
    assert torch.equal(tgda.defender_.w.detach(), w0)  # TGDA's follower, with n = 0 steps, stays where it was
    assert (_ridge(M, x, theta1_tgda) - w0).norm() > 1e-3  # ... off the ridge
    # the first leader step is the same in both (the rest differ only because w differs afterwards)
    one_fr = _quadratic_attack(defender, "fr", solver=solver, epochs=1).poison(x, y, x_val=xv, y_val=yv)[0]
    one_tgda = _quadratic_attack(defender, "tgda", solver=solver, epochs=1).poison(x, y, x_val=xv, y_val=yv)[0]
    torch.testing.assert_close(one_fr, one_tgda, rtol=0, atol=1e-14)


def test_gradient_descent_newton_lands_on_the_best_response_in_one_step():
    x, y, xv, yv, M, A = _quadratic_game(seed=1)
    w_start = torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64)  # far off the ridge
    defender = QuadraticDefender(M, A, w_start)
    gdn = _quadratic_attack(defender, "gdn", epochs=1, follower_steps=1, beta=1.0)
    theta1, _ = gdn.poison(x, y, x_val=xv, y_val=yv)
    torch.testing.assert_close(gdn.defender_.w.detach(), _ridge(M, x, theta1), rtol=1e-10, atol=1e-10)
    # beta = 0.5: half the Newton step, w_start + (w* - w_start) / 2 (the leader's step does not depend on beta)
    half = _quadratic_attack(defender, "gdn", epochs=1, follower_steps=1, beta=0.5)
    theta_half, _ = half.poison(x, y, x_val=xv, y_val=yv)
    torch.testing.assert_close(theta_half, theta1, rtol=0, atol=0)
    torch.testing.assert_close(half.defender_.w.detach(), (w_start + _ridge(M, x, theta1)) / 2, rtol=1e-10, atol=1e-10)
    # plain gradient descent with the same beta does not get there
    tgda = _quadratic_attack(defender, "tgda", epochs=1, follower_steps=1, beta=1.0)
    tgda.poison(x, y, x_val=xv, y_val=yv)
    assert (tgda.defender_.w.detach() - _ridge(M, x, theta1)).norm() > 1e-2


class Wrapped(nn.Module):
    """An LR defender hypergrad does not recognise as a chain: the products fall back to autograd."""

    def __init__(self, d, classes):
        super().__init__()
        self.lin = nn.Linear(d, classes)

    def forward(self, x):
        return self.lin(x.flatten(1))


class TinyAttacker(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x, y):
        return torch.tanh(self.lin(x.flatten(1)) + 0.1 * y.to(x.dtype)[:, None]).view(x.shape)


def _defender(kind, d=4, classes=3):
    torch.manual_seed(7)
    if kind == "lr":
        return nn.Sequential(nn.Flatten(), nn.Linear(d, classes)).double()
    if kind == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(d, 5), nn.Tanh(), nn.Linear(5, classes)).double()
    return Wrapped(d, classes).double()


def _data(seed=3, n=20, classes=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 2, 2, generator=g, dtype=torch.float64) * 2 - 1
    y = torch.randint(0, classes, (n,), generator=g)
    xv = torch.rand(10, 1, 2, 2, generator=g, dtype=torch.float64) * 2 - 1
    yv = torch.randint(0, classes, (10,), generator=g)
    return x, y, xv, yv


def _dense(defender, attacker, x, y, xp0, yp0):
    """f(theta, w) = L(D_tr U D_p(theta), w) on flat vectors, for dense derivatives."""
    w_names = [(k, p) for k, p in defender.named_parameters()]
    t_names = [(k, p) for k, p in attacker.named_parameters()] if attacker is not None else None

    def f(th, w):
        params = dict(zip([k for k, _ in w_names], hypergrad.unflatten(w, [p for _, p in w_names])))
        if attacker is None:
            poisons = th.view(xp0.shape)
        else:
            tp = dict(zip([k for k, _ in t_names], hypergrad.unflatten(th, [p for _, p in t_names])))
            poisons = functional_call(attacker, tp, (xp0, yp0))
        return F.cross_entropy(functional_call(defender, params, (torch.cat([x, poisons]),)), torch.cat([y, yp0]))

    return f


@pytest.mark.parametrize("kind", ["lr", "mlp", "wrapped"])
@pytest.mark.parametrize("pixels", [True, False])
def test_follow_the_ridge_correction_equals_the_dense_one(kind, pixels):
    x, y, xv, yv = _data()
    defender = _defender(kind)
    attacker = None if pixels else TinyAttacker(4).double()
    damping = 0.1  # the softmax-regression Hessian is singular along the all-ones logit shift
    kw = dict(epsilon=0.2, epochs=1, batch_size=100, alpha=0.5, follower_steps=0, solver="minres",
              solver_iterations=200, solver_rtol=1e-14, damping=damping)
    fr = TGDAAttack(defender, attacker, game_solver="fr", **kw)
    xp_fr, _ = fr.poison(x, y, x_val=xv, y_val=yv)
    tgda = TGDAAttack(defender, attacker, **kw)
    xp_tgda, _ = tgda.poison(x, y, x_val=xv, y_val=yv)
    if pixels:  # theta: the poisons' pixels
        theta0, theta1, theta1_tgda = x[:4].reshape(-1), xp_fr.reshape(-1), xp_tgda.reshape(-1)
    else:  # theta: the attacker network's weights
        theta0 = hypergrad.flatten([p.detach() for p in attacker.parameters()])
        theta1 = hypergrad.flatten([p.detach() for p in fr.attacker_.parameters()])
        theta1_tgda = hypergrad.flatten([p.detach() for p in tgda.attacker_.parameters()])
    torch.testing.assert_close(theta1, theta1_tgda, rtol=0, atol=1e-14)  # FR's leader step is TGDA's

    w0 = hypergrad.flatten([p.detach() for p in defender.parameters()])
    f = _dense(defender, attacker, x, y, x[:4], y[:4])
    H = torch.autograd.functional.hessian(lambda w: f(theta1, w), w0) + damping * torch.eye(len(w0), dtype=w0.dtype)
    mixed = torch.autograd.functional.jacobian(  # d(grad_w f)/d theta: [w, theta]
        lambda th: torch.autograd.functional.jacobian(lambda w: f(th, w), w0, create_graph=True), theta1)
    expected = w0 - torch.linalg.solve(H, mixed @ (theta1 - theta0))  # w + dw*/dtheta Delta
    w1 = hypergrad.flatten([p.detach() for p in fr.defender_.parameters()])
    assert (w1 - w0).norm() > 1e-4
    torch.testing.assert_close(w1, expected, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("kind", ["lr", "mlp", "wrapped"])
def test_gradient_descent_newton_step_equals_the_dense_one(kind):
    x, y, xv, yv = _data(seed=4)
    defender = _defender(kind)
    damping, beta = 0.1, 0.7
    kw = dict(epsilon=0.2, epochs=1, batch_size=100, alpha=0.5, solver="minres", solver_iterations=200,
              solver_rtol=1e-14, damping=damping, beta=beta)
    gdn = TGDAAttack(defender, None, game_solver="gdn", follower_steps=2, **kw)
    theta1, _ = gdn.poison(x, y, x_val=xv, y_val=yv)
    f = _dense(defender, None, x, y, x[:4], y[:4])
    w = hypergrad.flatten([p.detach() for p in defender.parameters()])
    for _ in range(2):  # two Newton steps at the moved poisons
        H = torch.autograd.functional.hessian(lambda v: f(theta1.reshape(-1), v), w)
        g = torch.autograd.functional.jacobian(lambda v: f(theta1.reshape(-1), v), w)
        w = w - beta * torch.linalg.solve(H + damping * torch.eye(len(w), dtype=w.dtype), g)
    torch.testing.assert_close(hypergrad.flatten([p.detach() for p in gdn.defender_.parameters()]), w,
                               rtol=1e-9, atol=1e-11)
    # the leader's step is TGDA's
    tgda_poisons, _ = TGDAAttack(defender, None, follower_steps=2, **kw).poison(x, y, x_val=xv, y_val=yv)
    torch.testing.assert_close(theta1, tgda_poisons, rtol=0, atol=1e-14)


def _tiny_setup():
    x, y, xv, yv = _data(seed=5, n=30)
    return x, y, xv, yv, _defender("lr"), TinyAttacker(4).double()


@pytest.mark.parametrize("options", [{}, {"formulation": "zero-sum"}, {"warm_start": "cold"}, {"leader": "defender"},
                                     {"solver": "cgnr", "solver_iterations": 4, "damping": 0.01}])
def test_tgda_is_the_default_and_unchanged(options):
    x, y, xv, yv, defender, attacker = _tiny_setup()
    kw = {**dict(epsilon=0.1, epochs=2, batch_size=10, alpha=0.05, follower_steps=2, solver="cg",
                 solver_iterations=30), **options}
    default = TGDAAttack(defender, attacker, **kw)
    assert default.game_solver == "tgda"
    a = default.poison(x, y, x_val=xv, y_val=yv)
    b = TGDAAttack(defender, attacker, game_solver="tgda", **kw).poison(x, y, x_val=xv, y_val=yv)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("game_solver", ["fr", "gdn"])
@pytest.mark.parametrize("pixels", [True, False])
def test_fr_and_gdn_keep_the_invariants_over_several_batches(game_solver, pixels):
    x, y, xv, yv, defender, attacker = _tiny_setup()
    attack = TGDAAttack(defender, None if pixels else attacker, epsilon=0.1, epochs=2, batch_size=7, alpha=0.5,
                        follower_steps=2, solver="cgnr", solver_iterations=8, damping=0.01, game_solver=game_solver)
    x_p, y_p = attack.poison(x, y, x_val=xv, y_val=yv)  # 5 batches, one without any poison
    assert x_p.shape == (3, 1, 2, 2) and torch.equal(y_p, y[:3])
    assert torch.isfinite(x_p).all() and x_p.min() >= -1 and x_p.max() <= 1
    assert len(attack.history) == 2 and all(h["batches"] == 5 for h in attack.history)
    again = TGDAAttack(defender, None if pixels else attacker, epsilon=0.1, epochs=2, batch_size=7, alpha=0.5,
                       follower_steps=2, solver="cgnr", solver_iterations=8, damping=0.01, game_solver=game_solver)
    assert torch.equal(again.poison(x, y, x_val=xv, y_val=yv)[0], x_p)


@pytest.mark.parametrize("kwargs, message", [
    ({"game_solver": "newton"}, "game_solver"),
    ({"game_solver": "fr", "leader": "defender"}, "attacker as leader"),
    ({"game_solver": "gdn", "leader": "defender"}, "attacker as leader"),
    ({"game_solver": "fr", "warm_start": "cold"}, "warm_start='partial'"),
])
def test_bad_combinations_raise(kwargs, message):
    _, _, _, _, defender, attacker = _tiny_setup()
    with pytest.raises(ValueError, match=message):
        TGDAAttack(defender, attacker, **kwargs)
    TGDAAttack(defender, attacker, game_solver="gdn", warm_start="cold")  # a Newton follower may restart


def test_game_solver_is_a_config_setting_read_by_from_config():
    assert ATTACKS["tgda"] is TGDAAttack
    fields = {f.name: f.default for f in dataclasses.fields(Config)}
    assert fields["game_solver"] == "tgda"
    _, _, _, _, defender, attacker = _tiny_setup()
    cfg = Config(game_solver="gdn").resolved()
    assert TGDAAttack.from_config(cfg, defender=defender, attacker=attacker).game_solver == "gdn"
    with pytest.raises(ValueError, match="game-solver"):
        Config(game_solver="newton").resolved()
