"""The defenses' interface, the data-only and loss filters on tiny data with planted answers, the
defended test stage of the protocol (tgda-attack run/evaluate --defense) and its files."""
import dataclasses
import json
import os

import pytest
import torch

from tgda_attack import cli, protocol
from tgda_attack.config import DefenseConfig
from tgda_attack.defenses import DEFENSES, PoisonFilter, RobustTraining
from tgda_attack.defenses.base import keep_all_but_largest, registry
from tgda_attack.defenses.centroid import SlabFilter, SphereFilter, keep_per_class, slab_scores, sphere_scores
from tgda_attack.defenses.loss import LossFilter


def _blobs(n_per_class=40, seed=0):
    """Three well separated Gaussian classes in 4 dimensions, as (N, 1, 2, 2) images."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[4.0, 0, 0, 0], [0, 4.0, 0, 0], [0, 0, 4.0, 0]], dtype=torch.float64)
    x = torch.cat([c + 0.5 * torch.randn(n_per_class, 4, generator=g, dtype=torch.float64) for c in centres])
    y = torch.arange(3).repeat_interleave(n_per_class)
    return x.view(-1, 1, 2, 2), y


def test_keep_all_but_largest_removes_the_floor_of_the_share_and_counts_nan_as_largest():
    scores = torch.tensor([0.1, 5.0, float("nan"), 2.0, 0.3, 4.0, 0.0, 1.0, 0.2, 0.4])
    assert (~keep_all_but_largest(scores, 0.3)).nonzero().flatten().tolist() == [1, 2, 5]
    assert keep_all_but_largest(scores, 0.05).all()  # floor(0.5) = 0


def test_sphere_removes_points_planted_far_from_their_class_centroid():
    x, y = _blobs()
    planted = torch.tensor([3, 50, 100])
    x.view(len(y), -1)[planted] += torch.tensor([0.0, 0, 0, 9.0], dtype=torch.float64)  # off along a free axis
    _, is_clean = SphereFilter(fraction=3 / 120).detect_poison(x, y)
    assert (~is_clean).nonzero().flatten().tolist() == planted.tolist()
    flat = x.flatten(1)
    dense = torch.stack([(flat[i] - flat[y == y[i]].mean(0)).norm() for i in range(len(y))])
    assert torch.allclose(sphere_scores(x, y), dense)


def test_slab_scores_are_distances_along_the_line_between_centroids():
    x, y = _blobs()
    flat = x.flatten(1)
    i = 7
    mu, rest = flat[y == y[i]].mean(0), flat[y != y[i]].mean(0)
    d = (mu - rest) / (mu - rest).norm()
    assert slab_scores(x, y)[i].item() == pytest.approx(abs(((flat[i] - mu) @ d).item()))
    # a point pushed along its class's line (towards the other classes) is removed; one moved
    # orthogonally to every line is not
    x2 = x.clone().view(len(y), -1)
    x2[10] -= 6 * d
    x2[20, 3] += 6.0
    _, is_clean = SlabFilter(fraction=1 / 120).detect_poison(x2.view_as(x), y)
    assert not is_clean[10] and is_clean[20]


def test_per_class_removal_takes_each_class_share_so_a_poisoned_class_cannot_shield_others():
    y = torch.tensor([0] * 50 + [1] * 50)
    scores = torch.cat([torch.full((50,), 100.0) + torch.arange(50.0), torch.arange(50.0)])
    removed = (~keep_per_class(scores, y, 0.1)).nonzero().flatten().tolist()
    assert removed == [45, 46, 47, 48, 49, 95, 96, 97, 98, 99]


def test_loss_filter_removes_a_point_with_a_planted_huge_loss():
    x, y = _blobs()
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3)).double()
    with torch.no_grad():
        model[1].weight.copy_(torch.eye(3, 4, dtype=torch.float64))
        model[1].bias.zero_()
    y = y.clone()
    y[[5, 60]] = torch.tensor([2, 0])  # mislabelled: a huge cross-entropy under the centroid classifier
    report, is_clean = LossFilter(fraction=2 / 120).detect_poison(x, y, model=model)
    assert (~is_clean).nonzero().flatten().tolist() == [5, 60] and report["threshold"] > 2.0
    calls = []
    LossFilter(fraction=0.01).detect_poison(x, y, fit=lambda xk, yk: calls.append(len(yk)) or model)
    assert calls == [len(y)]  # without a model it trains one on (x, y)
    with pytest.raises(ValueError, match="model= or fit="):
        LossFilter().detect_poison(x, y)


@pytest.mark.parametrize("name", sorted(n for n, cls in DEFENSES.items() if getattr(cls, "uses_model", False)))
def test_a_filter_gives_the_callers_model_back_in_the_mode_it_was_in(name):
    x, y = _blobs()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.ReLU(),
                                torch.nn.Linear(8, 3)).double()
    model[2].eval()  # a mixed state: each module's own mode comes back
    refit = {"fit": lambda xk, yk: model} if name == "sever" else {}  # its later rounds retrain: the same model here
    reports = [DEFENSES[name](fraction=0.05).detect_poison(x, y, model=model, **refit)[1] for _ in range(2)]
    assert model.training and not model[2].training and model[1].training  # was left in eval mode
    assert torch.equal(reports[0], reports[1])  # evaluated with dropout off both times


@pytest.mark.parametrize("name", sorted(n for n, cls in DEFENSES.items() if getattr(cls, "uses_model", False)))
def test_a_fit_that_returns_a_float32_model_scores_float64_images(name):
    x, y = _blobs()  # float64

    def fit(xk, yk):
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))  # float32
    report, is_clean = DEFENSES[name](fraction=0.05).detect_poison(x, y, fit=fit, x_val=x[:30], y_val=y[:30])
    assert int((~is_clean).sum()) == 6  # was torch's "mat1 and mat2 must have the same dtype"


@pytest.mark.parametrize("fraction", [0, 1, -0.1, "3%", True])
def test_filters_refuse_a_share_outside_zero_one(fraction):
    with pytest.raises(ValueError, match="share of the training set"):
        LossFilter(fraction=fraction)


def test_registry_holds_every_defense_with_its_kind_and_checks_them():
    assert {"loss", "sphere", "slab"} <= set(DEFENSES)
    for name, cls in DEFENSES.items():
        assert cls.name == name and issubclass(cls, PoisonFilter if cls.kind == "filter" else RobustTraining)
        cls.from_config(DefenseConfig(defense=name, **cls.quick).checked())  # every setting maps to a keyword
    with pytest.raises(ValueError, match="two defenses"):
        registry(LossFilter, LossFilter)
    with pytest.raises(ValueError, match="unknown defense"):
        DefenseConfig(defense="fgsm").checked()
    with pytest.raises(ValueError, match="defense-fraction"):
        DefenseConfig(defense="loss", defense_fraction=1.5).checked()


@pytest.fixture(scope="module")
def label_flip_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run"))
    assert cli.main(["run", "--attack", "label-flip", "--pretrain-epochs", "2", "--out", out, "--quiet"]) == 0
    return out


@pytest.mark.parametrize("name", sorted(DEFENSES))
def test_every_defense_runs_in_the_test_stage_and_reports_what_it_removed(name, label_flip_run, capsys):
    quick = [f"--{k.replace('_', '-')}={v}" for k, v in DEFENSES[name].quick.items()]
    assert cli.main(["evaluate", "--out", label_flip_run, "--defense", name, *quick, "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert f"under the {name} defense" in printed
    assert ("| the attacker's D_v (1200 points) |" in printed) == DEFENSES[name].validates
    metrics = json.load(open(os.path.join(label_flip_run, f"defense_{name}", "metrics.json")))
    undefended = json.load(open(os.path.join(label_flip_run, "metrics.json")))
    assert metrics["poisoned_accuracy"] == undefended["poisoned_accuracy"]
    assert metrics["defended_drop"] == pytest.approx(metrics["clean_accuracy"] - metrics["defended_accuracy"])
    if DEFENSES[name].kind == "filter":
        n_all = metrics["n_train"] + metrics["n_poison"]
        assert metrics["n_removed"] == int(0.03 * n_all + 1e-9) == metrics["poisons_removed"] + metrics["clean_removed"]
        assert metrics["recall"] == pytest.approx(metrics["poisons_removed"] / metrics["n_poison"])
    assert os.path.exists(os.path.join(label_flip_run, f"defense_{name}", "defender_defended.pt"))
    # the validation set is named where the defense reads one (the influence filter), and only there
    assert metrics.get("defender_validation") == ("the attacker's D_v" if DEFENSES[name].validates else None)


def test_the_defended_model_is_trained_on_the_kept_points(label_flip_run):
    metrics = protocol.stage_defend(label_flip_run, DefenseConfig(defense="sphere"), overwrite=True)
    cfg = protocol.run_config(label_flip_run)
    splits = protocol.load_splits(cfg)
    poisons = protocol.load_state(os.path.join(label_flip_run, "poisons.pt"))
    x, y = protocol.poisoned_training_set(splits.x_train, splits.y_train, poisons, poisons["x_poison"], poisons["y_poison"])
    _, keep = SphereFilter().detect_poison(x, y)
    expected = protocol.train_defender(cfg, x[keep], y[keep])
    saved = protocol.load_state(os.path.join(label_flip_run, "defense_sphere", "defender_defended.pt"))
    assert all(torch.equal(saved[k], v) for k, v in expected.state_dict().items())
    is_poison = protocol._poison_mask(len(y), poisons)
    assert metrics["poisons_removed"] == int((~keep & is_poison).sum())


def test_defense_results_of_other_settings_are_not_silently_reused(label_flip_run):
    protocol.stage_defend(label_flip_run, DefenseConfig(defense="slab"), overwrite=True)
    with pytest.raises(protocol.RunFolderError, match=f"`tgda-attack evaluate --out {label_flip_run} --defense slab ...` "
                                                     "replaces them"):  # not run --overwrite, which redoes the run
        protocol.stage_defend(label_flip_run, DefenseConfig(defense="slab", defense_fraction=0.05), resume=True)
    again = protocol.stage_defend(label_flip_run, DefenseConfig(defense="slab"), resume=True)
    assert again["defense_settings"] == {"defense_fraction": 0.03}


@pytest.mark.parametrize("content", ["garbage{", "{}"])
def test_a_damaged_defense_result_is_computed_again_not_reported_as_other_settings(label_flip_run, tmp_path, content):
    import shutil
    folder = str(tmp_path / "copy")
    shutil.copytree(label_flip_run, folder)
    first = protocol.stage_defend(folder, DefenseConfig(defense="slab"), overwrite=True)
    with open(os.path.join(folder, "defense_slab", "metrics.json"), "w") as fh:
        fh.write(content)  # once: "holds results of defense settings None"
    again = protocol.stage_defend(folder, DefenseConfig(defense="slab"), resume=True)
    assert again["defended_accuracy"] == first["defended_accuracy"]
    assert json.load(open(os.path.join(folder, "defense_slab", "metrics.json")))["defense_settings"] == {"defense_fraction": 0.03}


def test_stage_3_run_again_removes_the_defense_results_of_its_former_retraining(label_flip_run, tmp_path):
    """The filters score points with stage 3's retrained defender: a new one (evaluate by hand, another thread
    count) outdates every defense_* folder, which would otherwise stand beside metrics of another model."""
    import shutil
    folder = str(tmp_path / "copy")
    shutil.copytree(label_flip_run, folder)
    protocol.stage_defend(folder, DefenseConfig(defense="loss"), overwrite=True)
    assert os.path.exists(os.path.join(folder, "defense_loss", "metrics.json"))
    assert cli.main(["evaluate", "--out", folder, "--quiet"]) == 0
    assert not any(name.startswith("defense_") for name in os.listdir(folder))


@pytest.mark.parametrize("argv, message", [
    (["--defense", "fgsm"], "invalid choice"), (["--defense-fraction", "0.1"], "add --defense"),
    (["--defense", "loss", "--defense-fraction", "2"], "defense-fraction"),
    (["--defense", "loss", "--defense-fraction", "1"], "defense-fraction must be a fraction in (0, 1), got 1.0"),
    # ranges the Setting lets through and the defense itself refuses: before the run, not after its stage 3
    (["--defense", "maxup", "--maxup-noise", "inf"], "finite number"),
    (["--defense", "influence", "--influence-rtol", "inf"], "a finite number >= 0; got inf"),
    (["--defense", "influence", "--influence-damping", "inf"], "a finite number >= 0; got inf"),
    # a filter that would remove no point (mnist-sample's 2,800: 0.0001 rounds to 0), or Sever rounds of none
    (["--defense", "loss", "--defense-fraction", "0.0001"], "removes no point, so the loss defense would change nothing"),
    (["--defense", "sever", "--defense-fraction", "0.001", "--sever-rounds", "3"], "use at most 2 rounds"),
    # 2,800 + 84 poisons: the share is checked on the smaller set a filter runs on, the clean side's D_tr (0.00035
    # takes a point of the 2,884 and none of the 2,800: it stopped after the poisoned side's retraining), and the
    # advice takes a point
    (["--defense", "loss", "--defense-fraction", "0.00035"], "of 2800 training points removes no point, so the loss "
                                                             "defense would change nothing: use a fraction of at least 0.00036"),
])
def test_defense_usage_errors_are_one_line_before_any_work(argv, message, tmp_path, capsys):
    out = tmp_path / "r"
    assert cli.main(["run", "--attack", "label-flip", "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and not out.exists()


def test_a_filter_that_removes_no_point_is_refused_before_its_training(label_flip_run, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("trained before the check")
    monkeypatch.setattr(protocol, "train_defender", no_training)
    with pytest.raises(protocol.data_mod.DataTooSmallError, match="removes no point"):
        protocol.stage_defend(label_flip_run, DefenseConfig(defense="slab", defense_fraction=1e-4), overwrite=True)
    assert LossFilter(0.001).points_removed(2884) == 2 and LossFilter(0.001).check_size(1000) is None


def test_evaluate_refuses_a_filter_that_removes_no_point_before_stage_3(label_flip_run, tmp_path, monkeypatch, capsys):
    import shutil
    folder = str(tmp_path / "copy")
    shutil.copytree(label_flip_run, folder)
    os.remove(os.path.join(folder, "metrics.json"))  # stage 3 not run yet: evaluate retrains it first

    def no_training(*args, **kwargs):
        raise AssertionError("stage 3 ran before the check")
    monkeypatch.setattr(protocol, "stage_evaluate", no_training)
    assert cli.main(["evaluate", "--out", folder, "--defense", "loss", "--defense-fraction", "0.0001", "--quiet"]) == 2
    assert "removes no point, so the loss defense would change nothing" in capsys.readouterr().err


def test_a_filter_called_on_too_few_points_to_remove_one_says_so():
    x, y = torch.rand(30, 1, 2, 2) * 2 - 1, torch.arange(30) % 3
    with pytest.raises(protocol.data_mod.DataTooSmallError, match="0.03 of 30 training points removes no point"):
        LossFilter(0.03).detect_poison(x, y, model=torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3)))


def test_a_config_file_can_hold_the_defense_and_the_command_line_wins(tmp_path, capsys):
    path = tmp_path / "c.toml"
    path.write_text('epsilon = 0.05\ndefense = "sever"\ndefense_fraction = 0.05\nsever_rounds = 3\n')
    parse = cli.build_parser().parse_args
    args = parse(["run", "--out", "x", "--config", str(path), "--sever-rounds", "4"])
    assert cli.config_from_args(args).epsilon == 0.05
    assert cli.defense_from_args(args) == DefenseConfig(defense="sever", defense_fraction=0.05, sever_rounds=4)
    assert cli.config_from_args(parse(["pretrain", "--out", "x", "--config", str(path)])).epsilon == 0.05  # the
    # defense is left to the run that follows
    args = parse(["run", "--out", "x", "--config", str(path), "--defense", "loss"])  # another defense wins, without
    assert cli.defense_from_args(args) == DefenseConfig(defense="loss")  # the file's defense's settings
    path.write_text('defense_fraction = 0.05\n')  # settings without a defense: for the one the command line names
    assert cli.defense_from_args(parse(["run", "--out", "x", "--config", str(path), "--defense", "loss"])) == \
        DefenseConfig(defense="loss", defense_fraction=0.05)
    assert cli.main(["run", "--out", str(tmp_path / "r"), "--config", str(path)]) == 2
    assert f"--defense-fraction (from {path}) set(s) a defense; add --defense NAME" in capsys.readouterr().err
    for content, message in (('defense = "fgsm"\n', "unknown defense 'fgsm'"),
                             ('defense = "loss"\nsever_rounds = 3\n', "defense loss does not read --sever-rounds (from"),
                             ('defense = "loss"\ndefense_fraction = "many"\n', "defense_fraction must be a number")):
        path.write_text(content)
        assert cli.main(["run", "--out", str(tmp_path / "r"), "--config", str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err and not (tmp_path / "r").exists()


def test_seeds_under_a_defense_summarise_the_defense_too(tmp_path, capsys):
    out = tmp_path / "m"
    assert cli.main(["run", "--attack", "label-flip", "--pretrain-epochs", "1", "--seeds", "0", "1", "--defense", "slab",
                     "--out", str(out), "--quiet"]) == 0
    per_seed = [json.load(open(out / f"seed_{s}" / "defense_slab" / "metrics.json")) for s in (0, 1)]
    summary = json.load(open(out / "summary.json"))["under_defense"]
    for key in ("defended_accuracy", "defended_drop", "attack_drop_under_defense", "poisons_removed", "precision"):
        values = [r[key] for r in per_seed]
        assert summary[key]["mean"] == pytest.approx(sum(values) / 2)
        assert summary[key]["std"] == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5)
    assert summary["defense_settings"] == {"defense_fraction": 0.03} and summary["seeds"] == [0, 1]
    assert summary["units"].startswith("fractions") and json.load(open(out / "summary.json"))["units"] == summary["units"]
    table = (out / "summary.md").read_text()
    assert "Under the slab defense (defense-fraction 0.03), mean ± std over seeds" in table
    # the two drops of the defended model under one name each, in the summary as in each run's table (the run's
    # "drop with defense" was from the undefended clean accuracy, the summary's from the clean accuracy with defense)
    printed = capsys.readouterr().out
    for name in ("drop from the clean acc.", "drop under the defense: from the clean acc. with defense"):
        assert name in table and name in printed
    assert f"| slab | 2 | {100 * summary['defended_accuracy']['mean']:.2f} ± " in table


def test_evaluate_with_a_defense_needs_the_finished_run(tmp_path, capsys):
    assert cli.main(["evaluate", "--out", str(tmp_path), "--defense", "loss"]) == 2
    assert "lacks" in capsys.readouterr().err


def test_the_defender_can_validate_on_points_the_attacker_never_saw(tmp_path, monkeypatch):
    """--defender-val-fraction F: D_v's last F share is the defender's own validation set, what the influence defense
    scores against, and the attacker's D_v is the rest (label flip from D_v takes its images there); 0, the default,
    shares D_v, the set the attacks were made to hurt."""
    shared = protocol.load_splits(protocol.Config())
    held = protocol.load_splits(protocol.Config(defender_val_fraction=0.25))
    n, k = len(shared.y_val), int(0.25 * len(shared.y_val))
    assert len(held.y_val) == n - k and len(held.defender_validation()[1]) == k
    assert torch.equal(torch.cat([held.x_val, held.defender_validation()[0]]), shared.x_val)
    assert torch.equal(torch.cat([held.y_val, held.defender_validation()[1]]), shared.y_val)
    assert shared.defender_validation()[0] is shared.x_val and torch.equal(held.x_train, shared.x_train)

    out = str(tmp_path / "run")
    assert cli.main(["run", "--attack", "label-flip", "--flip-pool", "val", "--poison-init", "random",
                     "--pretrain-epochs", "2", "--defender-val-fraction", "0.25", "--out", out, "--quiet"]) == 0
    poisons = protocol.load_state(os.path.join(out, "poisons.pt"))
    def nearest(x, pool):
        return torch.cdist(x.flatten(1), pool.flatten(1), compute_mode="donot_use_mm_for_euclid_dist").min(1)
    shared_images = nearest(poisons["x_poison"], shared.x_val)
    held_images = nearest(poisons["x_poison"], held.defender_validation()[0])
    assert (shared_images.values == 0).all() and (held_images.values > 0).all()  # D_v's images, none held out
    assert int(shared_images.indices.max()) >= n // 2  # random over the attacker's part, not only its first points
    assert json.load(open(os.path.join(out, "config.json")))["split"]["n_val"] == n - k

    influence = DEFENSES["influence"]
    detect, scored_against = influence.detect_poison, []

    def spy(self, x, y, **kwargs):
        scored_against.append((kwargs["x_val"], kwargs["y_val"]))
        return detect(self, x, y, **kwargs)
    monkeypatch.setattr(influence, "detect_poison", spy)
    metrics = protocol.stage_defend(out, DefenseConfig(defense="influence", **influence.quick))
    assert len(scored_against) == 2  # the poisoned set's filter and the clean baseline's
    assert all(torch.equal(x, held.defender_validation()[0]) and torch.equal(y, held.defender_validation()[1])
               for x, y in scored_against)
    assert metrics["defender_validation"] == "held out from D_v" and metrics["n_defender_validation"] == k


@pytest.mark.parametrize("argv, message", [
    (["1"], "in [0, 1)"), (["-0.1"], "in [0, 1)"), (["0.0001"], "leaves the defender none; use a fraction from 0.0009 to 0.9991"),
    (["0.5", "--perfect-knowledge"], "drop one of the two")])
def test_a_defender_val_fraction_that_leaves_a_side_empty_is_one_line_before_any_work(argv, message, tmp_path, capsys):
    out = tmp_path / "r"
    assert cli.main(["run", "--attack", "label-flip", "--defender-val-fraction", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and not out.exists()
    if "from" in message:  # the range it suggests is accepted
        assert protocol.load_splits(protocol.Config(defender_val_fraction=0.0009)).defender_validation()[1].numel() == 1


def test_the_clean_side_of_a_defense_is_computed_once_for_the_attacks_of_a_shared_pretraining(tmp_path, monkeypatch):
    """The defense applied to clean D_tr does not depend on the attack: runs that share a clean pretraining (a bench's
    runs of one seed) compute it once, and what they reuse equals computing it in a run outside the store."""
    shared = str(tmp_path / "shared")
    flip = protocol.Config.from_dict({"attack": "label-flip", "pretrain_epochs": 2})
    other_attack = dataclasses.replace(flip, flip_rule="random")
    for cfg, name in ((flip, "a"), (other_attack, "b")):
        protocol.run(cfg, str(tmp_path / name), shared_pretraining=shared)
    loss = DefenseConfig(defense="loss")  # a filter that scores with the pretrained defender
    first = protocol.stage_defend(str(tmp_path / "a"), loss)
    assert "clean_defense_reused_from" not in first

    trainings = []
    real_train = protocol.train_defender
    monkeypatch.setattr(protocol, "train_defender", lambda *a, **k: trainings.append(k.get("desc")) or real_train(*a, **k))
    second = protocol.stage_defend(str(tmp_path / "b"), loss)
    assert trainings == ["retrain defender (defended)"]  # the poisoned set's defense only
    assert second["clean_defense_reused_from"].startswith(shared)
    for name in ("clean_defended_accuracy", "clean_set_removed", "clean_report"):
        assert second[name] == first[name], name
    assert second["clean_defense_seconds_when_computed"] == first["clean_defense_seconds"]
    assert second["attack_drop_under_defense"] == pytest.approx(second["clean_defended_accuracy"]
                                                                - second["defended_accuracy"])
    # another defense with the same settings (sphere and slab read only the share, as loss) is its own
    sphere = protocol.stage_defend(str(tmp_path / "b"), DefenseConfig(defense="sphere"))
    assert "clean_defense_reused_from" not in sphere and len(trainings) == 3
    assert sphere["clean_report"] != second["clean_report"]
    monkeypatch.undo()

    # TGDA's pretraining adds an attacker (another entry of the store) but trains the same defender: it shares too
    tgda = protocol.Config.from_dict({"attack": "tgda", "pretrain_epochs": 2, "attacker_epochs": 0, "attack_epochs": 1,
                                      "attack_batch_size": 1000, "follower_steps": 1, "solver_iterations": 2})
    protocol.run(tgda, str(tmp_path / "t"), shared_pretraining=shared)
    assert len([e for e in os.listdir(shared) if e != "clean_defenses"]) == 2
    assert protocol.stage_defend(str(tmp_path / "t"), loss)["clean_defense_reused_from"] == second["clean_defense_reused_from"]

    alone = str(tmp_path / "alone")  # the independent check: the same run outside the store computes its own
    protocol.run(other_attack, alone)
    computed = protocol.stage_defend(alone, loss)
    assert "clean_defense_reused_from" not in computed
    for name in ("clean_defended_accuracy", "clean_set_removed", "clean_report"):
        assert computed[name] == second[name], name

    # other defense settings, or another validation set for the defender, are computed again
    other = protocol.stage_defend(str(tmp_path / "b"), DefenseConfig(defense="loss", defense_fraction=0.05),
                                  overwrite=True)
    assert "clean_defense_reused_from" not in other and other["clean_set_removed"] > first["clean_set_removed"]
    protocol.run(dataclasses.replace(flip, defender_val_fraction=0.5), str(tmp_path / "c"), shared_pretraining=shared)
    assert "clean_defense_reused_from" not in protocol.stage_defend(str(tmp_path / "c"), loss)

    # a damaged kept file is computed again and replaced; a store it cannot write costs the reuse, not the result
    kept = second["clean_defense_reused_from"]
    with open(kept, "w") as fh:
        fh.write('{"key": {"trunc')
    again = protocol.stage_defend(str(tmp_path / "b"), loss, overwrite=True)
    assert "clean_defense_reused_from" not in again and again["clean_defended_accuracy"] == first["clean_defended_accuracy"]
    assert "clean_defense_reused_from" in protocol.stage_defend(str(tmp_path / "b"), loss, overwrite=True)
    monkeypatch.setattr(protocol.tempfile, "mkstemp", lambda **k: (_ for _ in ()).throw(PermissionError("read-only")))
    os.remove(kept)
    unkept = protocol.stage_defend(str(tmp_path / "b"), loss, overwrite=True)
    assert unkept["clean_defended_accuracy"] == first["clean_defended_accuracy"] and not os.path.exists(kept)


def test_evaluate_with_a_defense_keeps_a_finished_stage_3(label_flip_run, monkeypatch, capsys):
    def no_retraining(*args, **kwargs):
        raise AssertionError("the finished stage 3 was retrained")

    monkeypatch.setattr(protocol, "stage_evaluate", no_retraining)
    assert cli.main(["evaluate", "--out", label_flip_run, "--defense", "sphere", "--quiet"]) == 0
    assert "stage 3 of these poisons is finished" in capsys.readouterr().out
    monkeypatch.undo()
    path = os.path.join(label_flip_run, "metrics.json")
    recorded = json.load(open(path))
    for damaged in ("{", json.dumps({k: v for k, v in recorded.items() if k != "attack"})):  # stage 3 runs again
        with open(path, "w") as fh:
            fh.write(damaged)
        assert protocol.finished_evaluation(label_flip_run) is None
        assert cli.main(["evaluate", "--out", label_flip_run, "--defense", "sphere", "--quiet"]) == 0
        assert "stage 3 of these poisons is finished" not in capsys.readouterr().out
        assert protocol.finished_evaluation(label_flip_run)["poisoned_accuracy"] == recorded["poisoned_accuracy"]
