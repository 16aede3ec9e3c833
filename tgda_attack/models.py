"""Defenders and attackers of Lu, Kamath & Yu, "Indiscriminate Data Poisoning Attacks on Neural
Networks" (TMLR 2022), Section 5.1, and the defenders of their Gradient Canceling paper (ICML 2023).

Defenders (the follower F with parameters w): "lr" (logistic regression), "nn" (784-784-784-10,
leaky ReLU 0.2) and "cnn" (two conv layers, max-pooling, one linear layer) for MNIST;
"cifar-cnn" (conv6-conv16-fc120-fc84-fc10) and "resnet18" (torchvision's, adapted to 32x32) for
CIFAR-10; "gc-lr", "gc-nn" (784-128-10, ReLU) and "gc-cnn" (PyTorch's MNIST example net with
dropout), the MNIST models of the Gradient Canceling paper (watml/plim), each behind that code's input
normalisation (MnistStandardize). Attackers (the leader L with parameters theta) generate poisons from clean points and
their labels: the MNIST fully connected generator (785-784-784-784, leaky ReLU, tanh) and the
CIFAR-10 convolutional autoencoder (three conv, three transposed conv), label as an extra input.
Every attacker ends in tanh, so its poisons stay in the [-1, 1] pixel range of the data.
"""
import torch
from torch import nn

NUM_CLASSES = 10


def _lr(in_shape):
    return nn.Sequential(nn.Flatten(), nn.Linear(_numel(in_shape), NUM_CLASSES))


def _nn(in_shape):
    d = _numel(in_shape)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, 784), nn.LeakyReLU(0.2), nn.Linear(784, 784),
                         nn.LeakyReLU(0.2), nn.Linear(784, NUM_CLASSES))


def _cnn(in_shape):
    c, h, w = in_shape
    return nn.Sequential(nn.Conv2d(c, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(64 * ((h - 4) // 2) * ((w - 4) // 2), NUM_CLASSES))


def _cifar_cnn(in_shape):
    c, h, w = in_shape
    flat = 16 * (((h - 4) // 2 - 4) // 2) * (((w - 4) // 2 - 4) // 2)
    return nn.Sequential(nn.Conv2d(c, 6, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(flat, 120), nn.ReLU(), nn.Linear(120, 84),
                         nn.ReLU(), nn.Linear(84, NUM_CLASSES))


def _resnet18(in_shape):
    import torchvision

    model = torchvision.models.resnet18(num_classes=NUM_CLASSES)
    # 32x32 inputs: a 3x3 stem with stride 1 and no max-pooling, as is usual for CIFAR-10.
    model.conv1 = nn.Conv2d(in_shape[0], 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


class MnistStandardize(nn.Module):
    """Our MNIST pixels x in [-1, 1] to the (x01 - 0.1307) / 0.3081 of PyTorch's MNIST example (x01 = (x + 1) / 2
    in [0, 1]): the input normalisation of the Gradient Canceling authors' models (watml/plim). A fixed affine
    map without parameters, so a model behind it trains on our data exactly as theirs trains on theirs."""

    MEAN, STD = 0.1307, 0.3081
    SCALE, SHIFT = 1 / (2 * STD), (0.5 - MEAN) / STD  # x' = SCALE * x + SHIFT

    def forward(self, x):
        return x * self.SCALE + self.SHIFT


def _mnist_only(name, in_shape):
    if tuple(in_shape) != (1, 28, 28):
        raise ValueError(f"the {name} defender is the Gradient Canceling authors' MNIST model (1x28x28 inputs); "
                         f"got inputs of shape {tuple(in_shape)}: use lr, nn, cnn, cifar-cnn or resnet18")


def _gc_lr(in_shape):
    """The GC authors' LR (watml/plim GradPC/models.py `LR`): ours behind their input normalisation."""
    _mnist_only("gc-lr", in_shape)
    return nn.Sequential(MnistStandardize(), nn.Flatten(), nn.Linear(784, NUM_CLASSES))


def _gc_nn(in_shape):
    """The GC authors' NN (`LinearModel`): 784-128-10 with ReLU, behind their input normalisation."""
    _mnist_only("gc-nn", in_shape)
    return nn.Sequential(MnistStandardize(), nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, NUM_CLASSES))


def _gc_cnn(in_shape):
    """The GC authors' CNN (`ConvNet`, PyTorch's MNIST example net, dropout included), behind their input
    normalisation."""
    _mnist_only("gc-cnn", in_shape)
    return nn.Sequential(MnistStandardize(), nn.Conv2d(1, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Dropout(0.25), nn.Flatten(), nn.Linear(9216, 128), nn.ReLU(),
                         nn.Dropout(0.5), nn.Linear(128, NUM_CLASSES))


DEFENDERS = {"lr": _lr, "nn": _nn, "cnn": _cnn, "cifar-cnn": _cifar_cnn, "resnet18": _resnet18,
             "gc-lr": _gc_lr, "gc-nn": _gc_nn, "gc-cnn": _gc_cnn}


def _numel(shape):
    out = 1
    for s in shape:
        out *= s
    return out


def make_defender(name, in_shape=(1, 28, 28)):
    """A defender by name ("lr", "nn", "cnn", "cifar-cnn", "resnet18") for inputs of in_shape (C, H, W)."""
    if name not in DEFENDERS:
        raise ValueError(f"unknown defender {name!r}; choose one of {sorted(DEFENDERS)}")
    return DEFENDERS[name](tuple(in_shape))


class MLPGenerator(nn.Module):
    """The MNIST attacker: [x; y] (785) -> 784 -> 784 -> 784, leaky ReLU 0.2, tanh output."""

    def __init__(self, in_shape=(1, 28, 28), hidden=784):
        super().__init__()
        self.in_shape = tuple(in_shape)
        d = _numel(in_shape)
        self.net = nn.Sequential(nn.Linear(d + 1, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, hidden),
                                 nn.LeakyReLU(0.2), nn.Linear(hidden, d), nn.Tanh())

    def forward(self, x, y):
        label = (y.to(x.dtype) / (NUM_CLASSES - 1)).unsqueeze(1)  # the label, scaled to [0, 1]
        return self.net(torch.cat([x.flatten(1), label], dim=1)).view(-1, *self.in_shape)


class ConvAutoencoder(nn.Module):
    """The CIFAR-10 attacker: three conv and three transposed conv layers; the label enters as a
    constant extra input channel; tanh output."""

    def __init__(self, in_shape=(3, 32, 32)):
        super().__init__()
        c = in_shape[0]
        self.encoder = nn.Sequential(nn.Conv2d(c + 1, 16, 3, stride=2, padding=1), nn.ReLU(),
                                     nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
                                     nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU())
        self.decoder = nn.Sequential(nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1), nn.ReLU(),
                                     nn.ConvTranspose2d(32, 16, 4, stride=2, padding=1), nn.ReLU(),
                                     nn.ConvTranspose2d(16, c, 4, stride=2, padding=1), nn.Tanh())

    def forward(self, x, y):
        plane = (y.to(x.dtype) / (NUM_CLASSES - 1)).view(-1, 1, 1, 1).expand(-1, 1, *x.shape[2:])
        return self.decoder(self.encoder(torch.cat([x, plane], dim=1)))


ATTACKERS = {"mlp": MLPGenerator, "autoencoder": ConvAutoencoder}


def make_attacker(name, in_shape=(1, 28, 28)):
    """An attacker by name ("mlp" for MNIST, "autoencoder" for CIFAR-10)."""
    if name not in ATTACKERS:
        raise ValueError(f"unknown attacker {name!r}; choose one of {sorted(ATTACKERS)}")
    return ATTACKERS[name](tuple(in_shape))
