"""Packaging: the build backend's torch requirement, CUDA toolchain detection, the sdist's
contents and the loader's refusal of a build made for another torch."""

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "build_backend"))

import spard_build  # noqa: E402
import spard_toolchain  # noqa: E402
from spard_ext import _loader  # noqa: E402


# ----------------------------------------------------------------------------------------------
# The torch the isolated build gets
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("info, expected", [
    (None, "torch>=2.10"),                                                           # no torch yet
    ({"version": "2.13.0+cpu", "dist": "2.13.0+cpu", "cuda": None}, "torch==2.13.0"),  # any variant
    ({"version": "2.14.1+cu130", "dist": "2.14.1", "cuda": "13.0"}, "torch===2.14.1"),  # not +cpu
    ({"version": "2.14.1+cu126", "dist": "2.14.1+cu126", "cuda": "12.6"}, "torch==2.14.1+cu126"),
])
def test_build_requires_the_target_environments_torch(info, expected):
    assert spard_build.torch_requirement(info) == expected


def test_build_stops_with_a_message_for_a_torch_older_than_the_minimum():
    with pytest.raises(SystemExit) as e:
        spard_build.torch_requirement({"version": "2.9.1+cpu", "dist": "2.9.1+cpu", "cuda": None})
    message = str(e.value)
    assert "torch >= 2.10" in message and "2.9.1" in message and "pip install 'torch>=2.10'" in message


def test_build_stops_for_a_torch_no_index_serves():
    with pytest.raises(SystemExit, match="--no-build-isolation"):
        spard_build.torch_requirement({"version": "2.15.0a0+git12ab", "dist": "2.15.0a0+git12ab", "cuda": None})


def test_minimum_torch_and_transformers_match_the_declared_dependencies():
    text = (ROOT / "pyproject.toml").read_text()
    assert f'"torch>={".".join(map(str, spard_build.MIN_TORCH))}"' in text
    assert '"transformers>=4.56.2"' in text  # the oldest release the suite passes with (.ci/floors)


def test_the_version_is_declared_once_per_place_and_agrees():
    import spard

    assert f'version = "{spard.__version__}"' in (ROOT / "pyproject.toml").read_text()


def test_target_torch_is_read_without_importing_it():
    info = spard_build.target_torch()  # the interpreter running the tests has torch
    import torch

    assert info["version"] == torch.__version__ and info["cuda"] == torch.version.cuda


# ----------------------------------------------------------------------------------------------
# CUDA toolchain
# ----------------------------------------------------------------------------------------------
def fake_toolkit(root: Path) -> Path:
    for rel in ("bin/nvcc", "include/cuda_runtime.h", "lib64/libcudart.so"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).touch()
    return root


def test_cuda_home_from_an_nvcc_wrapper_is_its_toolkit_not_the_wrappers_grandparent(tmp_path):
    # /usr/local/bin/nvcc as a wrapper script: torch's guess would be /usr/local (no libcudart).
    toolkit = fake_toolkit(tmp_path / "cuda-13.0")
    wrapper = tmp_path / "usr-local" / "bin" / "nvcc"
    wrapper.parent.mkdir(parents=True)
    wrapper.write_text(f"#!/bin/sh\nexec {toolkit}/bin/nvcc \"$@\"\n")
    home, how = spard_toolchain.find_cuda_home(environ={}, which=lambda _: str(wrapper),
                                               nvcc_top=lambda _: str(toolkit))
    assert home == str(toolkit) and how == f"found through {wrapper}"


def test_a_cuda_home_without_libcudart_is_refused_with_the_reason(tmp_path):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").touch()
    home, why = spard_toolchain.find_cuda_home(environ={"CUDA_HOME": str(tmp_path)})
    assert home is None and "lib64/libcudart.so" in why and "CUDA_HOME" in why


def plan(torch_cuda="13.0", flag="", target=None, nvcc="13.0", home="/cuda", gpu=True, arch=""):
    return spard_toolchain.cuda_plan(torch_cuda, flag, target, find=lambda: (home, home),
                                     version_of=lambda _: nvcc, gpu_visible=gpu, arch_list=arch)


def test_cuda_kernels_are_built_only_when_a_gpu_or_the_user_asks_for_them():
    home, why = plan(gpu=False)  # nvcc alone is no reason to spend minutes compiling for no GPU
    assert home is None and why.startswith("no GPU is visible") and "SPARD_EXT_CUDA=1" in why
    assert plan(gpu=False, arch="8.0;9.0") == ("/cuda", "TORCH_CUDA_ARCH_LIST=8.0;9.0, CUDA toolkit /cuda (/cuda)")
    assert plan(gpu=False, flag="1")[0] == "/cuda"
    assert plan(gpu=True)[1].startswith("a GPU is visible, CUDA toolkit /cuda")
    assert plan(gpu=True, flag="0") == (None, "SPARD_EXT_CUDA=0")


def test_setup_plans_with_the_visible_gpu_and_the_arch_list():
    text = (ROOT / "setup.py").read_text(encoding="utf-8")
    assert "gpu_visible=torch.cuda.is_available()" in text and 'arch_list=os.environ.get("TORCH_CUDA_ARCH_LIST"' in text


def test_cuda_kernels_are_built_only_when_the_toolchain_is_usable():
    assert plan()[0] == "/cuda"
    assert plan(torch_cuda=None) == (None, "a GPU is visible, but the torch compiled against is a CPU-only build")
    home, why = plan(nvcc="12.8")
    assert home is None and "nvcc 12.8" in why and "13.0" in why
    home, why = plan(target="")  # installing next to a CPU-only torch
    assert home is None and "CPU-only" in why
    assert plan(flag="0")[0] is None


def test_spard_ext_cuda_1_forces_the_build_or_says_why_not():
    assert plan(flag="1", target="")[0] == "/cuda"
    with pytest.raises(RuntimeError, match="nvcc 12.8"):
        plan(flag="1", nvcc="12.8")
    with pytest.raises(RuntimeError, match="CPU-only"):
        plan(flag="1", torch_cuda=None)


# ----------------------------------------------------------------------------------------------
# The loader
# ----------------------------------------------------------------------------------------------
CUDA_BUILD = {"torch": "2.14.1+cu130", "torch_cuda": "13.0", "cuda_kernels": True}


def test_loader_refuses_another_torch_release_naming_both_and_the_reinstall_command():
    with pytest.raises(ImportError) as e:
        _loader.plan(CUDA_BUILD, "2.13.0+cpu", None)
    message = str(e.value)
    assert "2.14.1+cu130" in message and "2.13.0+cpu" in message
    assert "pip install --no-cache-dir --force-reinstall --no-deps" in message


def test_loader_takes_a_cuda_build_under_a_cpu_torch_with_its_cpu_kernels():
    p = _loader.plan(CUDA_BUILD, "2.14.1+cpu", None)
    assert not p.load_cuda and "CPU-only" in p.note
    assert _loader.plan(CUDA_BUILD, "2.14.0+cu130", "13.0").load_cuda  # same release series
    with pytest.raises(ImportError, match="CUDA 13.0.*CUDA 12.6"):
        _loader.plan(CUDA_BUILD, "2.14.1+cu126", "12.6")


STABLE_BUILD = {"torch": "2.14.1+cu130", "torch_cuda": "13.0", "stable_abi": "2.10", "cuda_kernels": False}


def test_loader_takes_the_stable_cpu_kernels_under_any_torch_from_their_target_on():
    for version in ("2.13.0+cpu", "2.10.0", "2.14.1+cu130", "2.15.0.dev20260101", "3.0.0"):
        assert _loader.plan(STABLE_BUILD, version, None) == _loader.Plan(load_cuda=False, note="")
    with pytest.raises(ImportError) as e:
        _loader.plan(STABLE_BUILD, "2.9.1+cpu", None)
    assert "torch >= 2.10" in str(e.value) and "2.9.1+cpu" in str(e.value)
    assert "pip install 'torch>=2.10'" in str(e.value)


def test_loader_holds_the_cuda_kernels_of_a_stable_build_to_their_release_series():
    build = {**STABLE_BUILD, "cuda_kernels": True}
    assert _loader.plan(build, "2.14.0+cu130", "13.0").load_cuda  # same release series
    p = _loader.plan(build, "2.13.0+cpu", None)  # another release, CPU-only: the CPU kernels
    assert not p.load_cuda and "CPU-only" in p.note
    # another release with CUDA: the CUDA kernels cannot load, and CUDA tensors would meet ops
    # without a CUDA kernel, so the import stops with the versions and the rebuild command
    with pytest.raises(ImportError) as e:
        _loader.plan(build, "2.13.0+cu130", "13.0")
    message = str(e.value)
    assert message.startswith("spard_ext: SPARD's CUDA kernels were compiled against torch 2.14.1+cu130")
    assert "2.13.0+cu130" in message and "pip install --no-cache-dir --force-reinstall --no-deps" in message
    with pytest.raises(ImportError, match="CUDA 13.0.*CUDA 12.6"):
        _loader.plan(build, "2.14.1+cu126", "12.6")


STABLE_CUDA_BUILD = {**STABLE_BUILD, "cuda_kernels": True, "cuda_stable_abi": "2.10", "cuda_major": 13}


def test_loader_takes_the_stable_cuda_kernels_under_any_torch_of_their_cuda_major():
    for version, cuda in (("2.10.0+cu130", "13.0"), ("2.13.0+cu130", "13.0"), ("2.14.1", "13.2"), ("2.16.0", "13.9")):
        assert _loader.plan(STABLE_CUDA_BUILD, version, cuda) == _loader.Plan(load_cuda=True, note=""), version
    with pytest.raises(ImportError) as e:
        _loader.plan(STABLE_CUDA_BUILD, "2.13.0+cu128", "12.8")
    message = str(e.value)
    assert "\n" not in message and "CUDA major 13" in message and "CUDA major 12" in message
    assert "2.13.0+cu128" in message and "pip install --no-cache-dir --force-reinstall --no-deps" in message
    with pytest.raises(ImportError, match="need torch >= 2.10"):  # below the stable target: the CPU rule
        _loader.plan(STABLE_CUDA_BUILD, "2.9.1+cu130", "13.0")


def _import_with_record(tmp_path, record: dict):
    """Imports a copy of the built package whose build record is replaced by ``record``, and runs
    one op: (return code, stderr)."""
    import spard_ext

    pkg = tmp_path / "spard_ext"
    shutil.copytree(Path(spard_ext.__file__).parent, pkg)
    (pkg / _loader.BUILD_INFO).write_text(json.dumps(record))
    code = ("import torch, spard_ext; x = [torch.zeros(3)]; "
            "spard_ext.project_(x, [torch.ones(3)], -3.0); assert x[0].tolist() == [-1.0, -1.0, -1.0]")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(tmp_path)})
    return out.returncode, out.stderr


def test_a_stable_build_recorded_for_another_release_imports_and_runs(tmp_path):
    import spard_ext

    if not (_loader.read_build_info(str(Path(spard_ext.__file__).parent)) or {}).get("stable_abi"):
        pytest.skip("this build of spard_ext is not on the stable ABI (a CMake or older build)")
    code, err = _import_with_record(tmp_path, {"torch": "2.10.0+cpu", "torch_cuda": None, "stable_abi": "2.10",
                                               "cuda_kernels": False})
    assert code == 0, err[-2000:]
    code, err = _import_with_record(tmp_path / "newer", {"torch": "2.10.0+cpu", "torch_cuda": None,
                                                         "stable_abi": "99.0", "cuda_kernels": False})
    assert code != 0 and err.strip().splitlines()[-1].startswith("ImportError: spard_ext: SPARD's CPU kernels "
                                                                 "need torch >= 99.0")


def _import_faking_torch_cuda(tmp_path, record: dict, torch_cuda: str):
    """Imports a copy of the built package with ``record`` as its build record, under this torch
    with torch.version.cuda faked: (return code, stdout, stderr)."""
    import spard_ext

    pkg = tmp_path / "spard_ext"
    shutil.copytree(Path(spard_ext.__file__).parent, pkg)
    (pkg / _loader.BUILD_INFO).write_text(json.dumps(record))
    code = (f"import torch; torch.version.cuda = {torch_cuda!r}; import spard_ext; "
            "print(spard_ext.CUDA_KERNELS, torch._C._dispatch_has_kernel_for_dispatch_key('spard_ext::project_', 'CUDA'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(tmp_path)})
    return out.returncode, out.stdout, out.stderr


def _stable_cuda_build_here():
    import torch

    import spard_ext

    folder = Path(spard_ext.__file__).parent
    info = _loader.read_build_info(str(folder)) or {}
    if torch.version.cuda is None or not info.get("cuda_stable_abi") or _loader.library_path("_C_cuda", str(folder)) is None:
        pytest.skip("needs a build of spard_ext with stable-ABI CUDA kernels, under a CUDA build of torch")
    return info


def test_cuda_kernels_load_under_a_torch_recorded_as_another_release_of_their_cuda_major(tmp_path):
    info = _stable_cuda_build_here()
    # As if built against torch 2.10 for this CUDA major, and loaded under another minor CUDA version.
    major = int(info["cuda_major"])
    record = {**info, "torch": f"2.10.0+cu{major}0", "torch_cuda": f"{major}.0"}
    code, out, err = _import_faking_torch_cuda(tmp_path, record, f"{major}.9")
    assert code == 0, err[-2000:]
    assert out.split() == ["True", "True"]  # loaded, and the ops have their CUDA kernels


def test_cuda_kernels_under_another_cuda_major_stop_the_import_with_one_line(tmp_path):
    info = _stable_cuda_build_here()
    major = int(info["cuda_major"])
    code, out, err = _import_faking_torch_cuda(tmp_path, info, f"{major - 1}.8")
    assert code != 0
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"ImportError: spard_ext: SPARD's CUDA kernels were compiled for CUDA {info['torch_cuda']} "
                           f"(CUDA major {major}")
    assert f"CUDA major {major - 1}" in last and "pip install --no-cache-dir --force-reinstall --no-deps" in last


@pytest.mark.parametrize("library,record", [("_C", "stable_abi"), ("_C_cuda", "cuda_stable_abi")])
def test_kernels_call_torch_only_through_the_stable_c_shim(library, record):
    # What makes one build load under many torch releases: no symbol of torch's C++ library
    # (c10::, at::, torch::), whose ABI changes between releases; only the C shim.
    import spard_ext

    folder = Path(spard_ext.__file__).parent
    if not (_loader.read_build_info(str(folder)) or {}).get(record):
        pytest.skip(f"this build of spard_ext has no {library} on the stable ABI (a CMake, CPU-only or older build)")
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("needs nm (binutils)")
    out = subprocess.run([nm, "-D", "-C", "--undefined-only", _loader.library_path(library, str(folder))],
                         capture_output=True, text=True, check=True).stdout
    symbols = [line.split(None, 1)[-1].strip() for line in out.splitlines() if line.strip()]
    cxx = [s for s in symbols if re.match(r"(c10|at|torch)::", s) or re.search(r"[ (<,](c10|at|torch)::", s)]
    assert not cxx, f"torch C++ symbols in {library}: {cxx[:10]}"
    shim = [s for s in symbols if s.startswith(("aoti_torch_", "torch_"))]
    assert len(shim) >= 10, symbols  # it does call torch, through the shim


def test_import_under_another_torch_stops_with_the_message_not_a_loader_error(tmp_path):
    import torch

    import spard_ext

    # The built package, with its record rewritten as if compiled against another release before
    # the stable ABI (no "stable_abi" entry: held to its release series).
    pkg = tmp_path / "spard_ext"
    shutil.copytree(Path(spard_ext.__file__).parent, pkg)
    other = "2.3.0+cpu" if not torch.__version__.startswith("2.3.") else "2.4.0+cpu"
    (pkg / _loader.BUILD_INFO).write_text(json.dumps({"torch": other, "torch_cuda": None,
                                                      "cuda_kernels": False}))
    out = subprocess.run([sys.executable, "-c", "import spard_ext"], cwd=tmp_path, capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: spard_ext: SPARD's kernels were compiled against torch " + other)
    assert torch.__version__ in last


# ----------------------------------------------------------------------------------------------
# The sdist builds on its own
# ----------------------------------------------------------------------------------------------
def test_sdist_holds_the_sources_headers_and_build_backend(tmp_path):
    out = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, env={**os.environ, "SPARD_EXT_CUDA": "0"})
    assert out.returncode == 0, out.stderr[-2000:]
    (sdist,) = tmp_path.glob("spard-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for path in ("pyproject.toml", "setup.py", "README.md", "build_backend/spard_build.py",
                 "build_backend/spard_toolchain.py", "csrc/project.h", "csrc/project_cpu.h", "csrc/stable.h",
                 "csrc/message.h", "csrc/lane_sum.h", "csrc/module.cpp", "csrc/cuda/project_cuda.cu",
                 "csrc/cuda/dpp_greedy.cu", "csrc/cuda/checks.h", "csrc/cuda/checks.cpp",
                 "CMakeLists.txt", "docs/algorithms.md", "tests/test_project.py", "spard_ext/_loader.py"):
        assert path in names, path
    assert not [n for n in names if n.endswith(".so") or n.endswith(_loader.BUILD_INFO)]


# ----------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------
def test_spard_version_and_help(capsys):
    import spard
    from spard.cli import build_parser

    with pytest.raises(SystemExit) as e:
        build_parser(["--version"]).parse_args(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"spard {spard.__version__}"
    description = build_parser([]).description
    # The help opens with a whole sentence, not a docstring cut at its first line break.
    assert description[0].isupper() and description.endswith(".") and "\n" not in description
