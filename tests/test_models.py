"""Defenders and attackers of the paper (tgda_attack.models)."""
import pytest
import torch

from tgda_attack.models import make_attacker, make_defender


@pytest.mark.parametrize("name, shape", [("lr", (1, 28, 28)), ("nn", (1, 28, 28)), ("cnn", (1, 28, 28)),
                                         ("cifar-cnn", (3, 32, 32)), ("resnet18", (3, 32, 32))])
def test_defenders_classify_into_ten_classes(name, shape):
    assert make_defender(name, shape)(torch.randn(2, *shape)).shape == (2, 10)


def test_nn_defender_is_the_papers():
    net = make_defender("nn")
    linears = [m for m in net if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 784), (784, 784), (784, 10)]
    assert all(m.negative_slope == 0.2 for m in net if isinstance(m, torch.nn.LeakyReLU))


@pytest.mark.parametrize("name, shape", [("mlp", (1, 28, 28)), ("autoencoder", (3, 32, 32))])
def test_attackers_stay_in_pixel_range_and_use_the_label(name, shape):
    torch.manual_seed(0)
    attacker = make_attacker(name, shape)
    x = torch.rand(4, *shape) * 2 - 1
    out = attacker(x, torch.tensor([0, 1, 2, 3]))
    assert out.shape == x.shape and out.min() >= -1 and out.max() <= 1
    assert not torch.allclose(out, attacker(x, torch.tensor([9, 9, 9, 9])))
    if name == "mlp":
        assert attacker.net[0].in_features == 785


def test_unknown_names_are_reported():
    with pytest.raises(ValueError, match="choose one of"):
        make_defender("svm")
    with pytest.raises(ValueError, match="choose one of"):
        make_attacker("gan")


def test_the_gradient_canceling_authors_models_see_their_normalised_pixels():
    from tgda_attack.models import MnistStandardize

    x = torch.tensor([-1.0, 0.0, 1.0])  # our pixels; theirs (x01 - 0.1307) / 0.3081 with x01 = (x + 1) / 2
    torch.testing.assert_close(MnistStandardize()(x), (torch.tensor([0.0, 0.5, 1.0]) - 0.1307) / 0.3081)
    images = torch.rand(2, 1, 28, 28) * 2 - 1
    sizes = {"gc-lr": 7850, "gc-nn": 784 * 128 + 128 + 1290, "gc-cnn": 320 + 18496 + 9216 * 128 + 128 + 1290}
    for name, size in sizes.items():
        model = make_defender(name)
        assert model(images).shape == (2, 10) and sum(p.numel() for p in model.parameters()) == size
        with pytest.raises(ValueError, match="MNIST model"):
            make_defender(name, (3, 32, 32))
