import os

import pytest
import torch

# One intra-op thread: the models in tests are tiny, and on a loaded 2-core machine OpenMP threads
# spin-wait on each other (measured: 20 tiny system steps 129 s at 2 threads vs 0.38 s at 1).
torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
