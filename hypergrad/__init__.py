"""hypergrad: higher-order autodiff for bilevel problems.

Hessian-vector products (hypergrad.hvp), batched Krylov solvers with device-side scalars
(hypergrad.solve) and the total derivative through a follower's optimum (hypergrad.total_grad),
the computation at the heart of the TGDA attack of Lu, Kamath & Yu, "Indiscriminate Data Poisoning
Attacks on Neural Networks" (TMLR 2022), eq. 15-17. The solvers' vector work runs in the fused
kernels of the compiled extension hypergrad._C when it is built, and in pure PyTorch otherwise.
"""
from ._ops import build_info, has_cuda_extension, has_extension, use_extension
from .hvp import HessianOperator, flatten, hessian_operator, hvp, unflatten
from .graphs import SolveGraphCache
from .mlp_hvp import ClassifierLoss, StructuredHessian, linear_chain, structured_hessian
from .solvers import METHODS, SolveInfo, Solver, solve
from .preconditioners import hutchinson_diagonal, jacobi
from .total_grad import total_grad
from .distributed import ShardedMean
from .implicit import implicit_argmin

__all__ = [
    "ClassifierLoss", "HessianOperator", "METHODS", "ShardedMean", "SolveGraphCache", "SolveInfo", "Solver", "StructuredHessian",
    "build_info", "hutchinson_diagonal", "implicit_argmin", "jacobi",
    "flatten", "has_cuda_extension", "has_extension", "hessian_operator", "hvp", "linear_chain", "solve",
    "structured_hessian", "total_grad", "unflatten", "use_extension",
]
__version__ = "0.1.0"
