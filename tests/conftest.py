import os

# The Triton interpreter must be selected before triton is first imported: it runs the GPU kernels
# on CPU tensors so that the Triton backend is tested on machines without a GPU.
os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import imer_fast.backends  # noqa: E402
import imer_fast.ops  # noqa: E402

BACKENDS = ("cpp", "triton", "reference")


def triton_kernels_missing():
    try:
        for name in ("rgcn", "dialogue_graph", "attention", "layer_norm", "sampler_steps", "group_norm", "timestep_embedding",
                     "winograd_conv"):
            importlib.import_module(f"imer_fast._kernels.{name}")
    except Exception as err:  # noqa: BLE001 - any import failure means the backend is unavailable
        return str(err)
    return None


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Run the test on each backend: C++ kernels, Triton kernels under the interpreter, reference."""
    name = request.param
    if name == "triton":
        missing = triton_kernels_missing()
        if missing:
            pytest.skip(f"Triton kernels unavailable: {missing}")
        with imer_fast.ops.triton_on_cpu():
            yield name
    elif name == "reference":
        with imer_fast.backends.force("reference"):
            yield name
    else:
        yield name


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
