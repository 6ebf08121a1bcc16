import sys
from pathlib import Path

# Benchmarks share helpers with the tests (reference inputs); make them importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
