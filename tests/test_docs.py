"""The documentation names no machine's paths: data and models are found relative to the project."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MACHINE_PATH = re.compile(r"(?<![\w.])/(work|home|root|Users|mnt|scratch)/")


def tracked_text_files():
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:  # not a git checkout (an sdist): scan the documentation folders
        return [p for p in [ROOT / "README.md", *ROOT.glob("docs/*.md"), *ROOT.glob("benchmarks/*.md")]]
    return [ROOT / f for f in out.stdout.splitlines()
            if f.endswith((".md", ".py", ".yaml", ".yml", ".toml", ".txt", ".cfg"))]


def test_no_absolute_machine_paths():
    found = []
    for path in tracked_text_files():
        for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
            if MACHINE_PATH.search(line):
                found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()[:100]}")
    assert not found, "absolute machine paths:\n" + "\n".join(found)
