"""torch and torchvision for the tests that compare with them, or a skip that says why.

pytest.importorskip skips only when the module is missing. A torchvision built
for another torch (or for CUDA, next to a CPU-only torch) is installed but
fails at import, with RuntimeError ("operator torchvision::nms does not exist")
or, on a second try in the same process, AttributeError: those skip here too.
"""

import pytest

BROKEN_IMPORT = (ImportError, RuntimeError, AttributeError, OSError)


def import_torch():
    try:
        import torch
    except ModuleNotFoundError:
        pytest.skip("torch is not installed")
    except BROKEN_IMPORT as e:
        pytest.skip(f"torch is installed but cannot be imported: {type(e).__name__}: {e}")
    return torch


def import_torchvision_ops():
    """torchvision.ops (after torch), or a skip."""
    import_torch()
    try:
        import torchvision.ops as ops

        ops.nms, ops.roi_align, ops.roi_pool  # noqa: B018 (the compiled ops are there)
    except ModuleNotFoundError:
        pytest.skip("torchvision is not installed")
    except BROKEN_IMPORT as e:
        pytest.skip(f"torchvision is installed but cannot be imported: {type(e).__name__}: {e}")
    return ops
