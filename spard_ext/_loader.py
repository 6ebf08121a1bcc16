"""Loading the compiled kernels, with a clear message whenever they cannot be loaded.

Two libraries (see setup.py), recorded in ``_build_info.json`` next to them:

- ``_C`` (op schemas and CPU kernels) is built on the LibTorch stable ABI: it calls torch only
  through its C shim, which keeps working across torch releases from the recorded target on
  (``stable_abi``, 2.10). It loads under any torch >= that target; under an older torch, nothing
  is loaded and ImportError says what to upgrade.
- ``_C_cuda`` (CUDA kernels) is built on the same stable ABI and target (``cuda_stable_abi``),
  and links libcudart of one CUDA major (``cuda_major``). It is loaded under a CUDA build of any
  torch >= that target with the same CUDA major; under a CPU-only torch the CPU kernels are used
  alone. Under a CUDA torch of another CUDA major the import stops with an ImportError (one line)
  that names both majors and the command that rebuilds SPARD against the torch in use (CUDA
  tensors would otherwise meet ops without a CUDA kernel, far from the cause).

A build recorded without ``stable_abi`` (from before the port) is held to the torch release
series it was built for, for both libraries; one without ``cuda_stable_abi`` (CUDA kernels on
the regular ABI) holds its CUDA kernels to that series. A loader error (missing library,
undefined symbol) never surfaces raw: it is wrapped in an ImportError that says what to do.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import json
import os
import warnings
from dataclasses import dataclass
from typing import Optional

BUILD_INFO = "_build_info.json"
HERE = os.path.dirname(os.path.abspath(__file__))

REINSTALL = ("pip install --no-cache-dir --force-reinstall --no-deps <SPARD source folder or sdist> "
             "(or, in a source checkout, `make build`)")


def release_series(version: str) -> tuple[int, int] | None:
    """(major, minor) of a torch version ("2.14.1+cu130" -> (2, 14))."""
    parts = version.split("+")[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return None


def read_build_info(folder: str = HERE) -> Optional[dict]:
    """The recorded build, or None (a build from before the file existed, or by CMake)."""
    path = os.path.join(folder, BUILD_INFO)
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ImportError(f"spard_ext: cannot read {path} ({e}); reinstall SPARD: {REINSTALL}") from None
    return info if isinstance(info, dict) else None


@dataclass(frozen=True)
class Plan:
    load_cuda: bool
    """Whether to load the CUDA kernels as well as the CPU ones."""
    note: str
    """Why not, when they exist but are left out (empty otherwise)."""


def _another_release(what: str, built: str, torch_version: str) -> ImportError:
    series = ".".join(map(str, release_series(built) or ()))
    return ImportError(
        f"spard_ext: SPARD's {what} were compiled against torch {built}, but this environment "
        f"has torch {torch_version}; compiled torch extensions only load under the torch "
        f"release series they were built for. Rebuild SPARD against this torch: {REINSTALL}. "
        f"Or install torch {series}.* again."
    )


def plan(info: Optional[dict], torch_version: str, torch_cuda: Optional[str]) -> Plan:
    """What to load under this torch; raises ImportError when the build does not fit it."""
    if info is None:
        return Plan(load_cuda=True, note="")
    built = str(info.get("torch", "?"))
    series = release_series(torch_version)
    stable = info.get("stable_abi")
    if stable:
        target = release_series(str(stable))
        if series is None or target is None or series < target:
            need = str(stable)
            raise ImportError(
                f"spard_ext: SPARD's CPU kernels need torch >= {need} (they are built on its stable "
                f"ABI, compiled against torch {built}), but this environment has torch {torch_version}. "
                f"Upgrade torch: pip install 'torch>={need}'."
            )
        same_series = release_series(built) == series
    elif release_series(built) != series:
        raise _another_release("kernels", built, torch_version)
    else:
        same_series = True
    if not info.get("cuda_kernels"):
        return Plan(load_cuda=False, note="")
    if torch_cuda is None:
        return Plan(load_cuda=False, note=f"torch {torch_version} is CPU-only: using the CPU kernels")
    if not (stable and info.get("cuda_stable_abi")) and not same_series:
        raise _another_release("CUDA kernels", built, torch_version)
    built_cuda = str(info.get("torch_cuda") or "")
    built_major = str(info.get("cuda_major") or built_cuda.split(".")[0])
    major = torch_cuda.split(".")[0]
    if built_major != major:
        raise ImportError(
            f"spard_ext: SPARD's CUDA kernels were compiled for CUDA {built_cuda} (CUDA major {built_major}, "
            f"torch {built}), but this torch {torch_version} uses CUDA {torch_cuda} (CUDA major {major}). "
            f"Rebuild SPARD against this torch: {REINSTALL}."
        )
    return Plan(load_cuda=True, note="")


def library_path(name: str, folder: str = HERE) -> Optional[str]:
    """The file of the compiled module ``name`` in ``folder`` (any extension suffix), or None."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(folder, name + suffix)
        if os.path.isfile(path):
            return path
    return None


def _loader_error(what: str, torch_version: str, info: Optional[dict], error: BaseException) -> ImportError:
    built = f"compiled against torch {info.get('torch')}" if info else "no build record"
    return ImportError(
        f"spard_ext: cannot load {what} under torch {torch_version} ({built}): {error}. "
        f"Rebuild SPARD against this torch: {REINSTALL}."
    )


def load(package: str = "spard_ext"):
    """Loads the kernels; returns (the ``_C`` module, whether the CUDA kernels are loaded, note)."""
    import torch

    info = read_build_info()
    p = plan(info, torch.__version__, torch.version.cuda)
    if library_path("_C") is None:
        raise ImportError(
            "spard_ext: the compiled kernels are missing (no _C library next to spard_ext/__init__.py). "
            "Install SPARD with `pip install .`, or build in place with `make build` "
            "(python setup.py build_ext --inplace)."
        )
    try:
        cpu = importlib.import_module(f"{package}._C")
    except ImportError as e:
        raise _loader_error("the CPU kernels (_C)", torch.__version__, info, e) from e
    cuda_loaded = False
    if p.load_cuda:
        path = library_path("_C_cuda")
        if path is not None:
            try:
                torch.ops.load_library(path)
            except OSError as e:
                raise _loader_error("the CUDA kernels (_C_cuda)", torch.__version__, info, e) from e
            cuda_loaded = True
        elif info is not None:
            raise ImportError(f"spard_ext: the build record lists CUDA kernels but {HERE} has no _C_cuda "
                              f"library; reinstall SPARD: {REINSTALL}.")
    if not cuda_loaded and torch.version.cuda is not None and torch.cuda.is_available():
        # Said once, here: otherwise the first op on a CUDA tensor fails far from the cause.
        warnings.warn(f"spard_ext: this SPARD build has no CUDA kernels, but torch {torch.__version__} sees a GPU: "
                      "SPARD's ops on CUDA tensors will fail. Rebuild with them: SPARD_EXT_CUDA=1 "
                      f"{REINSTALL}", RuntimeWarning, stacklevel=2)
    return cpu, cuda_loaded, p.note
