"""Data-parallel TGDA (torch.distributed, gloo on this CPU): K processes each taking a share of every batch
make the same attack as one process (float64, up to the order of the sums); `torchrun ... run` writes the
same poisons as a one-process run; settings it cannot spread are refused with one line."""
import dataclasses
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import hypergrad
from test_attacks import _attack, _tiny
from tgda_attack import cli, data_parallel
from tgda_attack.data import poison_budget
from tgda_attack.attacks.tgda import DEFAULT_SOLVER

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")


def _worker(rank, world, init_file, options, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        x, y, xv, yv, defender, attacker = _tiny(seed=5, n=60)
        attack = _attack(defender, attacker, data_parallel=True, **options)
        x_p, y_p = attack.poison(x, y, x_val=xv, y_val=yv)
        torch.save({"x_p": x_p, "history": attack.history, "w": list(attack.defender_.parameters())},
                   f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("options", [
    {"batch_size": 20, "epochs": 2, "follower_steps": 3},  # 3 batches an epoch, shares of 7/7/6 and 10/10 rows
    {"batch_size": 30, "formulation": "zero-sum", "warm_start": "cold"},
    {"batch_size": 20, "epochs": 2, "solver": DEFAULT_SOLVER, "solver_iterations": 16, "follower_steps": 20},  # defaults
])
def test_two_processes_make_the_attack_of_one(tmp_path, options):
    out = str(tmp_path / "result")
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), options, out), nprocs=2, join=True)
    x, y, xv, yv, defender, attacker = _tiny(seed=5, n=60)
    single = _attack(defender, attacker, **options)
    x_p, _ = single.poison(x, y, x_val=xv, y_val=yv)
    for rank in (0, 1):
        result = torch.load(f"{out}.{rank}", weights_only=False)
        torch.testing.assert_close(result["x_p"], x_p, rtol=0.0, atol=1e-10)  # the bar: 1e-10, float64
        for a, b in zip(result["w"], single.defender_.parameters()):
            torch.testing.assert_close(a, b.detach(), rtol=1e-9, atol=1e-11)
        for got, want in zip(result["history"], single.history):
            assert got["leader_loss"] == pytest.approx(want["leader_loss"], rel=1e-9)
            assert got["follower_loss"] == pytest.approx(want["follower_loss"], rel=1e-9)


def _sum_worker(rank, world, init_file, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        sharded = hypergrad.ShardedMean(leader_weight=[0.25, 0.75][rank], follower_weight=0.5)
        t = torch.tensor([4.0, 8.0]) * (rank + 1)
        torch.save([sharded.leader(t), sharded.follower(t), t], f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_sharded_mean_weights_each_rank_by_its_share(tmp_path):
    out = str(tmp_path / "sums")
    mp.spawn(_sum_worker, args=(2, str(tmp_path / "init"), out), nprocs=2, join=True)
    for rank in (0, 1):
        leader, follower, t = torch.load(f"{out}.{rank}")
        torch.testing.assert_close(leader, torch.tensor([4.0 * 0.25 + 8.0 * 0.75, 8.0 * 0.25 + 16.0 * 0.75]))
        torch.testing.assert_close(follower, torch.tensor([6.0, 12.0]))
        torch.testing.assert_close(t, torch.tensor([4.0, 8.0]) * (rank + 1))  # the input is left as it was


SMALL = ["--attack", "tgda", "--pretrain-epochs", "2", "--attacker-epochs", "1", "--attack-epochs", "1",
         "--attack-batch-size", "1000", "--follower-steps", "1", "--solver-iterations", "3", "--dtype", "float64",
         "--quiet"]


def test_torchrun_writes_the_poisons_of_a_one_process_run(tmp_path):
    single = str(tmp_path / "single")
    # One thread, as each torchrun process has: a seed fixes a run's bits for one thread count (on an AVX-512 CPU
    # the one-process run with 1 and with 2 threads differs by 2e-8, the spread run and the 1-thread run by 4e-16).
    threads = torch.get_num_threads()
    try:
        assert cli.main(["run", *SMALL, "--threads", "1", "--out", single]) == 0
    finally:
        torch.set_num_threads(threads)
    spread = str(tmp_path / "spread")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the tgda_attack the tests import
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "tgda_attack", "run", *SMALL, "--out", spread], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("results:") == 1  # rank 0 alone reports
    a, b = (torch.load(os.path.join(d, "poisons.pt"), weights_only=True) for d in (single, spread))
    torch.testing.assert_close(a["x_poison"], b["x_poison"], rtol=1e-8, atol=1e-10)


def test_settings_torchrun_cannot_spread_are_refused_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # as torchrun sets it
    assert cli.main(["run", "--attack", "label-flip", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert "one process" in err and "--dp-mode partitions" in err and "\n" not in err and not (tmp_path / "r").exists()
    assert cli.main(["run", "--leader", "defender", "--out", str(tmp_path / "r")]) == 2
    assert "--leader attacker" in capsys.readouterr().err


def test_independent_partitions_are_the_attacks_of_each_partition_gathered(tmp_path):
    """--dp-mode partitions (the paper's 8-GPU CIFAR-10 runs): each process attacks every K-th point alone."""
    from tgda_attack import protocol
    from tgda_attack.attacks import ATTACKS

    spread = str(tmp_path / "spread")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "tgda_attack", "run", *SMALL, "--dp-mode", "partitions", "--out", spread], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    cfg = protocol.run_config(spread)
    splits = protocol.load_splits(cfg)
    parts = []
    for rank in (0, 1):
        defender = protocol.new_defender(cfg, splits.image_shape)
        protocol.load_weights(defender, os.path.join(spread, "defender_pretrained.pt"))
        attacker = protocol.new_attacker(cfg, splits.image_shape)
        protocol.load_weights(attacker, os.path.join(spread, "attacker_pretrained.pt"))
        attack = ATTACKS["tgda"].from_config(cfg, defender=defender, attacker=attacker)
        tr, va = torch.arange(rank, len(splits.y_train), 2), torch.arange(rank, len(splits.y_val), 2)
        attack.epsilon = data_parallel.partition_share(84, len(splits.y_train), rank, 2) / len(tr)  # 42 of 1,400
        x_p, _ = attack.poison(splits.x_train[tr], splits.y_train[tr], x_val=splits.x_val[va], y_val=splits.y_val[va])
        parts.append((x_p, tr[attack.source_indices_]))
    poisons = torch.load(os.path.join(spread, "poisons.pt"), weights_only=True)
    torch.testing.assert_close(poisons["x_poison"], torch.cat([p[0] for p in parts]), rtol=1e-8, atol=1e-10)
    assert torch.equal(poisons["source_indices"], torch.cat([p[1] for p in parts]))
    assert os.path.exists(os.path.join(spread, "attack_checkpoint.rank1.pt"))


@pytest.mark.parametrize("n, epsilon, world", [(42000, 0.03, 8), (35000, 0.03, 8), (2800, 0.03, 3), (2801, 0.03, 3),
                                                (100, 0.5, 7), (10, 0.1, 4)])
def test_the_partitions_budgets_sum_to_the_runs(n, epsilon, world):
    """Each partition poisons its share of the run's floor(epsilon * n), in proportion to its size (each partition's
    own floor would give fewer: 1,256 of 1,260 for full MNIST on 8, 82 of 84 for mnist-sample on 3)."""
    total = poison_budget(n, epsilon)
    sizes = [len(range(r, n, world)) for r in range(world)]
    shares = [data_parallel.partition_share(total, n, r, world) for r in range(world)]
    assert sum(shares) == total
    assert all(abs(share - total * size / n) < 1 for share, size in zip(shares, sizes))
    assert [poison_budget(size, share / size) for share, size in zip(shares, sizes)] == shares  # what each rank makes


def test_partitions_fewer_than_the_poisons_are_refused_before_any_work(monkeypatch):
    """A partition without a poison would stop alone while the others wait for it at the gather."""
    from tgda_attack import protocol
    from tgda_attack.data import DataTooSmallError

    monkeypatch.setattr(data_parallel, "world_size", lambda: 8)
    cfg = protocol.Config(dp_mode="partitions", epsilon=0.002).resolved()
    with pytest.raises(DataTooSmallError, match="makes 5 poisons, fewer than one a partition; use at most 5 processes"):
        protocol._check_poison_budget(cfg, 2800)
    protocol._check_poison_budget(dataclasses.replace(cfg, epsilon=0.003), 2800)  # 8 poisons: one each
    protocol._check_poison_budget(dataclasses.replace(cfg, dp_mode="sharded"), 2800)  # one attack, any budget


def test_label_flip_runs_as_partitions(tmp_path, capsys):
    out = str(tmp_path / "flip")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "tgda_attack", "run", "--attack", "label-flip", "--pretrain-epochs", "1", "--quiet",
                           "--dp-mode", "partitions", "--out", out], env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert torch.load(os.path.join(out, "poisons.pt"), weights_only=True)["y_poison"].numel() == 84  # 42 + 42


@pytest.mark.parametrize("world_size", ["2", "abc"])
def test_a_world_size_left_in_the_environment_is_not_a_torchrun_launch(world_size, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", world_size)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    assert not data_parallel.launched()
    assert cli.main(["run", "--attack", "label-flip", "--pretrain-epochs", "1", "--quiet", "--out", str(tmp_path)]) == 0
