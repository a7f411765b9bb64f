"""Test-session settings: offline hub access and one thread per pytest-xdist worker.

Two workers on a 2-core machine each running torch with 2 threads oversubscribe the cores and
slow small models several-fold; kernels launched by papermill inherit OMP_NUM_THREADS.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
