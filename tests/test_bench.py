"""`tgda-attack bench`: the paper's tables at the smoke scale, resumed runs, the paper's numbers beside ours,
and usage errors caught before any run starts."""
import csv
import json
import os

import pytest

from tgda_attack import bench, cli, protocol
from tgda_attack.attacks import ATTACKS
from tgda_attack.defenses import DEFENSES


def test_every_table_plans_valid_runs_at_every_scale():
    for table in bench.TABLES.values():
        for scale in bench.SCALES:
            runs = bench.plan(table, scale, [0, 1], data_root="/data")
            assert runs and all(cfg.seed in (0, 1) for _, _, cfg in runs)
            keys = {cell.key for cell, _, _ in runs}
            assert len(keys) * 2 == len(runs), table.key
            if scale == "paper":
                assert {cfg.dataset for _, _, cfg in runs} == {"cifar10" if table.cifar else "mnist"}
                assert set(table.paper) <= keys, table.key  # every published cell is run at the paper scale


def test_the_long_follower_rows_take_fifty_times_the_follower_of_the_others_also_under_set():
    def follower_steps(overrides=None):
        runs = bench.plan(bench.TABLES["2"], "paper", [0], data_root="/data", defenders=["lr"],
                          attacks=["min-max", "tgda"], overrides=overrides)
        return {cell.row: cfg.follower_steps for cell, _, cfg in runs}

    assert follower_steps() == {"min-max": 20, "min-max (box)": 20, "min-max (long follower)": 1000,
                                "min-max (box, long follower)": 1000, "tgda": 20}
    shortened = follower_steps({"follower_steps": 4})
    assert shortened == {"min-max": 4, "min-max (box)": 4, "min-max (long follower)": 200,
                         "min-max (box, long follower)": 200, "tgda": 4}


def test_under_perfect_knowledge_the_rows_of_poisons_from_d_v_are_left_out():
    """With the test set as the attacker's D_v, label flip's D_v rows would poison with test images (refused for a
    run): a table under --set perfect_knowledge=true runs the other rows, Tables 10 and 11 too."""
    for key in ("2", "10"):
        runs = bench.plan(bench.TABLES[key], "paper", [0], data_root="/data", defenders=["lr"],
                          attacks=["label-flip"], overrides={"perfect_knowledge": True})
        assert {cell.row for cell, _, _ in runs} == {"label-flip"} and all(cfg.perfect_knowledge for _, _, cfg in runs)
    runs = bench.plan(bench.TABLES["2"], "paper", [0], data_root="/data", defenders=["lr"], attacks=["label-flip"])
    assert {cell.row for cell, _, _ in runs} == {"label-flip", *bench.LABEL_FLIP_ROWS}


def test_table_2_smoke_has_a_row_for_every_attack_and_resumes(tmp_path, capsys, monkeypatch):
    out = str(tmp_path)
    assert cli.main(["bench", "--table", "2", "--scale", "smoke", "--seeds", "1", "--out", out, "--quiet"]) == 0
    printed = capsys.readouterr().out
    lines = [line for line in printed.splitlines() if line.startswith("| ") and " lr " in line]
    boxed = [f"{a} (box)" for a in bench.SANITIZED_ROWS]  # min-max in its sanitised set, and in the box alone
    boxed += [f"{a} {kind}" for a in bench.LONG_FOLLOWER_ROWS for kind in ("(long follower)", "(box, long follower)")]
    boxed += list(bench.GC_ROWS)  # and Gradient Canceling's other labels and its authors' recipe
    boxed += list(bench.LABEL_FLIP_ROWS)  # and label flip from D_v with the nearest wrong class
    assert sorted(line.split(" | ")[0][2:] for line in lines) == sorted([*ATTACKS, *boxed])
    assert "| tgda | lr | 1 |" in printed and "92.35 / 89.56 / 2.79 | 1.1 h |" in printed  # the paper's, beside ours
    assert "| min-max | lr | 1 |" in printed and "92.35 / 89.80 / 2.55 |" in printed  # the sanitised row carries it
    with open(os.path.join(out, "table_2.csv")) as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(ATTACKS) + len(boxed) and all(r["seeds"] == "1" for r in rows)
    for row in bench.SANITIZED_ROWS:
        for folder, kind in ((f"{row}_sanitized", "sanitized"), (row, "box")):  # the box rows keep the old folders
            config = json.load(open(os.path.join(out, "table_2", folder, "lr", "seed_0", "config.json")))
            assert config["attack"] == row and config["feasible_set"] == kind
    config = json.load(open(os.path.join(out, "table_2", "label-flip_nearest_val", "lr", "seed_0", "config.json")))
    assert (config["attack"], config["flip_rule"], config["flip_pool"]) == ("label-flip", "nearest", "val")
    config = json.load(open(os.path.join(out, "table_2", "label-flip_pairs_val", "lr", "seed_0", "config.json")))
    assert (config["flip_pool"], config["flip_select"]) == ("val", "confused-pairs")
    for folder, kind in (("min-max_sanitized_long", "sanitized"), ("min-max_long", "box")):
        config = json.load(open(os.path.join(out, "table_2", folder, "lr", "seed_0", "config.json")))
        assert (config["attack"], config["feasible_set"]) == ("min-max", kind)
        assert config["follower_steps"] == bench.LONG_FOLLOWER * ATTACKS["min-max"].quick["follower_steps"]
    assert '"long follower": min-max\'s defender takes 50 times the other rows\' gradient steps a round' in printed
    config = json.load(open(os.path.join(out, "table_2", "gradient-canceling_cancel", "lr", "seed_0", "config.json")))
    assert config["gc_labels"] == "cancel" and config["gc_recipe"] == "valid"
    config = json.load(open(os.path.join(out, "table_2", "gradient-canceling_authors", "lr", "seed_0", "config.json")))
    assert (config["gc_recipe"], config["defender"], config["dtype"]) == ("authors", "gc-lr", "float64")
    assert "| gradient-canceling (authors) | lr | 1 |" in printed and "— / — / 21.10 (GC paper) |" in printed
    pretrains = [json.load(open(os.path.join(out, "table_2", f, "lr", "seed_0", "pretrain.json")))
                 for f in os.listdir(os.path.join(out, "table_2"))]
    # the cells' clean LR is trained once; TGDA's (it adds an attacker) and the authors' (gc-lr) differ
    assert sum("pretrained_in" not in p for p in pretrains) == 3 and len(pretrains) == len(rows)
    assert len({p["clean_accuracy"] for p in pretrains if "pretrained_in" in p}) == 1
    metrics = json.load(open(os.path.join(out, "table_2", "label-flip", "lr", "seed_0", "metrics.json")))
    row = next(r for r in rows if r["attack"] == "label-flip")
    assert float(row["accuracy_drop_mean"]) == pytest.approx(100 * metrics["accuracy_drop"])

    def no_work(*args, **kwargs):
        raise AssertionError("a complete run was run again")

    monkeypatch.setattr(protocol, "stage_attack", no_work)
    monkeypatch.setattr(protocol, "stage_evaluate", no_work)
    assert cli.main(["bench", "--table", "2", "--scale", "smoke", "--out", out, "--quiet"]) == 0


def test_table_10_smoke_is_a_matrix_of_attacks_and_every_defense_each_attack_run_once(tmp_path, capsys, monkeypatch):
    out = str(tmp_path)
    calls = []
    real = protocol.stage_attack
    monkeypatch.setattr(protocol, "stage_attack", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    argv = ["bench", "--table", "10", "--scale", "smoke", "--seeds", "1", "--attacks", "label-flip", "tgda", "--out", out]
    assert cli.main([*argv, "--quiet"]) == 0
    printed = capsys.readouterr().out
    for attack in ("label-flip", "tgda"):
        assert {line.split(" | ")[2] for line in printed.splitlines() if line.startswith(f"| {attack} | lr |")} == set(DEFENSES)
    assert "| tgda | lr | loss | 1 |" in printed and "| 2.79 / 2.56 |" in printed  # the paper's Table 10, beside ours
    # one attack run per (row, defender, seed: label flip's own and its LABEL_FLIP_ROWS, TGDA), shared by every defense
    assert len(calls) == 1 + len(bench.LABEL_FLIP_ROWS) + 1
    calls.clear()
    assert cli.main(["bench", "--table", "2", "--scale", "smoke", "--attacks", "tgda", "--out", out, "--quiet"]) == 0
    assert calls == []  # and by Table 2
    rows = json.load(open(os.path.join(out, "table_10.json")))
    row = next(r for r in rows if r["attack"] == "label-flip" and r["defense"] == "loss")
    metrics = json.load(open(os.path.join(out, "table_2", "label-flip", "lr", "seed_0", "defense_loss", "metrics.json")))
    assert row["defended_drop_mean"] == pytest.approx(100 * metrics["defended_drop"])
    assert row["recall_mean"] == pytest.approx(100 * metrics["recall"])
    # the defense's trainings recorded their last epochs: the drop under the defense between their medians
    assert metrics["attack_drop_under_defense_median_last_epochs"] == pytest.approx(
        metrics["clean_defended_accuracy_last_epochs"]["median"] - metrics["defended_accuracy_last_epochs"]["median"])
    assert row["attack_drop_under_defense_median_last_epochs_mean"] == pytest.approx(
        100 * metrics["attack_drop_under_defense_median_last_epochs"])
    undefended = json.load(open(os.path.join(out, "table_2", "label-flip", "lr", "seed_0", "metrics.json")))
    assert metrics["accuracy_drop_median_last_epochs"] == undefended["accuracy_drop_median_last_epochs"]
    assert "| the same, medians of the last epochs |" in open(os.path.join(out, "table_10.md")).read()
    maxup = json.load(open(os.path.join(out, "table_2", "label-flip", "lr", "seed_0", "defense_maxup", "metrics.json")))
    assert maxup["defended_accuracy_last_epochs"]["accuracy"][-1] == maxup["defended_accuracy"]  # a robust training too
    assert "defender's validation set (influence) used: the attacker's D_v (the set the attacks were made to hurt" in open(
        os.path.join(out, "table_10.md")).read()  # what favours it, said beside its numbers


def test_a_table_whose_defender_validates_on_its_own_data_says_so(tmp_path):
    out = str(tmp_path)
    assert cli.main(["bench", "--table", "11", "--scale", "smoke", "--defenses", "influence", "--set",
                     "defender_val_fraction=0.5", "--out", out, "--quiet"]) == 0
    text = open(os.path.join(out, "table_11.md")).read()
    assert "(influence) used: held out from D_v." in text and "made to hurt" not in text
    row = json.load(open(os.path.join(out, "table_11.json")))[0]
    assert row["defender_validation"] == "held out from D_v" and row["defended_training_seconds_mean"] > 0


def test_a_run_that_diverges_is_counted_and_its_message_kept(tmp_path):
    # a learning rate of 1e30 makes the NN defender's gradient descent blow up: a result of the bench, not its end
    out = str(tmp_path)
    assert cli.main(["bench", "--table", "2", "--scale", "smoke", "--attacks", "label-flip", "--defenders", "nn",
                     "--set", "pretrain_lr=1e30", "--out", out, "--quiet"]) == 0
    row = next(r for r in json.load(open(os.path.join(out, "table_2.json"))) if r["attack"] == "label-flip")
    assert (row["seeds"], row["diverged"], row["accuracy_drop_mean"]) == (1, 1, None)
    folder = os.path.join(out, "table_2", "label-flip", "nn", "seed_0")
    assert row["diverged_messages"].startswith(folder + ": ") and "lr 1e+30" in row["diverged_messages"]
    text = open(os.path.join(out, "table_2.md")).read()
    assert "| 1 (1 diverged) |" in text and "diverged_messages" in text


def test_a_cell_of_one_seed_shows_no_spread(tmp_path):
    """One seed measures no spread: its cell is the value alone (not "x ± 0.00"), its std None in the JSON."""
    out = str(tmp_path)
    assert cli.main(["bench", "--table", "2", "--scale", "smoke", "--attacks", "label-flip", "--defenders", "lr",
                     "--out", out, "--quiet"]) == 0
    row = next(r for r in json.load(open(os.path.join(out, "table_2.json"))) if r["attack"] == "label-flip")
    assert row["seeds"] == 1 and row["accuracy_drop_std"] is None and row["accuracy_drop_mean"] is not None
    line = next(l for l in open(os.path.join(out, "table_2.md")) if l.startswith("| label-flip | lr |"))
    assert f"| {row['accuracy_drop_mean']:.2f} |" in line and "±" not in line.split("|")[6]


def test_a_budget_other_than_the_paper_s_shows_no_paper_figures_beside_ours(tmp_path, capsys):
    out = str(tmp_path)
    flags = ["bench", "--table", "2", "--scale", "smoke", "--attacks", "label-flip", "--defenders", "lr", "--quiet"]
    assert cli.main([*flags, "--out", os.path.join(out, "paper")]) == 0
    assert cli.main([*flags, "--out", os.path.join(out, "other"), "--set", "epsilon=0.1"]) == 0
    beside, alone = (next(r for r in json.load(open(os.path.join(out, name, "table_2.json"))) if r["attack"] == "label-flip")
                     for name in ("paper", "other"))
    assert beside["paper_drop"] is not None and alone["paper_drop"] is None  # the paper's 3% is not this 10%
    assert "epsilon other than the paper's" in open(os.path.join(out, "other", "table_2.md")).read()
    assert cli.main([*flags, "--out", os.path.join(out, "same"), "--set", "epsilon=0.03"]) == 0  # the paper's own
    assert "other than the paper's" not in open(os.path.join(out, "same", "table_2.md")).read()


def test_retrainings_pool_into_a_column_of_the_table(tmp_path):
    out = str(tmp_path)
    assert cli.main(["bench", "--table", "2", "--scale", "smoke", "--attacks", "label-flip", "--defenders", "lr",
                     "--seeds", "2", "--set", "retrainings=2", "--out", out, "--quiet"]) == 0
    row = next(r for r in json.load(open(os.path.join(out, "table_2.json"))) if r["attack"] == "label-flip")
    drops = [100 * d for s in (0, 1) for d in json.load(open(os.path.join(
        out, "table_2", "label-flip", "lr", f"seed_{s}", "metrics.json")))["retrainings"]["accuracy_drop"]]
    assert row["retrained_drops"] == 4 and row["retrained_drop_mean"] == pytest.approx(sum(drops) / 4)
    text = open(os.path.join(out, "table_2.md")).read()
    assert "| drop over retrainings |" in text and f"({row['retrained_drops']}) |" in text


def test_figure_4_marks_the_points_whose_seeds_diverged(tmp_path):
    def row(attack, eps, drop, diverged):
        return {"attack": attack, "column": f"nn eps={eps}", "seeds": 3, "diverged": diverged,
                "accuracy_drop_mean": drop, "accuracy_drop_std": None if drop is None else 0.5}
    rows = [row("tgda", 1.0, 0.1, 1), row("tgda", 0.03, -0.1, 0), row("min-max", 0.3, None, 3)]
    curves = bench.epsilon_curves(rows)
    assert curves == {"nn": {"tgda": [(0.03, -0.1, 0.5, ""), (1.0, 0.1, 0.5, "1/3 diverged")],
                             "min-max": [(0.3, None, None, "3/3 diverged")]}}
    path = str(tmp_path / "figure.png")
    bench.save_epsilon_figure(rows, path)  # an attack with no drawable point is still marked, not a crash
    with open(path, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


def test_figure_4_names_min_max_by_its_feasible_set():
    """Figure 4 runs min-max and i-min-max in the pixel box (Table 2's "(box)" rows, not its sanitised rows that
    carry the paper's numbers), and says so; their folders stay the attacks' own."""
    cells = bench.TABLES["figure-4"].cells(("lr",), ("min-max", "i-min-max", "tgda"), ())
    named = {(c.row, c.row_folder, c.settings.get("feasible_set", "box")) for c in cells}
    assert named == {("min-max (box)", "min-max", "box"), ("i-min-max (box)", "i-min-max", "box"), ("tgda", "tgda", "box")}


def test_figure_4_is_drawn(tmp_path):
    out = str(tmp_path)
    assert cli.main(["bench", "--table", "figure-4", "--attacks", "label-flip", "--out", out, "--quiet"]) == 0
    rows = json.load(open(os.path.join(out, "table_figure-4.json")))
    assert [r["column"] for r in rows] == [f"lr eps={e}" for e in bench.FIGURE_EPSILONS]
    drops = [r["accuracy_drop_mean"] for r in rows]
    assert drops[-1] > drops[0]  # flipping every label hurts more than flipping 3%
    with open(os.path.join(out, "table_figure-4.png"), "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv, message", [
    (["--scale", "paper"], "--data-root"), (["--data-root", "/data"], "--data-root is read at --scale paper only"),
    (["--seeds", "0"], "--seeds"), (["--seeds", "5000000000"], "--seeds is the number of seeds"),
    (["--table", "14"], "invalid choice"),
    (["--attacks", "fgsm"], "invalid choice"), (["--device", "tpu"], "device"),
    (["--defenders", "cifar-cnn"], "another dataset"), (["--defenses", "loss"], "defense tables"),
    (["--set", "attack_epochs"], "SETTING=VALUE"), (["--set", "epochs=2"], "no such setting"),
    (["--set", "seed=3"], "--seeds"), (["--set", "attack_epochs=-1"], "attack-epochs must be >= 0"),
    (["--set", "attack_epochs=1.5"], "attack_epochs takes an integer"), (["--set", "damping=nan"], "finite"),
    (["--set", "pretrain_attacker=maybe"], "yes or no"), (["--table", "7", "--set", "follower_steps=2"], "sets follower_steps itself"),
    (["--attacks", "min-max", "--rows", "min-max_long", "tgda"], "no row tgda among the chosen attacks' rows; choose "
                                                                  "from min-max_sanitized, min-max, min-max_sanitized_long"),
    (["--table", "5", "--attacks", "label-flip"], "table 5 studies tgda, not label-flip: drop those from --attacks"),
    (["--table", "13", "--attacks", "label-flip"], "table 13 studies emn, not label-flip"),
    (["--table", "3", "--attacks", "gradient-canceling"], "table 3 studies label-flip, metapoison, tgda, not gradient"),
])
def test_usage_errors_are_one_line_before_any_run(argv, message, tmp_path, capsys):
    args = ["bench", "--table", "2", "--out", str(tmp_path / "b"), *argv]
    if "--table" in argv:
        args = ["bench", "--out", str(tmp_path / "b"), *argv]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not (tmp_path / "b").exists()


def test_a_run_folder_with_other_settings_stops_the_bench_unless_overwrite(tmp_path, capsys):
    out = str(tmp_path)
    flags = ["bench", "--table", "figure-4", "--attacks", "label-flip", "--out", out, "--quiet"]
    folder = os.path.join(out, "table_figure-4", "label-flip", "lr_eps=0.1", "seed_0")
    assert cli.main(["run", "--attack", "label-flip", "--epsilon", "0.1", "--pretrain-epochs", "1", "--out", folder,
                     "--quiet"]) == 0
    capsys.readouterr()
    assert cli.main(flags) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and "pretrain_epochs 1 -> " in err  # what differs is named
    assert cli.main([*flags, "--overwrite"]) == 0
    assert json.load(open(os.path.join(folder, "config.json")))["pretrain_epochs"] == bench.SMOKE["pretrain_epochs"]


def test_a_damaged_file_in_a_run_folder_is_named_not_called_other_settings(tmp_path, capsys):
    out = str(tmp_path)
    flags = ["bench", "--table", "2", "--attacks", "label-flip", "--defenders", "lr", "--out", out, "--quiet"]
    assert cli.main(flags) == 0
    folder = os.path.join(out, "table_2", "label-flip", "lr", "seed_0")
    os.remove(os.path.join(folder, "metrics.json"))
    with open(os.path.join(folder, "poisons.pt"), "w") as fh:
        fh.write("garbage")
    capsys.readouterr()
    assert cli.main(flags) == 2
    err = capsys.readouterr().err.strip()
    assert "poisons.pt" in err and "other settings" not in err and "\n" not in err
    assert cli.main([*flags, "--overwrite"]) == 0  # --overwrite makes the run again
    assert os.path.exists(os.path.join(folder, "metrics.json"))


def test_missing_full_data_stops_the_paper_scale_before_any_run(tmp_path, capsys):
    out = tmp_path / "b"
    assert cli.main(["bench", "--table", "5", "--scale", "paper", "--data-root", str(tmp_path), "--out", str(out)]) == 2
    assert "MNIST not found" in capsys.readouterr().err and not out.exists()
    raw = tmp_path / "MNIST" / "raw"  # files that are there but are not MNIST (a failed download's HTML page)
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (raw / name).write_text("<html>not found</html>")
    assert cli.main(["bench", "--table", "5", "--scale", "paper", "--data-root", str(tmp_path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "train-images-idx3-ubyte is not an MNIST IDX file" in err and "\n" not in err and not out.exists()


def test_set_changes_every_run_and_the_tables_say_so(tmp_path, capsys):
    out = str(tmp_path)
    flags = ["bench", "--table", "figure-4", "--attacks", "label-flip", "--out", out, "--quiet"]
    assert cli.main([*flags, "--set", "pretrain_epochs=2", "--set", "pretrain-lr=0.05"]) == 0
    assert "(smoke scale, with pretrain_epochs=2, pretrain_lr=0.05, poisons made with " in capsys.readouterr().out
    folders = [os.path.join(out, "table_2", "label-flip", "lr", "seed_0")] + [  # epsilon 3%: Table 2's run
        os.path.join(out, "table_figure-4", "label-flip", f"lr_eps={eps}", "seed_0") for eps in bench.FIGURE_EPSILONS[1:]]
    for eps, folder in zip(bench.FIGURE_EPSILONS, folders):
        config = json.load(open(os.path.join(folder, "config.json")))
        assert (config["pretrain_epochs"], config["pretrain_lr"], config["epsilon"]) == (2, 0.05, eps)
    rows = json.load(open(os.path.join(out, "table_figure-4.json")))
    assert {r["overrides"] for r in rows} == {"pretrain_epochs=2, pretrain_lr=0.05"}
    assert cli.main(flags) == 2  # the full schedule into the same folders: they hold the shortened runs
    assert "--overwrite" in capsys.readouterr().err


def test_a_cell_with_table_2_settings_is_table_2_run_not_a_second_one(tmp_path, capsys):
    out = str(tmp_path)
    assert cli.main(["bench", "--table", "2", "--attacks", "tgda", "--out", out, "--quiet"]) == 0
    table_2 = json.load(open(os.path.join(out, "table_2.json")))[0]
    assert cli.main(["bench", "--table", "5", "--out", out, "--quiet"]) == 0
    rows = {r["column"]: r for r in json.load(open(os.path.join(out, "table_5.json")))}
    assert not os.path.exists(os.path.join(out, "table_5", "lr", "non-zero-sum"))  # Table 2's tgda run, same settings
    assert os.path.exists(os.path.join(out, "table_5", "lr", "zero-sum", "seed_0", "metrics.json"))
    assert rows["non-zero-sum"]["accuracy_drop_mean"] == table_2["accuracy_drop_mean"]
    assert rows["non-zero-sum"]["attack_seconds_mean"] == table_2["attack_seconds_mean"]  # not made again
    assert rows["zero-sum"]["accuracy_drop_mean"] is not None


def test_set_reads_each_value_as_its_setting_type():
    overrides = cli._parse_overrides(["gc_labels=true", "pretrain-attacker=no", "alpha=0.5", "attack_epochs=2"])
    assert overrides == {"gc_labels": "true", "pretrain_attacker": False, "alpha": 0.5, "attack_epochs": 2}
    assert type(overrides["alpha"]) is float and type(overrides["attack_epochs"]) is int


def test_a_run_folder_another_bench_is_making_waits_for_it(tmp_path, monkeypatch):
    import threading

    from tgda_attack import rundir
    made = []
    monkeypatch.setattr(bench, "_run_cell", lambda cell, scale, cfg, folder, overwrite, diverged, shared: made.append(folder))
    folder = str(tmp_path / "run")
    with rundir.exclusive(folder):
        other = threading.Thread(target=bench.folder_job, args=([(None, None, folder)], "smoke", False))
        other.start()
        other.join(0.5)
        assert other.is_alive() and made == []  # waiting for the lock
    other.join(10)
    assert made == [folder]


# Cells the TMLR paper itself prints with a drop that is not its clean accuracy minus the poisoned one (checked
# against ../shared/paper: Table 2 i-min-max and back-gradient vs the CNN, Table 3 MetaPoison vs the CIFAR CNN,
# Table 8 cold start vs LR); transcribed as printed.
PAPER_AS_PRINTED = {("i-min-max", "cnn"), ("back-gradient", "cnn"), ("metapoison", "cifar-cnn"), ("lr", "cold start")}


def test_the_paper_cells_are_transcribed_consistently():
    """Each published cell's drop is the table's clean accuracy minus its poisoned accuracy (to the paper's
    rounding), except the cells the paper prints otherwise: a check on our transcription of its numbers."""
    inconsistent = set()
    for table in bench.TABLES.values():
        for key, paper in table.paper.items():
            if not isinstance(paper, bench.Paper) or paper.source or paper.accuracy is None:
                continue
            clean = next(table.paper_clean[k] for k in key if k in table.paper_clean)
            if abs(clean - paper.accuracy - paper.drop) > 0.011:
                inconsistent.add(key)
    assert inconsistent == PAPER_AS_PRINTED


def test_the_title_names_the_threads_the_kept_runs_were_made_with(tmp_path, capsys):
    """--set threads=1 over runs made with 2 threads keeps them (threads are not a run's identity): the title said
    "with threads=1", though a seed fixes a run's bits for one thread count."""
    flags = ["bench", "--table", "2", "--attacks", "label-flip", "--out", str(tmp_path), "--quiet"]
    assert cli.main([*flags, "--set", "threads=2"]) == 0
    assert "(smoke scale, poisons made with 2 CPU threads)" in capsys.readouterr().out
    assert cli.main([*flags, "--set", "threads=1"]) == 0
    printed = capsys.readouterr().out
    assert "(smoke scale, poisons made with 2 CPU threads)" in printed and "threads=1" not in printed
    assert {r["threads"] for r in json.load(open(tmp_path / "table_2.json"))} == {"2"}


def test_a_name_given_twice_is_one_row_or_column_and_attacks_choose_the_studied_rows():
    """--defenders lr lr once ran one run as two seeds' worth ("seeds 2", std 0); --attacks was silently ignored by
    the tables that study one attack's variants, and by tables 3 and 12, which ran all three of their attacks."""
    once = bench.plan(bench.TABLES["2"], "smoke", [0], defenders=["lr"], attacks=["label-flip"])
    twice = bench.plan(bench.TABLES["2"], "smoke", [0], defenders=["lr", "lr"], attacks=["label-flip", "label-flip"])
    assert [(c.key, s) for c, s, _ in twice] == [(c.key, s) for c, s, _ in once]
    defended = bench.plan(bench.TABLES["10"], "smoke", [0], defenders=["lr"], attacks=["label-flip"],
                          defenses=["loss", "loss"])
    assert len(defended) == len(bench.plan(bench.TABLES["10"], "smoke", [0], defenders=["lr"], attacks=["label-flip"],
                                           defenses=["loss"]))
    for key in ("3", "12"):
        table = bench.TABLES[key]
        chosen = bench.plan(table, "smoke" if key == "3" else "sample", [0], attacks=["tgda"])
        assert {cfg.attack for _, _, cfg in chosen} == {"tgda"}
        assert len({cfg.attack for _, _, cfg in bench.plan(table, "smoke", [0])}) == 3


def test_rows_keep_only_the_named_rows_of_the_chosen_attacks():
    rows = ["min-max_sanitized", "i-min-max"]
    runs = bench.plan(bench.TABLES["2"], "smoke", [0, 1], defenders=["lr"], attacks=["min-max", "i-min-max"], rows=rows)
    assert [(cell.row_folder, seed) for cell, seed, _ in runs] == [(r, s) for r in rows for s in (0, 1)]
    assert {cfg.feasible_set for cell, _, cfg in runs if cell.row_folder == "min-max_sanitized"} == {"sanitized"}
    every = bench.plan(bench.TABLES["2"], "smoke", [0], defenders=["lr"], attacks=["min-max", "i-min-max"])
    assert len(every) == 6 and {c.row_folder for c, _, _ in every} > set(rows)  # without --rows: the long rows too


def test_the_drop_between_the_medians_of_the_last_epochs_is_a_column_and_a_spike_is_counted(tmp_path):
    """Each run records its trainings' test accuracy over their last epochs; the table shows the drop between their
    medians and counts the runs whose reported accuracy is a swing of the last epoch (a spike)."""
    out = str(tmp_path)
    argv = ["bench", "--table", "2", "--scale", "smoke", "--attacks", "label-flip", "--defenders", "lr", "--seeds", "2",
            "--out", out, "--quiet"]
    assert cli.main(argv) == 0
    paths = [os.path.join(out, "table_2", "label-flip", "lr", f"seed_{s}", "metrics.json") for s in (0, 1)]
    runs = [json.load(open(p)) for p in paths]
    row = next(r for r in json.load(open(os.path.join(out, "table_2.json"))) if r["attack"] == "label-flip")
    assert row["accuracy_drop_median_last_epochs_mean"] == pytest.approx(
        sum(100 * r["accuracy_drop_median_last_epochs"] for r in runs) / 2)
    assert row["accuracy_drop_last_epoch_spikes"] == 0 and row["accuracy_drop_median_last_epochs_runs"] == 2
    assert "| drop, medians of the last epochs |" in open(os.path.join(out, "table_2.md")).read()
    # seed 1's retraining as if its last epoch had read 20 points below where the training settled
    tail = runs[1]["poisoned_accuracy_last_epochs"]
    tail["accuracy"][-1] -= 0.2
    tail["spike"] = True
    with open(paths[1], "w") as fh:
        json.dump(runs[1], fh)
    assert cli.main(argv) == 0  # finished runs are read back, the table rebuilt
    row = next(r for r in json.load(open(os.path.join(out, "table_2.json"))) if r["attack"] == "label-flip")
    assert row["accuracy_drop_last_epoch_spikes"] == 1
    text = open(os.path.join(out, "table_2.md")).read()
    assert "(1 spiked) |" in text and '"spiked"' in text
    # a run made before the record existed (none of its keys; one with some deleted is a damaged file, made again):
    # the median is over the other run, and says so
    for key in [k for k in runs[1] if "last_epochs" in k]:
        del runs[1][key]
    with open(paths[1], "w") as fh:
        json.dump(runs[1], fh)
    assert cli.main(argv) == 0
    row = next(r for r in json.load(open(os.path.join(out, "table_2.json"))) if r["attack"] == "label-flip")
    assert row["accuracy_drop_median_last_epochs_mean"] == pytest.approx(100 * runs[0]["accuracy_drop_median_last_epochs"])
    assert "(1 of 2 runs) |" in open(os.path.join(out, "table_2.md")).read()


def test_a_set_setting_the_authors_recipe_does_not_read_is_said_under_the_table(tmp_path, capsys):
    """--set gc_steps=2 titles the whole table; the authors' Gradient Canceling runs its own schedule: the table says
    which rows did not read it, and their rows' JSON hold the names."""
    out = str(tmp_path / "bench")
    assert cli.main(["bench", "--table", "2", "--scale", "smoke", "--attacks", "gradient-canceling", "--rows",
                     "gradient-canceling", "gradient-canceling_authors", "--set", "gc_steps=2", "--out", out,
                     "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "with gc_steps=2" in printed
    assert "Not read by gradient-canceling (authors) (lr): gc_steps" in printed
    rows = {r["attack"]: r for r in json.load(open(os.path.join(out, "table_2.json")))}
    assert rows["gradient-canceling (authors)"]["overrides_not_read"] == "gc_steps"
    assert rows["gradient-canceling"]["overrides_not_read"] == ""
    assert json.load(open(os.path.join(out, "table_2", "gradient-canceling", "lr", "seed_0", "config.json")))["gc_steps"] == 2
