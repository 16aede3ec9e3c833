import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """A run with --threads sets torch's thread count for the process (protocol.use_threads); the tests after it
    must not run with it, since a seed fixes a run's bits for one thread count (a bench in this process and in
    jobs then differ)."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
