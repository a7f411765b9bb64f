"""Test-session settings: offline hub access and one torch thread per test process.

Two workers on a 2-core machine each running torch with 2 threads oversubscribe the cores and
slow small models several-fold; kernels launched by papermill inherit OMP_NUM_THREADS.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    # Tiny models gain nothing from intra-op threads, and on a shared 2-core machine spinning
    # OpenMP threads make each op wait for a descheduled peer (measured: 0.7 ms vs 55 ms per step).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """The notebook series on the smoke preset, run once per test process by the runner (``make run``'s path);
    the tests that read it share the xdist group "notebooks", so one worker runs it."""
    from overfill_lib import runner

    run_dir, outcomes = runner.run_series("smoke", force=True, run_dir=tmp_path_factory.mktemp("smoke-run") / "run")
    failed = [o for o in outcomes if o.status != "ok"]
    assert not failed, "\n".join(f"{o.notebook}: {o.error}" for o in failed)
    return run_dir
