import os
from pathlib import Path

import jax
import numpy as np
import pytest

FIXTURES = Path(__file__).parent / "fixtures"
FAMILIES = ["llama", "qwen2", "qwen3", "qwen3_moe"]

# The suite runs on the CPU unless a test is marked gpu; tests compare exact tokens, so keep matmuls in f32.
jax.config.update("jax_default_matmul_precision", "highest")


def pytest_collection_modifyitems(config, items):
    on_gpu = jax.default_backend() == "gpu"
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the device machine)")
    for item in items:
        if "gpu" in item.keywords and not on_gpu:
            item.add_marker(skip)


@pytest.fixture
def rng(request):
    # fresh random inputs every run, reproducible from the printed seed on failure
    seed = int(os.environ.get("TEST_SEED", np.random.SeedSequence().entropy % 2**31))
    request.node.user_properties.append(("seed", seed))
    print(f"seed={seed}")
    return np.random.default_rng(seed)


def rel_err(a, b) -> float:
    """||a - b|| / ||b|| (L2 over all elements)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))
