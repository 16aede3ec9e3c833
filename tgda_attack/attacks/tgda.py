"""The Total Gradient Descent Ascent (TGDA) attack of Lu, Kamath & Yu, "Indiscriminate Data
Poisoning Attacks on Neural Networks" (TMLR 2022): Algorithm 1, eq. 15-17.

The attacker L_theta generates the poisons D_p = L_theta(D_p^0) from clean points and their labels
(clean label: the labels never change). Beyond the paper, `attacker=None` makes the poisons' pixels
themselves the leader's parameters (theta = D_p, initialised at D_p^0, projected onto the pixel range
after every step): each poison then follows its own total gradient. A generator moves all poisons
through shared weights, so one step moves every poison along a common direction (the generator's
J J^T has a large shared mode); with large alpha this collapses all poisons onto one saturated
image (measured on mnist-sample: README, "Schedules").

For T epochs over D_tr in batches, each batch takes
  * m leader steps of total gradient ascent, theta += alpha * D_theta l, where D_theta l is the
    derivative of l through the defender's optimum (hypergrad.total_grad), and
  * n follower steps of gradient descent on f = L(D_tr U D_p(theta), w): w -= beta * grad_w f.
Options the paper studies: l = L(D_v, w) (non-zero-sum, default) or l = f (zero-sum, Table 5);
partial warm start (default) or cold start, where each batch's follower steps restart from the
pretrained w (Table 8); the attacker as leader (default) or the defender as leader (Table 4).

With the defender as leader the roles swap: the defender descends the total derivative of f
through the attacker's response, w -= beta * D_w f, and the attacker, as follower, takes n
gradient ascent steps on f, the only loss its poisons enter directly (L(D_v, w) does not depend
on theta, so it cannot steer a follower).

Game solvers (Appendix C, `game_solver`), all with the attacker as leader and the leader's step
unchanged (eq. 46, 48, 50: theta += alpha * D_theta l); they differ in the follower's update:
  * "tgda" (eq. 47, the default): n gradient descent steps w -= beta * grad_w f.
  * "fr", follow the ridge (eq. 48-49; Wang, Zhang & Ba, ICLR 2020): the follower's best response
    w*(theta) solves grad_w f(theta, w*) = 0, so it moves with theta as
    dw*/dtheta = -H_ww^{-1} H_w,theta (H_ww = d2f/dw2, H_w,theta = d2f/dw dtheta). Once per batch,
    right after the m leader steps have moved theta by Delta (the actual displacement theta_new -
    theta_old, the sum of the m steps alpha * D_theta l after the pixels' projection), the follower
    first adds the ridge correction w += -(H_ww + damping I)^{-1} H_w,theta Delta, then takes the n
    ordinary gradient steps. Sign: eq. 49 prints "+ H_ww^{-1} nabla_xw f D_x l". Wang et al.'s leader
    *descends* (x -= eta grad_x f) and the term there is + H_yy^{-1} H_yx eta grad_x f =
    -H_yy^{-1} H_yx (x_new - x_old); the paper's leader *ascends* (Delta = +alpha D_theta l), so the
    same ridge-tracking derivative gives -H_ww^{-1} H_w,theta Delta. That is the convention
    implemented (w then stays on the ridge of a quadratic game exactly: tests/test_game_solvers.py).
    H_w,theta Delta = grad_w <grad_theta f, Delta> (one double-backward pass through the poisons' rows
    of f, the only ones that depend on theta), and the H_ww solve is hypergrad.solve with the run's
    solver, solver_iterations, solver_rtol and damping. Both are evaluated at (theta_new, w), where
    the follower's gradient steps that follow are also evaluated (this implementation's follower
    always moves after the leader), rather than at (theta_old, w) as in eq. 49's simultaneous
    update: the two agree to first order in Delta, and exactly on a quadratic game.
  * "gdn", gradient descent Newton (eq. 50-51; Zhang et al. 2021): each of the n follower steps is
    a Newton step, w -= beta * (H_ww + damping I)^{-1} grad_w f, solved as for "fr". Against a
    non-convex defender H_ww is indefinite; the default solver (MINRES) and cgnr still solve such systems.
The products H_ww v use the structured product of hypergrad.mlp_hvp for LR and NN defenders and
reverse-over-reverse autograd otherwise. Neither "fr" nor "gdn" is defined with the defender as
leader (the appendix states both with the attacker leading), and "fr" needs the partial warm
start (a cold start discards the w the correction moves along the ridge): those combinations raise
ValueError. Each costs one more Krylov solve per batch ("fr") or per follower step ("gdn") than
TGDA: one attack epoch on mnist-sample (LR defender, defaults, 2 shared CPU cores) took 19 s with
tgda, 24 s with fr and 100 s with gdn (20 Newton steps of 16 cgnr iterations). GDN's step is the
run's beta, shared with TGDA's gradient step (0.05 on mnist-sample); a Newton step is already scaled
by the curvature, so beta = 1 is its natural value (eq. 51's eta), to be set explicitly.
"""
import copy
import logging
import math
import time

import torch
import torch.nn.functional as F

import hypergrad
from hypergrad.distributed import strided_shard

from .. import data_parallel
from ..progress import progress_bar
from ..rundir import RunFolderError, save_atomic
from ..training import tensor_digest, weights_digest
from .base import PoisoningAttack, Setting, StopSignals, kept_progress
from .feasible import FEASIBLE_SETTINGS, check_feasible, make_feasible_set

logger = logging.getLogger(__name__)

WARM_STARTS = ("partial", "cold")
LEADERS = ("attacker", "defender")
FORMULATIONS = ("non-zero-sum", "zero-sum")
GAME_SOLVERS = ("tgda", "fr", "gdn")  # Appendix C: the follower's update
# The solve of (H_ww + damping I) v = grad_w l in every leader step. The paper's procedure is CG on the
# normal equations ("cgnr", 16 iterations), but a batch's H_ww is singular (LR on full MNIST: 7,850
# parameters, 3,437 eigenvalues above 1e-6 for a batch of 1,030 points), and 16 cgnr iterations on it
# amplify rounding: in float32 a one-ulp change of grad_w l changes D_theta l by up to 46% of its norm
# (MINRES: under 1%), and its cosine to the exact hypergradient is 0.07-0.11 (MINRES: 0.70-0.79, both
# against the solve damped by 1e-3). So the attack's outcome depended on the order of floating-point
# sums: full MNIST, LR, seed 4, one code, cgnr: drop 2.78 with one thread, 2.59 with two (1.25 seen on
# another machine); MINRES: 4.56 and 4.55 with the compiled kernels and with their twins (issue 21).
DEFAULT_SOLVER = "minres"


class TGDAAttack(PoisoningAttack):
    """TGDA poisoning: trains the attacker network by total gradient ascent against the defender.

    Args:
        defender: the pretrained defender F (an nn.Module; the attack works on a copy).
        attacker: the attacker L, called as attacker(x, y) -> poisoned x (the attack works on a copy),
            or None to optimise the poisons' pixels directly.
        epsilon: poison budget as a fraction of |D_tr|. (default: 0.03)
        epochs: T, passes over D_tr. (default: 200)
        batch_size: points of D_tr (and of D_v) per step. (default: 1000)
        alpha: attacker step size. (default: 0.01)
        leader_steps: m, leader steps per batch. (default: 1)
        beta: defender step size. (default: 0.1)
        follower_steps: n, follower steps per batch. (default: 20)
        solver: hypergrad.solve method for the total gradient (default: "minres"; "cgnr" is the paper's
            procedure, whose result hinges on rounding: DEFAULT_SOLVER), or a hypergrad.Solver holding
            every setting of the solves (then solver_iterations, solver_rtol and damping are not given).
        solver_iterations: most solver iterations per leader step. (default: 16)
        solver_rtol: relative tolerance of the solve. (default: 1e-6)
        damping: added to the Hessian's diagonal. (default: 0.0)
        cuda_graphs: record each leader step's solve once per batch shape as a CUDA graph and replay it
            (hypergrad.SolveGraphCache): exactly solver_iterations iterations, no early stop. Needs an
            LR or NN defender (a chain of linear layers and one activation) and the attacker as
            leader; on a CPU the same solve runs eagerly. (default: False)
        warm_start: "partial" or "cold". (default: "partial")
        leader: "attacker" or "defender". (default: "attacker")
        formulation: "non-zero-sum" (l = L(D_v, w)) or "zero-sum" (l = f). (default: "non-zero-sum")
        game_solver: the follower's update (Appendix C): "tgda" (gradient descent, eq. 47), "fr"
            (follow the ridge: a ridge correction after the leader steps, eq. 49) or "gdn" (Newton
            steps, eq. 51); "fr" and "gdn" need leader="attacker", "fr" also warm_start="partial".
            (default: "tgda")
        init: D_p^0 as the "first" epsilon*N points of D_tr or a seeded "random" choice. (default: "first")
        pixel_range: the poisons are clamped to it. (default: (-1.0, 1.0))
        seed: seed of the batch order. (default: 0)
        checkpoint: file to save progress to after every epoch and to resume from. (default: None)
        verbose: show a progress bar. (default: False)
    """

    name = "tgda"
    needs_attacker = True  # the attacker network L; with attacker=None (--attacker pixels) the pixels lead
    settings = (Setting("game_solver", str, "tgda", GAME_SOLVERS,
                        "TGDA's game solver (Appendix C): tgda (follower gradient descent), fr (follow the ridge) "
                        "or gdn (follower Newton steps); fr and gdn need the attacker as leader"),
                Setting("checkpoint_every", int, 0, "count",
                        "TGDA: also save the attack's checkpoint every this many batches (0: at each epoch's end only; "
                        "SIGINT and SIGTERM always save one at the next batch boundary)")) + FEASIBLE_SETTINGS

    def __init__(self, defender, attacker, epsilon=0.03, *, epochs=200, batch_size=1000, alpha=0.01,
                 leader_steps=1, beta=0.1, follower_steps=20, solver=DEFAULT_SOLVER, solver_iterations=16,
                 solver_rtol=1e-6, damping=0.0, cuda_graphs=False, warm_start="partial", leader="attacker",
                 formulation="non-zero-sum", game_solver="tgda", init="first", pixel_range=(-1.0, 1.0), seed=0,
                 checkpoint=None, verbose=False, data_parallel=False, checkpoint_every=0, feasible_set="box",
                 feasible_quantile=0.9):
        super().__init__(epsilon, init=init, seed=seed)
        self.feasible_set, self.feasible_quantile, self.feasible_ = feasible_set, feasible_quantile, None
        self.defender, self.attacker = defender, attacker
        self.epochs, self.batch_size = epochs, batch_size
        self.alpha, self.leader_steps, self.beta, self.follower_steps = alpha, leader_steps, beta, follower_steps
        if isinstance(solver, hypergrad.Solver):
            if (solver_iterations, solver_rtol, damping) != (16, 1e-6, 0.0):
                raise ValueError("pass the solve's settings either as solver=hypergrad.Solver(...) or as solver, "
                                 "solver_iterations, solver_rtol and damping, not both")
            if solver.maxiter is None:
                raise ValueError("give the hypergrad.Solver a maxiter: each of the attack's solves runs at most that "
                                 "many iterations")
            solver_iterations, solver_rtol, damping = solver.maxiter, solver.rtol, solver.damping
            self.solver_ = solver
        else:
            self.solver_ = None
        self.solver = solver.method if isinstance(solver, hypergrad.Solver) else solver
        self.solver_iterations, self.solver_rtol, self.damping = solver_iterations, solver_rtol, damping
        self.cuda_graphs = cuda_graphs
        self.warm_start, self.leader, self.formulation = warm_start, leader, formulation
        self.game_solver = game_solver
        self.pixel_range, self.checkpoint, self.verbose = pixel_range, checkpoint, verbose
        self.data_parallel, self.checkpoint_every = data_parallel, checkpoint_every
        self._check_params()
        if self.solver_ is None:  # every solve of the attack, as one value
            self.solver_ = hypergrad.Solver(method=self.solver, maxiter=self.solver_iterations, rtol=self.solver_rtol,
                                            damping=self.damping)

    def _check_params(self):
        super()._check_params()
        self._check_counts("epochs", "leader_steps", "follower_steps", "solver_iterations", "checkpoint_every")
        self._check_counts("batch_size", minimum=1)
        if self.alpha <= 0 or self.beta <= 0:
            raise ValueError("the step sizes alpha and beta must be positive")
        if self.solver not in hypergrad.METHODS:
            raise ValueError(f"solver must be one of {hypergrad.METHODS}, got {self.solver!r}")
        for name, allowed in (("warm_start", WARM_STARTS), ("leader", LEADERS), ("formulation", FORMULATIONS),
                              ("game_solver", GAME_SOLVERS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.damping < 0:
            raise ValueError("damping must be non-negative")
        if self.game_solver != "tgda" and self.leader != "attacker":
            raise ValueError(f"game_solver={self.game_solver!r} is defined with the attacker as leader only (Appendix "
                             "C, eq. 48-51: the follower is the defender); use leader='attacker' or game_solver='tgda'")
        if self.game_solver == "fr" and self.warm_start != "partial":
            raise ValueError("game_solver='fr' needs warm_start='partial': its ridge correction moves the follower's "
                             "current w, which a cold start throws away every batch")
        if self.data_parallel and (self.leader != "attacker" or self.game_solver != "tgda" or self.cuda_graphs):
            raise ValueError("data_parallel runs the attacker-led TGDA game (leader='attacker', game_solver='tgda') "
                             "without cuda_graphs; run the other variants in one process")
        check_feasible(self.feasible_set, self.feasible_quantile)
        if self.feasible_set != "box" and self.attacker is not None:
            raise ValueError(f"feasible_set={self.feasible_set!r} constrains pixels the attack optimises: use attacker=None "
                             "(the poisons' pixels as the leader's parameters); a generator's poisons are its outputs")
        if self.cuda_graphs and (self.leader != "attacker" or not self.solver_iterations):
            raise ValueError("cuda_graphs needs leader='attacker' (the defender's loss is what the recorded solve "
                             "inverts) and solver_iterations >= 1")

    @classmethod
    def check_config(cls, cfg):
        idle = [f"--{name.replace('_', '-')} 0" for name in ("attack_epochs", "leader_steps") if getattr(cfg, name) == 0]
        if cfg.leader == "attacker" and cfg.solver_iterations == 0:
            idle.append("--solver-iterations 0 (the attacker-led game's leader gradient is the implicit term alone)")
        if idle:  # the Python API keeps them, for ablations; a run under TGDA's name would report D_p^0 as its poisons
            raise ValueError(f"{', '.join(idle)}: the attack would not move its poisons from D_p^0, and the run would "
                             "report them as TGDA's; give it at least one epoch, leader step and solver iteration")
        if cfg.game_solver != "tgda" and cfg.leader != "attacker":
            raise ValueError(f"game-solver {cfg.game_solver} needs --leader attacker (Appendix C defines it so)")
        if cfg.game_solver == "fr" and cfg.warm_start != "partial":
            raise ValueError("game-solver fr needs --warm-start partial (a cold start discards the w it moves)")
        if cfg.feasible_set != "box" and cfg.attacker != "pixels":
            raise ValueError(f"feasible-set {cfg.feasible_set} constrains the pixels TGDA optimises: add --attacker pixels "
                             "(a generator's poisons are its outputs)")

    @classmethod
    def from_config(cls, cfg, *, defender=None, attacker=None, checkpoint=None, verbose=False):
        return cls(defender, attacker, cfg.epsilon, epochs=cfg.attack_epochs, batch_size=cfg.attack_batch_size,
                   alpha=cfg.alpha, leader_steps=cfg.leader_steps, beta=cfg.beta, follower_steps=cfg.follower_steps,
                   solver=cfg.solver, solver_iterations=cfg.solver_iterations, damping=cfg.damping,
                   cuda_graphs=cfg.cuda_graphs, warm_start=cfg.warm_start, leader=cfg.leader,
                   formulation=cfg.formulation, game_solver=cfg.game_solver, init=cfg.poison_init, seed=cfg.seed, checkpoint=checkpoint,
                   verbose=verbose, data_parallel=data_parallel.world_size() > 1 and cfg.dp_mode == "sharded",
                   checkpoint_every=cfg.checkpoint_every, feasible_set=cfg.feasible_set,
                   feasible_quantile=cfg.feasible_quantile)

    def poison(self, x, y, *, x_val=None, y_val=None):
        """Runs Algorithm 1 on D_tr = (x, y) and returns the poisons (x_poison, y_poison).

        D_v = (x_val, y_val) is the attacker's validation set; without it a seeded 30% of (x, y)
        serves as D_v (base._defender_and_data). After the call the trained
        attacker is `attacker_`, the defender at the end of the game `defender_`,
        `source_indices_` the indices into D_tr of the clean points D_p^0, and `history` the
        mean losses, the wall-clock seconds and the number of batches of every epoch. With attacker=None, `attacker_` is None.
        """
        defender, x, y, x_val, y_val = self._defender_and_data(x, y, x_val, y_val)
        ref = next(defender.parameters())
        w = [p for p in defender.parameters() if p.requires_grad]
        w_pre = [p.detach().clone() for p in w]
        if self.cuda_graphs and hypergrad.linear_chain(defender) is None:
            raise ValueError(f"cuda_graphs needs a defender that is a chain of linear layers and one activation (the "
                             f"LR and NN defenders); {type(defender).__name__} is not: run without cuda_graphs")
        self._graphs = hypergrad.SolveGraphCache() if self.cuda_graphs else None

        idx = self._craft_sources(len(y)).to(ref.device)
        n_poison = len(idx)
        x_p0, y_p0 = x[idx], y[idx]
        self.feasible_ = make_feasible_set(self.feasible_set, x, y, quantile=self.feasible_quantile,
                                           pixel_range=self.pixel_range)
        self._poison_labels = y_p0
        self.info_ = {"feasible_set": self.feasible_.describe()}
        attacker = _DirectPoisons(self._project(x_p0, y_p0)) if self.attacker is None else copy.deepcopy(self.attacker)
        attacker.to(ref.device, ref.dtype)
        theta = [p for p in attacker.parameters() if p.requires_grad]

        self._start = [weights_digest(defender), weights_digest(attacker),  # what a kept checkpoint started from
                       *(tensor_digest(t) for t in (x, y, x_val, y_val))]
        self.history, self.earlier_seconds_ = [], 0.0  # a second poison() call starts its own record
        start_epoch, start_batch, partial = self._resume(defender, attacker)
        n_batches = math.ceil(len(y) / self.batch_size)
        rank, world = (data_parallel.rank(), data_parallel.world_size()) if self.data_parallel else (0, 1)
        if world > min(self.batch_size, len(y), len(y_val)):
            raise ValueError(f"{world} processes share each batch of {min(self.batch_size, len(y))} points: use a "
                             "larger batch or fewer processes")
        bar = progress_bar(range(start_epoch, self.epochs), desc="TGDA attack", disable=not self.verbose,
                   initial=start_epoch, total=self.epochs)
        with StopSignals() as stop:  # SIGINT/SIGTERM: save at the next batch boundary, then stop
            for epoch in bar:
                first = start_batch if epoch == start_epoch else 0
                done_stats, done_seconds = partial if epoch == start_epoch else ([], 0.0)
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                order = torch.randperm(len(y), generator=g).to(ref.device)
                p_order = torch.randperm(n_poison, generator=g).to(ref.device)
                v_order = torch.randperm(len(y_val), generator=g).to(ref.device)
                stats, epoch_start, stopping = list(done_stats), time.perf_counter() - done_seconds, False
                for b in range(first, n_batches):
                    tr = order[b * self.batch_size:(b + 1) * self.batch_size]
                    pp = p_order[b * n_poison // n_batches:(b + 1) * n_poison // n_batches]
                    vv = v_order.roll(-b * self.batch_size)[:self.batch_size]
                    sharded = None
                    if world > 1:  # this rank's share of the batch; the global means are weighted sums over ranks
                        shards = [strided_shard(i, rank, world) for i in (tr, pp, vv)]
                        follower_weight = (len(shards[0]) + len(shards[1])) / (len(tr) + len(pp))
                        leader_weight = follower_weight if self.formulation == "zero-sum" else len(shards[2]) / len(vv)
                        sharded = hypergrad.ShardedMean(leader_weight, follower_weight)
                        tr, pp, vv = shards
                    stats.append(self._step(defender, attacker, w, theta, w_pre, x[tr], y[tr], x_p0[pp], y_p0[pp],
                                            pp, x_val[vv], y_val[vv], sharded))
                    if not all(math.isfinite(v) for v in stats[-1].values()):
                        raise FloatingPointError(
                            f"TGDA attack diverged in epoch {epoch + 1}, batch {b + 1} of {n_batches}: the losses became "
                            f"{stats[-1]}. Most often the follower's gradient descent (beta={self.beta}) blows up on poisons "
                            "that sharpen its loss; rerun with a smaller beta or alpha. No poisons were returned.")
                    stopping = stop.requested(world)
                    if b + 1 < n_batches and (stopping or (self.checkpoint_every and (b + 1) % self.checkpoint_every == 0)):
                        self._save(defender, attacker, epoch, batch=b + 1, partial=(stats, time.perf_counter() - epoch_start))
                    if stopping and b + 1 < n_batches:
                        raise KeyboardInterrupt(f"stopped by a signal in epoch {epoch + 1}, after batch {b + 1} of "
                                                f"{n_batches}; the checkpoint holds it")
                record = {"epoch": epoch + 1, **{k: sum(s[k] for s in stats) / len(stats) for k in stats[0]},
                          "seconds": time.perf_counter() - epoch_start, "batches": n_batches}  # each step ends in a host sync
                self.history.append(record)
                bar.set_postfix(leader_loss=f"{record['leader_loss']:.4f}", follower_loss=f"{record['follower_loss']:.4f}")
                self._save(defender, attacker, epoch + 1)
                if stopping:
                    raise KeyboardInterrupt(f"stopped by a signal at the end of epoch {epoch + 1}; the checkpoint holds it")
        with torch.no_grad():
            x_poison = attacker(x_p0, y_p0).clamp(*self.pixel_range)
        self.attacker_ = None if self.attacker is None else attacker
        self.defender_ = defender
        return x_poison.detach(), y_p0.clone()

    def _step(self, defender, attacker, w, theta, w_pre, x_b, y_b, xp_b, yp_b, pp, xv_b, yv_b, sharded=None):
        """One batch of Algorithm 1: m leader steps, then n follower steps (pp: the poisons' indices). With
        `sharded` (a hypergrad.ShardedMean) the batch is this rank's share: every gradient, solve and loss
        is summed over the ranks, so that all ranks take the same steps as one process would."""
        def follower_objective():  # f = L(D_tr U D_p(theta), w) as a hypergrad.ClassifierLoss, so that
            # total_grad uses the structured Hessian-vector product for linear-activation defenders
            if len(yp_b) == 0:
                return hypergrad.ClassifierLoss(defender, x_b, y_b)
            poisons = attacker.pixels[pp] if isinstance(attacker, _DirectPoisons) else attacker(xp_b, yp_b)
            return hypergrad.ClassifierLoss(defender, (x_b, poisons), (y_b, yp_b))  # parts: only the poisons
            # carry a graph to theta, so the mixed term is differentiated through their rows alone

        def follower_loss():
            return follower_objective()()

        def leader_loss():  # l = L(D_v, w), or f in the zero-sum game
            return follower_loss() if self.formulation == "zero-sum" else F.cross_entropy(defender(xv_b), yv_b)

        solve = self.solver_
        if self.leader == "attacker":
            theta_old = [p.detach().clone() for p in theta] if self.game_solver == "fr" else None
            for _ in range(self.leader_steps):  # theta <- theta + alpha D_theta l
                d_theta = hypergrad.total_grad(leader_loss, follower_objective(), theta, w, check_finite=False,
                                               sharded=sharded, solver=solve, graphs=self._graphs)  # losses: below
                with torch.no_grad():
                    for p, d in zip(theta, d_theta):
                        p.add_(self.alpha * d)
                    if isinstance(attacker, _DirectPoisons):  # projected onto the feasible set (a row inside stays)
                        attacker.pixels.copy_(self._project(attacker.pixels, self._poison_labels))
            if self.warm_start == "cold":
                with torch.no_grad():
                    for p, p0 in zip(w, w_pre):
                        p.copy_(p0)
            objective = follower_objective()  # theta is fixed during the follower's steps
            if self.game_solver == "fr" and len(yp_b):  # w <- w - H_ww^-1 H_w,theta (theta - theta_old)
                self._follow_ridge(objective, w, theta, [p.detach() - p0 for p, p0 in zip(theta, theta_old)], solve)
            follower = hypergrad.ClassifierLoss(defender, objective.inputs.detach(), objective.targets)
            for _ in range(self.follower_steps):  # w <- w - beta grad_w f (gdn: w <- w - beta H_ww^-1 grad_w f)
                if self.game_solver == "gdn":
                    grads = self._newton_direction(follower, w, solve)
                else:
                    grads = torch.autograd.grad(follower(), w)
                if sharded is not None:
                    grads = [sharded.follower(g) for g in grads]
                with torch.no_grad():
                    for p, g in zip(w, grads):
                        p.sub_(self.beta * g)
        else:
            for _ in range(self.leader_steps):  # w <- w - beta D_w f, the attacker responding by ascending f
                d_w = hypergrad.total_grad(follower_objective(), lambda: -follower_loss(), w, theta, check_finite=False,
                                           solver=solve)
                with torch.no_grad():
                    for p, d in zip(w, d_w):
                        p.sub_(self.beta * d)
            for _ in range(self.follower_steps):  # theta <- theta + alpha grad_theta f
                grads = torch.autograd.grad(follower_loss(), theta)
                with torch.no_grad():
                    for p, g in zip(theta, grads):
                        p.add_(self.alpha * g)
                    if isinstance(attacker, _DirectPoisons):
                        attacker.pixels.copy_(self._project(attacker.pixels, self._poison_labels))
        with torch.no_grad():
            losses = leader_loss(), follower_loss()
        if sharded is not None:  # every rank sees the global losses (and stops together if they are not finite)
            losses = sharded.leader(losses[0]), sharded.follower(losses[1])
        return {"leader_loss": losses[0].item(), "follower_loss": losses[1].item()}

    def _follow_ridge(self, objective, w, theta, delta, solve):
        """FR's correction (eq. 49, sign as in the module docstring): w -= (H_ww + damping I)^-1 H_w,theta delta.

        H_w,theta delta = grad_w <grad_theta f, delta>, through the rows of f that carry a graph to theta
        (the poisons; the clean rows' mixed derivative is zero)."""
        f = objective.graph_part()
        grads = torch.autograd.grad(f, theta, create_graph=True, allow_unused=True)
        pairs = [(g, d) for g, d in zip(grads, delta) if g is not None]
        if not pairs:  # no leader parameter reaches this batch's poisons
            return
        inner = sum((g * d).sum() for g, d in pairs)
        mixed = torch.autograd.grad(inner, w, allow_unused=True)
        b = hypergrad.flatten([torch.zeros_like(p) if m is None else m for m, p in zip(mixed, w)]).detach()
        step = self._solve_hessian(objective, w, b, solve)
        with torch.no_grad():
            for p, s in zip(w, hypergrad.unflatten(step, w)):
                p.sub_(s)

    def _newton_direction(self, follower, w, solve):
        """GDN's direction (eq. 51): (H_ww + damping I)^-1 grad_w f, shaped like w."""
        grads = torch.autograd.grad(follower(), w)
        return hypergrad.unflatten(self._solve_hessian(follower, w, hypergrad.flatten(grads), solve), w)

    @staticmethod
    def _solve_hessian(objective, w, b, solve):
        """(H_ww + damping I)^-1 b for the follower loss `objective` (a ClassifierLoss) by hypergrad.solve;
        the structured product for LR and NN defenders, reverse-over-reverse autograd otherwise."""
        hessian = hypergrad.structured_hessian(objective, w)
        if hessian is None:
            hessian = hypergrad.HessianOperator.reverse(objective(), w)
        x, _ = solve(hessian, b)
        return x

    def _resume(self, defender, attacker):
        """(epoch, batch, (stats, seconds) of that epoch's batches so far) from the checkpoint, or from the start."""
        state = kept_progress(self.checkpoint, self._settings(),
                              {"epoch": int, "defender": dict, "attacker": dict, "history": list})
        if state is None:
            return 0, 0, ([], 0.0)
        try:
            defender.load_state_dict(state["defender"])
            attacker.load_state_dict(state["attacker"])
        except RuntimeError as exc:
            raise RunFolderError(f"{self.checkpoint} holds the models of another run ({str(exc).splitlines()[0]}); "
                                 "remove it to restart the attack") from None
        self.history = list(state["history"])
        partial = (list(state.get("partial_stats", [])), float(state.get("partial_seconds", 0.0)))
        self.earlier_seconds_ = sum(float(h.get("seconds", 0.0)) for h in self.history if isinstance(h, dict))
        logger.info("resuming the TGDA attack from %s at epoch %d, batch %d", self.checkpoint, state["epoch"],
                    state.get("batch", 0))
        return int(state["epoch"]), int(state.get("batch", 0)), partial

    def _settings(self):
        """What the attack's trajectory depends on, stored in its checkpoint (a resume under others is refused;
        more epochs continue the same trajectory)."""
        return {"epsilon": self.epsilon, "batch_size": self.batch_size, "alpha": self.alpha,
                "leader_steps": self.leader_steps, "beta": self.beta, "follower_steps": self.follower_steps,
                "solver": repr(self.solver_), "warm_start": self.warm_start, "leader": self.leader,
                "formulation": self.formulation, "game_solver": self.game_solver, "init": self.init, "seed": self.seed,
                "pixel_range": list(self.pixel_range), "attacker": "pixels" if self.attacker is None else "network",
                "start": getattr(self, "_start", None),
                **({} if self.feasible_set == "box" else {"feasible_set": self.feasible_set,
                                                          "feasible_quantile": self.feasible_quantile})}

    def _save(self, defender, attacker, epoch, batch=0, partial=((), 0.0)):
        """The checkpoint after `epoch` full epochs and `batch` batches of the next (their stats and seconds in
        `partial`): written atomically, by rank 0 alone."""
        if not self.checkpoint or (self.data_parallel and not data_parallel.is_main()):
            return
        save_atomic({"epoch": epoch, "batch": batch, "settings": self._settings(),
                     "defender": defender.state_dict(), "attacker": attacker.state_dict(),
                     "history": self.history, "partial_stats": list(partial[0]), "partial_seconds": partial[1]},
                    self.checkpoint)  # never a half-written checkpoint


class _DirectPoisons(torch.nn.Module):
    """The poisons' pixels as the leader's parameters (attacker=None), initialised at D_p^0."""

    def __init__(self, x_p0):
        super().__init__()
        self.pixels = torch.nn.Parameter(x_p0.detach().clone())

    def forward(self, x_p0, y_p0):  # all poisons, in the order of D_p^0
        return self.pixels
