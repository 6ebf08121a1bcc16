# Two commands set everything up on a fresh machine (see README):
#   make demo   - the main job: SPARD end to end on a tiny model, on the CPU
#   make test   - the test suite
# Both create (or reuse) the virtual environment in $(VENV), install torch and SPARD into it and
# build the extension. The CUDA kernels are compiled when a GPU is visible, or when
# SPARD_EXT_CUDA=1 / TORCH_CUDA_ARCH_LIST ask for them (.ci/run sets both, so CI compiles them).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.14.1
PYTEST_ARGS ?=
ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
export CUDA_HOME ?= /usr/local/cuda
endif

.PHONY: env build test demo bench cmake-test clean

env: $(VENV)/.installed

# torch first; SPARD editable without compiling (--no-build-isolation: the build tools and torch
# are those of the venv, nothing is fetched), then `build` compiles the extension in place once.
# (`pip install .` on its own works too: see "Installing" in the README.)
$(VENV)/.installed: setup.py pyproject.toml build_backend/spard_build.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)" setuptools wheel ninja numpy
	SPARD_EXT_SKIP_BUILD=1 $(PY) -m pip install -q --no-build-isolation -e ".[test,embed,adaptive]"
	touch $@

# Build the extension in place, and again after a change under csrc/ (ninja keeps the objects,
# so rebuilds are incremental).
KERNEL_SOURCES := $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda/*.cpp csrc/cuda/*.h)
build: $(VENV)/.built

$(VENV)/.built: $(VENV)/.installed $(KERNEL_SOURCES) build_backend/spard_toolchain.py
	$(PY) setup.py -q build_ext --inplace
	touch $@

test: build
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: build
	$(VENV)/bin/spard demo

bench: build
	$(PY) -m pytest benchmarks --benchmark-only --benchmark-columns=median,iqr,rounds -q

# The same sources built by CMake against libtorch, with the C++ tests run by ctest.
# With a CUDA build of torch, its CMake config looks for the toolkit: point it at CUDA_HOME and
# name the architectures so it does not probe for a GPU.
cmake-test: env
	TORCH_CUDA_ARCH_LIST="$${TORCH_CUDA_ARCH_LIST:-8.0;9.0}" cmake -S . -B build-cmake -DCMAKE_BUILD_TYPE=Release \
	  -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
	  $(if $(CUDA_HOME),-DCUDA_TOOLKIT_ROOT_DIR=$(CUDA_HOME))
	cmake --build build-cmake -j 2
	cd build-cmake && ctest --output-on-failure

clean:
	rm -rf build build-cmake spard_ext/_C*.so spard_ext/_build_info.json

# On a machine with an NVIDIA GPU, one command of under 10 minutes: build the CUDA kernels for
# that GPU, run every CUDA test and the GPU benchmarks, and write
# benchmarks/results/gpu_<device>.{md,json}. Uses the virtual environment when there is one,
# else the python3 that holds torch (GPU machines often come with it). Without a GPU it says so
# in one line and exits with status 2.
GPU_PY = $(if $(wildcard $(PY)),$(PY),python3)
.PHONY: gpu-report
gpu-report:
	$(GPU_PY) benchmarks/gpu_report.py
