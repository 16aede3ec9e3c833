"""`tgda-attack bench --executor local`: each run folder a submitit job (submitit's local executor runs them
as processes here), the same results as in one process, a failed job named with its log."""
import json
import operator
import os
import signal
import time

import pytest

from tgda_attack import cli, cluster

submitit = pytest.importorskip("submitit")


def test_a_bench_on_the_local_executor_matches_the_same_bench_in_one_process(tmp_path, capsys):
    args = ["bench", "--table", "2", "--scale", "smoke", "--attacks", "label-flip", "--seeds", "2", "--quiet"]
    assert cli.main([*args, "--out", str(tmp_path / "serial")]) == 0
    assert cli.main([*args, "--out", str(tmp_path / "jobs"), "--executor", "local", "--jobs", "2"]) == 0
    serial, jobs = (json.load(open(tmp_path / d / "table_2.json")) for d in ("serial", "jobs"))
    assert [r["poisoned_accuracy_mean"] for r in jobs] == [r["poisoned_accuracy_mean"] for r in serial]
    assert os.listdir(tmp_path / "jobs" / "submitit")  # the jobs' pickles and logs


def test_a_failed_job_stops_the_sweep_naming_its_log(tmp_path):
    executor = cluster.make_executor("local", cluster.log_folder(str(tmp_path)), timeout_min=5)
    assert cluster.run_jobs(executor, operator.add, [(1, 2), (3, 4)], jobs=2) == [3, 7]
    with pytest.raises(cluster.ClusterError, match="ZeroDivisionError.*its log: .*err"):
        cluster.run_jobs(executor, operator.truediv, [(1, 0)])


@pytest.mark.parametrize("sigint_ignored", [False, True])  # True: started in the background (`nohup ... &`)
def test_a_sweep_stopped_by_sigterm_cancels_the_jobs_in_flight(tmp_path, sigint_ignored):
    # The long job sleeps an hour under a 2-hour executor timeout, so only the cancel can end it within the
    # 4 minutes waited for it (generous: on a loaded machine a local job's process takes seconds to start and stop).
    # submitit cancels by SIGINT, which a job would ignore if it inherited an ignored SIGINT from the sweep.
    before = signal.signal(signal.SIGINT, signal.SIG_IGN if sigint_ignored else signal.default_int_handler)
    executor = cluster.make_executor("local", cluster.log_folder(str(tmp_path)), timeout_min=120)
    submitted = []
    submit = executor.submit
    executor.submit = lambda *args: submitted.append(submit(*args)) or submitted[-1]

    def terminate(index, result):  # the sweep's process gets SIGTERM while the long job runs
        os.kill(os.getpid(), signal.SIGTERM)

    try:
        with pytest.raises(KeyboardInterrupt):
            cluster.run_jobs(executor, time.sleep, [(0,), (3600,)], jobs=2, on_done=terminate)
        interrupted = time.monotonic()
        assert signal.getsignal(signal.SIGTERM) is not None  # the handler before the sweep is back
        assert signal.getsignal(signal.SIGINT) == (signal.SIG_IGN if sigint_ignored else signal.default_int_handler)
    finally:
        signal.signal(signal.SIGINT, before)
    while not submitted[1].done() and time.monotonic() - interrupted < 240:
        time.sleep(0.5)
    assert submitted[1].done(), "the job in flight was not cancelled (still running 4 minutes after the SIGTERM)"


@pytest.mark.parametrize("argv, message", [
    (["--jobs", "2"], "add --executor"), (["--executor", "local", "--jobs", "0"], "at least 1"),
    (["--executor", "pbs"], "invalid choice"), (["--job-gpus", "1"], "add --executor"),  # were ignored in-process
    (["--job-minutes", "5"], "add --executor"), (["--executor", "local", "--job-minutes", "0"], "at least 1"),
])
def test_cluster_usage_errors_are_one_line(argv, message, tmp_path, capsys):
    assert cli.main(["bench", "--table", "2", "--out", str(tmp_path / "b"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and not (tmp_path / "b").exists()


def test_jobs_import_this_package_not_a_folder_of_that_name_in_the_working_directory(tmp_path, monkeypatch):
    decoy = tmp_path / "checkout"  # a bench started in a source checkout of other code, by the installed command
    (decoy / "tgda_attack").mkdir(parents=True)
    (decoy / "tgda_attack" / "__init__.py").write_text("raise ImportError('the working directory copy was imported')\n")
    monkeypatch.chdir(decoy)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "elsewhere"))
    executor = cluster.make_executor("local", cluster.log_folder(str(tmp_path / "out")), timeout_min=5)
    assert cluster.run_jobs(executor, cluster.log_folder, [("x",)]) == [os.path.join("x", "submitit", "%j")]
    assert os.environ["PYTHONPATH"] == str(tmp_path / "elsewhere") and "PYTHONSAFEPATH" not in os.environ
