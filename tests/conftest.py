"""Session fixtures: the local samples (tiny Qwen2 and tiny Llama + three adapters each), built once."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Ray reads these when it is first imported, by whichever test that is: every Ray port on
# 127.0.0.1 (a one-machine "cluster"), and no usage statistics sent anywhere.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "samples"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_sample import Sample, make_sample  # noqa: E402
from pipeline_fixtures import exported, exported_samples, reference  # noqa: E402,F401


def _sample(tmp_path_factory, family: str) -> Sample:
    return make_sample(tmp_path_factory.mktemp(f"{family}_sample"), family)


@pytest.fixture(scope="session")
def qwen2_sample(tmp_path_factory) -> Sample:
    return _sample(tmp_path_factory, "qwen2")


@pytest.fixture(scope="session")
def llama_sample(tmp_path_factory) -> Sample:
    return _sample(tmp_path_factory, "llama")


def cuda_available() -> bool:
    """onnxruntime has the CUDA provider AND our native module was built with CUDA slot buffers."""
    try:
        import onnxruntime as ort

        from edgelora.runtime import native

        return "CUDAExecutionProvider" in ort.get_available_providers() and native.with_cuda()
    except ImportError:
        return False


def pytest_collection_modifyitems(config, items):
    """CUDA-marked tests skip cleanly without a CUDA provider, a GPU, or a CUDA build of the runtime."""
    if cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU, onnxruntime-gpu and a runtime built with EDGELORA_CUDA=ON")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
