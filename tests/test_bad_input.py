"""Bad input a user can give, each a clear error before any work: data (empty, one class, NaN or out-of-range
pixels, labels outside the classes), a defender whose output does not fit the labels; and a TGDA attack
killed with SIGKILL mid-epoch resumes to the very poisons of an uninterrupted run, and a Gradient Canceling descent
stopped by Ctrl-C continues to them."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tgda_attack import cli
from tgda_attack.attacks import (BackGradientAttack, ErrorMinimizingNoiseAttack, GradientCancelingAttack, MetaPoisonAttack,
                                 MinMaxAttack, TGDAAttack)
from tgda_attack.data import from_tensors

def _data(n=30):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, 4, 4, generator=g) * 2 - 1
    return x, torch.arange(n) % 3


@pytest.mark.parametrize("damage, message", [
    (lambda x, y: (x[:0], y[:0]), "empty"),
    (lambda x, y: (x, torch.zeros_like(y)), "one class"),
    (lambda x, y: (x.index_fill(0, torch.tensor([3]), float("nan")), y), "NaN"),
    (lambda x, y: (x * 255, y), "scale them to \\[-1, 1\\]"),
    (lambda x, y: (x, y + 9), "class indices 0 .. 9"),
    (lambda x, y: (x, y - 1), "class indices"),
])
def test_bad_data_is_named_before_any_work(damage, message):
    x, y = _data()
    bad_x, bad_y = damage(x, y)
    with pytest.raises(ValueError, match=message):
        from_tensors("mine", bad_x, bad_y, x, y)


ATTACKS_ON_A_DEFENDER = {  # each attack that trains or differentiates through a defender, at a size of seconds
    "tgda": lambda d: TGDAAttack(d, None, 0.1, epochs=1, batch_size=10, alpha=1.0),
    "gradient-canceling": lambda d: GradientCancelingAttack(d, 0.1, steps=1, radius=0.1),
    "min-max": lambda d: MinMaxAttack(d, 0.1, rounds=1, steps=1, follower_steps=1, batch_size=10, num_classes=3),
    "emn": lambda d: ErrorMinimizingNoiseAttack(d, 0.1, pgd_steps=1, train_steps=1, max_rounds=1, batch_size=10),
    "metapoison": lambda d: MetaPoisonAttack(d, 0.1, models=1, steps=1, train_epochs=1, batch_size=10,
                                             train_batch_size=10),
    "back-gradient": lambda d: BackGradientAttack(d, 0.1, unroll_steps=1, epochs=1, batch_size=10, num_classes=3),
}


@pytest.mark.parametrize("attack", sorted(ATTACKS_ON_A_DEFENDER))
def test_a_defender_with_too_few_outputs_or_frozen_is_named_before_any_work(attack):
    x, y = _data()
    make = ATTACKS_ON_A_DEFENDER[attack]
    with pytest.raises(ValueError, match="outputs \\[2\\] for one image, but the labels need 3 class scores"):
        make(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))).poison(x, y)
    frozen = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3)).requires_grad_(False)
    with pytest.raises(ValueError, match="none of the defender's parameters requires grad"):  # MetaPoison returned
        make(frozen).poison(x, y)  # its sources unchanged, the others stopped inside torch


@pytest.mark.parametrize("attack", sorted(ATTACKS_ON_A_DEFENDER))
def test_int32_labels_and_a_batch_norm_defender_in_training_mode_are_taken(attack):
    x, y = _data()
    torch.manual_seed(0)
    defender = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 8), torch.nn.BatchNorm1d(8),
                                   torch.nn.ReLU(), torch.nn.Linear(8, 3))
    x_p, y_p = ATTACKS_ON_A_DEFENDER[attack](defender).poison(x, y.int())  # cross-entropy: int64 only
    assert y_p.dtype == torch.int64 and torch.isfinite(x_p).all() and defender.training  # its mode kept


ATTACK = ["--pretrain-epochs", "2", "--attacker-epochs", "1", "--attack-epochs", "4", "--follower-steps", "2",
          "--solver-iterations", "4", "--quiet"]


def test_an_attack_killed_mid_epoch_resumes_to_the_poisons_of_an_uninterrupted_run(tmp_path):
    whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
    assert cli.main(["run", *ATTACK, "--out", whole]) == 0
    assert cli.main(["pretrain", *ATTACK, "--out", killed]) == 0
    # SIGKILL right after the first epoch's checkpoint: sent by the attack process itself, so that the instant does not
    # depend on how fast a busy machine lets a watching process see the file (the tgda_attack the tests import)
    kill_after_first_save = (
        "import os, signal, sys; from tgda_attack import cli; from tgda_attack.attacks import tgda; save = tgda.TGDAAttack._save\n"
        "def save_then_die(self, *a, **k):\n    save(self, *a, **k); os.kill(os.getpid(), signal.SIGKILL)\n"
        "tgda.TGDAAttack._save = save_then_die; sys.exit(cli.main(sys.argv[1:]))")
    proc = subprocess.Popen([sys.executable, "-c", kill_after_first_save, "attack", "--out", killed, "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = os.path.join(killed, "attack_checkpoint.pt")
    proc.wait(timeout=300)
    assert proc.returncode == -signal.SIGKILL, "the attack finished before it could be killed"
    assert not os.path.exists(os.path.join(killed, "poisons.pt"))
    assert torch.load(checkpoint, weights_only=True)["epoch"] < 4
    assert cli.main(["attack", "--out", killed, "--quiet"]) == 0  # continues from the checkpoint
    a, b = (torch.load(os.path.join(d, "poisons.pt"), weights_only=True) for d in (whole, killed))
    assert torch.equal(a["x_poison"], b["x_poison"]) and torch.equal(a["y_poison"], b["y_poison"])


def test_gradient_canceling_stopped_by_ctrl_c_continues_with_attack_again(tmp_path, monkeypatch, capsys):
    import tgda_attack.attacks.gradient_canceling as gc

    flags = ["--attack", "gradient-canceling", "--gc-steps", "8", "--gc-radius", "0.1", "--pretrain-epochs", "2", "--quiet"]
    whole, stopped = str(tmp_path / "whole"), str(tmp_path / "stopped")
    assert cli.main(["run", *flags, "--out", whole]) == 0
    assert cli.main(["pretrain", *flags, "--out", stopped]) == 0
    monkeypatch.setattr(gc, "CHECKPOINT_SECONDS", 1e9)  # saved only because of the signal
    objective, calls = gc.GradientCancelingAttack.objective, []

    def interrupted(self, *args):
        calls.append(1)
        if len(calls) == 4:
            signal.raise_signal(signal.SIGINT)  # Ctrl-C in step 3: it ends, then the attack saves and stops
        return objective(self, *args)
    monkeypatch.setattr(gc.GradientCancelingAttack, "objective", interrupted)
    capsys.readouterr()
    assert cli.main(["attack", "--out", stopped, "--quiet"]) == 130
    assert f"`tgda-attack attack --out {stopped}` again continues it" in capsys.readouterr().err
    assert torch.load(os.path.join(stopped, "attack_checkpoint.pt"), weights_only=True)["step"] == 4
    assert not os.path.exists(os.path.join(stopped, "poisons.pt"))
    again = []

    def counted(self, *args):
        again.append(1)
        return objective(self, *args)
    monkeypatch.setattr(gc.GradientCancelingAttack, "objective", counted)
    assert cli.main(["attack", "--out", stopped, "--quiet"]) == 0
    assert len(again) == 9 - 4  # steps 4 to 8: continued from the checkpoint
    a, b = (torch.load(os.path.join(d, "poisons.pt"), weights_only=True) for d in (whole, stopped))
    assert torch.equal(a["x_poison"], b["x_poison"]) and torch.equal(a["y_poison"], b["y_poison"])


def test_sigterm_mid_epoch_saves_the_batch_and_resumes_to_the_same_poisons(tmp_path):
    flags = ["--pretrain-epochs", "2", "--attacker-epochs", "1", "--attack-epochs", "2", "--attack-batch-size", "100",
             "--follower-steps", "2", "--solver-iterations", "4", "--checkpoint-every", "3", "--quiet"]
    whole, stopped = str(tmp_path / "whole"), str(tmp_path / "stopped")
    assert cli.main(["run", *flags, "--out", whole]) == 0
    assert cli.main(["pretrain", *flags, "--out", stopped]) == 0
    proc = subprocess.Popen([sys.executable, "-m", "tgda_attack", "attack", "--out", stopped, "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    checkpoint = os.path.join(stopped, "attack_checkpoint.pt")
    deadline = time.time() + 300
    while not os.path.exists(checkpoint) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)  # after batch 3 of 28 in epoch 1
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130 and f"`tgda-attack attack --out {stopped}` again continues it" in err, err
    state = torch.load(checkpoint, weights_only=True)
    assert state["epoch"] == 0 and 3 <= state["batch"] < 28  # saved mid-epoch, at the batch boundary
    assert cli.main(["attack", "--out", stopped, "--quiet"]) == 0
    a, b = (torch.load(os.path.join(d, "poisons.pt"), weights_only=True) for d in (whole, stopped))
    assert torch.equal(a["x_poison"], b["x_poison"])
