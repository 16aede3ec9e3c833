"""The three-stage protocol and the tgda-attack command, at tiny sizes on the embedded sample."""
import dataclasses
import json
import os
import shutil

import pytest
import torch

from tgda_attack import cli, protocol
from tgda_attack.attacks import ATTACKS
from tgda_attack.config import MAX_RETRAININGS

TINY = dict(dataset="mnist-sample", defender="lr", pretrain_epochs=1, pretrain_batch_size=1000,
            attacker_epochs=0, attack_epochs=1, attack_batch_size=1000, follower_steps=1, solver_iterations=2)
TINY_FLAGS = [arg for key, value in TINY.items() for arg in ("--" + key.replace("_", "-"), str(value))] + ["--quiet"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run"))
    assert cli.main(["run", "--epsilon", "0.03", "--seed", "0", "--out", out, *TINY_FLAGS]) == 0
    return out


def test_run_writes_the_output_folder(tiny_run):
    for name in ("config.json", "metrics.json", "poisons.pt", "poisons.png", "defender_pretrained.pt",
                 "attacker_pretrained.pt", "attacker_attacked.pt", "defender_poisoned.pt"):
        assert os.path.exists(os.path.join(tiny_run, name)), name
    with open(os.path.join(tiny_run, "metrics.json")) as fh:
        metrics = json.load(fh)
    for key in ("dataset", "defender", "attack", "epsilon", "n_train", "n_poison", "clean_accuracy",
                "poisoned_accuracy", "accuracy_drop", "attack_seconds", "seed", "mean_perturbation_l2",
                "poison_pairwise_l2", "source_pairwise_l2"):
        assert key in metrics
    assert metrics["n_train"] == 2800 and metrics["n_poison"] == 84
    assert metrics["accuracy_drop"] == pytest.approx(metrics["clean_accuracy"] - metrics["poisoned_accuracy"])
    # the trainings' test accuracy after their last epochs: the last is the reported one (one epoch here)
    clean, poisoned = metrics["clean_accuracy_last_epochs"], metrics["poisoned_accuracy_last_epochs"]
    assert clean == {"epochs": [1], "accuracy": [metrics["clean_accuracy"]], "median": metrics["clean_accuracy"],
                     "mean": metrics["clean_accuracy"], "spike": False}
    assert poisoned["accuracy"] == [metrics["poisoned_accuracy"]] and poisoned["spike"] is False
    assert metrics["accuracy_drop_median_last_epochs"] == pytest.approx(metrics["accuracy_drop"])
    poisons = torch.load(os.path.join(tiny_run, "poisons.pt"), weights_only=True)
    assert poisons["x_poison"].shape == (84, 1, 28, 28) and poisons["x_poison"].abs().max() <= 1


def test_poison_statistics_closed_form():
    source = torch.zeros(3, 1, 2, 2)
    poison = torch.stack([torch.zeros(1, 2, 2), torch.ones(1, 2, 2), torch.ones(1, 2, 2)])  # two identical
    stats = protocol.poison_statistics(source, poison)
    assert stats["mean_perturbation_l2"] == pytest.approx((0 + 2 + 2) / 3)  # |(1,1,1,1)| = 2
    assert stats["mean_perturbation_linf"] == pytest.approx(2 / 3) and stats["max_perturbation_linf"] == 1.0
    assert stats["poison_pairwise_l2"] == pytest.approx((2 + 2 + 0) * 2 / 6)
    assert stats["source_pairwise_l2"] == 0.0


def test_retraining_follows_the_pretrain_procedure(tiny_run):
    cfg = protocol.Config.from_dict({**TINY, "seed": 0}).resolved()
    splits = protocol.load_splits(cfg)
    pretrained = torch.load(os.path.join(tiny_run, "defender_pretrained.pt"), weights_only=True)
    again = protocol.train_defender(cfg, splits.x_train, splits.y_train)  # the procedure retraining uses
    for k, v in again.state_dict().items():
        assert torch.equal(v, pretrained[k]), k
    # the test stage with the same procedure on D_tr U D_p differs only by the poisons
    poisons = torch.load(os.path.join(tiny_run, "poisons.pt"), weights_only=True)
    retrained = protocol.train_defender(cfg, torch.cat([splits.x_train, poisons["x_poison"]]),
                                        torch.cat([splits.y_train, poisons["y_poison"]]))
    saved = torch.load(os.path.join(tiny_run, "defender_poisoned.pt"), weights_only=True)
    for k, v in retrained.state_dict().items():
        assert torch.equal(v, saved[k]), k


def test_retrainings_retrain_the_same_poisons_under_other_training_seeds_and_resume(tmp_path, monkeypatch, capsys):
    out = str(tmp_path)
    flip = ["--attack", "label-flip"]
    assert cli.main(["run", *flip, "--retrainings", "3", "--seed", "4", "--out", out, *TINY_FLAGS]) == 0
    with open(os.path.join(out, "metrics.json")) as fh:
        metrics = json.load(fh)
    r = metrics["retrainings"]
    assert r["seeds"] == [4, 4 + 2 ** 20, 4 + 2 ** 21]
    assert [r["clean_accuracy"][0], r["poisoned_accuracy"][0]] == [metrics["clean_accuracy"], metrics["poisoned_accuracy"]]
    cfg = protocol.Config.from_dict({**TINY, "attack": "label-flip"}).resolved()
    splits = protocol.load_splits(cfg)
    poisons = torch.load(os.path.join(out, "poisons.pt"), weights_only=True)
    x_all = torch.cat([splits.x_train, poisons["x_poison"]])
    y_all = torch.cat([splits.y_train, poisons["y_poison"]])
    for k, seed in enumerate(r["seeds"]):  # each pair: the pretrain procedure of that seed, on D_tr and on D_tr U D_p
        clean = protocol.accuracy(protocol.train_defender(cfg, splits.x_train, splits.y_train, seed=seed), splits.x_test,
                                  splits.y_test)
        poisoned = protocol.accuracy(protocol.train_defender(cfg, x_all, y_all, seed=seed), splits.x_test, splits.y_test)
        assert (r["clean_accuracy"][k], r["poisoned_accuracy"][k]) == (clean, poisoned), seed
        assert r["accuracy_drop"][k] == pytest.approx(clean - poisoned)
    assert len(set(r["poisoned_accuracy"])) > 1  # the seeds do train differently
    assert r["accuracy_drop_mean"] == pytest.approx(sum(r["accuracy_drop"]) / 3)
    # each pair's trainings recorded their last epochs (one here): the drop between the medians is the drop
    assert r["accuracy_drop_median_last_epochs"] == pytest.approx(r["accuracy_drop"])
    assert r["accuracy_drop_median_last_epochs"][0] == metrics["accuracy_drop_median_last_epochs"]
    assert r["spiked_seeds"] == [] and r["accuracy_drop_median_last_epochs_mean"] == pytest.approx(r["accuracy_drop_mean"])
    printed = capsys.readouterr().out
    assert "Drop over 3 retrainings (training seeds 4 + k * 2^20, k = 0 .. 2" in printed and "between the medians of the last epochs" in printed
    # pairs kept before the medians were recorded are read back without them
    kept = json.load(open(os.path.join(out, "retrainings.json")))
    del kept["last_epochs"]
    with open(os.path.join(out, "retrainings.json"), "w") as fh:
        json.dump(kept, fh)
    again = protocol.stage_evaluate(out)["retrainings"]
    assert again["accuracy_drop"] == r["accuracy_drop"]
    assert again["accuracy_drop_median_last_epochs"] == [r["accuracy_drop_median_last_epochs"][0], None, None]
    # stage 3 again: the finished pairs are read back from retrainings.json; only the run's own retraining is redone
    calls = []
    original = protocol.train_defender
    monkeypatch.setattr(protocol, "train_defender", lambda *a, **k: calls.append(k.get("desc")) or original(*a, **k))
    os.remove(os.path.join(out, "retrainings.json"))
    protocol.stage_evaluate(out)  # the pairs with their medians again
    calls.clear()
    assert protocol.stage_evaluate(out)["retrainings"] == r
    assert calls == ["retrain defender"]
    # other poisons (the digest of poisons.pt differs): every pair is trained again
    poisons["x_poison"] = poisons["x_poison"].flip(0)
    torch.save(poisons, os.path.join(out, "poisons.pt"))
    calls.clear()
    protocol.stage_evaluate(out)
    assert len(calls) == 1 + 2 * 2
    with open(os.path.join(out, "retrainings.json"), "w") as fh:
        fh.write("{not json")  # a damaged partial file: its pairs are trained again, nothing else happens
    calls.clear()
    assert protocol.stage_evaluate(out)["retrainings"]["seeds"] == [4, 4 + 2 ** 20, 4 + 2 ** 21] and len(calls) == 5
    # a retraining that diverges is that seed's result (None), not the end of the stage
    os.remove(os.path.join(out, "retrainings.json"))

    def diverging(cfg, x, y, *a, desc="", **k):
        if desc == f"retrain defender, seed {4 + 2 ** 20}":
            raise FloatingPointError("diverged")
        return original(cfg, x, y, *a, desc=desc, **k)
    monkeypatch.setattr(protocol, "train_defender", diverging)
    r = protocol.stage_evaluate(out)["retrainings"]
    assert r["accuracy_drop"][1] is None and r["diverged_seeds"] == [4 + 2 ** 20] and r["poisoned_accuracy"][1] is None
    assert r["accuracy_drop_mean"] == pytest.approx((r["accuracy_drop"][0] + r["accuracy_drop"][2]) / 2)


def test_no_two_run_seeds_share_a_retraining_seed():
    """Under seeds s .. s+K-1 the blocks of neighbouring run seeds overlapped, and a label flip by a fixed rule gave
    seed 0 and seed 1 the same pairs, counted twice in the bench's pooled drops."""
    blocks = [protocol.retraining_seeds(s, 5) for s in range(200)] + [protocol.retraining_seeds(2 ** 20 - 1, 5)]
    every = [t for block in blocks for t in block]
    assert len(set(every)) == len(every) and all(block[0] == s for block, s in zip(blocks, range(200)))
    most = protocol.retraining_seeds(0, MAX_RETRAININGS)
    assert len(set(most)) == MAX_RETRAININGS and all(0 <= t < 2 ** 32 for t in most)  # a run's seed range
    assert all(0 <= t < 2 ** 32 for t in protocol.retraining_seeds(2 ** 32 - 1, 3))
    # torch's CPU generator seeds from the low 32 bits: seeds 2**32 apart would be one training
    assert torch.equal(torch.rand(3, generator=torch.Generator().manual_seed(4)),
                       torch.rand(3, generator=torch.Generator().manual_seed(4 + 2 ** 32)))


def test_the_stage_helpers_fill_in_the_dataset_defaults_of_a_config():
    # from Python a user may pass a Config as written (its None settings not yet filled in)
    raw = protocol.Config(dataset="mnist-sample", defender="lr", pretrain_epochs=1, seed=3)
    assert raw.pretrain_batch_size is None
    full = raw.resolved()
    splits = protocol.load_splits(raw)
    assert torch.equal(splits.x_train, protocol.load_splits(full).x_train)
    a = protocol.train_defender(raw, splits.x_train[:200], splits.y_train[:200])
    b = protocol.train_defender(full, splits.x_train[:200], splits.y_train[:200])
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(v, w), k


def test_stages_run_separately_and_match_run(tiny_run, tmp_path):
    out = str(tmp_path)
    assert cli.main(["pretrain", "--epsilon", "0.03", "--seed", "0", "--out", out, *TINY_FLAGS]) == 0
    assert cli.main(["attack", "--out", out, "--quiet"]) == 0
    assert cli.main(["evaluate", "--out", out, "--quiet"]) == 0
    a = torch.load(os.path.join(out, "poisons.pt"), weights_only=True)
    b = torch.load(os.path.join(tiny_run, "poisons.pt"), weights_only=True)
    assert torch.equal(a["x_poison"], b["x_poison"])


def test_label_flip_and_seeds_summary(tmp_path, capsys):
    out = str(tmp_path)
    assert cli.main(["run", "--attack", "label-flip", "--seeds", "0", "1", "--out", out, *TINY_FLAGS]) == 0
    with open(os.path.join(out, "summary.json")) as fh:
        summary = json.load(fh)
    assert summary["seeds"] == [0, 1] and set(summary["accuracy_drop"]) == {"mean", "std"}
    runs = [json.load(open(os.path.join(out, f"seed_{s}", "metrics.json"))) for s in (0, 1)]
    assert summary["accuracy_drop_median_last_epochs"]["mean"] == pytest.approx(
        sum(r["accuracy_drop_median_last_epochs"] for r in runs) / 2)
    printed = capsys.readouterr().out
    assert "mean ± std" in printed and "drop, medians of the last epochs" in printed


def test_a_label_flip_from_d_v_is_read_back_against_d_v(tmp_path):
    out = str(tmp_path)
    assert cli.main(["run", "--attack", "label-flip", "--flip-rule", "nearest", "--flip-pool", "val", "--out", out,
                     *TINY_FLAGS]) == 0
    cfg = protocol.Config.from_dict({**TINY, "seed": 0}).resolved()
    splits = protocol.load_splits(cfg)
    poisons = torch.load(os.path.join(out, "poisons.pt"), weights_only=True)
    idx = poisons["source_indices"]
    assert poisons["source_pool"] == "val" and len(idx) == 84  # the budget is 3% of D_tr, the images D_v's
    assert torch.equal(poisons["x_poison"], splits.x_val[idx]) and bool((poisons["y_poison"] != splits.y_val[idx]).all())
    with open(os.path.join(out, "metrics.json")) as fh:
        metrics = json.load(fh)
    assert metrics["source_pool"] == "val" and metrics["max_perturbation_linf"] == 0  # measured against D_v's images
    # a damaged pool or an index past D_v is named before any retraining
    for damage, what in (({"source_pool": "test"}, "source pool 'test'"),
                         ({"source_indices": idx + len(splits.y_val)}, f"outside the {len(splits.y_val)} points of its source pool")):
        torch.save({**poisons, **damage}, os.path.join(out, "poisons.pt"))
        with pytest.raises(protocol.RunFolderError, match=what):
            protocol.stage_evaluate(out)


def test_pixel_attacker_runs_without_an_attacker_network(tmp_path):  # with the solves recorded (--cuda-graphs)
    out = str(tmp_path)
    assert cli.main(["run", "--attacker", "pixels", "--alpha", "100", "--cuda-graphs", "--out", out, *TINY_FLAGS]) == 0
    assert not os.path.exists(os.path.join(out, "attacker_pretrained.pt"))
    assert not os.path.exists(os.path.join(out, "attacker_attacked.pt"))
    with open(os.path.join(out, "config.json")) as fh:
        config = json.load(fh)
    assert config["attacker"] == "pixels" and config["cuda_graphs"] is True
    cfg = protocol.Config.from_dict({**TINY, "seed": 0}).resolved()
    splits = protocol.load_splits(cfg)
    poisons = torch.load(os.path.join(out, "poisons.pt"), weights_only=True)
    source = splits.x_train[poisons["source_indices"]]
    assert torch.equal(poisons["y_poison"], splits.y_train[poisons["source_indices"]])
    assert not torch.equal(poisons["x_poison"], source) and poisons["x_poison"].abs().max() <= 1


def test_unknown_attacker_in_a_config_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown attacker 'gan'"):
        protocol.Config(attacker="gan").resolved()


def test_config_file_and_command_line(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('defender = "nn"\nepsilon = 0.05\n')
    args = cli.build_parser().parse_args(["run", "--out", "x", "--config", str(path), "--epsilon", "0.1"])
    cfg = cli.config_from_args(args)
    assert cfg.defender == "nn" and cfg.epsilon == 0.1 and cfg.pretrain_epochs == protocol.DATASET_DEFAULTS["mnist-sample"]["pretrain_epochs"]


@pytest.mark.parametrize("argv, message", [
    (["run", "--out", "x", "--defender", "svm"], "invalid choice"),
    (["run", "--out", "x", "--attacker", "gan"], "invalid choice"),
    (["run"], "--out"),
    (["run", "--out", "x", "--epsilon", "lots"], "invalid float"),
    (["attack", "--out", "/nonexistent/folder"], "run the earlier stage"),
    (["run", "--out", "x", "--config", "/nonexistent.json"], "does not exist"),
    (["run", "--out", "x", "--dataset", "mnist", "--data-root", "/nonexistent"], "MNIST not found"),
])
def test_usage_errors_exit_2_with_one_line(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tgda-attack: error:") and message in err and "\n" not in err


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "0", "-1"], "--seeds: seed must be in 0 .. 2**32 - 1, got -1"),  # once: seed 0 ran, then a traceback
    (["--seeds", "1", "1"], "--seeds lists a seed twice"),
    (["--seed", "-1"], "seed must be in 0 .. 2**32 - 1"),  # torch would wrap it onto seed 2**64 - 1
    (["--split-seed", str(2 ** 32)], "split-seed must be in"), (["--retrainings", "4097"], "retrainings must be at most 4096"),
])
@pytest.mark.parametrize("command", ["run", "pretrain"])
def test_bad_seeds_are_one_line_before_any_run(command, argv, message, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main([command, "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tgda-attack: error:") and message in err and "\n" not in err
    assert not out.exists()


@pytest.mark.parametrize("command", ["run", "pretrain", "attack", "evaluate", "bench"])
def test_every_command_prints_its_help(command, capsys):  # a "3%" in a help text once crashed --help
    with pytest.raises(SystemExit) as done:
        cli.main([command, "--help"])
    assert done.value.code == 0 and "--out" in capsys.readouterr().out


def test_a_busy_machine_gets_a_note_and_threads_set_the_run(tmp_path, monkeypatch, capsys):
    cores = len(os.sched_getaffinity(0))
    monkeypatch.setattr(os, "getloadavg", lambda: (cores + 1.0, 0.0, 0.0))
    assert "--threads 1" in cli.busy_cpu_note(2) and cli.busy_cpu_note(1) is None
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert cli.busy_cpu_note(cores) is None
    assert f"{cores + 1} threads on {cores} cores" in cli.busy_cpu_note(cores + 1)  # an idle machine, too many threads
    before = torch.get_num_threads()
    try:
        assert cli.main(["run", *TINY_FLAGS, "--attack", "label-flip", "--threads", "1", "--out", str(tmp_path)]) == 0
        assert torch.get_num_threads() == 1
        with open(os.path.join(tmp_path, "attack.json")) as fh:
            assert json.load(fh)["threads"] == 1  # recorded: a seed fixes a run's bits for one thread count
    finally:
        torch.set_num_threads(before)


def test_config_round_trips_through_json(tiny_run):
    with open(os.path.join(tiny_run, "config.json")) as fh:
        values = json.load(fh)
    values.pop("split")
    assert dataclasses.asdict(protocol.Config.from_dict(values)) == values


def test_diverging_training_is_an_error():
    from tgda_attack.training import train_classifier

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    x, y = torch.randn(20, 1, 2, 2) * 1e30, torch.randint(0, 3, (20,))  # float32 logits overflow after one step
    with pytest.raises(FloatingPointError, match="diverged"):
        train_classifier(model, x, y, epochs=5, batch_size=5, lr=1e6, seed=0)


@pytest.mark.parametrize("argv, message", [
    (["--epsilon", "0"], "epsilon"), (["--epsilon", "-0.1"], "epsilon"), (["--epsilon", "1.5"], "epsilon"),
    (["--device", "cuda:7"], "device"), (["--device", "tpu"], "device"), (["--pretrain-batch-size", "0"], "pretrain-batch-size"),
    (["--alpha", "0"], "alpha"), (["--cuda-graphs", "--defender", "cnn"], "cuda-graphs"),
    (["--game-solver", "fr", "--leader", "defender"], "game-solver fr needs --leader attacker"),
    (["--game-solver", "fr", "--warm-start", "cold"], "warm-start partial"),
    (["--gc-steps", "-1"], "gc-steps must be an integer >= 1"),
    # an attack of no steps would report its starting points (copies, or a label flip) under its name, as TGDA's 0 epochs
    (["--attack", "gradient-canceling", "--gc-steps", "0"], "gc-steps must be an integer >= 1"),
    (["--attack", "min-max", "--mm-steps", "0"], "mm-steps must be an integer >= 1"),
    (["--attack", "metapoison", "--mp-steps", "0"], "mp-steps must be an integer >= 1"),
    (["--attack", "back-gradient", "--bg-unroll-steps", "0"], "bg-unroll-steps must be an integer >= 1"),
    (["--attack", "gradient-canceling", "--gc-target", "label-flip", "--target-epochs", "0"], "target-epochs must be an integer >= 1"), (["--target-epsilon", "0"], "target-epsilon must be a fraction"),
    (["--threads", "-1"], "threads must be >= 0"), (["--threads", "100000"], "at most 1024"),
    (["--gc-recipe", "mine"], "invalid choice"),
    (["--pretrain-max-grad-norm", "-1"], "pretrain-max-grad-norm must be >= 0"),
    (["--attack", "gradient-canceling", "--gc-recipe", "authors", "--gc-labels", "reverse"], "gc-recipe authors"),
    (["--dataset", "cifar10", "--defender", "gc-cnn"], "is an MNIST model"),
    (["--feasible-set", "sanitized"], "add --attacker pixels"), (["--feasible-quantile", "0"], "feasible-quantile"),
    (["--attack", "label-flip", "--feasible-set", "sanitized"], "does not keep its poisons in a feasible set"),
    (["--attack", "gradient-canceling", "--gc-recipe", "authors", "--dataset", "cifar10"], "MNIST recipe"),
    (["--attack", "gradient-canceling", "--gc-recipe", "authors", "--feasible-set", "sanitized"], "drop --feasible-set"),
    (["--attack", "label-flip", "--flip-select", "confused-pairs"], "needs --flip-rule nearest"),
    (["--attack", "label-flip", "--flip-pool", "test"], "invalid choice"),
    (["--attack", "label-flip", "--flip-pool", "val", "--epsilon", "0.5"], "--epsilon <= 0.429"),
    (["--attack", "label-flip", "--flip-pool", "val", "--perfect-knowledge"], "would take the poisons from D_test"),
    (["--epsilon", "0.0001"], "makes no poison"), (["--pretrain-epochs", "0"], "pretrain-epochs must be >= 1"),
    (["--attack-epochs", "0"], "would not move its poisons"), (["--leader-steps", "0"], "would not move its poisons"),
    (["--solver-iterations", "0"], "implicit term alone"), (["--seeds", "0", "1", "--seed", "5"], "both choose the seeds"),
])
def test_bad_settings_stop_before_any_work(argv, message, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["run", "--out", str(out), *TINY_FLAGS, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tgda-attack: error:") and message in err and "\n" not in err
    assert not out.exists()  # nothing was trained or written


@pytest.mark.parametrize("content, message", [
    ('{"epsilon": "lots"}', "epsilon must be a number"), ('{"attack": "fgsm"}', "unknown attack"),
    ('{"pretrain_epochs": 1.5}', "pretrain_epochs must be int"), ('{"cuda_graphs": "yes"}', "cuda_graphs must be bool"),
    ('{"flip_rule": "sideways"}', "unknown flip-rule"), ('{"gc_lr": -1}', "gc-lr must be a number > 0"),
    ('{"gc_steps": "many"}', "gc_steps must be int"), ('[1, 2]', "must hold an object of settings"),
    ('{"defence": "loss"}', "unknown setting(s) 'defence' (did you mean 'defense'?)"),
    ('{"defense": ["loss"]}', "setting defense must be one defense's name (a string), got ['loss']"),
    ('{"defense": {"a": 1}}', "setting defense must be one defense's name"),
    ('{"epsilom": 0.1, "zzz": 1}', "unknown setting(s) 'epsilom' (did you mean 'epsilon'?), 'zzz'; `tgda-attack run --help`"),
])
def test_a_bad_config_file_is_one_line(content, message, tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text(content)
    assert cli.main(["run", "--out", str(tmp_path / "run"), "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


@pytest.mark.parametrize("name, content, message", [
    ("c.cfg", 'epsilon = 0.05\ndefender = "nn"\n', None),  # TOML under another suffix is read as TOML
    ("c", '{"epsilon": 0.05, "defender": "nn"}', None),  # JSON without a suffix
    ("c.txt", "epsilon: 0.05", "is not valid JSON or TOML: as JSON, Expecting value"),
    ("c.json", "epsilon = 0.05", "is not valid JSON: Expecting value"),  # the suffix says which
    ("c.toml", b"\xff\xfe", "is not valid TOML: 'utf-8' codec"),
])
def test_a_config_file_is_read_as_its_suffix_says_or_as_whichever_it_is(name, content, message, tmp_path, capsys):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    args = ["run", "--out", str(tmp_path / "run"), "--config", str(path)]
    if message is None:
        cfg = cli.config_from_args(cli.build_parser().parse_args(args))
        assert (cfg.epsilon, cfg.defender) == (0.05, "nn")
        return
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_a_config_folder_or_an_out_that_is_a_file_is_one_line(tmp_path, capsys):
    assert cli.main(["run", "--out", str(tmp_path / "run"), "--config", str(tmp_path)]) == 2
    assert "is a folder, not a file" in capsys.readouterr().err
    assert cli.main(["run", "--out", str(tmp_path / "run"), "--config", os.devnull]) == 2
    assert "is not a regular file" in capsys.readouterr().err
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out in (afile, afile / "run"):  # --out a file, or a folder inside one
        assert cli.main(["run", "--out", str(out), *TINY_FLAGS]) == 2
        err = capsys.readouterr().err.strip()  # was "[Errno 17] File exists"
        assert err == f"tgda-attack: error: --out {out}: {afile} is a file, not a folder; choose another --out"
    for command in ("attack", "evaluate"):  # the later stages pointed at a file
        assert cli.main([command, "--out", str(afile)]) == 2
        assert "is a file, not a folder" in capsys.readouterr().err
    assert afile.read_text() == "x"


@pytest.mark.parametrize("command", ["run", "pretrain", "attack", "evaluate", "bench"])
def test_an_out_that_names_no_folder_or_a_link_to_nothing_is_one_line(command, tmp_path, capsys):
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "gone")  # a link to a folder removed since
    flags = ([*TINY_FLAGS, "--attack", "label-flip"] if command in ("run", "pretrain") else ["--table", "2"]
             if command == "bench" else [])
    for out, message in (("", "names no folder"), (str(link), "which does not exist; create that folder"),
                         (str(link / "run"), f"{link} is a link to"),
                         (f"{link}/../run", f"{link} is a link to")):  # the system resolves link/.. through the link
        assert cli.main([command, *flags, "--out", out]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("tgda-attack: error: --out") and message in err and "\n" not in err
    assert not (tmp_path / "gone").exists()


def test_options_the_run_does_not_read_are_named_in_a_note(tmp_path, capsys):
    parse = cli.build_parser().parse_args
    args = parse(["run", "--out", "x", "--attack", "label-flip", "--gc-steps", "5", "--alpha", "0.5", "--data-root", "d",
                  "--flip-rule", "random"])
    assert cli.unread_options_note(args, cli.config_from_args(args)) == (
        "tgda-attack: note: this run ignores --gc-steps (read by attack gradient-canceling), --alpha (read by attack "
        "tgda only), --data-root (mnist-sample is embedded: no files are read)")
    for argv in (["--attack", "gradient-canceling", "--gc-steps", "5"], ["--alpha", "0.5", "--solver", "cgnr"]):
        args = parse(["run", "--out", "x", *argv])
        assert cli.unread_options_note(args, cli.config_from_args(args)) is None
    # the authors' recipe of gradient canceling has its own schedule, step and radius (their --gc-* were silent)
    args = parse(["run", "--out", "x", "--attack", "gradient-canceling", "--gc-recipe", "authors", "--defender",
                  "gc-lr", "--gc-steps", "6", "--gc-lr", "0.5"])
    assert cli.unread_options_note(args, cli.config_from_args(args)) == (
        "tgda-attack: note: this run ignores --gc-steps (this run's gradient-canceling recipe sets it itself), --gc-lr "
        "(this run's gradient-canceling recipe sets it itself)")
    out = str(tmp_path / "r")  # the note comes first, on stdout, and the run goes on
    assert cli.main(["run", "--attack", "label-flip", "--gc-steps", "5", "--out", out, *TINY_FLAGS]) == 0
    assert capsys.readouterr().out.startswith("tgda-attack: note: this run ignores --gc-steps")


def test_the_command_shows_a_warning_in_one_line_of_its_own(tmp_path):
    """Python shows a warning with the file, line number and source line of the code that raised it."""
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-m", "tgda_attack", "run", "--attack", "gradient-canceling", "--gc-steps", "2",
                           "--out", str(tmp_path / "r"), *TINY_FLAGS], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(protocol.__file__))})
    assert done.returncode == 0
    assert "tgda-attack: warning: Gradient Canceling: no GradPC target within reach" in done.stderr
    assert "UserWarning" not in done.stderr and "target = self._gradpc" not in done.stderr
    assert cli.one_line_warning("m", UserWarning, "f.py", 3) == "tgda-attack: warning: m\n"
    import warnings
    before = warnings.formatwarning
    assert cli.main(["run", "--attack", "label-flip", "--out", str(tmp_path / "f"), *TINY_FLAGS]) == 0
    assert warnings.formatwarning is before  # called from Python: the caller's format is left as it was


def test_a_device_name_torch_does_not_know_is_one_line_of_ours(tmp_path, capsys):
    assert cli.main(["run", "--out", str(tmp_path / "r"), "--device", "CPU"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("device 'CPU' is not a device name; use cpu, cuda or cuda:N (lower case)")


def test_one_seed_over_a_folder_of_seeds_or_seeds_over_a_single_run_is_refused(tmp_path, capsys):
    flags = ["--attack", "label-flip", *TINY_FLAGS]
    seeds, single = tmp_path / "seeds", tmp_path / "single"
    assert cli.main(["run", *flags, "--seeds", "0", "1", "--out", str(seeds)]) == 0
    assert cli.main(["run", *flags, "--out", str(single)]) == 0
    capsys.readouterr()
    for argv, message in ((["--seed", "0", "--out", str(seeds)], f"one seed's run goes in its own folder: --out {seeds / 'seed_0'}"),
                          (["--seeds", "0", "1", "--out", str(single), "--resume"], "holds a single run (config.json)")):
        for command in ("run", "pretrain"):
            assert cli.main([command, *flags, *argv]) == 2
            err = capsys.readouterr().err.strip()
            assert message in err and "\n" not in err
    for command in ("attack", "evaluate"):  # the later stages, pointed at the folder of seeds
        assert cli.main([command, "--out", str(seeds)]) == 2
        assert f"one folder each: give one of them, e.g. --out {seeds / 'seed_0'}" in capsys.readouterr().err
    assert sorted(os.listdir(seeds)) == ["seed_0", "seed_1", "summary.json", "summary.md"]
    assert not any(n.startswith("seed_") for n in os.listdir(single))
    assert cli.main(["run", *flags, "--seeds", "0", "1", "--out", str(seeds), "--resume"]) == 0  # the same layout resumes
    table = tmp_path / "bench"
    (table / "table_2").mkdir(parents=True)  # what a bench writes (its cells' runs are inside)
    for argv in (["run", *flags, "--out", str(table)], ["run", *flags, "--seeds", "0", "1", "--out", str(table)],
                 ["pretrain", *flags, "--out", str(table)]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert "holds the tables of `tgda-attack bench` (table_2)" in err and "\n" not in err
    for folder, named in ((single, "config.json"), (seeds, "seed_0, seed_1")):
        assert cli.main(["bench", "--table", "2", "--scale", "smoke", "--out", str(folder)]) == 2
        err = capsys.readouterr().err.strip()
        assert f"holds the files of `tgda-attack run` ({named})" in err and "\n" not in err
    assert os.listdir(table) == ["table_2"] and not any(n.startswith("table_") for n in os.listdir(single))


def test_seeds_of_one_seed_write_the_seeds_layout_that_more_seeds_extend(tmp_path, capsys):
    flags = ["--attack", "label-flip", *TINY_FLAGS]
    out = tmp_path / "s"
    assert cli.main(["run", *flags, "--seeds", "3", "--out", str(out)]) == 0  # once: a single run in out itself
    assert (out / "seed_3" / "metrics.json").exists() and json.load(open(out / "summary.json"))["seeds"] == [3]
    assert cli.main(["run", *flags, "--seeds", "3", "4", "--out", str(out), "--resume"]) == 0
    assert json.load(open(out / "summary.json"))["seeds"] == [3, 4]
    capsys.readouterr()
    assert cli.main(["evaluate", "--out", str(out / "seed_3"), "--quiet"]) == 0  # one seed's stage 3 again
    note = f"note: removed {out / 'summary.md'} and {out / 'summary.json'}, which summarised seed_3 as it was; " \
           f"`tgda-attack run --seeds 3 4 --out {out} --resume`"
    assert note in capsys.readouterr().out and not (out / "summary.md").exists() and not (out / "summary.json").exists()
    assert cli.main(["run", *flags, "--seeds", "3", "4", "--out", str(out), "--resume"]) == 0  # the note's advice
    assert json.load(open(out / "summary.json"))["seeds"] == [3, 4]
    for argv in (["attack", "--out", str(out / "seed_4")], ["run", *flags, "--seed", "4", "--out", str(out / "seed_4"),
                                                             "--overwrite"]):
        assert cli.main(argv) == 0 and not (out / "summary.md").exists()  # its results changed
        assert cli.main(["run", *flags, "--seeds", "3", "4", "--out", str(out), "--resume"]) == 0
    assert cli.main(["run", *flags, "--seed", "4", "--out", str(out / "seed_4"), "--resume"]) == 0
    assert (out / "summary.md").exists()  # a finished run resumed: nothing changed
    own = tmp_path / "study"  # a user's own summary beside a folder named seed_*: not `run --seeds`'s, left alone
    own.mkdir()
    (own / "summary.md").write_text("my notes")
    (own / "summary.json").write_text('{"seeds": [7]}')
    assert cli.main(["run", *flags, "--seed", "4", "--out", str(own / "seed_4")]) == 0
    assert (own / "summary.md").read_text() == "my notes"
    single = tmp_path / "one"  # as `--seeds 3` wrote it before: the run in the folder itself
    assert cli.main(["run", *flags, "--seed", "3", "--out", str(single)]) == 0
    capsys.readouterr()
    assert cli.main(["run", *flags, "--seeds", "3", "--out", str(single), "--resume"]) == 2
    assert "(`--seed 3 --resume` continues it" in capsys.readouterr().err


def test_every_seed_folder_is_checked_before_the_first_seeds_work(tmp_path, capsys):
    out = tmp_path / "m"
    flags = ["--attack", "label-flip", *TINY_FLAGS]
    assert cli.main(["run", *flags, "--epsilon", "0.05", "--out", str(out / "seed_1")]) == 0  # another run in seed_1
    capsys.readouterr()
    assert cli.main(["run", *flags, "--seeds", "0", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "seed_1 already holds a run" in err and "\n" not in err
    assert not (out / "seed_0").exists()  # seed 0 was not run first


def test_a_stage_1_file_removed_under_later_stages_is_not_trained_again_silently(tmp_path, capsys):
    """Stage 1 trained again (another machine, a GPU) need not be the model the folder's poisons were made against."""
    out = str(tmp_path / "r")
    flags = ["--attack", "label-flip", *TINY_FLAGS, "--out", out]
    assert cli.main(["run", *flags]) == 0
    os.remove(os.path.join(out, "defender_pretrained.pt"))
    capsys.readouterr()
    assert cli.main(["run", *flags, "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert "lacks defender_pretrained.pt of stage 1 but holds attack.json, poisons.pt" in err and "--overwrite" in err
    assert cli.main(["run", *flags, "--overwrite"]) == 0  # the advice works


def test_a_poisons_file_of_another_run_is_refused_by_evaluate(tmp_path, capsys):
    runs = [str(tmp_path / name) for name in ("a", "b")]
    for out, eps in zip(runs, ("0.03", "0.05")):
        assert cli.main(["run", "--attack", "label-flip", *TINY_FLAGS, "--epsilon", eps, "--out", out]) == 0
    shutil.copy(os.path.join(runs[1], "poisons.pt"), os.path.join(runs[0], "poisons.pt"))
    capsys.readouterr()
    assert cli.main(["evaluate", "--out", runs[0]]) == 2
    assert "holds 140 poisons where the attack.json written with it says 84" in capsys.readouterr().err


def test_a_folder_holding_another_run_is_refused_then_overwritten_or_resumed_unless_its_poisons_were_damaged(
        tmp_path, capsys):
    out = str(tmp_path)
    flags = ["--attack", "label-flip", "--out", out, *TINY_FLAGS]
    assert cli.main(["run", *flags]) == 0
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    capsys.readouterr()
    assert cli.main(["run", *flags, "--epsilon", "0.05"]) == 2  # no silent reuse under other settings
    assert "already holds a run" in capsys.readouterr().err
    assert cli.main(["run", *flags, "--epsilon", "0.05", "--resume"]) == 2
    assert "epsilon 0.03 -> 0.05" in capsys.readouterr().err
    assert cli.main(["run", *flags, "--resume"]) == 0  # same settings: the finished run is kept
    assert json.load(open(os.path.join(out, "metrics.json"))) == metrics
    assert cli.main(["run", *flags, "--defense", "sphere", "--resume"]) == 0  # a defense result of these poisons
    assert os.path.exists(os.path.join(out, "defense_sphere", "metrics.json"))
    with open(os.path.join(out, "poisons.pt"), "wb") as fh:  # damaged after the run finished
        fh.write(b"garbage")
    capsys.readouterr()
    assert cli.main(["run", *flags, "--resume"]) == 2  # not the kept metrics of poisons that are gone
    err = capsys.readouterr().err.strip()
    assert "poisons.pt" in err and "tgda-attack attack --out" in err and "\n" not in err
    assert cli.main(["attack", "--out", out]) == 0  # as the error advises: new poisons, no result of the old ones
    assert not os.path.exists(os.path.join(out, "metrics.json"))
    assert not os.path.exists(os.path.join(out, "defense_sphere"))
    assert cli.main(["run", *flags, "--resume"]) == 0  # evaluates the new poisons
    again = json.load(open(os.path.join(out, "metrics.json")))
    assert again["poisoned_accuracy"] == metrics["poisoned_accuracy"]  # label flip: the same poisons again
    assert cli.main(["run", *flags, "--epsilon", "0.05", "--overwrite"]) == 0
    assert json.load(open(os.path.join(out, "metrics.json")))["n_poison"] == 140
    assert not os.path.exists(os.path.join(out, "defense_sphere"))  # it was of the replaced poisons


def _as_an_older_version_wrote_it(out, **config):
    """The run folder `out` as written by a version before config.json's settings were recorded in pretrain.json and
    attack.json (protocol.check_made_with), its config.json updated with `config` (None: the key left out)."""
    for name, key in (("pretrain.json", "stage_1_settings"), ("attack.json", "settings")):
        values = json.load(open(os.path.join(out, name)))
        values.pop(key, None)
        json.dump(values, open(os.path.join(out, name), "w"))
    path = os.path.join(out, "config.json")
    recorded = {**json.load(open(path)), **config}
    json.dump({k: v for k, v in recorded.items() if v is not None}, open(path, "w"))


def test_a_folder_written_before_a_setting_existed_resumes_when_the_setting_is_at_its_default(tmp_path, capsys):
    out = str(tmp_path)
    flags = ["--attack", "label-flip", "--out", out, *TINY_FLAGS]
    assert cli.main(["run", *flags]) == 0
    _as_an_older_version_wrote_it(out, perfect_knowledge=None)  # a version without the setting
    assert cli.main(["run", *flags, "--resume"]) == 0
    assert cli.main(["run", *flags, "--perfect-knowledge", "--resume"]) == 2  # not at its default: another run
    assert "perfect_knowledge None -> True" in capsys.readouterr().err


def test_a_folder_written_before_the_gradient_norm_bound_is_a_run_of_plain_descent(tmp_path, capsys):
    """A setting whose introduction changed what the code does (the bound of 5, eeb4fd5) is read, where config.json
    lacks it, at the value of the code before it (0: plain gradient descent), not at today's default: resuming
    such a folder under the bound would report its plain-descent metrics as a run with the bound."""
    out = str(tmp_path)
    flags = ["--attack", "label-flip", "--out", out, *TINY_FLAGS]
    assert cli.main(["run", *flags, "--pretrain-max-grad-norm", "0"]) == 0
    _as_an_older_version_wrote_it(out, pretrain_max_grad_norm=None)  # a version without the setting
    capsys.readouterr()
    assert cli.main(["run", *flags, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "pretrain_max_grad_norm 0.0 -> 5.0" in err and "add --pretrain-max-grad-norm 0.0 to continue it" in err
    assert cli.main(["run", *flags, "--pretrain-max-grad-norm", "0", "--resume"]) == 0
    assert protocol.run_config(out).pretrain_max_grad_norm == 0.0  # what `evaluate --out` retrains with


def test_a_run_is_the_settings_it_reads(tmp_path, capsys):
    """Settings a run's attack does not read (TGDA's solve and schedule, another attack's options, the thread
    count) do not stop a resume; a TGDA run written under the former default solver names the option."""
    out = str(tmp_path / "flip")
    flags = ["--attack", "label-flip", "--out", out, *TINY_FLAGS]
    assert cli.main(["run", *flags]) == 0
    _as_an_older_version_wrote_it(out, solver="cgnr", checkpoint_every=5, gc_steps=7)  # a label-flip run
    assert cli.main(["run", *flags, "--threads", "1", "--resume"]) == 0
    out = str(tmp_path / "tgda")
    assert cli.main(["run", "--out", out, *TINY_FLAGS, "--solver", "cgnr"]) == 0
    capsys.readouterr()
    assert cli.main(["run", "--out", out, *TINY_FLAGS, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "solver 'cgnr' -> 'minres'" in err and "add --solver cgnr to continue it" in err and "\n" not in err.strip()


def _flags(values):
    return [arg for key, value in values.items() for arg in ("--" + key.replace("_", "-"), str(value))]


@pytest.mark.parametrize("attack", [name for name in ATTACKS if name != "tgda"])
def test_every_registered_baseline_runs_through_the_cli(attack, tmp_path):
    out = str(tmp_path)
    extra = _flags(ATTACKS[attack].quick)
    assert cli.main(["run", "--attack", attack, *extra, "--out", out, *TINY_FLAGS]) == 0
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert metrics["attack"] == attack and metrics["n_poison"] == 84
    assert not os.path.exists(os.path.join(out, "attacker_pretrained.pt"))  # only TGDA needs an attacker network


def test_transfer_tests_the_poisons_on_another_defender(tmp_path):
    out = str(tmp_path)
    assert cli.main(["run", "--attack", "label-flip", "--eval-defender", "nn", "--out", out, *TINY_FLAGS]) == 0
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    pretrain = json.load(open(os.path.join(out, "pretrain.json")))
    assert metrics["defender"] == "lr" and metrics["eval_defender"] == "nn"
    assert metrics["clean_accuracy"] == pretrain["eval_clean_accuracy"] != pretrain["clean_accuracy"]
    # the tested network's clean record, not the surrogate's, is the clean side of the median drop
    assert metrics["clean_accuracy_last_epochs"] == pretrain["eval_clean_accuracy_last_epochs"]
    assert metrics["clean_accuracy_last_epochs"]["accuracy"] == [pretrain["eval_clean_accuracy"]]
    cfg = protocol.Config.from_dict({**TINY, "attack": "label-flip", "eval_defender": "nn"}).resolved()
    splits = protocol.load_splits(cfg)
    clean_nn = protocol.train_defender(cfg, splits.x_train, splits.y_train, name="nn")  # independent retrace
    assert pretrain["eval_clean_accuracy"] == protocol.accuracy(clean_nn, splits.x_test, splits.y_test)
    poisoned = torch.load(os.path.join(out, "defender_poisoned.pt"), weights_only=True)
    assert poisoned["1.weight"].shape == (784, 784)  # the NN was retrained, not the LR surrogate


def test_a_transfer_runs_summary_names_the_tested_defender(tmp_path, capsys):
    """Over seeds the accuracies are the eval defender's: the summary and the printout name it, and the surrogate."""
    out = str(tmp_path)
    assert cli.main(["run", "--attack", "label-flip", "--eval-defender", "nn", "--seeds", "0", "1", "--out", out,
                     *TINY_FLAGS]) == 0
    printed = capsys.readouterr().out
    assert "label-flip against nn (poisons made against lr)" in printed
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert (summary["defender"], summary["eval_defender"]) == ("lr", "nn")
    assert "| nn (poisons made against lr) | label-flip |" in open(os.path.join(out, "summary.md")).read()


def test_perfect_knowledge_gives_the_attacker_the_test_set(tmp_path, monkeypatch):
    seen = {}
    base = ATTACKS["label-flip"]

    class Recording(base):
        def poison(self, x, y, *, x_val=None, y_val=None):
            seen["n_val"] = len(y_val)
            return super().poison(x, y, x_val=x_val, y_val=y_val)

    monkeypatch.setitem(protocol.ATTACKS, "label-flip", Recording)
    for flag, expected in (("--no-perfect-knowledge", 1200), ("--perfect-knowledge", 1000)):
        assert cli.main(["run", "--attack", "label-flip", flag, "--out", str(tmp_path / flag), *TINY_FLAGS]) == 0
        assert seen["n_val"] == expected  # D_v: 30% of the 4,000 training digits, or the 1,000 test digits


def _pretrained(out):
    return torch.load(os.path.join(out, "defender_pretrained.pt"), weights_only=True)


def test_a_shared_pretraining_is_trained_once_and_equals_training_it_again(tmp_path, monkeypatch):
    shared = str(tmp_path / "shared")
    flip = protocol.Config.from_dict({**TINY, "attack": "label-flip", "pretrain_epochs": 2})
    canceling = dataclasses.replace(flip, attack="gradient-canceling")  # another attack: the same clean model
    first = protocol.stage_pretrain(flip, str(tmp_path / "a"), shared=shared)
    assert "pretrained_in" not in first and len(os.listdir(shared)) == 1

    def no_training(*args, **kwargs):
        raise AssertionError("a pretraining the shared folder holds was trained again")

    monkeypatch.setattr(protocol, "train_defender", no_training)
    second = protocol.stage_pretrain(canceling, str(tmp_path / "b"), shared=shared)
    assert second["clean_accuracy"] == first["clean_accuracy"]
    assert second["pretrained_in"] == os.path.join(shared, os.listdir(shared)[0])
    assert protocol.settings_of(str(tmp_path / "b"))["attack"] == "gradient-canceling"
    monkeypatch.undo()
    alone = str(tmp_path / "alone")  # the independent check: the same settings trained without the store
    protocol.stage_pretrain(canceling, alone)
    for name, value in _pretrained(alone).items():
        assert torch.equal(_pretrained(str(tmp_path / "b"))[name], value), name


@pytest.mark.parametrize("change", [dict(pretrain_lr=0.05), dict(seed=1), dict(pretrain_max_grad_norm=0.0),
                                    dict(defender="nn"), dict(threads=1)])
def test_a_pretraining_with_other_settings_is_not_taken_from_the_shared_folder(change, tmp_path):
    shared = str(tmp_path / "shared")
    base = protocol.Config.from_dict({**TINY, "attack": "label-flip", "threads": 2})
    protocol.stage_pretrain(base, str(tmp_path / "a"), shared=shared)
    other = protocol.stage_pretrain(dataclasses.replace(base, **change), str(tmp_path / "b"), shared=shared)
    assert "pretrained_in" not in other and len(os.listdir(shared)) == 2


def test_an_unfinished_shared_entry_is_trained_again_not_copied(tmp_path):
    shared = str(tmp_path / "shared")
    cfg = protocol.Config.from_dict({**TINY, "attack": "label-flip"})
    protocol.stage_pretrain(cfg, str(tmp_path / "a"), shared=shared)
    entry = os.path.join(shared, os.listdir(shared)[0])
    os.remove(os.path.join(entry, "defender_pretrained.pt"))  # a store killed before its key.json was written
    again = protocol.stage_pretrain(cfg, str(tmp_path / "b"), shared=shared)
    assert "pretrained_in" not in again and os.path.exists(os.path.join(entry, "defender_pretrained.pt"))
    with open(os.path.join(entry, "key.json"), "w") as fh:
        fh.write("{trunc")
    assert "pretrained_in" not in protocol.stage_pretrain(cfg, str(tmp_path / "c"), shared=shared)


def test_a_shared_pretraining_of_other_data_is_not_copied_and_one_stored_before_the_digest_is(tmp_path):
    """The entry's name does not hold the data (files replaced under the same --data-root): its key.json's digest
    does; an entry stored before keys held it is taken as the run folders of then are (by their settings)."""
    shared = str(tmp_path / "shared")
    cfg = protocol.Config.from_dict({**TINY, "attack": "label-flip"})
    protocol.stage_pretrain(cfg, str(tmp_path / "a"), shared=shared)
    key_file = os.path.join(shared, os.listdir(shared)[0], "key.json")
    key = json.load(open(key_file))
    assert len(key["data_sha256"]) == 64
    json.dump({**key, "data_sha256": "0" * 64}, open(key_file, "w"))
    assert "pretrained_in" not in protocol.stage_pretrain(cfg, str(tmp_path / "b"), shared=shared)
    json.dump({k: v for k, v in key.items() if k != "data_sha256"}, open(key_file, "w"))
    assert "pretrained_in" in protocol.stage_pretrain(cfg, str(tmp_path / "c"), shared=shared)


class _Stopped(Exception):
    pass


@pytest.mark.parametrize("stopped", ["pretrain", "retrain", f"retraining_{2 ** 20}_poisoned", "defended", "clean_defended"])
def test_a_run_stopped_mid_training_continues_that_training_to_the_results_of_one_never_stopped(
        tmp_path, monkeypatch, stopped):
    """Every training of a run keeps its progress (protocol.training_checkpoint): stopped after epoch 2 of 4, the
    run continued with --resume (and the defense rerun) resumes that training at epoch 2 and ends at the models and
    numbers of a run never stopped; no kept training is left in the folders after."""
    from tgda_attack.config import DefenseConfig
    from tgda_attack.training import TrainingCheckpoint
    monkeypatch.setattr(protocol, "LAST_EPOCHS_FRACTION", 1.0)  # every epoch of these 4 recorded, the stop's included
    cfg = protocol.Config.from_dict({**TINY, "pretrain_epochs": 4, "attack": "label-flip", "seed": 0, "retrainings": 2})
    dcfg = DefenseConfig(defense="loss").checked()
    whole, cut = str(tmp_path / "whole"), str(tmp_path / "cut")
    protocol.run(cfg, whole)
    protocol.stage_defend(whole, dcfg)
    made = {}

    def kept_every_epoch(folder, name):  # made[name]: the first of the name (the one its training used)
        kept = TrainingCheckpoint(os.path.join(folder, f"training_checkpoint.{name}.pt"), every_s=0)
        made.setdefault(name, kept)
        return kept
    monkeypatch.setattr(protocol, "training_checkpoint", kept_every_epoch)
    save = TrainingCheckpoint._save

    def save_then_stop(self, key, epoch, *args):
        save(self, key, epoch, *args)
        if self.path.endswith(f".{stopped}.pt") and epoch == 2:
            raise _Stopped
    monkeypatch.setattr(TrainingCheckpoint, "_save", save_then_stop)
    with pytest.raises(_Stopped):
        protocol.run(cfg, cut)
        protocol.stage_defend(cut, dcfg)
    monkeypatch.setattr(TrainingCheckpoint, "_save", save)
    made.clear()
    protocol.run(cfg, cut, resume=True)
    protocol.stage_defend(cut, dcfg, resume=True)
    assert made[stopped].resumed_at_epoch == 2
    # the others start afresh, or (a training finished before the stop whose result was not yet written) are read back
    assert all(each.resumed_at_epoch in (0, 4) for name, each in made.items() if name != stopped)
    if stopped == f"retraining_{2 ** 20}_poisoned":
        assert made[f"retraining_{2 ** 20}_clean"].resumed_at_epoch == 4
    for name in ("defender_pretrained.pt", "defender_poisoned.pt", "defense_loss/defender_defended.pt"):
        a, b = (torch.load(os.path.join(d, name), weights_only=True) for d in (whole, cut))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    metrics = [protocol.read_json(os.path.join(d, "metrics.json")) for d in (whole, cut)]
    assert metrics[0]["retrainings"] == metrics[1]["retrainings"]
    assert metrics[0]["poisoned_accuracy"] == metrics[1]["poisoned_accuracy"]
    defended = [protocol.read_json(os.path.join(d, "defense_loss", "metrics.json")) for d in (whole, cut)]
    assert [d["clean_defended_accuracy"] for d in defended][0] == defended[1]["clean_defended_accuracy"]
    assert defended[0]["defended_accuracy"] == defended[1]["defended_accuracy"]
    # each training's record of its last epochs is whole: the epochs before the stop came back from its checkpoint
    for key in ("clean_accuracy_last_epochs", "poisoned_accuracy_last_epochs"):
        assert metrics[0][key]["epochs"] == [1, 2, 3, 4] and metrics[0][key] == metrics[1][key], key
        assert metrics[0][key]["accuracy"][-1] == metrics[0][key.replace("_last_epochs", "")]
    for key in ("defended_accuracy_last_epochs", "clean_defended_accuracy_last_epochs"):
        assert defended[0][key]["epochs"] == [1, 2, 3, 4] and defended[0][key] == defended[1][key], key
    assert not [name for _, _, files in os.walk(cut) for name in files if name.startswith("training_checkpoint.")]


def test_overwrite_new_poisons_and_finished_stages_remove_kept_trainings(tmp_path):
    from tgda_attack import rundir
    out = str(tmp_path)
    assert cli.main(["run", "--attack", "label-flip", "--out", out, *TINY_FLAGS]) == 0

    def leave(*names):
        for name in names:
            open(os.path.join(out, f"training_checkpoint.{name}"), "wb").close()

    def left():
        return sorted(n for n in os.listdir(out) if n.startswith("training_checkpoint."))
    leave("retrain.pt", "retrain.pt.tmp")
    protocol.clear_evaluation(out)  # what the attack stage does before it writes new poisons
    assert left() == []
    leave("pretrain.pt", "retraining_3_clean.pt")  # a kill after the stages wrote their results, before clean-up
    assert cli.main(["run", "--attack", "label-flip", "--out", out, "--resume", *TINY_FLAGS]) == 0
    assert left() == []
    leave("pretrain.pt", "pretrain.pt.tmp")
    cfg = protocol.Config.from_dict({**TINY, "attack": "label-flip"}).resolved()
    assert rundir.claim(out, cfg, overwrite=True) is False and left() == []


@pytest.mark.parametrize("epochs, recorded", [(3, 1), (15, 1), (20, 2), (30, 3), (100, 10), (250, 10)])
def test_a_training_records_the_last_tenth_of_its_epochs_at_most_ten(epochs, recorded):
    cfg = protocol.Config.from_dict({**TINY, "pretrain_epochs": epochs})
    record = protocol.accuracy_record(cfg, None)
    assert (record and record.count) == recorded


def test_the_median_drop_is_taken_over_the_last_epochs_and_a_pretraining_without_a_record_is_said(tmp_path, caplog):
    """30 epochs: the last 3 of each training are tested (each the accuracy of that many epochs of the same
    training), the drop between their medians reported; a pretrain.json written before the record holds none, and
    the evaluate stage says so instead of reporting a median drop."""
    out = str(tmp_path / "run")
    cfg = protocol.Config.from_dict({**TINY, "pretrain_epochs": 30, "attack": "label-flip", "seed": 0})
    metrics = protocol.run(cfg, out)
    splits = protocol.load_splits(cfg)
    clean = metrics["clean_accuracy_last_epochs"]
    assert clean["epochs"] == [28, 29, 30] and clean["accuracy"][-1] == metrics["clean_accuracy"]
    short = protocol.train_defender(dataclasses.replace(cfg, pretrain_epochs=28), splits.x_train, splits.y_train)
    assert clean["accuracy"][0] == protocol.accuracy(short, splits.x_test, splits.y_test)  # epoch 28 of the same training
    poisoned = metrics["poisoned_accuracy_last_epochs"]
    assert poisoned["accuracy"][-1] == metrics["poisoned_accuracy"]
    for entry in (clean, poisoned):
        assert entry["median"] == sorted(entry["accuracy"])[1]
        assert entry["spike"] == (abs(entry["accuracy"][-1] - entry["median"]) > protocol.SPIKE)
    assert metrics["accuracy_drop_median_last_epochs"] == pytest.approx(clean["median"] - poisoned["median"])
    assert metrics["accuracy_drop_mean_last_epochs"] == pytest.approx(sum(clean["accuracy"]) / 3 - sum(poisoned["accuracy"]) / 3)
    pre = protocol.read_json(os.path.join(out, "pretrain.json"))
    del pre["clean_accuracy_last_epochs"]
    protocol.write_json(os.path.join(out, "pretrain.json"), pre)
    again = protocol.stage_evaluate(out)
    assert again["poisoned_accuracy_last_epochs"] == poisoned and again["accuracy_drop_median_last_epochs"] is None
    assert "holds no record of the clean pretraining's last epochs" in caplog.text
    from tgda_attack.report import metrics_table
    assert "poisoned median" in metrics_table(again) and "between the medians" not in metrics_table(again)


def test_a_reader_that_closes_the_pipe_early_ends_the_command_quietly(tmp_path):
    """`tgda-attack ... | head -1`: the results are in their files, so a closed stdout ends the command with SIGPIPE's
    status (141) and no BrokenPipeError traceback."""
    import subprocess
    import sys
    out = str(tmp_path / "run")
    assert cli.main(["run", "--attack", "label-flip", "--out", out, *TINY_FLAGS]) == 0
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the command prints
    done = subprocess.run([sys.executable, "-m", "tgda_attack", "run", "--attack", "label-flip", "--resume", "--out", out,
                           *TINY_FLAGS], stdout=write, stderr=subprocess.PIPE, text=True,
                          env={**{k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"},  # stdout buffered,
                               "PYTHONPATH": os.path.dirname(os.path.dirname(protocol.__file__))})  # as in a shell
    os.close(write)
    assert done.returncode == 141 and done.stderr == ""


@pytest.mark.parametrize("command", ["run", "bench", "evaluate"])
def test_ctrl_c_says_how_to_continue_the_command_it_stopped(command, tmp_path, capsys, monkeypatch):
    """It said "`tgda-attack attack --out DIR` resumes an attack from its checkpoint" after any command: no DIR, and
    a bench is simply run again."""
    from tgda_attack import bench

    def stop(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(protocol, "run", stop)
    monkeypatch.setattr(protocol, "stage_evaluate", stop)
    monkeypatch.setattr(bench, "folder_job", stop)
    out = str(tmp_path / "r")
    argv = {"run": ["run", "--attack", "label-flip", *TINY_FLAGS, "--out", out],
            "bench": ["bench", "--table", "2", "--attacks", "label-flip", "--out", out, "--quiet"],
            "evaluate": ["evaluate", "--out", out]}[command]
    if command == "evaluate":
        os.makedirs(out)
        with open(os.path.join(out, "config.json"), "w") as fh:
            fh.write("{}")
    assert cli.main(argv) == 130
    err = capsys.readouterr().err.strip()
    expected = {"run": f"the same command with --resume continues the run in {out}",
                "bench": "the same bench command again continues it",
                "evaluate": f"`tgda-attack evaluate --out {out}` again continues it"}[command]
    assert err.startswith("tgda-attack: interrupted; ") and expected in err and "DIR" not in err


def test_a_figure_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    from tgda_attack import report
    path = str(tmp_path / "f.png")
    fig, _ = report.plt.subplots()
    report.save_figure(fig, path)
    with open(path, "rb") as fh:
        before = fh.read()
    assert before[:8] == b"\x89PNG\r\n\x1a\n"
    fig, _ = report.plt.subplots()
    monkeypatch.setattr(fig, "savefig", lambda target, **kw: open(target, "wb").close() or 1 / 0)  # killed midway
    with pytest.raises(ZeroDivisionError):
        report.save_figure(fig, path)
    assert open(path, "rb").read() == before and os.listdir(tmp_path) == ["f.png"]
