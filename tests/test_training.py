"""train_classifier's after_epoch hook: it sees the model of each epoch and does not change training."""
import copy

import torch

from tgda_attack.training import train_classifier


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
