"""A run folder's files read back safely: truncated, garbage, tampered or foreign files stop a stage with one
line naming the file and the command that rewrites it, before any work and without leaving results
behind; a malicious pickle never runs."""
import json
import os
import pickle
import shutil

import pytest
import torch

from tgda_attack import cli


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run") / "r")
    assert cli.main(["run", "--attack", "label-flip", "--pretrain-epochs", "1", "--out", out, "--quiet"]) == 0
    return out


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # loading this pickle unsafely would create the marker file


def _damage(folder, name, how, tmp_path):
    path = os.path.join(folder, name)
    if how == "garbage":
        with open(path, "w") as fh:
            fh.write("not what it should be")
    elif how == "truncated":
        with open(path, "rb") as fh:
            head = fh.read(64)
        with open(path, "wb") as fh:
            fh.write(head)
    elif how == "pickle":
        with open(path, "wb") as fh:
            pickle.dump(_RunsCode(str(tmp_path / "ran")), fh)
    elif how == "zip-pickle":  # torch.save's own format around an object that is not a tensor
        torch.save({"x_poison": _RunsCode(str(tmp_path / "ran"))}, path)
    elif how == "empty-object":
        with open(path, "w") as fh:
            fh.write("{}")
    elif how == "bad-labels":
        state = torch.load(path, weights_only=True)
        state["y_poison"] = state["y_poison"] + 100
        torch.save(state, path)
    elif how == "wrong-shape":
        state = torch.load(path, weights_only=True)
        state["x_poison"] = state["x_poison"][:, :, :5]
        torch.save(state, path)


@pytest.mark.parametrize("name, how, message", [
    ("attack.json", "garbage", "not valid JSON"), ("attack.json", "truncated", "not valid JSON"),
    ("attack.json", "empty-object", "lacks 'attack_seconds'"), ("pretrain.json", "empty-object", "lacks 'clean_accuracy'"),
    ("poisons.pt", "garbage", "not a tensor file"), ("poisons.pt", "truncated", "truncated or corrupted"),
    ("poisons.pt", "pickle", "nothing in it ran"), ("poisons.pt", "zip-pickle", "nothing in it ran"), ("poisons.pt", "bad-labels", "labels outside"),
    ("poisons.pt", "wrong-shape", "shaped like the data"),
])
def test_evaluate_refuses_a_damaged_file_before_retraining(finished_run, tmp_path, capsys, name, how, message):
    folder = str(tmp_path / "copy")
    shutil.copytree(finished_run, folder)
    for result in ("metrics.json", "defender_poisoned.pt", "poisons.png"):
        os.remove(os.path.join(folder, result))
    _damage(folder, name, how, tmp_path)
    assert cli.main(["evaluate", "--out", folder, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and name in err and "\n" not in err and "Traceback" not in err
    stage = "pretrain" if name == "pretrain.json" else "attack"
    assert f"tgda-attack {stage} --out {folder}" in err
    assert not (tmp_path / "ran").exists()  # the pickle's code never ran
    assert not os.path.exists(os.path.join(folder, "metrics.json"))  # nothing half-written
    assert not os.path.exists(os.path.join(folder, "defender_poisoned.pt"))


RUN = ["run", "--attack", "label-flip", "--pretrain-epochs", "1", "--quiet"]  # finished_run's


def _copy(finished_run, tmp_path):
    folder = str(tmp_path / "copy")
    shutil.copytree(finished_run, folder)
    return folder


@pytest.mark.parametrize("edit, made_with", [({"attack": "gradient-canceling"}, "attack.json"), ({"epsilon": 0.05}, "attack.json"),
                                             ({"seed": 3}, "pretrain.json"), ({"pretrain_lr": 0.5}, "pretrain.json")])
def test_a_config_json_changed_under_the_files_it_made_is_refused_not_reported_as_their_settings(
        finished_run, tmp_path, capsys, edit, made_with):
    """A hand-edited config.json once relabelled a label-flip run's numbers as Gradient Canceling's (or an epsilon of
    0.05 over 84 poisons, seed 0's clean accuracy beside a retraining under seed 3): each later stage and --resume
    now compare it with the settings pretrain.json and attack.json record."""
    folder = _copy(finished_run, tmp_path)
    path = os.path.join(folder, "config.json")
    original = json.load(open(path))
    json.dump({**original, **edit}, open(path, "w"))
    key = next(iter(edit))
    for argv in (["evaluate", "--out", folder], ["evaluate", "--out", folder, "--defense", "slab"],
                 [*RUN, *(f"--{key.replace('_', '-')}", str(edit[key])), "--out", folder, "--resume"]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert f"no longer holds the settings {made_with} was made with ({key} " in err and "\n" not in err
    before = json.load(open(os.path.join(finished_run, "metrics.json")))
    assert json.load(open(os.path.join(folder, "metrics.json"))) == before  # nothing rewritten
    # where the run executes, and stage 3's own retrainings, may change: a folder made on a GPU is evaluated on a CPU
    json.dump({**original, "device": "cpu", "threads": 1, "retrainings": 2}, open(path, "w"))
    assert cli.main(["evaluate", "--out", folder, "--quiet"]) == 0


def test_resume_of_a_finished_run_draws_a_deleted_figure_again(finished_run, tmp_path):
    folder = _copy(finished_run, tmp_path)
    os.remove(os.path.join(folder, "poisons.png"))
    assert cli.main([*RUN, "--out", folder, "--resume"]) == 0
    assert os.path.getsize(os.path.join(folder, "poisons.png")) > 1000  # the command printed its path: it is there


def test_a_config_json_changed_to_another_attack_before_the_attack_stage_makes_that_attack(tmp_path, capsys):
    """Running the stages separately with a config.json edited between them is a workflow: stage 1 fits any attack
    whose stage 1 settings it has (a TGDA stage 1, with its attacker, serves a label flip), and `attack` writes the
    attack.json it would otherwise be compared with."""
    folder = str(tmp_path / "r")
    tiny = ["--pretrain-epochs", "1", "--attacker-epochs", "0", "--quiet"]
    assert cli.main(["pretrain", *tiny, "--out", folder]) == 0  # TGDA's stage 1: defender and attacker
    path = os.path.join(folder, "config.json")
    json.dump({**json.load(open(path)), "attack": "label-flip"}, open(path, "w"))
    assert cli.main(["attack", "--out", folder, "--quiet"]) == 0 and cli.main(["evaluate", "--out", folder, "--quiet"]) == 0
    json.dump({**json.load(open(path)), "attack": "gradient-canceling", "gc_steps": 2}, open(path, "w"))
    assert cli.main(["attack", "--out", folder, "--quiet"]) == 0 and cli.main(["evaluate", "--out", folder, "--quiet"]) == 0
    assert json.load(open(os.path.join(folder, "metrics.json")))["attack"] == "gradient-canceling"
    capsys.readouterr()  # a resume with another attack and epsilon names the epsilon, and counts the attacks' own
    assert cli.main([*RUN, "--epsilon", "0.05", "--out", folder, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "attack 'gradient-canceling' -> 'label-flip'" in err and "epsilon 0.03 -> 0.05" in err
    assert "setting(s) only one of the two attacks reads" in err


def test_attack_over_a_stage_1_that_did_not_finish_advises_its_resume(finished_run, tmp_path, capsys):
    folder = _copy(finished_run, tmp_path)
    for name in ("pretrain.json", "attack.json", "poisons.pt", "metrics.json"):
        os.remove(os.path.join(folder, name))  # killed after the defender's weights, before pretrain.json
    assert cli.main(["attack", "--out", folder]) == 2
    assert f"stage 1 did not finish; `tgda-attack pretrain --out {folder} --resume`" in capsys.readouterr().err
    assert cli.main(["pretrain", "--attack", "label-flip", "--pretrain-epochs", "1", "--quiet", "--out", folder,
                     "--resume"]) == 0  # the advice works


@pytest.mark.parametrize("content", ["{}", "[1]", "empty weights"])
def test_resume_over_a_metrics_json_that_is_no_result_runs_stage_3_again(finished_run, tmp_path, content):
    """A metrics.json that is JSON but not a result (a hand edit, another program), or an emptied retrained defender
    beside it, is not returned as a finished stage 3: --resume retrains stage 3 (the same seed, the same numbers),
    instead of a KeyError at the first number read or a defense that stops at the file later."""
    folder = _copy(finished_run, tmp_path)
    name = "defender_poisoned.pt" if content == "empty weights" else "metrics.json"
    with open(os.path.join(folder, name), "w") as fh:
        fh.write("" if content == "empty weights" else content)
    assert cli.main([*RUN, "--out", folder, "--resume"]) == 0
    before, again = (json.load(open(os.path.join(f, "metrics.json"))) for f in (finished_run, folder))
    assert (again["clean_accuracy"], again["poisoned_accuracy"]) == (before["clean_accuracy"], before["poisoned_accuracy"])


@pytest.mark.parametrize("content, message", [("{}", "lacks 'clean_accuracy'"), ("null", "does not hold a JSON object")])
def test_resume_over_a_pretrain_json_that_is_no_result_stops_with_overwrite_advice(finished_run, tmp_path, capsys,
                                                                                  content, message):
    """Not stage 1 trained again under the folder's poisons (on another machine or a GPU it trains another model)."""
    folder = _copy(finished_run, tmp_path)
    with open(os.path.join(folder, "pretrain.json"), "w") as fh:
        fh.write(content)
    assert cli.main([*RUN, "--out", folder, "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and f"tgda-attack pretrain --out {folder} --overwrite" in err and "\n" not in err
    assert cli.main([*RUN, "--out", folder, "--overwrite"]) == 0  # the advice works
    assert json.load(open(os.path.join(folder, "pretrain.json")))["clean_accuracy"] == \
        json.load(open(os.path.join(finished_run, "pretrain.json")))["clean_accuracy"]


def test_resume_with_other_threads_sets_the_later_stages_threads(finished_run, tmp_path):
    """threads is not part of a run's identity: --resume --threads N continues the run, and the stages after a kept
    stage 1 (which read config.json) run with N."""
    folder = _copy(finished_run, tmp_path)
    os.remove(os.path.join(folder, "metrics.json"))
    assert cli.main([*RUN, "--out", folder, "--resume", "--threads", "1"]) == 0
    assert json.load(open(os.path.join(folder, "config.json")))["threads"] == 1


def test_resume_with_other_threads_over_a_finished_run_keeps_the_threads_it_ran_with(finished_run, tmp_path):
    """Nothing runs, so config.json keeps the threads its results were made with (a bench's title reads them)."""
    folder = _copy(finished_run, tmp_path)
    recorded = json.load(open(os.path.join(folder, "config.json")))["threads"]
    assert cli.main([*RUN, "--out", folder, "--resume", "--threads", str(recorded + 1)]) == 0
    assert json.load(open(os.path.join(folder, "config.json")))["threads"] == recorded
    assert cli.main(["pretrain", "--attack", "label-flip", "--pretrain-epochs", "1", "--out", folder, "--quiet",
                     "--resume", "--threads", str(recorded + 1)]) == 0  # stage 1 alone: for the stages that follow
    assert json.load(open(os.path.join(folder, "config.json")))["threads"] == recorded + 1


@pytest.mark.parametrize("content", ["[]", "null", "folder"])
def test_a_config_json_that_holds_no_settings_is_one_line_and_overwrite_replaces_it(finished_run, tmp_path, capsys,
                                                                                    content):
    folder = _copy(finished_run, tmp_path)
    path = os.path.join(folder, "config.json")
    os.remove(path)
    if content == "folder":
        os.mkdir(path)
    else:
        with open(path, "w") as fh:
            fh.write(content)
    for argv in ([*RUN, "--out", folder, "--resume"], ["evaluate", "--out", folder, "--quiet"]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert "config.json" in err and "--overwrite" in err and "\n" not in err
        assert ("cannot be read (Is a directory)" if content == "folder" else "does not hold a JSON object") in err
    assert cli.main([*RUN, "--out", folder, "--overwrite"]) == 0  # reads nothing it replaces
    assert "clean_accuracy" in json.load(open(os.path.join(folder, "metrics.json")))


def test_run_files_without_a_config_json_are_not_taken_for_a_new_folder(tmp_path, capsys):
    """A stale attack checkpoint (no config.json says what made it) would be resumed by an attack of other settings."""
    folder = tmp_path / "r"
    folder.mkdir()
    torch.save({"epoch": 3}, folder / "attack_checkpoint.pt")
    assert cli.main([*RUN, "--out", str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert "attack_checkpoint.pt" in err and "no config.json" in err and "--overwrite" in err and "\n" not in err
    assert sorted(os.listdir(folder)) == ["attack_checkpoint.pt"]
    assert cli.main([*RUN, "--out", str(folder), "--overwrite"]) == 0
    assert not (folder / "attack_checkpoint.pt").exists()


@pytest.mark.parametrize("command", ["attack", "evaluate", "defend"])
def test_a_folder_that_cannot_be_written_stops_a_stage_before_its_work(finished_run, tmp_path, capsys, monkeypatch,
                                                                       command):
    """The stages write only at their end: a read-only folder (simulated: CI runs as root, which writes anyway) is
    named before the attack or the retraining, not after it."""
    import builtins

    from tgda_attack import rundir
    folder = _copy(finished_run, tmp_path)
    before = {name: os.path.getmtime(os.path.join(folder, name)) for name in os.listdir(folder)}

    def read_only(path, mode="r", *args, **kwargs):
        if str(path).startswith(folder) and any(c in mode for c in "wax+"):
            raise PermissionError(13, "Permission denied", path)
        return builtins.open(path, mode, *args, **kwargs)
    monkeypatch.setattr(rundir, "open", read_only, raising=False)
    argv = {"attack": ["attack"], "evaluate": ["evaluate"], "defend": ["evaluate", "--defense", "loss"]}[command]
    assert cli.main([*argv, "--out", folder, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{folder} cannot be written (Permission denied)" in err and "\n" not in err
    assert {name: os.path.getmtime(os.path.join(folder, name)) for name in os.listdir(folder)} == before


@pytest.mark.parametrize("how", ["garbage", "pickle"])
def test_the_attack_stage_refuses_damaged_pretrained_weights(finished_run, tmp_path, capsys, how):
    folder = str(tmp_path / "copy")
    shutil.copytree(finished_run, folder)
    _damage(folder, "defender_pretrained.pt", how, tmp_path)
    assert cli.main(["attack", "--out", folder, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "defender_pretrained.pt" in err and "\n" not in err and "tgda-attack pretrain" in err
    assert not (tmp_path / "ran").exists()


def test_weights_of_another_architecture_are_named_as_such(finished_run, tmp_path, capsys):
    folder = str(tmp_path / "copy")
    shutil.copytree(finished_run, folder)
    torch.save({"0.weight": torch.zeros(2, 2)}, os.path.join(folder, "defender_pretrained.pt"))
    assert cli.main(["attack", "--out", folder, "--quiet"]) == 2
    assert "does not hold the weights of this run's" in capsys.readouterr().err


def test_progress_in_a_log_file_is_plain_lines_not_carriage_return_frames(monkeypatch):
    import io

    from tgda_attack.progress import progress_bar
    log = io.StringIO()
    monkeypatch.setattr("sys.stderr", log)
    bar = progress_bar(range(500), desc="work")
    for _ in bar:
        bar.set_postfix(loss=0.5)
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and 1 <= len(lines) <= 3 and "500/500" in lines[-1]


@pytest.mark.parametrize("name, command", [
    ("defender_pretrained.pt", "attack"), ("attacker_pretrained.pt", "attack"), ("attack_checkpoint.pt", "attack"),
    ("poisons.pt", "evaluate"), ("defender_poisoned.pt", "defend"), ("defender_pretrained.pt", "defend"),
])
def test_a_malicious_file_is_refused_at_every_place_a_run_reads_one(tmp_path, capsys, name, command):
    """A pickle that would create a file when loaded, at each tensor file a stage reads: refused, nothing ran."""
    out = str(tmp_path / "r")
    flags = ["--attack", "tgda", "--pretrain-epochs", "1", "--attacker-epochs", "1", "--attack-epochs", "1",
             "--follower-steps", "1", "--solver-iterations", "2", "--quiet"]
    assert cli.main(["run", *flags, "--out", out]) == 0
    capsys.readouterr()
    for how in ("pickle", "zip-pickle"):
        _damage(out, name, how, tmp_path)
        argv = {"attack": ["attack", "--out", out], "evaluate": ["evaluate", "--out", out],
                "defend": ["evaluate", "--out", out, "--defense", "loss"]}[command]
        if command == "defend":  # evaluate rewrites defender_poisoned.pt: damage it after, through the API
            from tgda_attack import protocol
            from tgda_attack.config import DefenseConfig
            with pytest.raises(protocol.RunFolderError, match="nothing in it ran"):
                protocol.stage_defend(out, DefenseConfig(defense="loss"), overwrite=True)
        else:
            assert cli.main(argv + ["--quiet"]) == 2
            err = capsys.readouterr().err.strip()
            assert name in err and "nothing in it ran" in err and "\n" not in err
            if name == "attack_checkpoint.pt":  # not "rerun the attack", which would read it again
                assert "remove it" in err
        assert not (tmp_path / "ran").exists()


def test_debug_shows_the_error_itself_instead_of_its_one_line(tmp_path):
    out = str(tmp_path / "r")
    assert cli.main(["run", "--epsilon", "2", "--out", out]) == 2
    with pytest.raises(cli.UsageError, match="epsilon"):
        cli.main(["--debug", "run", "--epsilon", "2", "--out", out])


def test_a_gpu_runs_folder_is_evaluated_on_a_cpu_as_the_error_advises(finished_run, tmp_path, capsys):
    """A folder a GPU made (config.json "device": "cuda"), copied to a machine without one: the error advised
    --device cpu, which `evaluate` did not take and `run --resume` refused as another run's settings."""
    folder = _copy(finished_run, tmp_path)
    path = os.path.join(folder, "config.json")
    with open(path) as fh:
        recorded = json.load(fh)
    with open(path, "w") as fh:
        json.dump({**recorded, "device": "cuda"}, fh)
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the folder runs as it is")
    assert cli.main(["evaluate", "--out", folder, "--quiet"]) == 2
    assert "use --device cpu" in capsys.readouterr().err
    assert cli.main(["evaluate", "--out", folder, "--quiet", "--device", "cpu", "--threads", "1"]) == 0
    with open(path) as fh:
        now = json.load(fh)
    assert (now["device"], now["threads"]) == ("cpu", 1) and {k: v for k, v in now.items() if k not in ("device", "threads")} \
        == {k: v for k, v in recorded.items() if k not in ("device", "threads")}
    with open(path, "w") as fh:
        json.dump({**now, "device": "cuda"}, fh)
    os.remove(os.path.join(folder, "metrics.json"))
    capsys.readouterr()
    assert cli.main([*RUN, "--out", folder, "--resume"]) == 2  # a resume goes on on the run's device, not on cpu
    assert f"{folder} was made on cuda (" in capsys.readouterr().err
    assert cli.main([*RUN, "--out", folder, "--resume", "--device", "cpu"]) == 0  # the device is not the run's identity
    for argv, message in ((["--device", "tpu"], "is not a device name"), (["--threads", "-1"], "threads must be 0")):
        assert cli.main(["attack", "--out", folder, *argv]) == 2
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("name, edit", [
    ("metrics.json", lambda m: m.pop("mean_perturbation_l2")),
    ("metrics.json", lambda m: m.pop("accuracy_drop_median_last_epochs")),
    ("metrics.json", lambda m: m["clean_accuracy_last_epochs"].update(accuracy=[])),
    ("metrics.json", lambda m: m.update(clean_accuracy_last_epochs="x")),
    ("defense_loss/metrics.json", lambda m: m.pop("clean_defended_accuracy")),
    ("defense_loss/metrics.json", lambda m: m.update(precision="x")),
    ("defense_loss/metrics.json", lambda m: m.update(defended_accuracy_last_epochs="x")),
])
def test_a_results_file_edited_in_part_is_computed_again_not_a_traceback(finished_run, tmp_path, capsys, name, edit):
    """A key its printout or the seeds' summary reads deleted, a list emptied, a string for a number: KeyError,
    ValueError or TypeError after the run; as a damaged file, the stage computes it again (the same seed, the
    same result)."""
    folder = _copy(finished_run, tmp_path)
    assert cli.main(["evaluate", "--out", folder, "--quiet", "--defense", "loss"]) == 0
    path = os.path.join(folder, name)
    whole = json.load(open(path))
    damaged = json.loads(json.dumps(whole))
    edit(damaged)
    with open(path, "w") as fh:
        json.dump(damaged, fh)
    capsys.readouterr()
    assert cli.main([*RUN, "--out", folder, "--resume", "--defense", "loss"]) == 0
    again = json.load(open(path))
    for key in ("clean_accuracy", "poisoned_accuracy", "defended_accuracy", "clean_defended_accuracy", "precision"):
        assert again.get(key) == whole.get(key), key
    assert again == {**whole, **{k: again[k] for k in again if k.endswith("_seconds")}}


def test_a_resume_under_other_defense_settings_stops_before_the_runs_printout(finished_run, tmp_path, capsys):
    folder = _copy(finished_run, tmp_path)
    assert cli.main(["evaluate", "--out", folder, "--quiet", "--defense", "loss"]) == 0
    capsys.readouterr()
    assert cli.main([*RUN, "--out", folder, "--resume", "--defense", "loss", "--defense-fraction", "0.05"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "holds results of defense settings {'defense_fraction': 0.03}" in captured.err
    assert cli.main([*RUN, "--out", folder, "--resume", "--defense", "loss"]) == 0  # the same settings: kept
