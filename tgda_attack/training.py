"""Training and testing of defenders and attackers: the "pretrain" and "test" stages of the
protocol of Lu, Kamath & Yu (TMLR 2022), Section 4.2.

Defenders are trained by plain mini-batch gradient descent on the cross-entropy (the paper's
"our own implementation of gradient descent", lr 0.1), with a seeded shuffle per epoch, so that
the same seed gives the same model and retraining on D_tr U D_p repeats the pretrain procedure
exactly. Attackers are pretrained as autoencoders: they learn to reconstruct D_tr from (x, y).

Gradient descent with a fixed step diverges when the data make the loss too sharp for it (poisons
can do that); the loss then overflows to inf/nan. Training stops with a FloatingPointError instead
of returning a model with nan weights, whose "accuracy" would be a meaningless number.

One deviation from plain gradient descent, on by default (Config.pretrain_max_grad_norm, 5): a step whose
gradient has an L2 norm (over all parameters) above `max_grad_norm` is scaled down to that norm, as
torch.nn.utils.clip_grad_norm_ does. The paper's NN on full MNIST at lr 0.1 is at the edge of stability:
on seed 0 it trains smoothly to 97.14% test accuracy at epoch 80, then one step in epoch 81 throws it out
(batch loss 1e25, then nan). A stable run's gradient norms stay below 3.4, so the bound acts only on the
first steps and the few outlier steps that start such a blow-up: 23 of the 4,200 steps on each of seeds 0
and 1, which then reach 97.52% and 97.48% (the paper: 98.04%); a bound of 20 lets them start. 0 turns it off.

Speed: on a CPU, a defender with 2-d convolutions trains in the channels-last memory layout (its weights and
each batch; the weights go back to the default layout when training ends). oneDNN's convolutions are faster
in it: the paper's CNN, one batch of 1,000 MNIST digits forward and backward on 2 cores, 1.16 s -> 0.84 s. The
values computed are the same up to the summation order of the convolutions.

Resuming: a training given a TrainingCheckpoint keeps its progress in a file (the weights, the shuffle's and
torch's random states after the last finished epoch, every `every_s` seconds and at its end); called again
with the same arguments it continues from there and ends at the same weights, bit for bit, as one that was
never stopped (on a CPU; on a GPU only where its kernels are deterministic: torch does not make a convolution's
backward pass so unless told to, so a CNN on a GPU ends near, not at, them). The paper's CNN trains for an hour on a 2-core CPU; a kill in its 90th epoch costs one minute.
"""
import contextlib
import hashlib
import json
import logging
import math
import os
import time

import torch
import torch.nn.functional as F
from .progress import progress_bar
from .rundir import RunFolderError, load_state, save_atomic

logger = logging.getLogger(__name__)


def _batches(n, batch_size, generator):
    order = torch.randperm(n, generator=generator)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def cross_entropy_loss(model, x, y):
    return F.cross_entropy(model(x), y)


def bounded_step(lr, grads, max_grad_norm):
    """The step size of w -= step * grad with the gradient scaled down to an L2 norm of `max_grad_norm` where it
    is longer: lr itself when max_grad_norm is 0, else a 0-dim tensor (no host synchronisation per step)."""
    if not max_grad_norm:
        return lr
    norm = torch.nn.utils.get_total_norm(grads)
    return lr * torch.clamp(max_grad_norm / (norm + 1e-6), max=1.0)


def training_layout(model, device):
    """The memory layout train_classifier gives `model` and its (4-d) image batches on `device`: torch.channels_last
    for a model with 2-d convolutions on a CPU, else None (the default layout)."""
    convolutional = any(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    return torch.channels_last if convolutional and torch.device(device).type == "cpu" else None


@contextlib.contextmanager
def _memory_layout(model, layout):
    """`model`'s weights in `layout` inside the block (None: as they are), in the default layout after it, also
    when the block stops with an error."""
    if layout is None:
        yield
        return
    model.to(memory_format=layout)
    try:
        yield
    finally:
        model.to(memory_format=torch.contiguous_format)


def tensor_digest(t):
    """sha256 of a tensor's values, shape and dtype (its bytes in the default layout, on the CPU; 0-dim tensors,
    such as BatchNorm's batch counters, included)."""
    digest = hashlib.sha256(f"{list(t.shape)}:{t.dtype}:".encode())
    digest.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy())
    return digest.hexdigest()


def weights_digest(model):
    """sha256 of a module's state, or of a state_dict (tensor_digest of each entry, with its name)."""
    state = model.state_dict() if isinstance(model, torch.nn.Module) else model
    return hashlib.sha256("".join(f"{name}:{tensor_digest(t)};" for name, t in state.items()).encode()).hexdigest()


class LastEpochs:
    """What `measure(model)` gives after each of a training's last `count` epochs (the test accuracy, in the
    protocol): `values` maps an epoch (1-based) to its value. A model's accuracy after its last epoch is one
    snapshot of a training that can swing from epoch to epoch (a network trained by SGD on poisons it has not fitted
    can read 77% at one epoch and 97% at the next); this record shows whether the last epoch was such a swing.
    A TrainingCheckpoint keeps it with the training's progress, so a resumed training's record is whole (a
    checkpoint kept without a record, by an older version, resumes too: the epochs it would have recorded are
    then missing from `values`, and a warning says so)."""

    def __init__(self, measure, count):
        if not (isinstance(count, int) and count >= 1):
            raise ValueError(f"count must be a whole number of epochs >= 1, got {count!r}")
        self.measure, self.count, self.values = measure, count, {}

    def after(self, epoch, epochs, model):
        """Records epoch `epoch` (1-based) of `epochs` if it is one of the last `count` (model in eval mode)."""
        if epoch > epochs - self.count:
            self.values[epoch] = float(self.measure(model))


class TrainingCheckpoint:
    """Where train_classifier keeps the progress of one training (the file `path`), so that a training stopped
    before its end continues from its last kept epoch when train_classifier is called again with the same
    model at the same initialisation, data and settings. A file of another training (other data, settings,
    architecture or initial weights, loss, memory layout, threads or torch), or one that cannot be read, is set
    aside: the training starts afresh (a warning says why) and replaces it. Kept every `every_s` seconds at the
    end of an epoch (after `after_epoch`; with a LastEpochs record, which it keeps too), and at the end of the training, so that a kill between the training's
    end and the caller's use of the model costs nothing: the caller calls discard() once it has written what it
    made of the model. A file that cannot be written costs the resumption, not the training (a warning).

    After a training: `resumed_at_epoch` (0: it started afresh) and `seconds_before` (the training's time in
    the calls before this one). What a loss_fn or after_epoch keeps of its own (a random stream of its own) is
    not kept: a training whose loss draws random numbers from anything but torch's global generator does not
    resume to the same weights."""

    def __init__(self, path, every_s=60.0):
        if not every_s >= 0:
            raise ValueError(f"every_s must be >= 0 seconds, got {every_s}")
        self.path, self.every_s, self._unwritable = path, every_s, False
        self.resumed_at_epoch, self.seconds_before = 0, 0.0

    def discard(self):
        """Removes the file, and a temporary one a kill during a save left (the caller has written what it made of
        the trained model)."""
        for path in (self.path, self.path + ".tmp"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)

    def _load(self, key):
        if not os.path.exists(self.path):
            return None
        try:
            state = load_state(self.path, {"key": str, "epoch": int, "model": dict, "shuffle": torch.Tensor,
                                           "torch_rng": torch.Tensor, "seconds": float})
        except (RunFolderError, OSError) as exc:
            logger.warning("training from scratch: %s", exc)
            return None
        if state["key"] != key:
            logger.warning("training from scratch: %s was kept by another training (other data, settings, "
                           "architecture, initial weights, loss, threads or torch)", self.path)
            return None
        return state

    def _save(self, key, epoch, model, generator, seconds, device, last_epochs=None):
        if self._unwritable:
            return
        state = {"key": key, "epoch": epoch, "model": model.state_dict(), "shuffle": generator.get_state(),
                 "torch_rng": torch.get_rng_state(), "seconds": float(seconds),
                 "last_epochs": {} if last_epochs is None else dict(last_epochs.values)}
        if device.type == "cuda":  # dropout on the GPU draws from that device's generator
            state["cuda_rng"] = torch.cuda.get_rng_state(device)
        try:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            save_atomic(state, self.path)
        except OSError as exc:
            logger.warning("the training goes on without keeping its progress (a kill now loses it): %s could not "
                           "be written: %s", self.path, exc)
            self._unwritable = True
            with contextlib.suppress(OSError):
                os.remove(self.path + ".tmp")


def _training_key(model, x, y, epochs, batch_size, lr, seed, max_grad_norm, loss_fn, layout):
    """What a kept training must agree on to be continued (a JSON string)."""
    return json.dumps({
        "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed, "max_grad_norm": float(max_grad_norm),
        "x": tensor_digest(x), "y": tensor_digest(y), "initial_weights": weights_digest(model),
        "model": repr(model), "loss": f"{getattr(loss_fn, '__module__', '')}.{getattr(loss_fn, '__qualname__', loss_fn)}",
        "layout": str(layout), "device": str(x.device), "threads": torch.get_num_threads(),
        "torch": torch.__version__}, sort_keys=True)


def _restore_record(last_epochs, kept, kept_epoch, epochs, path):
    """Sets a LastEpochs' values to those a checkpoint kept (of the epochs up to `kept_epoch` in its window); warns
    of the window's epochs before `kept_epoch` it lacks (a checkpoint of an older version, or of a shorter record)."""
    kept = kept if isinstance(kept, dict) else {}
    window = range(max(epochs - last_epochs.count, 0) + 1, kept_epoch + 1)
    last_epochs.values = {e: float(kept[e]) for e in window if isinstance(kept.get(e), (int, float))}
    missing = [e for e in window if e not in last_epochs.values]
    if missing:
        logger.warning("%s was kept without the test accuracy of epochs %s: the record of the last epochs of this "
                       "resumed training lacks them", path, ", ".join(map(str, missing)))


def train_classifier(model, x, y, *, epochs, batch_size, lr, seed, verbose=False, desc="train defender",
                     loss_fn=cross_entropy_loss, after_epoch=None, max_grad_norm=0.0, checkpoint=None,
                     last_epochs=None):
    """Mini-batch gradient descent on loss_fn(model, x_batch, y_batch) (the cross-entropy unless a robust
    training procedure gives its own): w -= lr * grad, the gradient scaled down to an L2 norm of
    `max_grad_norm` where it is longer (0: never). `after_epoch(model)`, where given, is called after
    each epoch (in eval mode; training resumes in train mode); `last_epochs`, a LastEpochs, records its measure after
    each of the last epochs (before after_epoch). `checkpoint`, a TrainingCheckpoint, keeps the training's progress
    (and the record) and continues a kept one. Returns the model."""
    if epochs < 0 or batch_size < 1 or lr <= 0 or not max_grad_norm >= 0:
        raise ValueError("epochs must be >= 0, batch_size >= 1, lr > 0 and max_grad_norm >= 0")
    layout = training_layout(model, x.device) if x.dim() == 4 else None
    generator = torch.Generator().manual_seed(seed)
    first_epoch, seconds_before, start = 0, 0.0, time.perf_counter()
    if checkpoint is not None:
        key = _training_key(model, x, y, epochs, batch_size, lr, seed, max_grad_norm, loss_fn, layout)
        kept = checkpoint._load(key)
        if kept is not None:
            model.load_state_dict(kept["model"])
            generator.set_state(kept["shuffle"])
            torch.set_rng_state(kept["torch_rng"])
            if "cuda_rng" in kept and x.device.type == "cuda":
                torch.cuda.set_rng_state(kept["cuda_rng"], x.device)
            first_epoch, seconds_before = kept["epoch"], kept["seconds"]
            if last_epochs is not None:
                _restore_record(last_epochs, kept.get("last_epochs"), kept["epoch"], epochs, checkpoint.path)
        checkpoint.resumed_at_epoch, checkpoint.seconds_before = first_epoch, seconds_before
        last_kept = time.perf_counter()
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    bar = progress_bar(range(first_epoch, epochs), desc=desc, disable=not verbose, leave=False,
                       initial=first_epoch, total=epochs)
    with _memory_layout(model, layout):
        for epoch in bar:
            for idx in _batches(len(y), batch_size, generator):
                xb = x[idx] if layout is None else x[idx].contiguous(memory_format=layout)
                loss = loss_fn(model, xb, y[idx])
                grads = torch.autograd.grad(loss, params)
                with torch.no_grad():
                    step = bounded_step(lr, grads, max_grad_norm)
                    for p, g in zip(params, grads):
                        p.sub_(step * g)
            last = loss.item()  # one host synchronisation per epoch
            if not math.isfinite(last):
                raise _diverged(desc, f"loss {last}", epoch, epochs, lr)
            if not _finite(params):  # the loss comes before the epoch's last step: its weights, before any are kept
                raise _diverged(desc, "weights not finite after the epoch's last step", epoch, epochs, lr)
            bar.set_postfix(loss=f"{last:.4f}")
            if after_epoch is not None or last_epochs is not None:
                model.eval()
                if last_epochs is not None:
                    last_epochs.after(epoch + 1, epochs, model)
                if after_epoch is not None:
                    after_epoch(model)
                model.train()
            if checkpoint is not None and (epoch + 1 == epochs or time.perf_counter() - last_kept >= checkpoint.every_s):
                checkpoint._save(key, epoch + 1, model, generator, seconds_before + time.perf_counter() - start,
                                 x.device, last_epochs)
                last_kept = time.perf_counter()
    if not _finite(params):  # a kept training resumed at its end (kept by an older version, which saved such weights)
        raise _diverged(desc, "weights not finite after the last step", epochs - 1, epochs, lr)
    model.eval()
    return model


def _finite(params):
    return all(bool(torch.isfinite(p).all()) for p in params)


def _diverged(desc, what, epoch, epochs, lr):
    """The FloatingPointError of a training whose gradient descent diverged in epoch `epoch` (0-based)."""
    return FloatingPointError(
        f"{desc}: gradient descent diverged ({what}) in epoch {epoch + 1} of {epochs} with lr {lr}: the training "
        "data make the loss too sharp for this step size (poisons can do this: an attack outcome, but no accuracy "
        "can be measured); use a smaller learning rate (--pretrain-lr) or a gradient-norm bound "
        "(--pretrain-max-grad-norm)")


@contextlib.contextmanager
def eval_mode(model):
    """`model` in eval mode for the block (dropout off, batch norm on its running statistics), then back in the
    mode each of its modules was in: a caller's model is not left switched."""
    restore = modes_restorer(model)
    model.eval()
    try:
        yield model
    finally:
        restore()


def modes_restorer(model):
    """A function that puts each of `model`'s modules back in the mode (training or eval) it is in now."""
    modes = [(m, m.training) for m in model.modules()]

    def restore():
        for m, training in modes:
            m.training = training
    return restore


@torch.no_grad()
def accuracy(model, x, y, batch_size=2000):
    """Fraction of correctly classified points (the model evaluated in eval mode, its mode kept)."""
    with eval_mode(model):
        correct = sum((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum().item()
                      for i in range(0, len(y), batch_size))
    return correct / max(1, len(y))


def pretrain_attacker(attacker, x, y, *, epochs, batch_size, lr=1e-3, seed=0, verbose=False):
    """Trains the attacker to reconstruct x from (x, y) (mean squared error, Adam). Returns it."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(attacker.parameters(), lr=lr)
    bar = progress_bar(range(epochs), desc="pretrain attacker", disable=not verbose, leave=False)
    for _ in bar:
        for idx in _batches(len(y), batch_size, generator):
            loss = F.mse_loss(attacker(x[idx], y[idx]), x[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        bar.set_postfix(mse=f"{loss.item():.4f}")
    return attacker
