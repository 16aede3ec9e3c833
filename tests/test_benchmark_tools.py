"""benchmarks/attack_timing.py: the time per batch of a finished attack, from its epochs' seconds."""
import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _module(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_attack_timing_is_the_median_after_the_first_epoch(tmp_path):
    history = [{"epoch": e + 1, "seconds": s, "batches": 10} for e, s in enumerate([5.0, 1.0, 3.0, 2.0])]
    (tmp_path / "attack.json").write_text(json.dumps({"attack_seconds": 11.0, "history": history}))
    (tmp_path / "config.json").write_text(json.dumps({"dataset": "mnist", "defender": "nn", "device": "cpu",
                                                      "cuda_graphs": False}))
    timing = _module("attack_timing")
    result = timing.timing(str(tmp_path))
    assert result["seconds_per_batch_after_first_epoch"] == pytest.approx(0.2)  # median of 1, 3, 2 over 10 batches
    assert result["projected_minutes_for_paper_schedule"] == pytest.approx(0.2 * 12_060 / 60)
    assert timing.main([str(tmp_path / "missing")]) == 2
