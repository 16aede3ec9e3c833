"""Device and dtype lists shared by the tests (CUDA cases skip where no GPU is present), and tiny data and
models shared by the defense tests."""
import pytest
import torch
from torch import nn

import hypergrad

DTYPES = [torch.float32, torch.float64]
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                     reason="needs a CUDA device")]),
]
needs_extension = pytest.mark.skipif(not hypergrad.has_extension(),
                                     reason="needs hypergrad._C: " + str(hypergrad.build_info()["extension_error"]))
# Implementations of the ops: the compiled kernels and their pure-PyTorch twins.
BACKENDS = [pytest.param(True, id="extension", marks=needs_extension), pytest.param(False, id="reference")]


def tol(dtype):
    return {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}


def tiny_classification(n, d=3, classes=3, seed=0):
    """n points in d dimensions with random labels (float64): the defense tests' data."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randint(0, classes, (n,), generator=g)


def tiny_model(kind, seed=0):
    """A float64 linear model ("lr") or a 3-4-3 tanh network on 3 features: the defense tests' defenders."""
    torch.manual_seed(seed)
    model = nn.Linear(3, 3) if kind == "lr" else nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    return model.double()
