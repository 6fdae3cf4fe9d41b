import os

# Multi-threaded OpenBLAS crawls on two shared cores (eigh of 2048x2048: 37 s on 2 threads, 3 s on 1).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Two shared cores: one intra-op thread per test process keeps timings stable.
torch.set_num_threads(int(os.environ.get("VITDIFF_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
