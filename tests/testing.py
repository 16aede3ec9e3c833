"""Device and dtype lists shared by the tests; CUDA cases skip where no GPU is present."""
import pytest
import torch

import hypergrad

DTYPES = [torch.float32, torch.float64]
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                     reason="needs a CUDA device")]),
]
needs_extension = pytest.mark.skipif(not hypergrad.has_extension(),
                                     reason="hypergrad._C is not built: " + str(hypergrad.build_info()["extension_error"]))
# Implementations of the ops: the compiled kernels and their pure-PyTorch twins.
BACKENDS = [pytest.param(True, id="extension", marks=needs_extension), pytest.param(False, id="reference")]


def tol(dtype):
    return {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
