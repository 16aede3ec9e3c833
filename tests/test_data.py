"""Datasets, splits and the poison budget (tgda_attack.data), on small files in the real formats."""
import gzip
import json
import os
import pickle

import numpy as np
import pytest
import torch

from tgda_attack import data


def write_idx(path, array):
    """Writes a uint8 array in MNIST's IDX format (gzip when the path ends in .gz)."""
    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with (gzip.open if path.endswith(".gz") else open)(path, "wb") as fh:
        fh.write(header + array.tobytes())


def test_poison_budget():
    assert data.poison_budget(2800, 0.03) == 84
    assert data.poison_budget(42000, 0.03) == 1260  # the paper's MNIST budget
    assert data.poison_budget(100, 0.29) == 29
    with pytest.raises(ValueError, match="epsilon"):
        data.poison_budget(100, 1.5)


def test_initial_poison_indices():
    assert data.initial_poison_indices(100, 3).tolist() == [0, 1, 2]
    a = data.initial_poison_indices(100, 10, "random", seed=4)
    assert torch.equal(a, data.initial_poison_indices(100, 10, "random", seed=4))
    assert len(set(a.tolist())) == 10 and not torch.equal(a, data.initial_poison_indices(100, 10, "random", seed=5))


def test_mnist_sample_is_the_embedded_default():
    s = data.load_dataset("mnist-sample")
    assert (len(s.y_train), len(s.y_val), len(s.y_test)) == (2800, 1200, 1000)
    assert s.image_shape == (1, 28, 28)
    assert s.x_train.min() == -1.0 and s.x_train.max() == 1.0
    assert set(s.y_test.tolist()) == set(range(10))
    again = data.load_dataset("mnist-sample")
    assert torch.equal(s.x_train, again.x_train) and torch.equal(s.y_val, again.y_val)
    assert s.summary()["split_seed"] == 0


@pytest.mark.parametrize("gzipped", [False, True], ids=["idx", "idx.gz"])
def test_mnist_from_local_idx_files(tmp_path, gzipped):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train_x = rng.integers(0, 256, (20, 28, 28))
    train_x[0, 0, 0], train_x[0, 0, 1] = 0, 255
    write_idx(str(raw / "train-images-idx3-ubyte"), train_x)
    write_idx(str(raw / "train-labels-idx1-ubyte"), np.arange(20) % 10)
    write_idx(str(raw / "t10k-images-idx3-ubyte"), rng.integers(0, 256, (10, 28, 28)))
    write_idx(str(raw / "t10k-labels-idx1-ubyte"), np.arange(10))
    if gzipped:  # the files as they are distributed: read as well (unpacked beside them)
        for name in data.MNIST_FILES:
            with open(raw / name, "rb") as src, gzip.open(raw / (name + ".gz"), "wb") as dst:
                dst.write(src.read())
            os.remove(raw / name)
    s = data.load_dataset("mnist", data_root=str(tmp_path))
    assert (len(s.y_train), len(s.y_val), len(s.y_test)) == (14, 6, 10)
    all_x = torch.cat([s.x_train, s.x_val])
    assert all_x.min() == -1.0 and all_x.max() == 1.0
    expected = torch.as_tensor(train_x, dtype=torch.float32) / 127.5 - 1
    assert sorted(all_x.sum((1, 2, 3)).tolist()) == pytest.approx(sorted(expected.sum((1, 2)).tolist()))


def _write_cifar(folder, n=4):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name in data.CIFAR_FILES:
        batch = {"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8), "labels": list(range(n))}
        with open(folder / name, "wb") as fh:
            pickle.dump(batch, fh)


def test_cifar10_from_local_batches(tmp_path):
    _write_cifar(tmp_path / "cifar-10-batches-py")
    s = data.load_dataset("cifar10", data_root=str(tmp_path))
    assert len(s.y_train) + len(s.y_val) == 20 and len(s.y_test) == 4
    assert s.image_shape == (3, 32, 32)
    assert -1.0 <= s.x_train.min() and s.x_train.max() <= 1.0


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_a_cifar_batch_of_another_shape_is_a_clear_error(tmp_path):
    path = tmp_path / "data_batch_1"
    with open(path, "wb") as fh:
        pickle.dump([1, 2, 3], fh)
    with pytest.raises(data.DataUnreadableError, match="not a CIFAR-10 batch: it holds a list"):
        data.read_cifar_batch(str(path))


@pytest.mark.parametrize("content, message", [
    (b"not a pickle at all", "not a pickle"),  # each read: its own error, named
    (pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1]})[:40], "truncated"),
    (pickle.dumps({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]}), r"is \[2, 100\], not \[2, 3072\]"),
    (pickle.dumps({"data": [[256] * 3072], "labels": [0]}), "must be uint8 pixels"),
    (pickle.dumps({"data": np.zeros((1, 3072), np.uint8), "labels": np.array("x")}), "'labels' one integer an image"),
    # what a cast once read silently: pixels in [0, 1] as black images, HWC arrays with their channels striped,
    # a label 1.7 as 1; and labels beyond the ten classes
    (pickle.dumps({"data": np.full((2, 3072), 0.5, np.float32), "labels": [0, 1]}), "got float32"),
    (pickle.dumps({"data": np.zeros((2, 32, 32, 3), np.uint8), "labels": [0, 1]}), r"is \[2, 32, 32, 3\]"),
    (pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0.0, 1.7]}), "got uint8 and float64"),
    (pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 10]}), "labels run from 0 to 10"),
])
def test_a_damaged_cifar_batch_is_a_clear_error(tmp_path, content, message):
    path = tmp_path / "data_batch_1"
    path.write_bytes(content)
    with pytest.raises(data.DataUnreadableError, match=message) as err:
        data.read_cifar_batch(str(path))
    assert str(path) in str(err.value)


def test_a_cifar_batch_with_any_bytes_changed_is_read_or_named_never_a_traceback(tmp_path):
    """Random damage (bytes changed, the file cut) in a batch's pickle: DataUnreadableError or the batch, nothing
    else (these 300 raised UnpicklingError, UnicodeDecodeError, ValueError, AttributeError, TypeError and
    OverflowError from the unpickler)."""
    good = pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1]}, protocol=4)
    rng = np.random.default_rng(0)
    path = tmp_path / "data_batch_1"
    for trial in range(300):
        damaged = bytearray(good)
        for at in rng.integers(0, 200, 1 + trial % 3):  # in the pickle's structure: its first and last bytes
            damaged[at if at < 150 else len(good) - (at - 150) - 1] = int(rng.integers(0, 256))
        path.write_bytes(bytes(damaged[:len(good) - int(rng.integers(0, 2)) * int(rng.integers(1, len(good)))]))
        try:
            data.read_cifar_batch(str(path))
        except data.DataUnreadableError:
            pass


def _write_mnist(raw, n_train=20, n_test=10):
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    write_idx(str(raw / "train-images-idx3-ubyte"), rng.integers(0, 256, (n_train, 28, 28)))
    write_idx(str(raw / "train-labels-idx1-ubyte"), np.arange(n_train) % 10)
    write_idx(str(raw / "t10k-images-idx3-ubyte"), rng.integers(0, 256, (n_test, 28, 28)))
    write_idx(str(raw / "t10k-labels-idx1-ubyte"), np.arange(n_test) % 10)


@pytest.mark.parametrize("damage, message", [
    ("garbage", "not an MNIST IDX file of images"), ("truncated", "bytes where its header promises"),
    ("labels", "20 x 28 x 28 images and train-labels-idx1-ubyte 19 labels"),
    ("no images", "0 x 28 x 28 images"),  # torchvision's own traceback before
    ("label 12", "do not make a dataset: the training labels must be class indices 0 .. 9"),  # a ValueError before
])
def test_damaged_mnist_files_are_named_before_torchvision_reads_them(tmp_path, damage, message):
    raw = tmp_path / "MNIST" / "raw"
    _write_mnist(raw)
    images = raw / "train-images-idx3-ubyte"
    if damage == "garbage":
        images.write_bytes(b"<html>not found</html>")
    elif damage == "truncated":
        images.write_bytes(images.read_bytes()[:1000])
    elif damage == "labels":
        write_idx(str(raw / "train-labels-idx1-ubyte"), np.arange(19) % 10)
    elif damage == "no images":
        write_idx(str(raw / "train-images-idx3-ubyte"), np.zeros((0, 28, 28), np.uint8))
        write_idx(str(raw / "train-labels-idx1-ubyte"), np.zeros(0, np.uint8))
    else:
        write_idx(str(raw / "train-labels-idx1-ubyte"), np.arange(20) % 10 + 3)
    with pytest.raises(data.DataUnreadableError, match=message):
        data.load_dataset("mnist", data_root=str(tmp_path))


def test_cifar_batch_that_would_run_code_is_refused(tmp_path):
    path = tmp_path / "data_batch_1"
    with open(path, "wb") as fh:
        pickle.dump({"data": _Exploit(), "labels": [0]}, fh)
    with pytest.raises(data.DataUnreadableError, match="refusing .* nothing in it ran"):
        data.read_cifar_batch(str(path))


@pytest.mark.parametrize("name, expected", [("mnist", "train-images-idx3-ubyte"), ("cifar10", "data_batch_1")])
def test_missing_files_name_the_folder_and_the_files(tmp_path, name, expected):
    with pytest.raises(data.DataNotFoundError, match=expected) as err:
        data.load_dataset(name, data_root=str(tmp_path))
    assert str(tmp_path) in str(err.value) and "--download" in str(err.value)


def test_unknown_dataset():
    with pytest.raises(ValueError, match="mnist-sample"):
        data.load_dataset("imagenet")


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_a_cifar_batch_of_any_pickle_protocol_is_read(tmp_path, protocol):
    """Protocol 5 (an array from its buffer) and protocol 2's bytes of an empty array were "refusing to load
    ... nothing in it ran", which read as if the file were malicious."""
    path = tmp_path / "data_batch_1"
    pixels = np.random.default_rng(protocol).integers(0, 256, (3, 3072)).astype(np.uint8)
    for n in (3, 0):
        path.write_bytes(pickle.dumps({"data": pixels[:n], "labels": list(range(n))}, protocol=protocol))
        images, labels = data.read_cifar_batch(str(path))
        assert np.array_equal(images.reshape(n, 3072), pixels[:n]) and labels.tolist() == list(range(n))


def test_missing_files_are_named_one_by_one_and_a_root_one_level_too_deep_is_pointed_up(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    _write_mnist(raw)
    os.remove(raw / "t10k-labels-idx1-ubyte")
    with pytest.raises(data.DataNotFoundError, match="t10k-labels-idx1-ubyte missing") as err:
        data.load_dataset("mnist", data_root=str(tmp_path))
    assert "train-images" not in str(err.value)
    _write_mnist(raw)
    with pytest.raises(data.DataNotFoundError, match=f"--data-root is the folder above MNIST/raw: --data-root {tmp_path}$"):
        data.load_dataset("mnist", data_root=str(raw))  # the files' own folder given
    assert len(data.load_dataset("mnist", data_root=str(tmp_path)).y_test) == 10


@pytest.mark.parametrize("epsilon", ["0.03", None, True, float("nan")])
def test_an_epsilon_that_is_no_number_is_one_value_error(epsilon):
    with pytest.raises(ValueError, match="a number in \\[0, 1\\]"):
        data.poison_budget(100, epsilon)


def test_files_in_a_flat_folder_the_tilde_and_an_empty_root_are_named(tmp_path, monkeypatch):
    _write_mnist(tmp_path / "flat")
    with pytest.raises(data.DataNotFoundError, match=r"the files are in .*flat itself: move them into .*flat/MNIST/raw"):
        data.load_dataset("mnist", data_root=str(tmp_path / "flat"))
    _write_mnist(tmp_path / "home" / "mine" / "MNIST" / "raw")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # "~/mine" as a shell would not expand it (--data-root=~/mine)
    assert len(data.load_dataset("mnist", data_root="~/mine").y_test) == 10
    monkeypatch.chdir(tmp_path / "home" / "mine")  # a relative root that is the files' own folder: pointed up
    with pytest.raises(data.DataNotFoundError, match=f"--data-root is the folder above MNIST/raw: --data-root "
                                                     f"{tmp_path / 'home' / 'mine'}$"):
        data.load_dataset("mnist", data_root="MNIST/raw")
    with pytest.raises(data.DataNotFoundError, match="the data root is empty"):
        data.load_dataset("mnist", data_root=" ")


def test_damaged_mnist_files_are_named_with_download_too(tmp_path):
    """--download over files already there: torchvision skips the download and read them unchecked (its traceback)."""
    raw = tmp_path / "MNIST" / "raw"
    _write_mnist(raw)
    (raw / "train-images-idx3-ubyte").write_bytes((raw / "train-images-idx3-ubyte").read_bytes()[:1000])
    with pytest.raises(data.DataUnreadableError, match="bytes where its header promises"):
        data.load_dataset("mnist", data_root=str(tmp_path), download=True)


def test_a_cifar_batch_asking_for_a_buffer_of_a_size_is_refused_before_it_is_allocated(tmp_path):
    path = tmp_path / "data_batch_1"
    path.write_bytes(b"cbuiltins\nbytes\n(J\x00e\xcd\x1dtR.")  # bytes(500000000): 500 MB from a pickle of 20 bytes
    with pytest.raises(data.DataUnreadableError, match=r"refusing to load bytes\(500000000\)"):
        data.read_cifar_batch(str(path))


def test_custom_tensors_of_another_layout_or_split_to_nothing_are_named():
    x, y = torch.rand(20, 1, 28, 28) * 2 - 1, torch.arange(20) % 10
    with pytest.raises(ValueError, match=r"channels last; pass them as \(N, C, H, W\)"):
        data.from_tensors("mine", x.permute(0, 2, 3, 1), y, x.permute(0, 2, 3, 1), y)
    with pytest.raises(ValueError, match=r"the test images are \[3, 28, 28\] but the training images \[1, 28, 28\]"):
        data.from_tensors("mine", x, y, x.expand(-1, 3, -1, -1), y)
    with pytest.raises(data.DataTooSmallError, match="val_fraction 0.01 of 20 training points leaves D_v empty"):
        data.from_tensors("mine", x, y, x, y, val_fraction=0.01)
    with pytest.raises(TypeError, match="seed must be an integer"):
        data.from_tensors("mine", x, y, x, y, seed=1.5)
    with pytest.raises(ValueError, match="the test dataset is empty"):
        data.from_dataset("mine", torch.utils.data.TensorDataset(x, y), torch.utils.data.TensorDataset(x[:0], y[:0]))


def test_a_run_refuses_data_replaced_under_its_data_root(tmp_path, capsys):
    """Other MNIST files under the same --data-root: stage 3 retrained on the new D_tr and tested on the new test set
    beside the clean accuracy of the old, without a word."""
    from tgda_attack import cli
    raw, out = tmp_path / "MNIST" / "raw", str(tmp_path / "run")
    _write_mnist(raw, n_train=100, n_test=20)
    assert cli.main(["run", "--dataset", "mnist", "--data-root", str(tmp_path), "--defender", "lr", "--attack",
                     "label-flip", "--epsilon", "0.1", "--pretrain-epochs", "1", "--threads", "1", "--quiet",
                     "--out", out]) == 0
    capsys.readouterr()
    write_idx(str(raw / "t10k-labels-idx1-ubyte"), (np.arange(20) + 1) % 10)  # the same sizes, other contents
    assert cli.main(["evaluate", "--out", out, "--quiet"]) == 2
    assert "are not those the run in" in capsys.readouterr().err
    _write_mnist(raw, n_train=120, n_test=20)  # other sizes: named
    assert cli.main(["attack", "--out", out, "--quiet"]) == 2
    assert "n_train 70 then, 84 now" in capsys.readouterr().err
    assert cli.main(["run", "--dataset", "mnist", "--data-root", str(tmp_path), "--defender", "lr", "--attack",
                     "label-flip", "--epsilon", "0.1", "--pretrain-epochs", "1", "--threads", "1", "--quiet",
                     "--out", out, "--resume"]) == 2  # stage 1 kept: the later stages refuse the new data
    assert "n_train 70 then, 84 now" in capsys.readouterr().err
    _write_mnist(raw, n_train=100, n_test=20)  # its own data back
    assert cli.main(["evaluate", "--out", out, "--quiet"]) == 0
    config = os.path.join(out, "config.json")  # a folder from before the digest: its sizes are compared
    recorded = json.load(open(config))
    del recorded["split"]["data_sha256"]
    json.dump(recorded, open(config, "w"))
    assert cli.main(["evaluate", "--out", out, "--quiet"]) == 0
