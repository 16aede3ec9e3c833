"""The scripts of docs/experiments, on a run of seconds."""
import importlib.util
import json
import os

import pytest

from tgda_attack import cli

EXPERIMENTS = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "experiments")


def experiment(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(EXPERIMENTS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_poison_fit_reads_a_run_and_agrees_with_its_metrics(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert cli.main(["run", "--attack", "min-max", "--mm-rounds", "2", "--mm-steps", "2", "--follower-steps", "2",
                     "--pretrain-epochs", "2", "--out", out, "--quiet"]) == 0
    poison_fit = experiment("poison_fit")
    rows = {name: rest for name, *rest in poison_fit.fit_report(out)}
    assert set(rows) == {"defender_pretrained", "defender_attacked", "defender_poisoned"}
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert rows["defender_pretrained"][0] == pytest.approx(metrics["clean_accuracy"], abs=1e-6)
    assert rows["defender_poisoned"][0] == pytest.approx(metrics["poisoned_accuracy"], abs=1e-6)
    # min-max labels each poison with its class of largest loss under the clean model: the clean model fits none
    assert rows["defender_pretrained"][2] == 0.0 and rows["defender_pretrained"][3] > 0
    capsys.readouterr()
    assert poison_fit.main([out, str(tmp_path / "missing")]) == 2
    captured = capsys.readouterr()
    assert f"| {out} | defender_poisoned |" in captured.out
    assert "missing lacks config.json" in captured.err and "\n" not in captured.err.strip()
