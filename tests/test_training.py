"""train_classifier: its after_epoch hook sees the model of each epoch and does not change training; its
gradient-norm bound is the clipped step written out by hand, and keeps a run finite that plain GD blows up."""
import copy

import pytest
import torch
import torch.nn.functional as F

from tgda_attack.training import TrainingCheckpoint, train_classifier


def _problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (40,), generator=g)
    torch.manual_seed(1)
    return torch.nn.Linear(5, 3).double(), x, y


def test_after_epoch_sees_the_model_that_k_epochs_of_the_same_training_give():
    model, x, y = _problem()
    kw = dict(batch_size=8, lr=0.5, seed=3)
    seen = []
    hooked = train_classifier(copy.deepcopy(model), x, y, epochs=3, after_epoch=lambda m: seen.append(
        (m.training, copy.deepcopy(m.state_dict()))), **kw)
    assert [training for training, _ in seen] == [False, False, False]
    for k, (_, state) in enumerate(seen, start=1):
        expected = train_classifier(copy.deepcopy(model), x, y, epochs=k, **kw).state_dict()
        for name in expected:
            torch.testing.assert_close(state[name], expected[name], rtol=0, atol=0)
    for p, q in zip(hooked.parameters(), train_classifier(copy.deepcopy(model), x, y, epochs=3, **kw).parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("max_grad_norm", [0.0, 0.05, 1e6])
def test_the_bounded_step_is_the_gradient_scaled_down_to_the_bound(max_grad_norm):
    model, x, y = _problem()
    lr = 0.5
    params = list(model.parameters())
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), params)
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
    assert 0.05 < norm < 1e6  # the three bounds: none, one that acts, one that does not
    scale = min(1.0, max_grad_norm / norm.item()) if max_grad_norm else 1.0
    expected = [p.detach() - lr * scale * g for p, g in zip(params, grads)]
    trained = train_classifier(copy.deepcopy(model), x, y, epochs=1, batch_size=len(y), lr=lr, seed=0,
                               max_grad_norm=max_grad_norm)
    for p, e in zip(trained.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-9, atol=1e-7)  # clip_grad_norm_'s 1e-6


def _sharp_problem():
    """A ReLU network whose loss is too sharp for lr 10: plain gradient descent overflows to nan."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 20, generator=g) * 3
    y = torch.randint(0, 3, (64,), generator=g)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 3))
    return model, x, y


def test_plain_descent_diverges_on_a_sharp_problem_and_the_bound_keeps_it_finite():
    model, x, y = _sharp_problem()
    kw = dict(epochs=50, batch_size=16, lr=10.0, seed=0)
    with pytest.raises(FloatingPointError, match="--pretrain-max-grad-norm"):
        train_classifier(copy.deepcopy(model), x, y, max_grad_norm=0.0, **kw)
    bounded = train_classifier(copy.deepcopy(model), x, y, max_grad_norm=1.0, **kw)
    assert all(torch.isfinite(p).all() for p in bounded.parameters())
    assert torch.isfinite(F.cross_entropy(bounded(x), y))


def test_a_last_step_that_leaves_weights_not_finite_is_refused_too():
    # one step of one epoch: no loss after it is ever computed, so the weights themselves are checked
    torch.manual_seed(0)
    model, x, y = torch.nn.Linear(5, 2), torch.randn(200, 5), torch.randint(0, 2, (200,))
    with pytest.raises(FloatingPointError, match="weights not finite after the epoch's last step"):
        train_classifier(model, x, y, epochs=1, batch_size=200, lr=1e40, seed=0)


def test_a_diverged_last_step_keeps_no_checkpoint_a_rerun_would_score(tmp_path):
    """The last step of the last epoch gives a finite loss and a NaN gradient: the training raises, and no kept file
    holds its NaN weights (a rerun resumed at the end would have skipped every check and scored them: argmax of NaN
    is class 0, an "accuracy" of the class-0 share). A file kept so by an older version is refused at its end too."""
    torch.manual_seed(0)
    x, y = torch.randn(40, 5), (torch.randn(40) > 0).long()
    steps = {"n": 0}

    def nan_gradient_at_step_4(model, xb, yb):
        steps["n"] += 1
        loss = F.cross_entropy(model(xb), yb)
        w = next(model.parameters())
        return loss + 0 * torch.sqrt(w - w).sum() if steps["n"] == 4 else loss  # finite value, NaN gradient

    def fresh():
        torch.manual_seed(1)
        return torch.nn.Linear(5, 2)
    kw = dict(epochs=2, batch_size=20, lr=0.1, seed=0)
    path = str(tmp_path / "kept.pt")
    with pytest.raises(FloatingPointError, match="in epoch 2 of 2"):  # kept after every epoch (every_s=0)
        train_classifier(fresh(), x, y, loss_fn=nan_gradient_at_step_4, checkpoint=TrainingCheckpoint(path, 0), **kw)
    steps["n"] = -100  # the same loss, without the NaN: the rerun resumes epoch 1's file to an undiverged model
    kept = TrainingCheckpoint(path, 0)
    again = train_classifier(fresh(), x, y, loss_fn=nan_gradient_at_step_4, checkpoint=kept, **kw)
    plain = train_classifier(fresh(), x, y, loss_fn=nan_gradient_at_step_4, **kw)
    assert kept.resumed_at_epoch == 1  # not 2: the diverged epoch was not kept
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), plain.state_dict().values()))
    state = torch.load(path, weights_only=True)  # now kept at the end: made NaN, as an older version kept a divergence
    assert state["epoch"] == 2
    state["model"] = {k: torch.full_like(v, float("nan")) for k, v in state["model"].items()}
    torch.save(state, path)
    with pytest.raises(FloatingPointError, match="weights not finite after the last step"):
        train_classifier(fresh(), x, y, loss_fn=nan_gradient_at_step_4, checkpoint=TrainingCheckpoint(path), **kw)


def test_a_negative_bound_is_refused():
    model, x, y = _problem()
    with pytest.raises(ValueError, match="max_grad_norm >= 0"):
        train_classifier(model, x, y, epochs=1, batch_size=8, lr=0.1, seed=0, max_grad_norm=-1.0)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-4)])  # float32: oneDNN's kernels
def test_a_convolutional_defender_trains_in_channels_last_to_the_same_model_and_comes_back_in_the_default_layout(
        monkeypatch, dtype, tol):
    """The channels-last layout of a CNN's training on a CPU changes only the convolutions' summation order: the model
    is the one the default layout trains (to rounding), with its weights back in the default layout."""
    from tgda_attack import training
    g = torch.Generator().manual_seed(0)
    x = torch.rand(24, 3, 10, 10, generator=g, dtype=dtype)
    y = torch.randint(0, 4, (24,), generator=g)
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 4 * 4, 4)).to(dtype)
    assert training.training_layout(model, x.device) is torch.channels_last
    kw = dict(epochs=3, batch_size=8, lr=0.5, seed=1)
    seen_layouts = []
    channels_last = train_classifier(copy.deepcopy(model), x, y, after_epoch=lambda m: seen_layouts.append(
        m[0].weight.is_contiguous(memory_format=torch.channels_last)), **kw)
    assert seen_layouts == [True] * 3
    assert all(p.is_contiguous() for p in channels_last.parameters())
    monkeypatch.setattr(training, "training_layout", lambda model, device: None)
    default = train_classifier(copy.deepcopy(model), x, y, **kw)
    for p, q in zip(channels_last.parameters(), default.parameters()):
        torch.testing.assert_close(p, q, rtol=tol, atol=tol)
    assert not torch.equal(channels_last[0].weight, model[0].weight)
    diverging = copy.deepcopy(model)
    x_nan = x.clone()
    x_nan[:, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError):  # the layout is restored also when training stops with an error
        train_classifier(diverging, x_nan, y, **kw)
    assert all(p.is_contiguous() for p in diverging.parameters())


class _Stop(Exception):
    pass


def _stopped_after(epochs_done):
    """An after_epoch hook that stops the training in its call after epoch `epochs_done` (a kill before that epoch
    is kept: the checkpoint holds epoch `epochs_done` - 1)."""
    seen = []

    def hook(model):
        seen.append(1)
        if len(seen) == epochs_done:
            raise _Stop
    return hook


def _dropout_cnn(dtype=torch.float64):
    torch.manual_seed(4)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Flatten(),
                               torch.nn.Linear(4 * 6 * 6, 3)).to(dtype)


def _batchnorm_net():
    torch.manual_seed(5)
    return torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.BatchNorm1d(6), torch.nn.ReLU(),
                               torch.nn.Linear(6, 3)).double()  # its batch counter is a 0-dim buffer


@pytest.mark.parametrize("kind", ["linear", "dropout-cnn", "batchnorm"])
def test_a_training_stopped_and_called_again_ends_at_the_weights_of_one_never_stopped(tmp_path, kind):
    """The kept state (weights, the shuffle's and torch's random streams: dropout draws from the latter; a CNN
    trains channels-last) makes the continued training the uninterrupted one, bit for bit."""
    from tgda_attack.training import TrainingCheckpoint
    if kind != "dropout-cnn":
        model, x, y = _problem()
        model = model if kind == "linear" else _batchnorm_net()
    else:
        g = torch.Generator().manual_seed(0)
        x, y = torch.rand(30, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (30,), generator=g)
        model = _dropout_cnn()
    kw = dict(epochs=5, batch_size=8, lr=0.5, seed=3, max_grad_norm=5.0)
    torch.manual_seed(9)
    whole = train_classifier(copy.deepcopy(model), x, y, **kw)
    kept = TrainingCheckpoint(str(tmp_path / "ckpt.pt"), every_s=0)
    torch.manual_seed(9)
    with pytest.raises(_Stop):
        train_classifier(copy.deepcopy(model), x, y, checkpoint=kept, after_epoch=_stopped_after(3), **kw)
    assert torch.load(kept.path, weights_only=True)["epoch"] == 2
    torch.manual_seed(123)  # another process: the global random state is the kept one, not this
    continued = train_classifier(copy.deepcopy(model), x, y, checkpoint=kept, **kw)
    assert kept.resumed_at_epoch == 2 and kept.seconds_before > 0
    for name, value in whole.state_dict().items():
        assert torch.equal(continued.state_dict()[name], value), name
    # kept at its end too: called once more it does no epoch and gives the same model, until discarded
    again = train_classifier(copy.deepcopy(model), x, y, checkpoint=kept, **kw)
    assert kept.resumed_at_epoch == 5
    assert all(torch.equal(again.state_dict()[name], value) for name, value in whole.state_dict().items())
    kept.discard()
    assert not (tmp_path / "ckpt.pt").exists()
    kept.discard()  # nothing left to remove: no error


@pytest.mark.parametrize("change", ["lr", "data", "initial weights", "architecture", "loss", "damaged file",
                                    "not a tensor file"])
def test_a_kept_training_of_another_training_or_a_damaged_file_is_set_aside_and_the_training_starts_afresh(
        tmp_path, caplog, change):
    from tgda_attack.training import TrainingCheckpoint
    model, x, y = _problem()
    kw = dict(epochs=4, batch_size=8, lr=0.5, seed=3)
    kept = TrainingCheckpoint(str(tmp_path / "ckpt.pt"), every_s=0)
    with pytest.raises(_Stop):
        train_classifier(copy.deepcopy(model), x, y, checkpoint=kept, after_epoch=_stopped_after(3), **kw)
    if change == "lr":
        kw["lr"] = 0.25
    elif change == "data":
        x = x.clone()
        x[0, 0] += 1e-9
    elif change == "initial weights":
        with torch.no_grad():
            model.bias.add_(1e-9)
    elif change == "architecture":  # the same weights in another network (a final softmax)
        model = torch.nn.Sequential(model, torch.nn.LogSoftmax(dim=1))
    elif change == "loss":
        kw["loss_fn"] = lambda m, xb, yb: F.cross_entropy(m(xb), yb, label_smoothing=0.1)
    elif change == "damaged file":
        with open(kept.path, "r+b") as fh:
            fh.truncate(100)
    else:
        with open(kept.path, "wb") as fh:
            fh.write(b"not a checkpoint")
    fresh = train_classifier(copy.deepcopy(model), x, y, **kw)
    continued = train_classifier(copy.deepcopy(model), x, y, checkpoint=kept, **kw)
    assert kept.resumed_at_epoch == 0 and "training from scratch" in caplog.text
    for p, q in zip(fresh.parameters(), continued.parameters()):
        assert torch.equal(p, q)
    assert torch.load(kept.path, weights_only=True)["epoch"] == 4  # replaced by this training's


def test_a_training_whose_progress_cannot_be_written_goes_on_to_the_same_model(tmp_path, caplog):
    from tgda_attack.training import TrainingCheckpoint
    model, x, y = _problem()
    kw = dict(epochs=3, batch_size=8, lr=0.5, seed=3)
    (tmp_path / "file").write_text("not a folder")
    kept = TrainingCheckpoint(str(tmp_path / "file" / "ckpt.pt"), every_s=0)
    trained = train_classifier(copy.deepcopy(model), x, y, checkpoint=kept, **kw)
    assert "without keeping its progress" in caplog.text and caplog.text.count("could not be written") == 1
    for p, q in zip(trained.parameters(), train_classifier(copy.deepcopy(model), x, y, **kw).parameters()):
        assert torch.equal(p, q)


def test_a_training_keeps_its_progress_only_every_so_many_seconds(tmp_path, monkeypatch):
    """every_s: saved at the end of an epoch once that long has passed since the last (and at the end)."""
    from tgda_attack import training
    saved = []
    monkeypatch.setattr(training.TrainingCheckpoint, "_save", lambda self, key, epoch, *a: saved.append(epoch))
    model, x, y = _problem()
    train_classifier(model, x, y, epochs=6, batch_size=8, lr=0.5, seed=3,
                     checkpoint=training.TrainingCheckpoint(str(tmp_path / "c.pt"), every_s=3600))
    assert saved == [6]
    with pytest.raises(ValueError, match="every_s"):
        training.TrainingCheckpoint(str(tmp_path / "c.pt"), every_s=-1)


def _weight_sum(model):
    assert not model.training
    return model.weight.sum().item()


def test_last_epochs_records_the_measure_of_the_models_of_the_last_epochs_and_does_not_change_training():
    from tgda_attack.training import LastEpochs
    model, x, y = _problem()
    kw = dict(batch_size=8, lr=0.5, seed=3)
    record = LastEpochs(_weight_sum, 3)
    recorded = train_classifier(copy.deepcopy(model), x, y, epochs=5, last_epochs=record, **kw)
    assert sorted(record.values) == [3, 4, 5]
    for k in (3, 4, 5):
        assert record.values[k] == train_classifier(copy.deepcopy(model), x, y, epochs=k, **kw).weight.sum().item()
    for p, q in zip(recorded.parameters(), train_classifier(copy.deepcopy(model), x, y, epochs=5, **kw).parameters()):
        assert torch.equal(p, q)
    short = LastEpochs(_weight_sum, 10)  # more than the training has: every epoch
    train_classifier(copy.deepcopy(model), x, y, epochs=2, last_epochs=short, **kw)
    assert sorted(short.values) == [1, 2]
    for count in (0, -1, 2.5, None):
        with pytest.raises(ValueError, match="count"):
            LastEpochs(_weight_sum, count)


def _stopped_with_a_record(tmp_path, stopped_after, record):
    """A 5-epoch training recorded whole (its last 3 epochs), and the same training with a checkpoint kept every
    epoch, stopped in epoch `stopped_after` recording into `record`: (model, x, y, kw, the whole record, checkpoint)."""
    from tgda_attack.training import LastEpochs, TrainingCheckpoint
    model, x, y = _problem()
    kw = dict(epochs=5, batch_size=8, lr=0.5, seed=3)
    whole = LastEpochs(_weight_sum, 3)
    train_classifier(copy.deepcopy(model), x, y, last_epochs=whole, **kw)
    kept = TrainingCheckpoint(str(tmp_path / "ckpt.pt"), every_s=0)
    with pytest.raises(_Stop):
        train_classifier(copy.deepcopy(model), x, y, checkpoint=kept, after_epoch=_stopped_after(stopped_after),
                         last_epochs=record, **kw)
    return model, x, y, kw, whole, kept


@pytest.mark.parametrize("stopped_after", [2, 4])  # before the recorded epochs, and inside them
def test_a_resumed_training_keeps_the_record_of_its_last_epochs_whole(tmp_path, caplog, stopped_after):
    """The record is kept with the training's progress: the epochs recorded before the stop come back from the
    checkpoint (the measure is not called again for them) and the record equals that of a training never stopped."""
    from tgda_attack.training import LastEpochs
    model, x, y, kw, whole, kept = _stopped_with_a_record(tmp_path, stopped_after, LastEpochs(_weight_sum, 3))
    measured = []
    continued = LastEpochs(lambda m: measured.append(1) or _weight_sum(m), 3)
    train_classifier(copy.deepcopy(model), x, y, checkpoint=kept, last_epochs=continued, **kw)
    assert kept.resumed_at_epoch == stopped_after - 1
    assert continued.values == whole.values
    assert len(measured) == min(3, 5 - (stopped_after - 1))
    # kept at its end: read back whole; a longer record than the one kept lacks the epochs it did not keep (a warning)
    again = LastEpochs(_weight_sum, 3)
    train_classifier(copy.deepcopy(model), x, y, checkpoint=kept, last_epochs=again, **kw)
    assert kept.resumed_at_epoch == 5 and again.values == whole.values
    longer = LastEpochs(_weight_sum, 4)
    train_classifier(copy.deepcopy(model), x, y, checkpoint=kept, last_epochs=longer, **kw)
    assert kept.resumed_at_epoch == 5 and longer.values == whole.values
    assert "kept without the test accuracy of epochs 2:" in caplog.text


@pytest.mark.parametrize("stopped_after", [2, 5])
def test_a_checkpoint_kept_without_a_record_resumes_and_says_which_epochs_the_record_lacks(tmp_path, caplog,
                                                                                           stopped_after):
    """A checkpoint of an older version (no record in it) is continued, not set aside: stopped before the recorded
    epochs nothing is lost; stopped inside them, the record lacks the epochs before the stop, and says so."""
    from tgda_attack.training import LastEpochs
    model, x, y, kw, whole, kept = _stopped_with_a_record(tmp_path, stopped_after, None)
    state = torch.load(kept.path, weights_only=True)
    del state["last_epochs"]
    torch.save(state, kept.path)
    continued = LastEpochs(_weight_sum, 3)
    train_classifier(copy.deepcopy(model), x, y, checkpoint=kept, last_epochs=continued, **kw)
    assert kept.resumed_at_epoch == stopped_after - 1
    lost = [e for e in (3, 4, 5) if e < stopped_after]
    assert continued.values == {e: v for e, v in whole.values.items() if e not in lost}
    assert ("kept without the test accuracy of epochs 3, 4" in caplog.text) == bool(lost)


def test_a_last_epoch_off_the_median_of_the_last_epochs_is_reported_as_a_spike(caplog):
    from tgda_attack.protocol import last_epochs_entry
    from tgda_attack.training import LastEpochs
    record = LastEpochs(_weight_sum, 5)
    record.values = {96: 0.9706, 97: 0.9720, 98: 0.9698, 99: 0.9731, 100: 0.7771}  # the NN's sphere-filter case
    entry = last_epochs_entry(record, 0.7771, "the retraining")
    assert entry == {"epochs": [96, 97, 98, 99, 100], "accuracy": [0.9706, 0.9720, 0.9698, 0.9731, 0.7771],
                     "median": 0.9706, "mean": pytest.approx(0.93252), "spike": True}
    assert "the retraining" in caplog.text and "77.71%" in caplog.text and "19.35 points" in caplog.text
    caplog.clear()
    record.values[100] = 0.9650  # 0.56 points off: within the training's settled swing
    assert last_epochs_entry(record, 0.9650, "the retraining")["spike"] is False and not caplog.text
    assert last_epochs_entry(None, 0.9, "x") is None
