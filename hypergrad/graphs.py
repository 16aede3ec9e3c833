"""Fixed-iteration solves recorded once as a CUDA graph and replayed, for the leader step of TGDA.

The leader step of Lu, Kamath & Yu (TMLR 2022, eq. 15-17, Algorithm 1 line 4) solves
(H_ww + damping I) v = grad_w l with the same method, iteration count and shapes on every batch.
On a GPU, the hundreds of small kernels of such a solve (the solver's fused updates and, per
product, the matrix products and fused terms of hypergrad.mlp_hvp) cost more to launch than to
run when the defender is small. A CUDA graph launches them all at once.

`SolveGraphCache` records a solve on its first call for a given layout (the operator's state
shapes, b's shape, dtype, device, the settings) and replays it on every later call, after copying
the new operator's state and b into the recorded buffers. What a recording needs:
  * an operator whose products read only tensors it can copy in place: a
    hypergrad.mlp_hvp.StructuredHessian (an autograd-graph product cannot be replayed);
  * no host synchronisation: the solve runs exactly `maxiter` iterations (check_every = maxiter), so
    it never stops early; rows that converge stop changing, as in hypergrad.solve.
On a CPU there is no graph: each call runs the same solve on the same buffers eagerly (same
results, no speed-up), so that code using the cache runs everywhere.
"""
import torch

from .mlp_hvp import StructuredHessian
from .solvers import METHODS, SolveInfo, solve


class SolveGraphCache:
    """Records fixed-iteration solves of structured Hessians as CUDA graphs and replays them.

    Args:
        warmup: eager runs on a side stream before a recording (CUDA needs its libraries' lazy
            initialisation to happen outside the capture). (default: 2)

    Example:
        >>> graphs = hypergrad.SolveGraphCache()
        >>> for batch in batches:  # the first call records, the others replay
        ...     d = hypergrad.total_grad(..., method="cgnr", maxiter=16, graphs=graphs)
    """

    def __init__(self, warmup=2):
        if not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup must be a positive integer, got {warmup!r}")
        self.warmup = warmup
        self._recordings = {}

    def __len__(self):
        """The number of recordings held (one per layout and settings)."""
        return len(self._recordings)

    def clear(self):
        """Drops every recording and the device memory its buffers and graph hold."""
        self._recordings.clear()

    def solve(self, operator, b, *, method="cg", maxiter=16, rtol=1e-5, atol=0.0, damping=0.0, neumann_scale=None,
              x0=None, solver=None):
        """(x, info) of (A + damping I) x = b after exactly maxiter iterations (hypergrad.solve's
        arguments, or a hypergrad.Solver holding them; A a StructuredHessian), replaying the recording of
        this layout, or recording it first. A recorded solve takes no preconditioner."""
        if solver is not None:
            if solver.preconditioner is not None:
                raise ValueError("a recorded solve takes no preconditioner: solve without graphs to precondition")
            method, maxiter, rtol, atol, damping = solver.method, solver.maxiter, solver.rtol, solver.atol, solver.damping
            neumann_scale = solver.options.get("neumann_scale")
        if not isinstance(operator, StructuredHessian):
            raise ValueError("a recorded solve needs a hypergrad.mlp_hvp.StructuredHessian (the structured product of "
                             "a ClassifierLoss of a linear-activation chain); an autograd-graph product cannot be "
                             "replayed: solve without graphs")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if not isinstance(maxiter, int) or maxiter < 1:
            raise ValueError(f"a recorded solve needs a fixed positive maxiter, got {maxiter!r}")
        if b.shape[-1] != operator.n or b.dim() not in (1, 2) or b.dtype != operator.dtype or b.device != operator.device:
            raise ValueError(f"b must be [{operator.n}] or [B, {operator.n}] of the operator's dtype {operator.dtype} "
                             f"on {operator.device}, got {list(b.shape)} {b.dtype} on {b.device}")
        key = (operator.layout(), tuple(b.shape), method, maxiter, float(rtol), float(atol), float(damping),
               None if neumann_scale is None else float(neumann_scale), x0 is None)
        recording = self._recordings.get(key)
        if recording is None:
            recording = _Recording(operator, b, x0, self.warmup, method=method, maxiter=maxiter, rtol=rtol,
                                   atol=atol, damping=damping, neumann_scale=neumann_scale)
            self._recordings[key] = recording
        return recording.run(operator, b, x0)


class _Recording:
    """One recorded solve: static copies of the operator's state, b and x0, and the graph (CUDA)."""

    def __init__(self, operator, b, x0, warmup, **settings):
        self.operator = operator.clone()
        self.b = b.detach().clone().contiguous()
        self.x0 = None if x0 is None else x0.detach().to(b.dtype).reshape(b.shape).clone()
        self.settings = settings
        self.graph = None
        if b.device.type == "cuda":
            self._capture(warmup)

    def _solve(self):
        with torch.no_grad():
            x, info = solve(self.operator, self.b, x0=self.x0, check_every=self.settings["maxiter"],
                            **self.settings)
        return x, info

    def _capture(self, warmup):
        with torch.cuda.device(self.b.device):  # the graph is recorded on the device of the buffers
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    self._solve()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.outputs = self._solve()

    def run(self, operator, b, x0):
        self.operator.load_state(operator)
        with torch.no_grad():
            self.b.copy_(b)
            if x0 is not None:
                self.x0.copy_(x0.detach().reshape(b.shape))
        if self.graph is None:
            x, info = self._solve()
        else:
            self.graph.replay()
            x, info = self.outputs
        x = x.clone()  # the recorded outputs are overwritten by the next replay: hand out copies
        return x, SolveInfo(method=info.method, iterations=info.iterations.clone(),
                            residual_norm=info.residual_norm.clone(), converged=info.converged.clone(),
                            negative_curvature=info.negative_curvature.clone(), num_matvecs=info.num_matvecs, x=x)
