"""A run's folder: the files each stage of the protocol writes, how they are written (JSON through a
temporary file and a rename, models and poisons as plain tensors read with weights_only=True), and
which settings wrote them.

config.json records the settings of the run that owns the folder. A run started into a folder that
holds another run is stopped before any work (`RunFolderError`): `overwrite` removes that run's files
and starts afresh; `resume` continues it, and only with the very same settings, so that no result is
ever reported under settings that did not produce it.
"""
import contextlib
import dataclasses
import json
import os
import pickle
import shutil
import warnings

import torch

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

RUN_FILES = ("config.json", "pretrain.json", "defender_pretrained.pt", "attacker_pretrained.pt", "attack_checkpoint.pt",
             "attack_checkpoint.pt.tmp", "attack.json", "poisons.pt", "attacker_attacked.pt", "defender_attacked.pt",
             "defender_poisoned.pt", "metrics.json", "poisons.png", "retrainings.json")


# The files in which trainings keep their progress (training.TrainingCheckpoint): TRAINING_CHECKPOINT + a name + ".pt"
# in a run folder (stage 1, stage 3, the retrainings) or a defense_NAME folder.
TRAINING_CHECKPOINT = "training_checkpoint."


def _training_checkpoints(out, prefix=""):
    return [name for name in os.listdir(out) if name.startswith(TRAINING_CHECKPOINT + prefix)]


def remove_training_checkpoints(folder, prefix=""):
    """Removes the trainings kept in `folder` whose names start with `prefix` (with their temporary files): called
    where the stage they belong to is finished, also when a kill came between its result and its own clean-up."""
    if os.path.isdir(folder):
        for name in _training_checkpoints(folder, prefix):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(folder, name))


# The stage (a `tgda-attack` command) that writes each file of a run folder, named in the advice for a damaged one.
WRITTEN_BY = {"config.json": "pretrain", "pretrain.json": "pretrain", "defender_pretrained.pt": "pretrain",
              "attacker_pretrained.pt": "pretrain", "attack_checkpoint.pt": "attack", "attack.json": "attack",
              "poisons.pt": "attack", "defender_poisoned.pt": "evaluate", "metrics.json": "evaluate",
              "poisons.png": "evaluate"}

EVALUATION_FILES = tuple(name for name, stage in WRITTEN_BY.items() if stage == "evaluate")  # of poisons.pt's poisons


def clear_evaluation(out):
    """Removes what stage 3 and the defenses wrote of the poisons in `out` (metrics, models, figure, defense_*
    folders): called before new poisons replace them, so that no result of the old poisons outlives them
    (retrainings.json stays: it records the digest of the poisons it measured)."""
    for name in (*EVALUATION_FILES, *_training_checkpoints(out)):  # a kept retraining is of the old poisons
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(out, name))
    clear_defenses(out)


def clear_defenses(out):
    """Removes the defense_* folders of `out`: their filters scored points with the retrained defender
    (defender_poisoned.pt), so a new one (stage 3 run again) outdates them."""
    for entry in os.scandir(out):
        if entry.is_dir() and entry.name.startswith("defense_"):
            shutil.rmtree(entry.path)


class RunFolderError(ValueError):
    """The output folder holds a run that this one must not silently continue or overwrite."""


class OtherSettingsError(RunFolderError):
    """The folder holds a run (or defense results) of other settings; `changed` says which differ."""

    def __init__(self, message, changed):
        super().__init__(message)
        self.changed = changed


@contextlib.contextmanager
def exclusive(out):
    """Holds an exclusive lock on the run folder `out` (its file .lock), waiting for another process that holds
    it: two benches whose tables share a run (tgda_attack.bench) make it once, one after the other. Where
    fcntl is missing (Windows) it does not lock."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, ".lock"), "a") as fh:
        if fcntl is not None:
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(fh, fcntl.LOCK_UN)


def write_json(path, obj):
    """Written to a temporary file, flushed to disk, then renamed: a kill at any instant leaves the old file or
    the new one, never half of one."""
    tmp = os.fspath(path) + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save_atomic(obj, path):
    """torch.save through a temporary file, fsync and a rename (as write_json); `path` a str or a pathlib.Path."""
    tmp = os.fspath(path) + ".tmp"
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def copy_atomic(src, dst):
    """A copy of the file `src` at `dst` through a temporary file of this process, fsync and a rename: a kill
    leaves the old `dst` or the new one, and two processes copying to one `dst` do not write one temporary."""
    tmp = f"{dst}.{os.getpid()}.tmp"
    shutil.copyfile(src, tmp)
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, dst)


def redo_from_stage_1(folder):
    """The advice for a run folder whose stage 1 is damaged or gone (the later stages were made from it)."""
    return (f"rerun `tgda-attack pretrain --out {folder} --overwrite` with the run's settings (or `tgda-attack run ... "
            "--overwrite`) to make the run again from stage 1")


def _unreadable(path, what):
    name, folder = os.path.basename(path), os.path.dirname(path) or "."
    stage = WRITTEN_BY.get(name)
    if name.startswith("attack_checkpoint"):  # rerunning the attack would read it again: it holds progress only
        advice = (f"remove it and rerun `tgda-attack attack --out {folder}` (the attack then starts afresh: the file "
                  "holds only its progress)")
    elif stage == "pretrain":  # without --overwrite, stage 1 would read the folder's files (this one) again
        advice = redo_from_stage_1(folder)
    else:
        advice = f"rerun `tgda-attack {stage} --out {folder}` to write it again" if stage else "remove it"
    return RunFolderError(f"{path} {what}; {advice}")


def read_json(path):
    """A JSON file of a run folder; RunFolderError (naming the stage that rewrites it) if it is not valid JSON."""
    try:
        with open(path) as fh:
            return json.load(fh)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _unreadable(path, f"is not valid JSON (truncated or edited: {exc})") from None


def read_json_object(path, required):
    """read_json of a file that must be an object with the keys `required` (name -> type or tuple of types)."""
    values = read_json(path)
    if not isinstance(values, dict):
        raise _unreadable(path, "does not hold a JSON object")
    for key, kind in required.items():
        value = values.get(key)
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise _unreadable(path, f"lacks {key!r} or holds a wrong value for it")
    return values


def check_writable(folder):
    """RunFolderError unless a file can be created in `folder` (a stage that only writes at its end checks first:
    a read-only folder would otherwise cost the whole stage)."""
    probe = os.path.join(folder, f".write-probe.{os.getpid()}")
    try:
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as exc:
        raise RunFolderError(f"{folder} cannot be written ({exc.strerror or exc}): this stage writes its results "
                             "there; make it writable, or copy the folder elsewhere and run on the copy") from None


def check_out(out):
    """RunFolderError for an --out that names no folder a run could use: empty, or through a link to nothing (the
    makedirs of a run would fail with "File exists")."""
    if not out.strip():
        raise RunFolderError(f"--out {out!r} names no folder; give the run's output folder")
    # Every prefix of the path as written, not normalised: the system resolves "link/.." through the link.
    path = os.sep if os.path.isabs(out) else os.getcwd()
    for part in out.split(os.sep):
        if not part:
            continue
        path = os.path.join(path, part)
        if os.path.islink(path):
            try:
                os.stat(path)
            except FileNotFoundError:
                raise RunFolderError(f"--out {out}: {path} is a link to {os.readlink(path)}, which does not exist; "
                                     "create that folder, or choose another --out") from None
            except OSError:  # a link into a folder this user cannot read: the stage's own error names it
                pass
        elif os.path.exists(path) and not os.path.isdir(path):
            raise RunFolderError(f"--out {out}: {path} is a file, not a folder; choose another --out")


def seed_runs(out):
    """The seed_K folders of `out` that hold a run (`tgda-attack run --seeds` writes one a seed), sorted by name."""
    if not os.path.isdir(out):
        return []
    return sorted(n for n in os.listdir(out) if n.startswith("seed_") and os.path.exists(os.path.join(out, n, "config.json")))


SUMMARY_FILES = ("summary.md", "summary.json")  # `run --seeds` writes them beside its seed_K folders


def drop_stale_summary(out):
    """After a command changed the results of `out`, a seed_K folder of `run --seeds`: removes the summary beside it,
    which summarised that seed as it was, and returns a note saying how to write it again (None where there is none)."""
    out = os.path.abspath(out)
    parent, name = os.path.dirname(out), os.path.basename(out)
    found = [n for n in SUMMARY_FILES if os.path.isfile(os.path.join(parent, n))]
    if not name.startswith("seed_") or "summary.json" not in found:
        return None
    try:
        seeds = read_json_object(os.path.join(parent, "summary.json"), {}).get("seeds")
    except RunFolderError:
        seeds = None
    if not isinstance(seeds, list) or name not in {f"seed_{s}" for s in seeds}:
        return None  # not the summary `run --seeds` wrote of this seed (a user's own file): left alone
    for each in found:
        os.remove(os.path.join(parent, each))
    again = f"--seeds {' '.join(map(str, seeds))} "
    return (f"note: removed {' and '.join(os.path.join(parent, n) for n in found)}, which summarised "
            f"{os.path.basename(out)} as it was; `tgda-attack run {again}--out {parent} --resume` (with the run's "
            "settings, and --defense if it had one) writes them again from the seeds' folders")


def bench_tables(out):
    """What `tgda-attack bench` wrote in `out` (its table_N folders and files), sorted by name."""
    if not os.path.isdir(out):
        return []
    return sorted(n for n in os.listdir(out) if n.startswith("table_"))


def need(out, *names):
    check_out(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise NotADirectoryError(f"--out {out} is a file, not a run folder; give the folder a run wrote")
    missing = [n for n in names if not os.path.exists(os.path.join(out, n))]
    seeds = seed_runs(out) if "config.json" in missing else []
    if seeds:  # `run --seeds` wrote one folder a seed
        raise RunFolderError(f"{out} holds the runs of several seeds ({', '.join(seeds[:3])}{' ...' if len(seeds) > 3 else ''}), "
                             f"one folder each: give one of them, e.g. --out {os.path.join(out, seeds[0])}")
    if missing:
        raise FileNotFoundError(f"{out} lacks {', '.join(missing)}: run the earlier stage(s) into this folder first "
                                "(tgda-attack pretrain / attack), or use tgda-attack run")


def load_state(path, required=None):
    """A tensor file of a run folder, read with weights_only=True (no code in it can run); RunFolderError if it
    is truncated, corrupted, holds anything but tensors and plain containers, or (`required`: name -> type)
    lacks an entry."""
    with open(path, "rb") as fh:
        if fh.read(4) != b"PK\x03\x04":  # torch.save writes a zip archive; anything else is never unpickled
            raise _unreadable(path, "is not a tensor file written by this program (garbage, or a plain pickle, which "
                                    "could run code if loaded; it was not unpickled, so nothing in it ran)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols: the error below says it all
            state = torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError:  # torch's own advice (weights_only=False) would run the file's code: not given
        raise _unreadable(path, "holds objects other than tensors, which could run code if loaded any other way "
                                "(it was read with weights_only=True: nothing in it ran). A file this program wrote "
                                "never does: do not load it elsewhere") from None
    except Exception:  # RuntimeError, EOFError, ... by the kind of damage
        raise _unreadable(path, "cannot be read as a tensor file: it is truncated or corrupted") from None
    if required:
        if not isinstance(state, dict):
            raise _unreadable(path, "does not hold a dict of tensors")
        for key, kind in required.items():
            if not isinstance(state.get(key), kind):
                raise _unreadable(path, f"lacks {key!r} or holds a wrong value for it")
    return state


def load_weights(model, path):
    """Loads the state dict at `path` into `model`; RunFolderError if the file is unreadable or holds the
    weights of another architecture."""
    state = load_state(path)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise _unreadable(path, f"does not hold the weights of this run's {type(model).__name__} ({first})") from None
    return model


def settings_of(out):
    """The settings recorded in out/config.json (a dict without the data split's summary), or None."""
    path = os.path.join(out, "config.json")
    if not os.path.exists(path):
        return None
    try:
        values = read_json_object(path, {})
    except OSError as exc:  # a folder of that name, a file that cannot be read
        raise _unreadable(path, f"cannot be read ({exc.strerror or exc})") from None
    values.pop("split", None)
    return values


def _run_files(out):
    """The files of a run (and its defense folders) in `out`: what --overwrite removes."""
    names = [n for n in os.listdir(out) if n in RUN_FILES or n.startswith("attack_checkpoint.rank")  # --dp-mode partitions
             or (n.startswith("defense_") and os.path.isdir(os.path.join(out, n)))] + _training_checkpoints(out)
    return sorted(names, key=lambda n: n != "config.json")  # config.json first: a kill midway leaves no run to resume


def claim(out, cfg, *, overwrite=False, resume=False):
    """Makes `out` the folder of the run with settings `cfg` (resolved), or raises RunFolderError.

    A folder without config.json is claimed as it is, unless it holds run files (whose settings are then unknown:
    RunFolderError unless `overwrite`). With another run's config.json: `overwrite`
    deletes that run's files, `resume` requires the same settings, neither stops with a message.
    Returns True when the folder already held this run (its finished stages can be skipped)."""
    held = claimable(out, cfg, overwrite=overwrite, resume=resume)
    os.makedirs(out, exist_ok=True)
    if overwrite:  # whatever the files hold, a config.json damaged or not: read nothing, remove them
        for name in _run_files(out):
            path = os.path.join(out, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    return held


def claimable(out, cfg, *, overwrite=False, resume=False):
    """What claim(out, cfg, ...) would return, or the RunFolderError it would raise, without changing anything (the
    command line checks every seed's folder so before the first seed's work)."""
    if overwrite and resume:
        raise RunFolderError("--overwrite and --resume exclude each other: start afresh or continue, not both")
    check_out(out)
    if overwrite or not os.path.isdir(out):
        return False
    recorded = settings_of(out)
    if recorded is None:
        stale = _run_files(out)
        if stale:  # a stale attack checkpoint would otherwise be resumed by an attack of other settings
            raise RunFolderError(f"{out} holds files of a run ({', '.join(stale[:4])}{' ...' if len(stale) > 4 else ''}) "
                                 "but no config.json, so not which settings made them; --overwrite removes them, or "
                                 "choose another --out")
        return False
    wanted = cfg.identity()  # the settings the run reads (tgda_attack.config.identity_of)
    recorded = cfg.identity_of({**cfg.as_recorded(recorded), "attack": recorded.get("attack")})
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    # a setting added to the project after this folder was written, at its default, is the same run (unless its
    # introduction changed what the code does: as_recorded reads it at its former default)
    changed = sorted(k for k in set(wanted) | set(recorded) if wanted.get(k) != recorded.get(k)
                     and not (k not in recorded and wanted.get(k) == defaults.get(k, object())))
    if resume and not changed:
        return True
    if resume:
        # with another attack, the settings only one of the two reads differ too: counted, not listed
        shown = [k for k in changed if "attack" not in changed or k not in cfg.ATTACK_SPECIFIC]
        diff = ", ".join(f"{k} {recorded.get(k)!r} -> {wanted.get(k)!r}" for k in shown) + (
            f", and {len(changed) - len(shown)} setting(s) only one of the two attacks reads"
            if len(changed) > len(shown) else "")
        former = [f"--{k.replace('_', '-')} {recorded[k]}" for k in changed
                  if recorded.get(k) == cfg.FORMER_DEFAULTS.get(k) and wanted.get(k) == defaults.get(k)]
        hint = f" (add {' '.join(former)} to continue it: that was the default once)" if former else ""
        raise OtherSettingsError(f"{out} holds a run with other settings ({diff}){hint}; --resume continues only the "
                                 "same settings: use another --out, or --overwrite to replace that run", diff)
    raise RunFolderError(f"{out} already holds a run (config.json); --resume continues it with the same settings, "
                         "--overwrite replaces it, or choose another --out")
