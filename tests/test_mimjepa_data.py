"""The embedded datasets: reproducible from the seed, balanced, and (lattices, arrangements)
classes that differ only in how identical parts are laid out."""

import math

import pytest
import torch

pytest.importorskip("mimjepa", reason="the training loop is installed with the package (pip install -e '.[test]')")

from mimjepa.config import DataConfig, PretrainConfig, load_config, ConfigError
from mimjepa.data import build_dataset
from mimjepa.synthetic import (ARRANGEMENT_CLASSES, LATTICE_CLASSES, LATTICE_SPACING, LATTICE_VALUES, OUTLINE_CLASSES,
                               PARTS_PER_IMAGE, SHAPE_CLASSES, arrangement_parts, arrangement_templates,
                               lattice_dot_centres, lattice_parts, lattice_templates, make_synthetic_images,
                               outline_parts, outline_segments, outline_templates)

NUM_CLASSES = {"lattices": len(LATTICE_CLASSES), "outlines": len(OUTLINE_CLASSES), "arrangements": len(ARRANGEMENT_CLASSES), "shapes": len(SHAPE_CLASSES)}


@pytest.mark.parametrize("kind", ["lattices", "outlines", "arrangements", "shapes"])
def test_same_seed_same_images_other_seed_other_images(kind):
    a = make_synthetic_images(40, 32, seed=5, kind=kind)
    b = make_synthetic_images(40, 32, seed=5, kind=kind)
    c = make_synthetic_images(40, 32, seed=6, kind=kind)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert a[0].shape == (40, 3, 32, 32) and a[0].dtype == torch.float32
    assert a[0].min() >= 0 and a[0].max() <= 1


@pytest.mark.parametrize("kind,n,classes", [("lattices", 203, None), ("lattices", 45, 6), ("outlines", 203, None), ("outlines", 50, 5), ("arrangements", 203, None),
                                            ("arrangements", 64, 3), ("shapes", 97, None)])
def test_classes_are_balanced(kind, n, classes):
    _, labels = make_synthetic_images(n, 32, seed=1, num_classes=classes, kind=kind)
    counts = torch.bincount(labels, minlength=classes or NUM_CLASSES[kind])
    assert counts.max() - counts.min() <= 1 and counts.sum() == n


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="kind"):
        make_synthetic_images(4, 32, seed=0, kind="blobs")
    with pytest.raises(ValueError, match="num_classes"):
        make_synthetic_images(4, 32, seed=0, num_classes=9)
    with pytest.raises(ValueError, match="img_size"):
        make_synthetic_images(4, 16, seed=0)
    with pytest.raises(ValueError, match="num_classes"):
        make_synthetic_images(4, 32, seed=0, num_classes=1, kind="outlines")
    with pytest.raises(ConfigError, match="colour_jitter"):
        load_config(PretrainConfig, None, ["data.colour_jitter=[0.4, 0.4, 0.4, 0.7]"])
    with pytest.raises(ConfigError, match="crop_scale"):
        load_config(PretrainConfig, None, ["data.crop_scale=[0.5, 0.2]"])
    for name in ("colour_jitter_prob", "greyscale_prob", "blur_prob"):
        with pytest.raises(ConfigError, match=name):
            load_config(PretrainConfig, None, [f"data.{name}=1.5"])


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
    images, labels2 = make_synthetic_images(n, 32, seed=11, kind="arrangements")
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
    train, y_train = make_synthetic_images(1600, 32, seed=21, kind="arrangements")
    test, y_test = make_synthetic_images(800, 32, seed=22, kind="arrangements")

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


# ---- outlines ---------------------------------------------------------------------------------
def _corner_profile(poly, k):
    """Sorted pairwise distances between the k corners of a closed polyline, over the largest."""
    d = torch.cdist(poly[..., :k, :], poly[..., :k, :]).flatten(-2).sort(dim=-1).values
    return d / d[..., -1:]


def test_outline_templates_are_closed_unit_and_distinct():
    templates = outline_templates()
    assert len(templates) == len(OUTLINE_CLASSES) == 8
    segments = outline_segments()
    assert segments == [24, 3, 4, 6, 10, 12, 7, 17]
    for (name, poly), k in zip(templates.items(), segments):
        assert torch.equal(poly[k], poly[0]) and (poly[k:] == poly[0]).all(), name  # closed, then padding
        assert abs(poly.norm(dim=1).max().item() - 1) < 1e-9, name
        # every real segment has length, so the outline is exactly k strokes
        assert ((poly[1:k + 1] - poly[:k]).norm(dim=1) > 0.05).all(), name
    # different numbers of corners, or (circle vs the polygons) different corner geometry
    assert len(set(segments)) == len(segments)


def test_each_image_holds_its_class_outline():
    """Up to rotation, scale and translation, an image's outline is its class's template; it fits
    in the image, spans most of it, and the pixels show exactly that stroke: on the outline the
    stroke colour, away from it the background."""
    n = 240
    labels, pts, width, stroke, scene = outline_parts(n, 32, seed=3)
    images, labels2 = make_synthetic_images(n, 32, seed=3, kind="outlines")
    assert torch.equal(labels, labels2)
    assert (pts - width[:, None, None] / 2 >= 0).all() and (pts + width[:, None, None] / 2 <= 32).all()
    segments = outline_segments()
    templates = list(outline_templates().values())
    for i in range(n):
        c, k = int(labels[i]), segments[int(labels[i])]
        # same corner geometry as its template (pairwise distances of the corners, scale-free)
        assert torch.allclose(_corner_profile(pts[i], k), _corner_profile(templates[c], k), atol=1e-6), i
        extent = (pts[i, :k].amax(0) - pts[i, :k].amin(0)).max()
        assert extent > 0.4 * 32, i
    # stroke pixels: the midpoints of the segments; background pixels: far from every segment
    from mimjepa.synthetic import _segment_distance

    for i in range(0, n, 7):
        k = segments[int(labels[i])]
        mids = ((pts[i, :k] + pts[i, 1:k + 1]) / 2).floor().long().clamp(0, 31)
        on = images[i][:, mids[:, 1], mids[:, 0]].T                               # (k, 3)
        assert (on - stroke[i].float()).abs().max() < 0.25, i
        dist = _segment_distance(pts[i:i + 1, : k + 1], 32)[0]
        far = dist > width[i] / 2 + 1.5
        assert far.sum() > 200
        bg_max = torch.maximum(scene["bg_a"][i], scene["bg_b"][i]).float().view(3, 1) + 0.15
        bg_min = torch.minimum(scene["bg_a"][i], scene["bg_b"][i]).float().view(3, 1) - 0.15
        pix = images[i][:, far]
        assert ((pix <= bg_max) & (pix >= bg_min)).float().mean() > 0.99, i


# ---- lattices ---------------------------------------------------------------------------------
def test_lattice_templates_have_unit_density_and_differ():
    templates = lattice_templates()
    assert len(templates) == len(LATTICE_CLASSES) == 8
    shortest = []
    for name, cell in templates.items():
        assert abs(abs(torch.linalg.det(cell).item()) - 1) < 1e-9, name  # one dot per unit area
        # the shortest nonzero lattice vector, as an axial direction and a length
        ij = torch.stack(torch.meshgrid(torch.arange(-3, 4), torch.arange(-3, 4), indexing="ij"), -1).view(-1, 2)
        vectors = ij.double() @ cell
        vectors = vectors[vectors.norm(dim=1) > 1e-9]
        v = vectors[vectors.norm(dim=1).argmin()]
        shortest.append((round(v.norm().item(), 2), round(math.degrees(math.atan2(v[1], v[0])) % 180) % 180))
    assert len(set(shortest)) == len(shortest), shortest  # no two lattices alike


# name -> (nearest-neighbour distance in spacings, axial directions (degrees) of the nearest neighbours)
LATTICE_RULES = {"square": (1.0, {0, 90}), "square_45": (1.0, {45, 135}), "hexagonal": (1.0746, {0, 60, 120}),
                 "rows": (0.62, {0}), "columns": (0.62, {90}), "diagonal_rows": (0.62, {45}),
                 "antidiagonal_rows": (0.62, {135}), "hexagonal_30": (1.0746, {30, 90, 150})}


def test_each_image_holds_its_class_lattice():
    """The dots of every image lie on its class's lattice (nearest neighbours at the class's
    distance, in the class's directions), each class has the same number of dots per image, and
    the pixels show exactly those dots: dot colour at every centre, background far from all."""
    n = 160
    parts = lattice_parts(n, 32, seed=4)
    images, labels = make_synthetic_images(n, 32, seed=4, kind="lattices")
    assert torch.equal(parts["labels"], labels)
    spacing = LATTICE_SPACING
    counts = torch.zeros(len(LATTICE_CLASSES))
    offsets = {}
    on_total = 0.0
    for i in range(n):
        name = LATTICE_CLASSES[int(labels[i])]
        centres = lattice_dot_centres(parts, i, 32)
        counts[labels[i]] += len(centres)
        d = torch.cdist(centres, centres) + torch.eye(len(centres)) * 1e9
        nn_dist, nn_idx = d.min(1)
        inner = ((centres > spacing) & (centres < 32 - spacing)).all(1)  # full neighbourhood in the image
        distance, directions = LATTICE_RULES[name]
        # per-dot jitter (std 0.25 px, at most 0.6 px per axis) moves neighbours by well under 2 px
        assert ((nn_dist[inner] / spacing - distance).abs() < 0.4).all(), (i, name)
        # (the nearest of several equally far neighbours is biased short by the jitter: < 0.75 px)
        assert abs(nn_dist[inner].median().item() / spacing - distance) < 0.15, (i, name)
        vec = centres[nn_idx[inner]] - centres[inner]
        angle = torch.rad2deg(torch.atan2(vec[:, 1], vec[:, 0])) % 180
        off = torch.stack([((angle - a + 90) % 180 - 90).abs() for a in directions]).amin(0)
        # (jitter tilts a 3 px neighbour vector by ~6 degrees; a dot of another direction is >= 30 off)
        assert off.median() < 15, (i, name, angle)
        offsets.setdefault(name, []).append(off)
        # pixels: every dot centre shows the dot colour, every pixel 2.5 px from all dots the background
        value = images[i].amax(0)
        px = centres.floor().long()
        # (pixel noise, std 0.03, takes a pixel across the midway threshold 0.1 now and then)
        on = value[px[:, 1], px[:, 0]] > (LATTICE_VALUES[0] + LATTICE_VALUES[1]) / 2
        assert on.float().mean() > 0.9, i
        on_total += on.float().sum().item() / len(on) / n
        coords = torch.arange(32, dtype=torch.float64) + 0.5
        grid = torch.stack(torch.meshgrid(coords, coords, indexing="xy"), -1).view(-1, 2)
        far = torch.cdist(grid, lattice_dot_centres_with_margin(parts, i)).amin(1) > 2.5
        assert (value.flatten()[far] < (LATTICE_VALUES[0] + LATTICE_VALUES[1]) / 2).float().mean() > 0.95, i
    assert on_total > 0.99
    assert all(torch.cat(v).median() < 6 for v in offsets.values()), {k: torch.cat(v).median() for k, v in offsets.items()}
    per_image = counts / (n / len(LATTICE_CLASSES))
    assert (per_image / per_image.mean() - 1).abs().max() < 0.08, per_image  # same density in every class


def lattice_dot_centres_with_margin(parts, i, img_size=32):
    """Every dot whose centre lies within a 4 px (at 32 px) margin around the image: dots just
    outside still paint its border pixels."""
    shifted = {**parts, "offset": parts["offset"].clone()}
    margin = 4.0 * img_size / 32
    out = []
    for dx in (-margin, 0.0, margin):
        for dy in (-margin, 0.0, margin):
            shifted["offset"][i] = parts["offset"][i] + torch.tensor([dx, dy], dtype=torch.float64)
            out.append(lattice_dot_centres(shifted, i, img_size) - torch.tensor([dx, dy], dtype=torch.float64))
    return torch.cat(out)


def test_lattice_colour_and_dot_count_do_not_depend_on_the_class():
    """The class is only where the dots lie: mean colour, hue and how much of the image the dots
    cover have the same distribution in every class (class means within a few standard errors)."""
    n, C = 4000, len(LATTICE_CLASSES)
    images, labels = make_synthetic_images(n, 32, seed=12, kind="lattices")
    value = images.amax(1)
    per_image = torch.stack([*images.mean((2, 3)).double().T,
                             (value > sum(LATTICE_VALUES) / 2).double().mean((1, 2))], dim=1)
    means = _stats_by_class(per_image, labels, C)
    z = (means - per_image.mean(0)) / (per_image.std(0) / math.sqrt(n / C))
    assert z.abs().max() < 4.5, z


def test_main_job_views_differ_only_in_hue():
    """With the shipped main-job config, the two pretraining views of an image are the same
    crop, and differ only in hue (turned anywhere on the circle): brightness and saturation, so
    the dots, are the same in both; the hue is not."""
    from mimjepa.cli import CONFIG_DIR
    from mimjepa.data import IMAGENET_MEAN, IMAGENET_STD

    cfg = load_config(PretrainConfig, CONFIG_DIR / "embedded.yaml", ["data.embedded_train_size=16"])
    assert cfg.data.embedded_kind == "lattices"
    views, _ = build_dataset(cfg.data, "train", 32, seed=0, two_views=True)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    hue_gaps = []
    for i in range(16):
        torch.manual_seed(i)
        a, b, _ = views[i]
        a, b = a * std + mean, b * std + mean
        # HSV value (max over channels) and saturation survive a hue turn (up to rounding)
        assert (a.amax(0) - b.amax(0)).abs().max() < 0.02, i
        sat = lambda x: 1 - x.amin(0) / x.amax(0).clamp_min(1e-6)
        assert (sat(a) - sat(b)).abs().mean() < 0.02, i
        hue_gaps.append((a.mean((1, 2)) - b.mean((1, 2))).abs().max())
    assert torch.stack(hue_gaps).median() > 0.05  # ...while the colour itself moves


@pytest.mark.parametrize("size", [24, 32, 48])
def test_lattice_rendering_matches_a_brute_force_rendering(size):
    """The renderer looks at four lattice points per pixel; drawing every dot (inside the image
    and just outside it) and taking the nearest gives the same image, at the smallest allowed
    size (where cells and dots are tightest) and others."""
    from mimjepa.synthetic import LATTICE_SATURATION, _hsv_to_rgb

    n = 24
    parts = lattice_parts(n, size, seed=9)
    images, _ = make_synthetic_images(n, size, seed=9, kind="lattices")
    coords = torch.arange(size, dtype=torch.float64) + 0.5
    grid = torch.stack(torch.meshgrid(coords, coords, indexing="xy"), -1).view(-1, 2)
    for i in range(n):
        nearest = torch.cdist(grid, lattice_dot_centres_with_margin(parts, i, size)).amin(1)
        cover = (parts["radius"][i] + 0.5 - nearest).clamp(0, 1).float().view(1, size, size)
        hue = parts["hue"][i:i + 1]
        bg, dot = (_hsv_to_rgb(hue, torch.full_like(hue, LATTICE_SATURATION), torch.full_like(hue, v)).view(3, 1, 1)
                   for v in LATTICE_VALUES)
        expected = (bg * (1 - cover) + dot * cover + parts["noise"][i]).clamp(0, 1)
        torch.testing.assert_close(images[i], expected, atol=1e-5, rtol=0)
