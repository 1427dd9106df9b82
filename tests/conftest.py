"""Test session set-up: CPU/gloo platform and a one-rank process group for single-process tests."""

import os
import tempfile

import pytest
import torch

from megatron_moh import patches, platform

# Everything runs on the CPU, except the GPU checks (tests/gpu) in a session that asks for CUDA
# with MOH_TEST_GPU=1 (benchmarks/gpu/check.sh does). The session is an entry point: every patch.
GPU_SESSION = os.environ.get("MOH_TEST_GPU", "0") == "1"
platform.setup(force_cpu=None if GPU_SESSION else True)
patches.install_all()
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session", autouse=True)
def one_rank_process_group():
    """Single-process tests build megatron modules, which need model-parallel groups."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if not torch.distributed.is_initialized():
        store = tempfile.mkdtemp(prefix="moh-pg-")
        platform.init_process_group(0, 1, init_method=f"file://{store}/rendezvous")
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(1234)
    yield


def pytest_collection_modifyitems(items):
    """Mark each test by its folder (unit, dist, integration), so `-m unit` runs the fast part."""
    for item in items:
        kind = item.path.parent.name
        if kind in ("unit", "dist", "integration"):
            item.add_marker(getattr(pytest.mark, kind))


@pytest.fixture
def one_thread():
    """torch on one CPU thread for the test, as the measured crossovers of moh_attention_impl='auto'."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
