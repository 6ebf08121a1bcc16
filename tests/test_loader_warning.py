"""One warning at import when a CUDA torch sees a GPU but SPARD was built without its CUDA
kernels (the first op on a CUDA tensor would otherwise fail far from the cause); none otherwise."""

import warnings

import pytest
import torch

from spard_ext import _loader

CPU_BUILD = {"torch": torch.__version__, "stable_abi": "2.10", "cuda_kernels": False}


def load_with(monkeypatch, *, gpu: bool, torch_cuda, cuda_library: bool, info=CPU_BUILD):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    monkeypatch.setattr(torch.version, "cuda", torch_cuda)
    monkeypatch.setattr(_loader, "read_build_info", lambda folder=_loader.HERE: info)
    real = _loader.library_path
    monkeypatch.setattr(_loader, "library_path",
                        lambda name, folder=_loader.HERE: (real(name, folder) if name == "_C" else
                                                           ("/nowhere/_C_cuda.so" if cuda_library else None)))
    monkeypatch.setattr(torch.ops, "load_library", lambda path: None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, cuda_loaded, _ = _loader.load()
    return cuda_loaded, [w for w in caught if "spard_ext" in str(w.message)]


def test_a_cpu_build_under_a_cuda_torch_with_a_gpu_warns_once(monkeypatch):
    cuda_loaded, caught = load_with(monkeypatch, gpu=True, torch_cuda="13.0", cuda_library=False)
    assert not cuda_loaded and len(caught) == 1
    message = str(caught[0].message)
    assert issubclass(caught[0].category, RuntimeWarning) and "\n" not in message
    assert "no CUDA kernels" in message and torch.__version__ in message and "SPARD_EXT_CUDA=1" in message


@pytest.mark.parametrize("gpu, torch_cuda, cuda_library, info", [
    (False, "13.0", False, CPU_BUILD),            # a CUDA torch on a machine without a GPU
    (True, None, False, CPU_BUILD),               # a CPU-only torch
    (True, "13.0", True, dict(CPU_BUILD, cuda_kernels=True, torch_cuda="13.0")),  # the kernels are there
])
def test_no_warning_when_nothing_is_missing(monkeypatch, gpu, torch_cuda, cuda_library, info):
    _, caught = load_with(monkeypatch, gpu=gpu, torch_cuda=torch_cuda, cuda_library=cuda_library, info=info)
    assert caught == []
