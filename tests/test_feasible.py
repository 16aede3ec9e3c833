"""The feasible sets of poisons (tgda_attack.attacks.feasible): the projection lands inside the box, sphere
and slab of each point's label, leaves a point already inside as it is, is the nearest feasible point (an
independent constrained solve), and min-max's poisons in the sanitized set pass the sphere and slab filters
that remove the box version's."""
import pytest
import torch

from tgda_attack import data
from tgda_attack.attacks import ImprovedMinMaxAttack, MinMaxAttack
from tgda_attack.attacks.feasible import FeasibleSet, make_feasible_set
from tgda_attack.defenses.centroid import SlabFilter, SphereFilter
from tgda_attack.models import make_defender
from tgda_attack.training import train_classifier


def _clusters(n=60, d=3, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(classes, d, generator=g, dtype=torch.float64) * 1.2 - 0.6
    y = torch.arange(n) % classes
    x = (centres[y] + 0.25 * torch.randn(n, d, generator=g, dtype=torch.float64)).clamp(-1, 1)
    return x, y


def test_projected_points_lie_in_the_box_sphere_and_slab_of_their_label():
    x, y = _clusters()
    feasible = FeasibleSet.sanitized(x, y, quantile=0.8, num_classes=3)
    g = torch.Generator().manual_seed(1)
    points = torch.rand(200, 3, generator=g, dtype=torch.float64) * 4 - 2
    labels = torch.randint(0, 3, (200,), generator=g)
    assert (feasible.violation(points, labels) > 0.1).float().mean() > 0.5  # most start well outside
    projected = feasible.project(points, labels)
    mu, rho = feasible.centroids[labels], feasible.radii[labels]
    v, s = feasible.directions[labels], feasible.widths[labels]
    assert bool(((projected - mu).norm(dim=1) <= rho + 1e-7).all())  # sphere
    assert bool((((projected - mu) * v).sum(1).abs() <= s + 1e-7).all())  # slab
    assert bool(((projected >= feasible.lower - 1e-7) & (projected <= feasible.upper + 1e-7)).all())  # box
    assert float(feasible.violation(projected, labels).max()) <= 1e-7


def test_a_projection_cut_off_before_convergence_still_ends_in_the_box():
    """One round of Dykstra's algorithm ends on the slab step, which here lands outside the box (a narrow slab
    across a corner of it): the pixels are clamped to the box all the same (a poison is always a valid image)."""
    t = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    feasible = FeasibleSet(t(0.0, 0.0), t(1.0, 1.0), t(0.95, 0.95)[None], t(0.5), t(0.5 ** 0.5, 0.5 ** 0.5)[None],
                           t(0.01), kind="sanitized")
    point, label = t(2.0, -1.0)[None], torch.tensor([0])
    cut = feasible.project(point, label, iterations=1)
    assert bool(((cut >= 0) & (cut <= 1)).all())
    assert float(feasible.violation(cut, label).max()) > 1e-3  # not at the projection yet: the sphere or slab
    full = feasible.project(point, label)
    assert float(feasible.violation(full, label).max()) <= 1e-7


def test_a_point_already_inside_is_left_unchanged():
    x, y = _clusters()
    feasible = FeasibleSet.sanitized(x, y, quantile=0.9, num_classes=3)
    inside = feasible.violation(x, y) == 0
    assert 0.6 < inside.float().mean() < 1.0  # the quantile leaves the farthest clean points outside
    assert torch.equal(feasible.project(x[inside], y[inside]), x[inside])
    box = FeasibleSet.box((-1.0, 1.0), 3)
    assert torch.equal(box.project(x, y), x)


def test_the_projection_is_the_nearest_feasible_point():
    """z is the Euclidean projection of p onto a convex set C iff z is in C and <p - z, q - z> <= 0 for every q
    in C: checked against feasible points made independently (clean points inside, mixed with the centroid)."""
    x, y = _clusters()
    feasible = FeasibleSet.sanitized(x, y, quantile=0.7, num_classes=3)
    g = torch.Generator().manual_seed(2)
    points = torch.rand(50, 3, generator=g, dtype=torch.float64) * 3 - 1.5
    labels = torch.randint(0, 3, (50,), generator=g)
    projected = feasible.project(points, labels, tol=1e-12)
    for p, z, c in zip(points, projected, labels):
        inside = x[(y == c) & (feasible.violation(x, torch.full_like(y, int(c))) == 0)]
        t = torch.rand(len(inside), 1, generator=g, dtype=torch.float64)
        q = torch.cat([inside, t * inside + (1 - t) * feasible.centroids[c]])  # convex: mixes stay inside
        assert float(((q - z) @ (p - z)).max()) <= 1e-9 * (1 + float((p - z).norm()))
    assert float((projected - points).norm(dim=1).gt(0.1).float().mean()) > 0.5  # most moved: not vacuous


def test_the_sets_are_made_from_clean_data_and_checked():
    x, y = _clusters()
    with pytest.raises(ValueError, match="every class"):
        FeasibleSet.sanitized(x, y, num_classes=4)
    with pytest.raises(ValueError, match="feasible_set"):
        make_feasible_set("ball", x, y)
    with pytest.raises(ValueError, match="feasible_set"):
        MinMaxAttack(torch.nn.Linear(3, 3), 0.1, feasible_set="ball")
    feasible = FeasibleSet.sanitized(x, y, quantile=0.5, num_classes=3)
    for c in range(3):  # half the clean points of each class inside the sphere: the median distance
        mine = x[y == c]
        inside = ((mine - feasible.centroids[c]).norm(dim=1) <= feasible.radii[c]).float().mean()
        assert inside.item() == pytest.approx(0.5, abs=0.06)


@pytest.fixture(scope="module")
def sample():
    s = data.load_dataset("mnist-sample")
    torch.manual_seed(0)
    defender = train_classifier(make_defender("lr", s.image_shape), s.x_train, s.y_train, epochs=10, batch_size=100,
                                lr=0.1, seed=0)
    return s, defender


def _recall(filter_, x, y, x_p, y_p):
    """The share of the poisons a filter removes from D_tr U D_p."""
    _, is_clean = filter_.detect_poison(torch.cat([x, x_p]), torch.cat([y, y_p]))
    return (~is_clean[len(y):]).float().mean().item()


@pytest.mark.parametrize("attack_cls", [MinMaxAttack, ImprovedMinMaxAttack])
def test_sanitized_min_max_poisons_survive_the_sphere_and_slab_filters_the_box_ones_do_not(sample, attack_cls):
    s, defender = sample
    extra = {"target_epochs": 1} if attack_cls is ImprovedMinMaxAttack else {}
    recalls = {}
    for kind in ("box", "sanitized"):
        attack = attack_cls(defender, 0.03, rounds=4, steps=20, feasible_set=kind, **extra)
        x_p, y_p = attack.poison(s.x_train, s.y_train)
        assert float(attack.feasible_.violation(x_p, y_p).max()) <= 1e-6  # every poison inside its set
        recalls[kind] = [_recall(f, s.x_train, s.y_train, x_p, y_p) for f in (SphereFilter(), SlabFilter())]
    # measured, recall of the sphere / slab filter: box min-max 0.74 / 0.71, i-min-max 0.13 / 0.42;
    # sanitized 0 / 0 for both
    assert max(recalls["box"]) > 0.3, recalls
    assert max(recalls["sanitized"]) <= 0.03, recalls  # at most the base rate: the filters cannot find them


def test_every_attack_that_optimises_pixels_keeps_its_poisons_in_the_sanitized_set(sample):
    from tgda_attack.attacks import BackGradientAttack, GradientCancelingAttack, TGDAAttack

    s, defender = sample
    x, y, xv, yv = s.x_train[:600], s.y_train[:600], s.x_val[:300], s.y_val[:300]
    attacks = [GradientCancelingAttack(defender, 0.03, steps=20, lr=0.1, target_epochs=1, feasible_set="sanitized"),
               BackGradientAttack(defender, 0.03, unroll_steps=2, epochs=1, batch_size=200, feasible_set="sanitized"),
               TGDAAttack(defender, None, 0.03, epochs=1, batch_size=200, alpha=500.0, follower_steps=2,
                          feasible_set="sanitized")]
    for attack in attacks:
        x_p, y_p = attack.poison(x, y, x_val=xv, y_val=yv)
        assert attack.feasible_.kind == "sanitized"
        assert float(attack.feasible_.violation(x_p, y_p).max()) <= 1e-6, attack.name
        assert _recall(SphereFilter(), x, y, x_p, y_p) <= 0.03 + 1e-9 and _recall(SlabFilter(), x, y, x_p, y_p) <= 0.03 + 1e-9
    with pytest.raises(ValueError, match="attacker=None"):
        TGDAAttack(defender, torch.nn.Identity(), 0.03, feasible_set="sanitized")
    with pytest.raises(ValueError, match="projects onto no set"):
        GradientCancelingAttack(defender, 0.03, recipe="authors", feasible_set="sanitized")
