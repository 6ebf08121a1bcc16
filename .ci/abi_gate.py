"""The checks of the ABI gate (.ci/abi_gate runs them).

    python .ci/abi_gate.py audit --target 2.10 LIB...   symbols: the stable C shim only, and the
                                                         minimum torch its symbols imply
    python .ci/abi_gate.py load                          the installed spard_ext loads its CUDA
                                                         kernels under this torch (no GPU needed)

audit uses torch-abi-audit when it imports (.ci/abi_gate installs it), else an equivalent check
with nm: no undefined symbol of torch's C++ library (c10::, at::, torch::), and the minimum torch
from the version blocks of torch/csrc/stable/c/shim.h.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys


def fail(message: str) -> None:
    sys.exit(f"abi_gate: FAIL: {message}")


def version_tuple(v: str) -> tuple[int, int, int]:
    parts = [int(p) for p in re.findall(r"\d+", v)[:3]]
    return tuple(parts + [0] * (3 - len(parts)))


# ------------------------------------------------------------------------------------------------
# audit
# ------------------------------------------------------------------------------------------------
def audit_with_tool(lib: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "torch_abi_audit.cli", lib, "--json"], capture_output=True, text=True)
    if out.returncode not in (0, 1):
        fail(f"torch-abi-audit could not inspect {lib}: {out.stderr.strip()[-500:]}")
    report = json.loads(out.stdout)
    (entry,) = [e for e in report["extensions"] + report["bundled_libs"] if os.path.samefile(e["path"], lib)]
    t = entry["torch"]
    return {"stable": bool(t["stable"]), "others": list(t["unstable_symbols"]), "shim": t["stable_shim_count"],
            "min_torch": t["min_torch_version"], "pinned_by": t.get("version_defining_symbols", [])[:4],
            "tool": "torch-abi-audit"}


def shim_versions() -> dict[str, str]:
    """Shim function -> the torch release that added it, from the version blocks of the installed
    torch's stable shim header (functions outside a block: 2.10, the stable ABI's first target here)."""
    import torch.utils.cpp_extension as cpp

    versions: dict[str, str] = {}
    for header in ("torch/csrc/stable/c/shim.h",):
        path = os.path.join(cpp.include_paths()[0], header)
        current = "2.10.0"
        for line in open(path, encoding="utf-8"):
            m = re.match(r"#if TORCH_FEATURE_VERSION >= TORCH_VERSION_(\d+)_(\d+)_(\d+)", line)
            if m:
                current = ".".join(m.groups())
            for name in re.findall(r"\b((?:aoti_)?torch_\w+)\s*\(", line):
                versions.setdefault(name, current)
    return versions


def audit_with_nm(lib: str) -> dict:
    nm = shutil.which("nm")
    if nm is None:
        fail("neither torch-abi-audit nor nm (binutils) is available")
    out = subprocess.run([nm, "-D", "-C", "--undefined-only", lib], capture_output=True, text=True, check=True).stdout
    symbols = [line.split(None, 1)[-1].strip() for line in out.splitlines() if line.strip()]
    others = [s for s in symbols if re.match(r"(c10|at|torch)::", s) or re.search(r"[ (<,](c10|at|torch)::", s)]
    shim = [s for s in symbols if re.fullmatch(r"(aoti_torch|torch)_\w+", s)]
    versions = shim_versions()
    floor = max([versions.get(s, "2.10.0") for s in shim] or ["2.10.0"], key=version_tuple)
    return {"stable": not others and bool(shim), "others": others, "shim": len(shim), "min_torch": floor,
            "pinned_by": [s for s in shim if versions.get(s, "2.10.0") == floor][:4], "tool": "nm"}


def audit(libs: list[str], target: str) -> None:
    try:
        import torch_abi_audit  # noqa: F401

        check = audit_with_tool
    except ImportError:
        print("abi_gate: torch-abi-audit is not installed: using the equivalent nm check")
        check = audit_with_nm
    for lib in libs:
        r = check(lib)
        name = os.path.basename(lib)
        print(f"abi_gate: {name}: {r['shim']} stable-shim symbols, {len(r['others'])} outside it; "
              f"minimum torch {r['min_torch']} (set by {', '.join(r['pinned_by']) or '-'}) [{r['tool']}]")
        if r["others"] or not r["stable"]:
            fail(f"{name} uses torch outside the stable C shim: {r['others'][:10]}")
        if r["min_torch"] is None or version_tuple(r["min_torch"]) > version_tuple(target):
            fail(f"{name} needs torch >= {r['min_torch']}, above its stable target {target}")


# ------------------------------------------------------------------------------------------------
# load
# ------------------------------------------------------------------------------------------------
OPS = ("project_reduce", "project_apply_", "project_", "dpp_greedy_dense", "dpp_greedy_lowrank")


def load() -> None:
    import math

    import torch

    import spard_ext

    where = os.path.dirname(spard_ext.__file__)
    print(f"abi_gate: torch {torch.__version__} (CUDA {torch.version.cuda}) from {os.path.dirname(torch.__file__)}; "
          f"spard_ext built against torch {spard_ext._loader.read_build_info()['torch']} from {where}")
    if not spard_ext.CUDA_KERNELS:
        fail(f"the CUDA kernels did not load under torch {torch.__version__}")
    for op in OPS:
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"spard_ext::{op}", "CUDA"):
            fail(f"spard_ext::{op} has no CUDA kernel under torch {torch.__version__}")
    # The CUDA kernels' host-side checks, reached without a GPU: CPU tensors redispatched to them.
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    ops = torch.ops.spard_ext
    b = torch.tensor(0.0)
    z = torch.zeros(4)
    cases = [
        (lambda: ops.project_.default.redispatch(keys, [torch.zeros(2)], [torch.zeros(3)], b, math.inf, False),
         "project_: shape mismatch at index 0: x[0] has shape [2] but a[0] has shape [3]"),
        (lambda: ops.project_reduce.default.redispatch(keys, [torch.zeros(2, dtype=torch.int32)], [torch.zeros(2)], True),
         "project_reduce: x[0] must be float32, float16, bfloat16 or float64, got Int"),
        (lambda: ops.project_apply_.default.redispatch(keys, [z], [z], b, b, b, -1.0, False),
         "project_apply_: max_step must be >= 0 (use inf for no cap), got -1"),
        (lambda: ops.project_apply_.default.redispatch(keys, [z], [z], b, b, b, 1.0, False),
         "project_apply_: the CUDA kernels were called with tensors on cpu"),
        (lambda: ops.dpp_greedy_dense.default.redispatch(keys, torch.zeros(3, 4), 2, 0.0, None, None),
         "dpp_greedy_dense: kernel must be square (N x N), got shape [3, 4]"),
        (lambda: ops.dpp_greedy_lowrank.default.redispatch(keys, torch.zeros(5, 2), 2, 1e-6, 0.0, None, None, "qr"),
         "dpp_greedy_lowrank: method must be 'auto', 'cholesky' or 'inverse', got 'qr'"),
        (lambda: ops.dpp_greedy_lowrank.default.redispatch(keys, torch.zeros(5, 2), 2, 1e-6, 0.0, None, None, "auto"),
         "dpp_greedy_lowrank: the CUDA kernels were called with a cpu tensor"),
    ]
    for call, want in cases:
        try:
            call()
        except RuntimeError as e:
            if str(e).splitlines()[0] != want:
                fail(f"the CUDA kernel refused with {str(e).splitlines()[0]!r}, expected {want!r}")
        else:
            fail(f"the CUDA kernel did not refuse: expected {want!r}")
    print(f"abi_gate: under torch {torch.__version__}: the CUDA kernels are registered for {len(OPS)} ops and "
          f"their input checks answer ({len(cases)} cases)")


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("audit")
    a.add_argument("--target", required=True)
    a.add_argument("libs", nargs="+")
    sub.add_parser("load")
    args = parser.parse_args()
    if args.cmd == "audit":
        audit(args.libs, args.target)
    else:
        load()


if __name__ == "__main__":
    main()
