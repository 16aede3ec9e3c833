"""The MaxUp defense (Gong, Ren, Ye & Liu, "MaxUp: a simple way to improve generalization of neural network
training", arXiv:2002.09024, 2020, the MaxUp objective; Lu, Kamath & Yu, TMLR 2022, Section 5.6 (c) and Table 11): the
defender is retrained on the (poisoned) training set D_tr U D_p by minimising the worst loss over m randomly
perturbed copies of every point,

    L_MaxUp(w) = (1/|B|) sum_{(x, y) in B} max_{i = 1..m} l(w; x'_i, y),    x'_1, ..., x'_m ~ P(. | x) i.i.d.,

with l the cross-entropy, in place of the plain mean cross-entropy of the retraining; everything else (the
seeded mini-batch gradient descent of tgda_attack.training.train_classifier, its epochs, batch size and step)
is unchanged. The m copies of a batch go through the model as one batch of m * |B| points, and the gradient
of the max is that of each point's worst copy, as when one trains on the worst augmentation of each point.

The perturbation P(. | x), and why:
  * Gaussian noise, x' = clip(x + sigma * z, -1, 1) with z ~ N(0, I): the perturbation MaxUp analyses (for
    small sigma its loss is asymptotically l + c_m * sigma * ||grad_x l||_2, a penalty on the input gradient
    that trains the defender to be smooth around every point) and the "random perturbations" of Lu et al.
    The clip keeps perturbed pixels in the data's range [-1, 1] (tgda_attack.data scales pixels so, and every
    attacker ends in tanh). A pixel at the bound (the MNIST background, -1) is thus moved inward only, by
    sigma / sqrt(2 pi) on average.
  * Not the augmentations of the implementation Lu et al. follow (github.com/Yunodo/maxup: random 90-degree
    rotations, flips and colour jitter of ImageNet photographs): rotations and flips do not preserve a
    digit's label (a 6 turned half round is a 9) and MNIST has no colour. MaxUp's own image-classification
    runs use Cutout/CutMix inside a full augmentation pipeline, which this protocol does not have.
    Yunodo/maxup also counts the unperturbed point among the candidates; here, as in MaxUp's objective above,
    only the m copies do.
  * sigma = 0.5 by default (`maxup_noise`, in the [-1, 1] pixel units of the data): 0.25 in [0, 1] units, a
    standard noise level of Gaussian-noise training for randomised smoothing (Cohen, Rosenfeld & Kolter
    2019), the task on which MaxUp uses Gaussian perturbations; a digit stays legible under it.
  * m = 4 copies by default (`maxup_copies`), the m MaxUp uses for image classification; the cost of a
    step grows with m (m forward and backward passes' worth of points).

The noise is drawn from a torch.Generator on the data's device seeded from the training seed (salted, so that
it is not the stream of the batch shuffle, which train_classifier seeds with the seed itself): the same seed
gives the same model.
"""
import math

import torch
import torch.nn.functional as F

from ..attacks.base import MAX_BATCH_COPIES, Setting
from ..training import train_classifier
from .base import RobustTraining

PIXEL_RANGE = (-1.0, 1.0)  # the data's pixel range (tgda_attack.data); perturbed copies are clipped to it
_NOISE_SEED_SALT = 0x6D61787570  # "maxup": the noise stream's seed is seed + salt, not the shuffle's seed


def perturbed_copies(x, copies, noise, generator):
    """(copies, *x.shape): `copies` perturbed copies of the batch x, clip(x + noise * z, -1, 1) with z standard
    normal, drawn as one tensor of that shape from `generator` (on x's device), copy by copy."""
    z = torch.randn((copies, *x.shape), generator=generator, device=x.device, dtype=x.dtype)
    return (x.unsqueeze(0) + noise * z).clamp(*PIXEL_RANGE)


def maxup_loss(model, x, y, *, copies, noise, generator):
    """MaxUp's loss on the batch (x, y): the mean over points of the largest cross-entropy of the point's
    `copies` perturbed copies (perturbed_copies), which the model sees as one batch of copies * len(y)."""
    x_aug = perturbed_copies(x, copies, noise, generator)
    losses = F.cross_entropy(model(x_aug.flatten(0, 1)), y.repeat(copies), reduction="none")
    return losses.view(copies, len(y)).max(0).values.mean()


def noise_generator(seed, device):
    """The generator of MaxUp's noise for training seed `seed`, on `device`."""
    return torch.Generator(device=device).manual_seed((seed + _NOISE_SEED_SALT) % 2 ** 63)


class MaxUpTraining(RobustTraining):
    """Retrains the defender on the worst of `copies` Gaussian-perturbed copies of every point (see the module
    docstring)."""

    name = "maxup"
    pixel_range = PIXEL_RANGE  # its noisy copies are clamped to the data's range
    settings = (
        Setting("maxup_copies", int, 4, "batch-copies",
                "maxup: m, the perturbed copies of every point whose largest loss is minimised"),
        Setting("maxup_noise", float, 0.5, "non-negative",
                "maxup: sigma, the std of the Gaussian pixel noise of a copy, in the data's [-1, 1] pixel units"),
    )
    quick = {"maxup_copies": 2}

    def __init__(self, copies=4, noise=0.5):
        self.copies, self.noise = copies, noise
        self._check_params()

    def _check_params(self):
        if not isinstance(self.copies, int) or isinstance(self.copies, bool) or not 1 <= self.copies <= MAX_BATCH_COPIES:
            raise ValueError(f"copies is m, the number of perturbed copies of every point, an integer from 1 to "
                             f"{MAX_BATCH_COPIES} (the copies of a batch are held in memory at once); got {self.copies!r}")
        if (not isinstance(self.noise, (int, float)) or isinstance(self.noise, bool) or not math.isfinite(self.noise)
                or self.noise < 0):
            raise ValueError(f"noise is the std of the Gaussian pixel noise, a finite number >= 0 (in the data's "
                             f"[-1, 1] pixel units; 0 gives plain cross-entropy training); got {self.noise!r}")

    def loss_fn(self, generator):
        """loss_fn(model, x, y) for train_classifier: maxup_loss with this defense's settings, noise from
        `generator`."""
        def loss(model, x, y):
            return maxup_loss(model, x, y, copies=self.copies, noise=self.noise, generator=generator)
        return loss

    def train(self, model, x, y, *, epochs, batch_size, lr, seed, verbose=False, desc="maxup training",
              max_grad_norm=0.0, last_epochs=None):
        return train_classifier(model, x, y, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, verbose=verbose,
                                desc=desc, max_grad_norm=max_grad_norm, loss_fn=self.loss_fn(noise_generator(seed, x.device)),
                                last_epochs=last_epochs)
