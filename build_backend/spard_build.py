"""PEP 517 build backend of SPARD: setuptools', plus the right torch in the build environment.

Both libraries are on the LibTorch stable ABI and load under any torch >= MIN_TORCH, but the CUDA
kernels (spard_ext._C_cuda) link libcudart of one CUDA major, so they must be compiled against a
torch of the CUDA major they will run under. pip's build isolation hides the environment's torch,
so a plain ``requires = ["torch"]`` would compile against the newest torch on the index, whose
CUDA major may not be the environment's (and the CUDA kernels would then refuse to load). This
backend asks for the torch release of the environment SPARD is installed into:

- pip runs the build hooks with that environment's interpreter (only its site-packages are hidden,
  through PYTHONPATH), so a child interpreter without PYTHONPATH sees its torch: the build then
  requires ``torch==<that release>``;
- uv, ``python -m build`` and pip into an environment without torch give no such view: the build
  requires ``torch>=MIN_TORCH`` (the newest allowed, which is also what gets installed next to
  a fresh SPARD). uv users building inside the source tree get the runtime's torch anyway
  (``[tool.uv.extra-build-dependencies]`` in pyproject.toml).

A torch older than MIN_TORCH, or a torch that no index can serve (a local source build), stops
the build here with a message saying what to do. Everything else is setuptools' backend.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403  (the hooks not wrapped below)

MIN_TORCH = (2, 10)
"""Oldest torch SPARD supports (keep in step with ``dependencies`` in pyproject.toml): the CPU
kernels are built on the LibTorch stable ABI with this as their target (TORCH_TARGET_VERSION),
which needs this torch's headers to build and loads under it and every later release."""

# Set for setup.py by the build hooks: the CUDA version of the target environment's torch,
# "" for a CPU-only torch (setup.py then skips the CUDA kernels unless SPARD_EXT_CUDA=1).
TARGET_CUDA_ENV = "SPARD_TARGET_TORCH_CUDA"

_PROBE = r"""
import importlib.metadata, importlib.util, json, os, re
spec = importlib.util.find_spec("torch")
info = None
if spec is not None and spec.submodule_search_locations:
    path = os.path.join(list(spec.submodule_search_locations)[0], "version.py")
    try:
        text = open(path, encoding="utf-8").read()
    except OSError:
        text = ""
    version = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", text, re.M)
    cuda = re.search(r"^cuda\b[^=\n]*=\s*(?:None|['\"]([^'\"]*)['\"])", text, re.M)
    try:
        dist = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if version:
        info = {"version": version.group(1), "dist": dist or version.group(1),
                "cuda": cuda.group(1) if cuda else None}
print(json.dumps(info))
"""


def target_torch() -> dict | None:
    """The torch the installing interpreter sees, or None: {"version": torch.__version__,
    "dist": the version its package metadata gives (what an index serves), "cuda": its CUDA
    version or None}. Reads files only, never imports torch (fast, and safe for a broken install).
    """
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE")}
    try:
        out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True,
                             text=True, timeout=120, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    import json

    try:
        info = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None
    return info if isinstance(info, dict) else None


def release(version: str) -> tuple[int, ...] | None:
    """(major, minor, patch) of a torch version string ("2.14.1+cu130" -> (2, 14, 1))."""
    m = re.match(r"^(\d+)\.(\d+)(?:\.(\d+))?", version)
    return tuple(int(g or 0) for g in m.groups()) if m else None


def is_index_release(version: str) -> bool:
    """Whether pip can fetch this torch again: a final release (a +cpu/+cuXYZ tag is fine),
    not a pre-release, nightly or local source build ("2.15.0a0+git1234")."""
    return re.fullmatch(r"\d+\.\d+(\.\d+)?(\+(cpu|cu\d+|rocm[\d.]+|xpu))?", version) is not None


def too_old_message(version: str) -> str:
    need = ".".join(map(str, MIN_TORCH))
    return (f"SPARD needs torch >= {need}, and this environment has torch {version}. "
            f"Upgrade torch first (pip install 'torch>={need}', with the index URL of the CUDA "
            f"variant you use), then install SPARD again.")


def torch_requirement(info: dict | None) -> str:
    """The build requirement for torch, given the target environment's torch (or None).

    A CPU-only target gets the same release in any variant (the CPU kernels compile the same
    against all of them). A CUDA target gets exactly its own build: ``===`` for the index's
    default build (so an index or find-links folder that also holds ``+cpu`` does not win),
    ``==`` with the local tag for a variant such as ``+cu126``, which then must be reachable
    from the index pip uses.
    """
    floor = "torch>=" + ".".join(map(str, MIN_TORCH))
    if info is None:
        return floor
    version = info["version"]
    dist = info.get("dist") or version
    rel = release(dist)
    if rel is None:
        return floor
    if rel[:2] < MIN_TORCH:
        raise SystemExit(too_old_message(version))
    if not is_index_release(dist):
        raise SystemExit(
            f"This environment's torch {version} is not a release on the package index, so an "
            f"isolated build cannot get the same torch. Build SPARD against it directly: "
            f"pip install --no-build-isolation . (needs setuptools, wheel and ninja installed)."
        )
    if not info.get("cuda"):
        return "torch==" + ".".join(map(str, rel))
    return f"torch=={dist}" if "+" in dist else f"torch==={dist}"


def _with_target_hint(hook, *args, **kwargs):
    info = target_torch()
    if info is not None and TARGET_CUDA_ENV not in os.environ:
        os.environ[TARGET_CUDA_ENV] = info.get("cuda") or ""
    return hook(*args, **kwargs)


# -- the hooks that differ from setuptools' ------------------------------------------------------
# The torch requirement first: a torch that cannot be built against stops here, before any output.
def get_requires_for_build_wheel(config_settings=None):
    torch = torch_requirement(target_torch())
    return _setuptools.get_requires_for_build_wheel(config_settings) + [torch]


def get_requires_for_build_editable(config_settings=None):
    torch = torch_requirement(target_torch())
    return _setuptools.get_requires_for_build_editable(config_settings) + [torch]


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    return _with_target_hint(_setuptools.build_wheel, wheel_directory, config_settings, metadata_directory)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    return _with_target_hint(_setuptools.build_editable, wheel_directory, config_settings, metadata_directory)
