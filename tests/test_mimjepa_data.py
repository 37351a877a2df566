"""The embedded datasets: reproducible from the seed, balanced, and (arrangements) classes that
differ only in how identical parts are laid out."""

import math

import pytest
import torch

pytest.importorskip("mimjepa", reason="the training loop is installed with the package (pip install -e '.[test]')")

from mimjepa.config import DataConfig, PretrainConfig, load_config, ConfigError
from mimjepa.data import build_dataset
from mimjepa.synthetic import (ARRANGEMENT_CLASSES, PARTS_PER_IMAGE, SHAPE_CLASSES, arrangement_parts,
                               arrangement_templates, make_synthetic_images)


@pytest.mark.parametrize("kind", ["arrangements", "shapes"])
def test_same_seed_same_images_other_seed_other_images(kind):
    a = make_synthetic_images(40, 32, seed=5, kind=kind)
    b = make_synthetic_images(40, 32, seed=5, kind=kind)
    c = make_synthetic_images(40, 32, seed=6, kind=kind)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert a[0].shape == (40, 3, 32, 32) and a[0].dtype == torch.float32
    assert a[0].min() >= 0 and a[0].max() <= 1


@pytest.mark.parametrize("kind,n,classes", [("arrangements", 203, None), ("arrangements", 64, 3), ("shapes", 97, None)])
def test_classes_are_balanced(kind, n, classes):
    _, labels = make_synthetic_images(n, 32, seed=1, num_classes=classes, kind=kind)
    counts = torch.bincount(labels, minlength=classes or len(ARRANGEMENT_CLASSES if kind == "arrangements" else SHAPE_CLASSES))
    assert counts.max() - counts.min() <= 1 and counts.sum() == n


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="kind"):
        make_synthetic_images(4, 32, seed=0, kind="blobs")
    with pytest.raises(ValueError, match="num_classes"):
        make_synthetic_images(4, 32, seed=0, num_classes=9)
    with pytest.raises(ValueError, match="img_size"):
        make_synthetic_images(4, 16, seed=0)
    with pytest.raises(ConfigError, match="crop_scale"):
        load_config(PretrainConfig, None, ["data.crop_scale=[0.5, 0.2]"])


def test_templates_have_unit_neighbour_spacing_and_differ():
    templates = arrangement_templates()
    assert len(templates) == len(ARRANGEMENT_CLASSES) == 8
    profiles = []
    for name, pts in templates.items():
        assert pts.shape == (PARTS_PER_IMAGE, 2)
        d = torch.cdist(pts, pts) + torch.eye(len(pts)) * 1e9
        nearest = d.min(1).values
        # every part has a neighbour exactly one spacing away: locally, all classes look the same
        assert torch.allclose(nearest, torch.ones_like(nearest), atol=1e-9), name
        profiles.append(torch.cdist(pts, pts).flatten().sort().values)
    profiles = torch.stack(profiles)
    gaps = torch.cdist(profiles, profiles) + torch.eye(len(profiles)) * 1e9
    assert gaps.min() > 1.0  # no two arrangements are the same up to rotation and translation


def _rotation_invariant_profile(pts):
    return torch.cdist(pts, pts).flatten(1).sort(dim=1).values


def test_each_image_holds_its_class_arrangement():
    """Up to rotation, translation and the spacing, the parts of an image are its class's template
    (pairwise-distance profile nearest to its own class's), and they fit in the image."""
    labels, pts, radius, _, _ = arrangement_parts(400, 32, seed=3)
    assert (pts - radius[:, None, None] >= 0).all() and (pts + radius[:, None, None] <= 32).all()
    d = torch.cdist(pts, pts) + torch.eye(PARTS_PER_IMAGE) * 1e9
    spacing = d.min(2).values.median(1).values
    profiles = torch.cdist(pts, pts).flatten(1).sort(dim=1).values / spacing[:, None]
    templates = torch.stack(list(arrangement_templates().values()))
    reference = torch.cdist(templates, templates).flatten(1).sort(dim=1).values
    nearest = torch.cdist(profiles.float(), reference.float()).argmin(1)
    assert torch.equal(nearest, labels)


def _stats_by_class(values, labels, num_classes):
    return torch.stack([values[labels == c].mean(0) for c in range(num_classes)])


def test_local_content_is_distributed_alike_in_every_class():
    """What a part looks like, how far its nearest neighbour is and in which direction, and the
    pooled pixel statistics of an image have the same distribution in every class (class means
    within a few standard errors of the overall mean); only the arrangement differs."""
    n, C = 4000, len(ARRANGEMENT_CLASSES)
    labels, pts, radius, rgb, _ = arrangement_parts(n, 32, seed=11)
    images, labels2 = make_synthetic_images(n, 32, seed=11)
    assert torch.equal(labels, labels2)
    d = torch.cdist(pts, pts) + torch.eye(PARTS_PER_IMAGE) * 1e9
    nn_dist, nn_idx = d.min(2)
    vec = torch.gather(pts, 1, nn_idx[..., None].expand(-1, -1, 2)) - pts
    theta = torch.atan2(vec[..., 1], vec[..., 0])
    per_image = torch.stack([
        radius,                                              # part size
        torch.cos(2 * theta).mean(1), torch.sin(2 * theta).mean(1),  # neighbour direction (axial)
        rgb.mean(1).double()[:, 0], rgb.mean(1).double()[:, 1], rgb.mean(1).double()[:, 2],  # part colours
        images.mean((2, 3)).double()[:, 0], images.mean((2, 3)).double()[:, 1], images.mean((2, 3)).double()[:, 2],
        (images.amax(1) > 0.6).double().mean((1, 2)),       # how much of the image the parts cover
    ], dim=1)
    means = _stats_by_class(per_image, labels, C)
    stderr = per_image.std(0) / math.sqrt(n / C)
    z = (means - per_image.mean(0)) / stderr
    assert z.abs().max() < 4.5, z
    # nearest-neighbour distance: the same spacing in every class (within 3 %; the per-part jitter
    # shortens it slightly where a part has two neighbours one spacing away)
    spacing = _stats_by_class(nn_dist.mean(1, keepdim=True), labels, C).squeeze(1)
    assert (spacing / spacing.mean() - 1).abs().max() < 0.03, spacing
    # ...while the arrangement's extent (a global property) differs a lot between classes
    extent = (pts.amax(1) - pts.amin(1)).norm(dim=1) / nn_dist.mean(1)
    ext = _stats_by_class(extent[:, None], labels, C).squeeze(1)
    assert ext.max() - ext.min() > 3.0


def test_pooled_local_features_do_not_separate_the_classes():
    """A bag of local patches (histogram of a 4x4 patch codebook, learned without labels, pooled
    over the image) classifies at chance level: local content carries no class."""
    C = len(ARRANGEMENT_CLASSES)
    train, y_train = make_synthetic_images(1600, 32, seed=21)
    test, y_test = make_synthetic_images(800, 32, seed=22)

    def patches(x):  # (N, 64, 48): each 4x4 patch, brightness-normalised (colour is a nuisance)
        grey = x.mean(1, keepdim=True)
        p = torch.nn.functional.unfold(grey, 4, stride=4).transpose(1, 2)
        return p - p.mean(-1, keepdim=True)

    g = torch.Generator().manual_seed(0)
    flat = patches(train).reshape(-1, 16)
    codebook = flat[torch.randperm(len(flat), generator=g)[:64]]
    for _ in range(10):  # k-means
        assign = torch.cdist(flat, codebook).argmin(1)
        for k in range(len(codebook)):
            if (assign == k).any():
                codebook[k] = flat[assign == k].mean(0)

    def bag(x):
        a = torch.cdist(patches(x), codebook[None]).argmin(-1)
        return torch.nn.functional.one_hot(a, len(codebook)).float().mean(1)

    b_train, b_test = bag(train), bag(test)
    # nearest class mean and a least-squares linear read-out, both on the pooled bag
    centroids = torch.stack([b_train[y_train == c].mean(0) for c in range(C)])
    acc_centroid = (torch.cdist(b_test, centroids).argmin(1) == y_test).float().mean()
    X = torch.cat([b_train, torch.ones(len(b_train), 1)], 1)
    W = torch.linalg.lstsq(X, torch.nn.functional.one_hot(y_train, C).float()).solution
    acc_linear = ((torch.cat([b_test, torch.ones(len(b_test), 1)], 1) @ W).argmax(1) == y_test).float().mean()
    assert acc_centroid < 0.25 and acc_linear < 0.25, (acc_centroid, acc_linear)


def test_embedded_splits_and_sizes():
    cfg = DataConfig(embedded_train_size=24, embedded_val_size=8, embedded_test_size=12)
    sizes = {s: len(build_dataset(cfg, s, 32)[0]) for s in ("train", "val", "test")}
    assert sizes == {"train": 24, "val": 8, "test": 12}
    assert build_dataset(cfg, "train", 32)[1] == 8
    assert build_dataset(DataConfig(embedded_kind="shapes", embedded_val_size=4), "val", 32)[1] == 10
    x_val = build_dataset(cfg, "val", 32)[0][0][0]
    x_test = build_dataset(cfg, "test", 32)[0][0][0]
    assert not torch.equal(x_val, x_test)  # each split its own draw
