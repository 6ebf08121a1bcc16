"""pip never installs or replaces torch for SPARD unless asked: the wheel's metadata requires no
torch (an extra, ``spard[torch]``, does), and without torch the import says what to install."""

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "build_backend"))

import spard_build  # noqa: E402

MIN = ".".join(map(str, spard_build.MIN_TORCH))


def test_torch_is_no_runtime_dependency_only_an_extra():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    names = [d.split(";")[0].split("[")[0].split("=")[0].split(">")[0].split("<")[0].strip().lower()
             for d in project["dependencies"]]
    assert "torch" not in names
    assert project["optional-dependencies"]["torch"] == [f"torch>={MIN}"]


def test_the_built_metadata_asks_for_torch_only_under_the_extra(tmp_path):
    # What pip reads before installing a wheel built from this tree (no compile: metadata only).
    out = subprocess.run([sys.executable, "-c",
                          "import sys; sys.path.insert(0, 'build_backend'); import spard_build; "
                          f"print(spard_build.prepare_metadata_for_build_wheel({str(tmp_path)!r}))"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    metadata = (tmp_path / out.stdout.strip().splitlines()[-1] / "METADATA").read_text(encoding="utf-8")
    torch_lines = [line for line in metadata.splitlines() if line.lower().startswith("requires-dist: torch")]
    assert torch_lines == [f'Requires-Dist: torch>={MIN}; extra == "torch"'], torch_lines


BLOCK_TORCH = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError("No module named 'torch'", name="torch")
sys.meta_path.insert(0, Block())
try:
    import spard_ext
except ImportError as e:
    print(type(e).__name__, e)
"""


def test_without_torch_the_import_says_what_to_install():
    out = subprocess.run([sys.executable, "-c", BLOCK_TORCH], cwd=ROOT, capture_output=True, text=True, timeout=120)
    line = out.stdout.strip()
    assert line.startswith("ImportError spard_ext: SPARD needs torch >= 2.10") and "\n" not in line
    assert "https://download.pytorch.org/whl/cpu" in line and "spard[torch]" in line
