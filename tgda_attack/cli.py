"""The `tgda-attack` command: the protocol of Lu, Kamath & Yu (TMLR 2022) from the shell.

    tgda-attack run --dataset mnist-sample --defender lr --epsilon 0.03 --seed 0 --out DIR
    tgda-attack pretrain --out DIR ...; tgda-attack attack --out DIR; tgda-attack evaluate --out DIR
    tgda-attack run --seeds 0 1 2 --out DIR     (one folder per seed, mean and std in DIR/summary.md)
    tgda-attack run ... --defense sever; tgda-attack evaluate --out DIR --defense loss
                                                (the test stage under a defense, into DIR/defense_NAME)
    tgda-attack bench --table 2 --scale smoke|sample|paper --seeds 3 [--data-root DIR] --out DIR
                                                (the paper's tables, ours beside the paper's numbers)

Every setting of tgda_attack.config.Config is an option (--pretrain-epochs, --solver, ...) and can
come from a JSON or TOML file (--config FILE; options on the command line win), the defense of `run`
(defense, defense_fraction, ...) too. Usage errors exit
with status 2 and one line.
"""
import argparse
import atexit
import dataclasses
import json
import os
import sys
import tomllib
import typing
import warnings

import torch

from . import bench, cluster, data_parallel, protocol
from .attacks import ATTACKS
from .config import (ATTACK_SETTINGS, CHOICES, DEFENSE_SETTINGS, PROTOCOL_HELP, TGDA_ONLY, Config,
                     DefenseConfig, check_device, check_threads)
from .defenses import DEFENSES
from .data import DataNotFoundError, DataTooSmallError, DataUnreadableError
from .metrics import summarize, summarize_defense
from .report import defense_summary_table, defense_table, metrics_table, summary_table, tested_defender
from .rundir import RunFolderError, bench_tables, check_out, claimable, drop_stale_summary, seed_runs, settings_of


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, status 2, no usage dump
        raise UsageError(message)


def _literal(text):
    """A help text as argparse prints it literally (it expands %-formats: "3%" crashed --help)."""
    return text.replace("%", "%%")


def _add_config_options(parser):
    group = parser.add_argument_group("settings (defaults: tgda_attack.config.Config and DATASET_DEFAULTS)")
    hints = typing.get_type_hints(Config)
    helps = {**{name: text + " " for name, text in PROTOCOL_HELP.items()},
             **{s.name: s.help + " " for s in ATTACK_SETTINGS}}
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if hints[f.name] is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None)
            continue
        group.add_argument(flag, dest=f.name, type=hints[f.name], choices=CHOICES.get(f.name), default=None,
                           help=_literal(f"{helps.get(f.name, '')}(default: {f.default if f.default is not None else 'by dataset'})"))
    parser.add_argument("--config", help="a JSON or TOML file of settings (of `run`: its defense's too, as defense = \"loss\" ...)")
    parser.add_argument("--seeds", type=int, nargs="+", help="run several seeds, one sub-folder each")
    runs = parser.add_mutually_exclusive_group()
    runs.add_argument("--overwrite", action="store_true", help="replace the run the output folder holds")
    runs.add_argument("--resume", action="store_true",
                      help="continue the run the output folder holds (same settings only), keeping its finished stages")


def _add_defense_options(parser):
    group = parser.add_argument_group("defense of the test stage (tgda_attack.defenses)")
    group.add_argument("--defense", choices=tuple(DEFENSES),
                       help="also retrain under this defense, into OUT/defense_NAME (a filter or a robust training)")
    hints = typing.get_type_hints(DefenseConfig)
    for s in DEFENSE_SETTINGS:
        group.add_argument("--" + s.name.replace("_", "-"), dest=s.name, type=hints[s.name],
                           choices=s.check if isinstance(s.check, tuple) else None, default=None,
                           help=_literal(f"{s.help} (default: {s.default})"))


def build_parser():
    parser = _Parser(prog="tgda-attack", description="TGDA data poisoning (Lu, Kamath & Yu, TMLR 2022): "
                     "pretrain -> attack -> retrain from scratch -> test")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error instead of its one line (tgda-attack --debug run ...)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, text in (("run", "all three stages"), ("pretrain", "stage 1: train the defender and the attacker")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--out", required=True, help="output folder")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        _add_config_options(p)
        if name == "run":
            _add_defense_options(p)
    for name, text in (("attack", "stage 2: generate the poisons from the folder's pretrained models"),
                       ("evaluate", "stage 3: retrain on D_tr U D_p and test (with --defense, a finished stage 3 "
                                    "is kept and only the defense runs)")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--out", required=True, help="folder holding the earlier stages' files")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        p.add_argument("--device", help="run this stage on this device, recorded in the folder's config.json for the "
                                        "stages after it (a GPU run's folder evaluated on a CPU: --device cpu)")
        p.add_argument("--threads", type=int, help="CPU threads of this stage and those after it, recorded likewise")
        if name == "evaluate":
            _add_defense_options(p)
    p = sub.add_parser("bench", help="the paper's tables: every run in its own folder, complete runs kept")
    p.add_argument("--table", required=True, choices=tuple(bench.TABLES), help="a table of the paper, or figure-4")
    p.add_argument("--scale", default="smoke", choices=bench.SCALES,
                   help="smoke: seconds, meaningless numbers; sample: the embedded MNIST sample; paper: full data")
    p.add_argument("--seeds", type=int, default=1, help="seeds 0 .. K-1 (default: 1)")
    p.add_argument("--data-root", help="folder of the full dataset (the paper scale)")
    p.add_argument("--defenders", nargs="+", choices=CHOICES["defender"], help="columns (default: by scale)")
    p.add_argument("--attacks", nargs="+", choices=CHOICES["attack"],
                   help="rows of tables 2 and 10 and figure-4 (default: all; min-max and i-min-max give a sanitised and a box row)")
    p.add_argument("--rows", nargs="+", metavar="ROW",
                   help="only these rows of the chosen attacks (tables 2 and 10), by their run folder names (e.g. min-max_sanitized "
                        "min-max: without the long-follower rows; a wrong name lists the table's)")
    p.add_argument("--defenses", nargs="+", choices=tuple(DEFENSES), help="defenses of tables 10 and 11 (default: the table's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--set", action="append", default=[], metavar="SETTING=VALUE", dest="overrides",
                   help="a setting of every run over the scale's, e.g. a shortened schedule: --set attack_epochs=2 "
                        "(repeatable; the tables' titles state it; use another --out than the full schedule's)")
    p.add_argument("--out", default="runs/bench", help="output folder (default: runs/bench)")
    p.add_argument("--overwrite", action="store_true", help="replace runs whose folders hold other settings")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--executor", choices=cluster.EXECUTORS,
                   help="run each run folder as a submitit job: local (processes here) or slurm (default: in this process)")
    p.add_argument("--jobs", type=int, default=1, help="jobs in flight at once with --executor (default: 1)")
    p.add_argument("--slurm-partition", help="Slurm partition (--executor slurm)")
    p.add_argument("--job-minutes", type=int, help="time limit of a job in minutes (default: 600)")
    p.add_argument("--job-gpus", type=int, help="GPUs a job asks for (default: 0)")
    return parser


def _bench(args):
    check_out(args.out)
    runs = (["config.json"] if os.path.exists(os.path.join(args.out, "config.json")) else []) + seed_runs(args.out)
    if runs:  # the bench's own runs go in table_N/ROW/COLUMN/seed_K: a table beside a run's files would mix them
        raise UsageError(f"{args.out} holds the files of `tgda-attack run` ({', '.join(runs[:3])}"
                         f"{' ...' if len(runs) > 3 else ''}); a bench goes in a folder of its own: choose another --out")
    if not 1 <= args.seeds <= 2 ** 32:
        raise UsageError(f"--seeds is the number of seeds (0 .. K-1, each below 2**32), from 1 to 2**32; got {args.seeds}")
    if args.data_root and args.scale != "paper":
        raise UsageError(f"--data-root is read at --scale paper only; --scale {args.scale} runs on the embedded MNIST "
                         "sample: drop --data-root, or add --scale paper")
    table = bench.TABLES[args.table]
    if args.executor is None and (args.jobs != 1 or args.slurm_partition or args.job_minutes is not None
                                  or args.job_gpus is not None):
        raise UsageError("--jobs, --slurm-partition, --job-minutes and --job-gpus set how jobs run on a cluster: add "
                         "--executor local|slurm")
    args.job_minutes = 600 if args.job_minutes is None else args.job_minutes
    args.job_gpus = 0 if args.job_gpus is None else args.job_gpus
    if args.jobs < 1 or args.job_minutes < 1 or args.job_gpus < 0:
        raise UsageError("--jobs and --job-minutes must be at least 1, --job-gpus at least 0")
    overrides = _parse_overrides(args.overrides)
    try:
        bench.plan(table, args.scale, [0], data_root=args.data_root, device=args.device, defenders=args.defenders,
                   attacks=args.attacks, defenses=args.defenses, overrides=overrides,
                   rows=args.rows)  # every setting checked before a job is submitted
        executor = None
        if args.executor:
            executor = cluster.make_executor(args.executor, cluster.log_folder(args.out), timeout_min=args.job_minutes,
                                             slurm_partition=args.slurm_partition, gpus=args.job_gpus, jobs=args.jobs)
        rows = bench.run_table(table, args.scale, list(range(args.seeds)), args.out, data_root=args.data_root,
                               device=args.device, defenders=args.defenders, attacks=args.attacks, defenses=args.defenses,
                               overrides=overrides, rows=args.rows, overwrite=args.overwrite, verbose=not args.quiet, executor=executor, jobs=args.jobs)
    except cluster.ClusterError as exc:
        if "failed" not in str(exc):
            raise UsageError(str(exc)) from None
        print(f"tgda-attack: {exc}; the runs finished before it are kept: rerun the bench to continue", file=sys.stderr)
        return 1
    except ValueError as exc:
        if isinstance(exc, RunFolderError):
            raise
        raise UsageError(str(exc)) from None
    print(bench.markdown(table, args.scale, rows))
    print(f"written: {os.path.join(args.out, f'table_{table.key}')}.{{md,csv,json}}"
          + (" and .png" if table.key == "figure-4" else ""))
    return 0


BOOL_WORDS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def _parse_overrides(items):
    """`--set SETTING=VALUE` items -> {setting: value}, each value read as its setting's type (Config's hints:
    int, float, yes/no, text); Config checks the values themselves."""
    hints = typing.get_type_hints(Config)
    overrides = {}
    for item in items:
        key, sep, text = item.partition("=")
        key, text = key.strip().replace("-", "_"), text.strip()
        if not sep or not key or not text:
            raise UsageError(f"--set {item!r}: write SETTING=VALUE, e.g. --set attack_epochs=2")
        kind = hints.get(key, str)  # an unknown name is reported by bench.check_overrides
        try:
            overrides[key] = (BOOL_WORDS[text.lower()] if kind is bool else kind(text))
        except (KeyError, ValueError):
            raise UsageError(f"--set {key}={text}: {key} takes "
                             f"{'yes or no' if kind is bool else 'an integer' if kind is int else 'a number'}") from None
    return overrides


def _read_config_file(path):
    if not os.path.isfile(path):
        what = ("is a folder, not a file" if os.path.isdir(path) else "is not a regular file (a device, a pipe)"
                if os.path.exists(path) else "does not exist")
        raise UsageError(f"config file {path} {what}")
    with open(path, "rb") as fh:
        content = fh.read()
    # by its suffix; a file of neither suffix (settings.cfg) is read as whichever it is
    formats = {".toml": ("TOML",), ".json": ("JSON",)}.get(os.path.splitext(path)[1].lower(), ("JSON", "TOML"))
    problems = []
    for kind in formats:
        try:
            values = json.loads(content) if kind == "JSON" else tomllib.loads(content.decode("utf-8"))
            break
        except (ValueError, tomllib.TOMLDecodeError) as exc:  # UnicodeDecodeError is a ValueError
            problems.append(f"as {kind}, {exc}" if len(formats) > 1 else str(exc))
    else:
        raise UsageError(f"config file {path} is not valid {' or '.join(formats)}: {'; '.join(problems)}")
    if not isinstance(values, dict):
        raise UsageError(f"config file {path} must hold an object of settings ({{\"epsilon\": 0.03, ...}}), "
                         f"not a {type(values).__name__}")
    return values


DEFENSE_KEYS = ("defense", *(s.name for s in DEFENSE_SETTINGS))  # a config file's keys that choose the defense


def _file_settings(args, defense):
    """The --config file's settings of the run (defense False) or of its defense (True); {} without a file. A file
    may hold both: the defense's are read by `run` (`pretrain` leaves them to the run that follows)."""
    if not hasattr(args, "config_values"):  # read once: the run's and the defense's settings are of one reading
        args.config_values = _read_config_file(args.config) if getattr(args, "config", None) else {}
    return {k: v for k, v in args.config_values.items() if (k in DEFENSE_KEYS) == defense}


def config_from_args(args):
    values = _file_settings(args, defense=False)
    for f in dataclasses.fields(Config):
        if getattr(args, f.name) is not None:
            values[f.name] = getattr(args, f.name)
    try:
        return Config.from_dict(values, also_known=DEFENSE_KEYS).resolved()  # its defense's are defense_from_args's
    except (TypeError, ValueError) as exc:
        raise UsageError(str(exc))


def defense_from_args(args):
    """The DefenseConfig of --defense and its settings, or None; UsageError for a setting without --defense."""
    typed = {k: getattr(args, k) for k in DEFENSE_KEYS if getattr(args, k) is not None}
    in_file = _file_settings(args, defense=True)
    if "defense" in typed and in_file.get("defense", typed["defense"]) != typed["defense"]:
        in_file = {}  # the command line chose another defense than the file's: the file's settings are for its own
    given = {**in_file, **typed}
    name = given.pop("defense", None)

    def named(keys):
        return ", ".join(f"--{k.replace('_', '-')}" + ("" if k in typed else f" (from {args.config})") for k in keys)
    if name is None:
        if given:
            raise UsageError(f"{named(given)} set(s) a defense; add --defense NAME")
        return None
    if not isinstance(name, str):  # a list or table in a config file (["loss"]: one defense a run)
        raise UsageError(f"setting defense must be one defense's name (a string), got {name!r} (from {args.config}); "
                         f"choose one of {', '.join(DEFENSES)}")
    if name not in DEFENSES:  # from a config file (the command line's choices are checked by argparse)
        raise UsageError(f"unknown defense {name!r} (from {args.config}); choose one of {', '.join(DEFENSES)}")
    unread = sorted(set(given) - {s.name for s in DEFENSES[name].settings})
    if unread:
        raise UsageError(f"defense {name} does not read {named(unread)}")
    try:
        return DefenseConfig(defense=name, **given).checked()
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _settings_text(settings):
    return ", ".join(f"{k.replace('_', '-')} {v}" for k, v in settings.items()) or "its defaults"


def _print_defense(metrics, out):
    print(f"\nunder the {metrics['defense']} defense:")
    print(defense_table(metrics))
    if metrics.get("clean_defense_reused_from"):
        print(f"the defense on clean D_tr: computed once for this clean pretraining, {metrics['clean_defense_reused_from']}")
    print(f"results: {os.path.join(out, 'defense_' + metrics['defense'], 'metrics.json')}")


def _print_run(metrics, out):
    print(f"\n{metrics['attack']} against {tested_defender(metrics)} on {metrics['dataset']} "
          f"(epsilon {metrics['epsilon']}, {_count(metrics['n_poison'], 'poison')}, seed {metrics['seed']}):")
    print(metrics_table(metrics))
    print(f"results: {os.path.join(out, 'metrics.json')}; figure: {os.path.join(out, 'poisons.png')}")


def unread_options_note(args, cfg):
    """A one-line note naming the options given on the command line that this run does not read (another attack's
    settings, TGDA's with another attack, --data-root for the embedded sample), else None. A note, not an error: one
    command line looped over attacks is a common script, and a config file may hold an experiment's every setting."""
    given = [f.name for f in dataclasses.fields(Config) if getattr(args, f.name, None) is not None]
    owners = {s.name: [a for a, cls in ATTACKS.items() if s in cls.settings] for s in ATTACK_SETTINGS}
    unread = {name: f"read by attack {', '.join(owners[name])}" for name in given
              if name in owners and cfg.attack not in owners[name]}
    unread.update({name: "read by attack tgda only" for name in given if name in TGDA_ONLY and cfg.attack != "tgda"})
    unread.update({name: f"this run's {cfg.attack} recipe sets it itself" for name in given
                   if name in ATTACKS[cfg.attack].unread_settings(cfg)})
    if cfg.dataset == "mnist-sample":
        unread.update({name: "mnist-sample is embedded: no files are read" for name in given
                       if name in ("data_root", "download")})
    if not unread:
        return None
    return ("tgda-attack: note: this run ignores " + ", ".join(
        f"--{name.replace('_', '-')} ({why})" for name, why in unread.items()))


def busy_cpu_note(threads):
    """A one-line note when other work already keeps this machine's CPUs busy and the run's `threads` would
    wait on each other (torch's OpenMP threads spin at every parallel region: the mnist-sample demo took 2.4x
    as long beside one busy core, an attack epoch 50x beside two 2-thread processes), else None."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    threads = threads or torch.get_num_threads()
    if threads > cores:  # a folder made on a bigger machine still resumes here: a note, not an error
        return (f"tgda-attack: note: this run uses {threads} threads on {cores} cores, so they wait on each other and "
                f"can make it many times slower; --threads {cores} (or fewer) avoids that. A seed fixes a run's bits "
                "for one thread count.")
    if threads < 2 or load + threads <= cores + 0.5:
        return None
    return (f"tgda-attack: note: the CPUs are busy (load {load:.1f} on {cores} cores) and this run uses {threads} "
            "threads, which then wait on each other and can make it many times slower; --threads 1 (or fewer "
            "threads) avoids that. A seed fixes a run's bits for one thread count.")


def _recorded_device(cfg, out):
    """`cfg` on the device the run in `out` was made on, where --resume names none: a GPU run continues on the GPU,
    not on the default cpu (a machine without one says so: --device cpu continues it there)."""
    recorded = (settings_of(out) or {}).get("device") if os.path.isdir(out) else None
    if not isinstance(recorded, str) or recorded == cfg.device:
        return cfg
    try:
        check_device(recorded)
    except ValueError as exc:
        raise UsageError(f"{out} was made on {recorded} ({exc})") from None
    return dataclasses.replace(cfg, device=recorded)


def _how_to_continue(args):
    """What continues a command interrupted by Ctrl-C: its finished stages, runs and checkpoints are kept."""
    command = getattr(args, "command", None)
    if command == "bench":
        return "the same bench command again continues it (its finished runs are kept, the interrupted one resumes)"
    if command in ("run", "pretrain"):
        return (f"the same command with --resume continues the run in {args.out} (its finished stages are kept; "
                "TGDA's and Gradient Canceling's attacks and the trainings resume from their checkpoints)")
    if command in ("attack", "evaluate"):
        return f"`tgda-attack {command} --out {args.out}` again continues it (TGDA's and Gradient Canceling's attacks " \
               "and the trainings resume from their checkpoints)"
    return "nothing was run"


def _drop_stale_summary(out):
    note = drop_stale_summary(out)
    if note:
        print(note)


def _record_execution_options(args):
    """`attack`/`evaluate --device D --threads N`: checked, then written to the folder's config.json, which the stage
    reads (how a run executes is not what it computes: config.EXECUTION)."""
    if args.device is None and args.threads is None:
        return
    try:
        if args.device is not None:
            check_device(args.device)
        if args.threads is not None:
            check_threads(args.threads)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    check_out(args.out)
    protocol.record_execution(args.out, device=args.device, threads=args.threads)


def _checked_seeds(cfg, seeds, seed_flag=None):
    """The seeds of a run (--seeds, else the config's), each checked as the config checks its seed, before any runs."""
    if not seeds:
        return [cfg.seed]
    if seed_flag is not None:
        raise UsageError(f"--seed {seed_flag} and --seeds {' '.join(map(str, seeds))} both choose the seeds; keep one")
    if len(set(seeds)) < len(seeds):
        raise UsageError(f"--seeds lists a seed twice ({' '.join(map(str, seeds))}); each seed is one run folder")
    for seed in seeds:
        try:
            dataclasses.replace(cfg, seed=seed).resolved()
        except ValueError as exc:
            raise UsageError(f"--seeds: {exc}") from None
    return seeds


def _check_layout(out, seeds, several):
    """UsageError where the run would mix the two layouts of an output folder: one run in it (config.json at its top;
    --seed) and one sub-folder a seed (seed_K/config.json, beside summary.md; --seeds, `several`). Either way a
    summary.md would then describe runs other than those beside it."""
    tables = bench_tables(out)
    if tables:
        raise UsageError(f"{out} holds the tables of `tgda-attack bench` ({', '.join(tables[:3])}"
                         f"{' ...' if len(tables) > 3 else ''}); a run goes in a folder of its own: choose another --out")
    seeds_there = seed_runs(out)
    if not several and seeds_there:
        raise UsageError(f"{out} holds the runs of several seeds ({', '.join(seeds_there[:3])}{' ...' if len(seeds_there) > 3 else ''}); "
                         f"one seed's run goes in its own folder: --out {os.path.join(out, f'seed_{seeds[0]}')}, or "
                         f"--seeds with every seed of the summary")
    if several and os.path.exists(os.path.join(out, "config.json")):
        seed = (settings_of(out) or {}).get("seed")
        again = (f" (`--seed {seed} --resume` continues it: `--seeds` of one seed wrote the run there before)"
                 if seeds == [seed] else "")
        raise UsageError(f"{out} holds a single run (config.json); the seeds' folders would go inside it: choose another "
                         f"--out{again}")


def _seed_folder(out, seed, several):
    """The output folder of one seed: `out` itself for a single run (--seed), out/seed_K for --seeds (even one: a later
    --seeds with more seeds adds theirs beside it)."""
    return os.path.join(out, f"seed_{seed}") if several else out


def one_line_warning(message, category, filename, lineno, line=None):
    """A warning as the command shows it: one line, like its errors (Python's shows the file, line and source of
    the code that warned; --debug keeps Python's)."""
    return f"tgda-attack: warning: {message}\n"


def main(argv=None):
    """The command: its exit status (0, 1 for a failed run, 2 for a usage error, 141 where stdout's reader has gone)."""
    python_format = warnings.formatwarning
    if "--debug" not in (sys.argv[1:] if argv is None else list(argv))[:1]:
        warnings.formatwarning = one_line_warning
    try:
        status = _command(argv)
        sys.stdout.flush()  # a pipe holds stdout in a buffer: a reader gone shows here, not at Python's exit
        return status
    except BrokenPipeError:  # stdout's reader has gone (`tgda-attack ... | head`): the results are in their files
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # else Python's exit flush raises it again
        return 141  # 128 + SIGPIPE, as a tool the pipe's end stops
    finally:
        warnings.formatwarning = python_format  # cli.main called from Python leaves the caller's format


def _count(n, noun):
    """'1 poison', '2 poisons'."""
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _command(argv):
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv[:1]  # before the command, as argparse reads it
    args = None
    try:
        args = parser.parse_args(argv)
        verbose = not args.quiet
        if args.command == "bench":
            return _bench(args)
        defense = defense_from_args(args) if args.command in ("run", "evaluate") else None
        if args.command in ("run", "pretrain"):
            cfg = config_from_args(args)
            if data_parallel.launched():
                if args.command != "run" or data_parallel.problem(cfg):
                    raise UsageError(data_parallel.problem(cfg) or "torchrun spreads `tgda-attack run` only")
                data_parallel.init(cfg.device)
                atexit.register(data_parallel.finish)
                verbose = verbose and data_parallel.is_main()
            seeds, several = _checked_seeds(cfg, args.seeds, args.seed), bool(args.seeds)
            _check_layout(args.out, seeds, several)
            if args.resume and args.device is None and "device" not in args.config_values:
                cfg = _recorded_device(cfg, _seed_folder(args.out, seeds[0], several))
            for seed in seeds:  # every seed's folder before the first seed's work
                claimable(_seed_folder(args.out, seed, several), dataclasses.replace(cfg, seed=seed),
                          overwrite=args.overwrite, resume=args.resume)
                if defense and args.resume:  # its defense's results too (they stopped it after the run's printout)
                    protocol.kept_defense(_seed_folder(args.out, seed, several), defense.checked(), resume=True)
            if defense:
                protocol.check_defense_size(cfg, defense)
            notes = [] if data_parallel.launched() else [unread_options_note(args, cfg), busy_cpu_note(cfg.threads)]
            for note in filter(None, notes):  # on stdout beside the results, once the run will start (a usage error
                print(note)                   # is one line on stderr alone)
            if args.command == "pretrain":
                for seed in seeds:
                    out = _seed_folder(args.out, seed, several)
                    result = protocol.stage_pretrain(dataclasses.replace(cfg, seed=seed), out, verbose,
                                                     overwrite=args.overwrite, resume=args.resume)
                    print(f"clean accuracy {100 * result['clean_accuracy']:.2f}% -> {out}")
                if not several and not args.resume:
                    _drop_stale_summary(args.out)
                return 0
            runs, defended = [], []
            unchanged = args.resume and protocol.finished_evaluation(args.out) is not None and (  # all of it kept
                not defense or protocol.kept_defense(args.out, defense.checked(), resume=True) is not None)
            for seed in seeds:
                out = _seed_folder(args.out, seed, several)
                runs.append(protocol.run(dataclasses.replace(cfg, seed=seed), out, verbose,
                                         overwrite=args.overwrite, resume=args.resume))
                if not data_parallel.is_main():
                    continue
                _print_run(runs[-1], out)
                if defense:
                    defended.append(protocol.stage_defend(out, defense, verbose, overwrite=args.overwrite or not args.resume,
                                                          resume=args.resume))
                    _print_defense(defended[-1], out)
            if not several and data_parallel.is_main() and not unchanged:  # one seed of `--seeds` run again
                _drop_stale_summary(args.out)
            if several and data_parallel.is_main():
                summary = summarize(runs)
                table = summary_table([summary])
                if defended:
                    summary["under_defense"] = summarize_defense(defended)
                    table += (f"\n\nUnder the {defense.defense} defense ({_settings_text(defense.own_settings())}), "
                              "mean ± std over seeds:\n\n" + defense_summary_table(summary["under_defense"]))
                with open(os.path.join(args.out, "summary.json"), "w") as fh:
                    json.dump(summary, fh, indent=2)
                with open(os.path.join(args.out, "summary.md"), "w") as fh:
                    fh.write(table + "\n")
                print("\nmean ± std over seeds:\n" + table)
            return 0
        _record_execution_options(args)
        if args.command == "attack":
            result = protocol.stage_attack(args.out, verbose)
            print(f"{_count(result['n_poison'], 'poison')} in {result['attack_seconds']:.1f} s -> {os.path.join(args.out, 'poisons.pt')}")
            _drop_stale_summary(args.out)
            return 0
        finished = protocol.finished_evaluation(args.out) if defense else None
        if defense and finished is None:  # before stage 3's training: a fraction of the run's data that removes no point
            cfg = protocol.run_config(args.out)  # a folder without a run: named here
            recorded = protocol.recorded_split(args.out).get("n_train")
            protocol.check_defense_size(cfg, defense, recorded if isinstance(recorded, int) else None)
        if finished is not None:
            print(f"stage 3 of these poisons is finished ({os.path.join(args.out, 'metrics.json')}): kept; "
                  "evaluate without --defense retrains it")
        _print_run(finished or protocol.stage_evaluate(args.out, verbose), args.out)
        if defense:
            _print_defense(protocol.stage_defend(args.out, defense, verbose, overwrite=True), args.out)
        _drop_stale_summary(args.out)
        return 0
    # FileExistsError ... PermissionError: an --out that is a file, lies in a file or cannot be written
    except (UsageError, RunFolderError, DataNotFoundError, DataUnreadableError, DataTooSmallError,
            FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError) as exc:
        if debug:
            raise
        print(f"tgda-attack: error: {exc}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:  # a diverged attack or training: nothing half-written is kept as a result
        if debug:
            raise
        print(f"tgda-attack: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"tgda-attack: interrupted; {_how_to_continue(args)}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
