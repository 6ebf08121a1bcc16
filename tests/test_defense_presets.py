"""Registry presets that follow a named source: spard-official is the released code's form."""

import pytest

from spard.defenses import make_defense
from spard.spag import SafetyProjector
from test_one_trainer import train
from test_spag import one_thread  # noqa: F401  (autouse fixture)


def test_spard_official_uses_the_released_fixed_tau(monkeypatch):
    d = make_defense("spard-official")
    assert d.settings.mode == "official" and d.settings.tau == 0.2
    # τ is not calibrated: the run's projector holds the released 0.2.
    def no_calibration(self, *a, **k):
        raise AssertionError("spard-official calibrated tau")

    monkeypatch.setattr(SafetyProjector, "calibrate_tau", no_calibration)
    _, run = train("spard-official", batch_size=4, grad_accum=1, steps=2)
    assert run["summary"]["spag"]["tau"] == pytest.approx(0.2)


def test_spard_official_tau_stays_settable():
    assert make_defense("spard-official", tau=0.5).settings.tau == 0.5
    assert make_defense("spard-official", tau=None).settings.tau is None  # calibrated, as before
    assert make_defense("spard").settings.tau is None  # the paper form keeps its calibration


def test_the_bench_docs_say_spard_official_uses_the_released_tau():
    from pathlib import Path

    bench = (Path(__file__).resolve().parents[1] / "docs" / "bench.md").read_text(encoding="utf-8")
    row = next(line for line in bench.splitlines() if line.startswith("| `spard-official` |"))
    assert "fixed τ = 0.2" in row and "settable" in row
