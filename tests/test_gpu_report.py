"""benchmarks/gpu_report.py on the CPU: the one-line refusal without a GPU, file names, the
JUnit counts, and the measurements and writer run end to end on tiny sizes with a fake device."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report_mod():
    spec = importlib.util.spec_from_file_location("gpu_report", ROOT / "benchmarks" / "gpu_report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_without_a_gpu_one_line_and_status_2():
    proc = subprocess.run([sys.executable, "benchmarks/gpu_report.py"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert lines == ["gpu-report: no CUDA device is visible (torch.cuda.is_available() is False); "
                     "run it on a machine with an NVIDIA GPU"]
    assert "Traceback" not in proc.stderr


def test_preflight_names_the_missing_piece(report_mod, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "no CUDA device" in report_mod.preflight(skip_build=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "cannot build the CUDA kernels" in report_mod.preflight(skip_build=False)
    assert report_mod.preflight(skip_build=True) is None


@pytest.mark.parametrize("name,slug", [("NVIDIA H100 80GB HBM3", "nvidia-h100-80gb-hbm3"),
                                       ("NVIDIA H200", "nvidia-h200"), ("  ", "unknown-device"),
                                       ("Tesla V100-SXM2-16GB", "tesla-v100-sxm2-16gb")])
def test_device_slug(report_mod, name, slug):
    assert report_mod.device_slug(name) == slug


def test_parse_junit(report_mod, tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text(
        '<?xml version="1.0"?><testsuites><testsuite name="pytest" errors="0" failures="1" skipped="1" tests="4">'
        '<testcase classname="tests.test_a" name="test_ok"/><testcase classname="tests.test_a" name="test_ok2"/>'
        '<testcase classname="tests.test_a" name="test_bad"><failure message="x">boom</failure></testcase>'
        '<testcase classname="tests.test_a" name="test_skip"><skipped message="s"/></testcase>'
        '</testsuite></testsuites>')
    got = report_mod.parse_junit(xml)
    assert got["tests"] == 4 and got["passed"] == 2 and got["skipped"] == 1
    assert got["failed"] == ["tests.test_a::test_bad"]
    assert got["reasons"] == {"tests.test_a::test_bad": "x"}


def test_measure_and_write_on_tiny_sizes_with_a_fake_device(report_mod, tmp_path):
    deadline = report_mod.Deadline(300)
    report = {"date": "2026-01-01 00:00", "torch": torch.__version__, "cuda": None,
              "device": {"name": "Fake GPU 9000 (test)", "capability": "9.0", "multiprocessors": 1, "memory_gib": 1},
              "targets": report_mod.TARGETS, "build": {"ok": True, "seconds": 1.0, "arch": "9.0", "log_tail": ""},
              "tests": {"tests": 3, "passed": 2, "failures": 1, "errors": 0, "skipped": 0,
                        "failed": ["tests/test_x.py::test_y"], "ok": False, "seconds": 2.0}}
    report_mod.measure(report, "cpu", deadline, small=True)
    report["seconds_total"] = 3.0
    assert not report.get("errors"), report.get("errors")
    layouts = {(r["layout"], r["dtype"]) for r in report["project"]}
    assert layouts == {(lay, dt) for lay in ("lora", "lora layout", "flat", "flat misaligned") for dt in ("float32", "bfloat16")}
    for r in report["project"]:
        assert r["fused_ms"] > 0 and r["copy_floor_ms"] > 0 and r["bytes_moved"] == 5 * r["elements"] * (
            4 if r["dtype"] == "float32" else 2)
    assert all(r["picks"] > 0 for r in report["dpp"])
    # the CPU against itself: the parity code runs and finds nothing
    assert report["parity"]["project"]["mismatches"] == 0 and report["parity"]["dpp"]["mismatches"] == 0
    tp = report["train_parity"]  # the same fp32 SPARD run twice: identical, with projections taken
    assert tp["ok"] and tp["worst_adapter_rel"] == 0.0 and tp["spag_triggers_device"] > 0
    cost = report["train_cost"]["defenses"]
    assert cost["sft"]["step_ratio"] == 1.0 and {"spard", "lisa", "bds", "booster"} <= set(cost)
    assert all(d["step_ms"] > 0 and d["peak_mib"] > 0 for d in cost.values())

    scale = report["train_cost_at_scale"]  # tiny here: the largest micro-batch that fits is the first tried
    assert scale["setup"]["micro_batch"] == 8 and scale["setup"]["paper_micro_batch_fits"]
    assert set(scale["defenses"]) == {"sft", "spard", "lisa"} and scale["defenses"]["sft"]["step_ratio"] == 1.0
    assert all(d["step_ms"] > 0 for d in scale["defenses"].values())

    json_path, md_path = report_mod.write_report(report, tmp_path)
    assert json_path.name == "gpu_fake-gpu-9000-test.json" and md_path.name == "gpu_fake-gpu-9000-test.md"
    assert json.loads(json_path.read_text())["device"]["name"] == "Fake GPU 9000 (test)"
    md = md_path.read_text()
    assert md.startswith("# GPU report: Fake GPU 9000 (test)")
    assert "CUDA tests: 2 passed, 1 failed" in md and "`tests/test_x.py::test_y`" in md
    assert "| lora | float32 |" in md and "× copy bandwidth" in md
    assert "Targets (LoRA list)" in md and "## CPU-vs-CUDA parity" in md
    assert "| lora layout | bfloat16 |" in md and "Target (eager call on the LoRA list laid out flat" in md
    assert "- training (fp32 SPARD, 6 steps, tiny Llama): same on the GPU and the CPU" in md
    assert "## One optimizer step per defense" in md and "| spard |" in md
    assert "## One optimizer step per defense at the paper's scale" in md and "micro-batch 8 x accumulation 1" in md
    assert sorted(p.name for p in tmp_path.iterdir()) == [json_path.name, md_path.name]  # no temp files left


def test_a_failing_phase_is_reported_and_the_others_run(report_mod, monkeypatch, tmp_path):
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(report_mod, "bench_dpp", broken)
    report = {"date": "-", "torch": "-", "cuda": None, "seconds_total": 0.0,
              "device": {"name": "Fake GPU", "capability": "-", "multiprocessors": 1, "memory_gib": 1}}
    report_mod.measure(report, "cpu", report_mod.Deadline(300), small=True)
    assert report["dpp"] == [] and len(report["project"]) == 8
    assert report["errors"][0].startswith("dpp_greedy N=2000: RuntimeError: CUDA out of memory (simulated)")
    _, md_path = report_mod.write_report(report, tmp_path)
    assert "## Errors" in md_path.read_text()


def test_phases_past_the_budget_are_listed_not_run(report_mod):
    report = {}
    report_mod.measure(report, "cpu", report_mod.Deadline(0), small=True)
    assert report["project"] == [] and report["dpp"] == []
    assert "parity project_" in report["skipped_phases"] and len(report["skipped_phases"]) == 15
    assert report["skipped_phases"][-1] == "defense cost at 7B shapes"


def test_verdicts(report_mod):
    assert report_mod._verdict(0.85, 0.8) == "met"
    assert report_mod._verdict(0.75, 0.8) == "MISSED"
    assert report_mod._verdict(1.5, 2.0, higher_is_better=False) == "met"
    assert report_mod._verdict(None, 2.0) == "-"


def test_at_scale_falls_back_to_the_largest_micro_batch_that_fits(monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_train", ROOT / "benchmarks" / "gpu_train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    tried = []

    def fake(name, device, dtype, model_kw, seq, optim, lora_r):
        tried.append((name, optim["batch_size"], optim["grad_accum"]))
        if optim["batch_size"] > 2 or name == "lisa":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return {"step_ms": 100.0 if name == "sft" else 150.0, "peak_mib": 10.0, "build_s": 0.0}

    monkeypatch.setattr(train, "_one_defense_at_scale", fake)
    got = train.train_cost_at_scale("cpu", ["sft", "lisa", "spard"], batch=128)
    assert tried == [("sft", 8, 16), ("sft", 4, 32), ("sft", 2, 64), ("spard", 2, 64), ("lisa", 2, 64)]
    assert got["setup"]["micro_batch"] == 2 and not got["setup"]["paper_micro_batch_fits"]
    assert got["notes"] == ["SFT does not fit at micro-batch 8", "SFT does not fit at micro-batch 4"]
    assert got["defenses"]["lisa"] == {"error": "out of memory at micro-batch 2"}
    assert got["defenses"]["spard"]["step_ratio"] == 1.5
    assert got["setup"]["parameters"] == 6_738_415_616  # Llama-2-7B's count


def test_unverified_cuda_results_are_listed_with_what_this_run_says(report_mod, tmp_path):
    # every listed test exists (the list cannot silently point at a renamed test)
    for _, prefixes in report_mod.UNVERIFIED:
        for prefix in prefixes:
            module, _, name = prefix.partition("::")
            source = (ROOT / (module.replace(".", "/") + ".py")).read_text()
            assert not name or f"def {name}" in source, prefix
    xml = tmp_path / "j.xml"
    xml.write_text(
        '<?xml version="1.0"?><testsuites><testsuite name="pytest" errors="0" failures="1" skipped="1" tests="4">'
        '<testcase classname="tests.test_kernels_cuda" name="test_products_that_leave_float32_are_formed_in_float64[3]"/>'
        '<testcase classname="tests.test_kernels_cuda" name="test_products_that_leave_float32_are_formed_in_float64[4099]"/>'
        '<testcase classname="tests.test_kernels_cuda" name="test_dpp_greedy_does_not_spin_the_calling_thread">'
        '<failure message="assert 0.9 &lt; 0.5">x</failure></testcase>'
        '<testcase classname="tests.test_kernels_cuda" name="test_a_cpu_tensor_b_is_captured_by_value">'
        '<skipped message="s"/></testcase></testsuite></testsuites>')
    rows = {r["what"].split(" (")[0]: r["status"] for r in report_mod.unverified_status(report_mod.parse_junit(xml))}
    assert rows["project_ reduce forms products in float64"] == "passed"
    assert rows["dpp_greedy's host thread yields, then sleeps, while it waits for the device"] == "FAILED"
    assert rows["a CPU-tensor b is captured by value in a CUDA graph"] == "not run"
    assert rows["the CUDA library on the LibTorch stable ABI"] == "FAILED"  # one of its tests failed
    assert {r["status"] for r in report_mod.unverified_status(None)} == {"not run"}
    report = {"date": "-", "torch": "-", "cuda": None, "seconds_total": 0.0,
              "device": {"name": "Fake GPU", "capability": "-", "multiprocessors": 1, "memory_gib": 1}}
    _, md_path = report_mod.write_report(report, tmp_path)
    md = md_path.read_text()
    assert "## CUDA results unverified before this run" in md
    assert md.count("| not run |") == len(report_mod.UNVERIFIED)
