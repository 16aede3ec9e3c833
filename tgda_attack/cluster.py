"""Runs independent jobs on a cluster through submitit (Slurm, or submitit's local executor, which runs each
job in its own process on this machine): the executor of `tgda-attack bench --executor local|slurm`.

Each job's function and arguments are pickled into OUT/submitit/ with its logs; at most `jobs` jobs are in
flight at once. A job that fails stops the sweep with one message naming its log; the jobs finished
before it have written their results (a bench resumed afterwards keeps them). A sweep stopped by Ctrl-C
or SIGTERM cancels the jobs it has in flight, so that none goes on writing a run folder the next bench
would make again beside it. submitit cancels a local job by SIGINT, which a process started in the background
(`nohup tgda-attack bench ... &`) ignores and passes on to the jobs it starts: the sweep therefore lets its jobs
start with SIGINT's default action. The jobs import the tgda_attack this process runs, not a folder of that name
in the working directory (_jobs_import_this_package).
"""
import contextlib
import os
import re
import signal
import threading
import time

EXECUTORS = ("local", "slurm")


class ClusterError(RuntimeError):
    """A job of the sweep failed, or the executor cannot start."""


def make_executor(kind, folder, *, timeout_min=600, slurm_partition=None, gpus=0, cpus=None, jobs=1):
    """A submitit executor writing into `folder`; ClusterError if submitit is missing or Slurm absent."""
    if kind not in EXECUTORS:
        raise ValueError(f"unknown executor {kind!r}; choose one of {', '.join(EXECUTORS)}")
    try:
        import submitit
    except ImportError:
        raise ClusterError("--executor needs submitit: pip install submitit (or pip install '.[cluster]')") from None
    try:
        executor = submitit.AutoExecutor(folder=folder, cluster=kind)
    except RuntimeError as exc:  # e.g. no sbatch on this machine
        raise ClusterError(f"executor {kind!r} cannot start here: {exc}") from None
    params = {"timeout_min": timeout_min}
    if gpus:
        params["gpus_per_node"] = gpus
    if cpus:
        params["cpus_per_task"] = cpus
    if kind == "slurm":
        params["slurm_array_parallelism"] = jobs
        if slurm_partition:
            params["slurm_partition"] = slurm_partition
    executor.update_parameters(**params)
    return executor


@contextlib.contextmanager
def _jobs_import_this_package():
    """The environment of the jobs submitted within: they import the tgda_attack (and hypergrad) this process
    runs, not a folder of that name in the working directory. A job starts as `python -m submitit...`, which puts
    the working directory first on sys.path; a bench started from a source checkout by the installed command
    would otherwise run the checkout's code in its jobs, as it is when each job starts (PYTHONSAFEPATH, Python
    3.11+, drops that entry; PYTHONPATH puts this package's folder first)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    saved = {name: os.environ.get(name) for name in ("PYTHONSAFEPATH", "PYTHONPATH")}
    os.environ["PYTHONSAFEPATH"] = "1"
    os.environ["PYTHONPATH"] = os.pathsep.join([root] + ([saved["PYTHONPATH"]] if saved["PYTHONPATH"] else []))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def run_jobs(executor, fn, arg_lists, *, jobs=1, poll_seconds=1.0, on_done=None):
    """[fn(*args) for args in arg_lists], each a job of `executor`, at most `jobs` at once; results in order.
    on_done(index, result) is called as each job finishes."""
    if jobs < 1:
        raise ValueError(f"jobs is the number of jobs in flight at once, at least 1; got {jobs}")
    pending = list(enumerate(arg_lists))
    running, results = [], [None] * len(arg_lists)
    with _sweep_signals(), _jobs_import_this_package():
        try:
            while pending or running:
                while pending and len(running) < jobs:
                    index, args = pending.pop(0)
                    running.append((index, executor.submit(fn, *args)))
                finished = [(i, job) for i, job in running if job.done()]
                for index, job in finished:
                    running.remove((index, job))
                    try:
                        results[index] = job.result()
                    except Exception as exc:  # submitit wraps the job's own exception and traceback
                        log = getattr(job.paths, "stderr", None)
                        errors = [line.strip() for line in str(exc).splitlines()
                                  if re.match(r"\s*[\w.]+(Error|Exception|Interrupt)\b", line)]
                        first = errors[-1] if errors else type(exc).__name__
                        raise ClusterError(f"job {job.job_id} failed ({first}); its log: {log}") from None
                    if on_done:
                        on_done(index, results[index])
                if not finished:
                    time.sleep(poll_seconds)
        except BaseException:  # a failed job, Ctrl-C, SIGTERM: the jobs in flight stop too
            for _, other in running:
                other.cancel(check=False)
            raise
    return results


@contextlib.contextmanager
def _sweep_signals():
    """While active (in the main thread), SIGTERM raises KeyboardInterrupt, as Ctrl-C does, instead of ending
    the process at once; and SIGINT, where it was ignored (a background launch), raises it too, so that the jobs
    started meanwhile do not inherit an ignored SIGINT, which would make their cancel a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"stopped by signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    previous_int = signal.getsignal(signal.SIGINT)
    if previous_int == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)


def log_folder(out):
    return os.path.join(out, "submitit", "%j")
