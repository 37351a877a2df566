"""The embedded datasets: procedurally drawn, labelled images, made in code from a seed.

Nothing is downloaded; the same seed gives the same images on every machine. Four kinds:

``lattices`` (the main job's data): small identical dots, about 40 per image, laid out on one
of eight lattices: square, square turned 45 degrees, triangular (two orientations), and rows of
close dots running horizontally, vertically or along either diagonal. Every lattice has the same
density of dots, so the class is only *where the dots lie relative to each other*: how far the
nearest neighbours are and in which directions. Nuisances: where the lattice starts, a small
random shift of every dot, pixel noise, and above all the colour: one hue per image, drawn
anywhere on the circle, for the background and the (slightly brighter) dots alike. Pooled
features of a random encoder are dominated by that hue; a pretraining that redraws the hue per
view cannot predict it, and can predict the dots.

``outlines``: one large closed outline per image, drawn with a stroke of constant width: a
circle, a triangle, a square, a hexagon, a five-pointed star, a plus, an arrow or a half disk.
Every class is built from the same local element (a stroke, straight or gently curved, with
corners), and the outline spans most of the image, so most patches hold a piece of it and a
hidden piece is best guessed from the rest of the same outline. Nuisances: position, size
(60-86 % of the image), angle, stroke width, the stroke's colour (one per image), the
background's two colours and gradient direction, and pixel noise.

``arrangements``: every image holds the same number of identical parts (small
disks, one size per image), and the class is only *how they are arranged*: eight parts on a
line, an arc, a circle, a square outline, an L, a zigzag, a plus or two parallel rows. Every
arrangement has the same spacing between neighbouring parts, and is drawn at a uniformly random
angle, scale and position, so the parts, the distances between neighbours and the directions
they lie in are distributed alike in every class: what a part looks like, or a bag of parts,
says nothing about the class. What does not carry the label varies a lot: each part's colour
(drawn per part), the part size, the background colour and its gradient, a few dim specks of
clutter and pixel noise. Features that pool local appearance see mostly these nuisances; telling
the classes apart, or guessing where hidden parts are, takes the arrangement.

``shapes``: ten classes of single large shapes (disk, square, triangle, ring, cross, horizontal
stripes, vertical stripes, checkerboard, twin disks, ellipse), each at a random position, size,
angle and colour over a faint gradient background in a contrasting colour, with pixel noise.
Local edges and textures separate these classes, so a random convolutional tokenizer already
does well on them.
"""

from __future__ import annotations

import math

import torch

__all__ = ["KINDS", "SHAPE_CLASSES", "ARRANGEMENT_CLASSES", "OUTLINE_CLASSES", "outline_templates", "outline_parts",
           "make_outline_images", "arrangement_templates", "arrangement_parts", "make_synthetic_images",
           "make_shape_images", "make_arrangement_images", "LATTICE_CLASSES", "lattice_templates", "lattice_parts",
           "lattice_dot_centres", "make_lattice_images", "classes_of"]

KINDS = ("lattices", "outlines", "arrangements", "shapes")

SHAPE_CLASSES = ("disk", "square", "triangle", "ring", "cross", "h_stripes", "v_stripes", "checker",
               "twin_disks", "ellipse")


def _seeded_labels(kind: str, classes: tuple, num_images: int, img_size: int, seed: int, num_classes: int,
                   min_size: int | None = None) -> tuple[torch.Generator, torch.Tensor]:
    """Checks the arguments, then (a generator seeded with ``seed``, labels (N,) of the first
    ``num_classes`` classes, balanced, in an order drawn from that generator)."""
    if not 2 <= num_classes <= len(classes):
        raise ValueError(f"num_classes must be in [2, {len(classes)}], got {num_classes}")
    if min_size is not None and img_size < min_size:
        raise ValueError(f"img_size must be at least {min_size} for the {kind}, got {img_size}")
    g = torch.Generator().manual_seed(seed)
    labels = (torch.arange(num_images) % num_classes)[torch.randperm(num_images, generator=g)]
    return g, labels


def _rotations(angle: torch.Tensor) -> torch.Tensor:
    """(N,) angles -> (N, 2, 2) rotation matrices acting on (x, y) column vectors."""
    c, s = angle.cos(), angle.sin()
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


def _shape_mask(kind: int, ys: torch.Tensor, xs: torch.Tensor, cy: float, cx: float, r: float,
                angle: float) -> torch.Tensor:
    """Soft-free boolean mask of one shape on a unit-square grid."""
    dy, dx = ys - cy, xs - cx
    c, s = math.cos(angle), math.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy          # rotated coordinates
    dist = torch.sqrt(dy ** 2 + dx ** 2)
    square = (u.abs() < r) & (v.abs() < r)
    if kind == 0:
        return dist < r
    if kind == 1:
        return square
    if kind == 2:
        return (v < r * 0.8) & (v > -r) & (u.abs() < (r * 0.8 - v) * 0.6)
    if kind == 3:
        return (dist < r) & (dist > r * 0.55)
    if kind == 4:
        return ((u.abs() < r * 0.3) & (v.abs() < r)) | ((v.abs() < r * 0.3) & (u.abs() < r))
    if kind == 5:
        return square & (torch.floor((v + r) / (r / 2.5)) % 2 == 0)
    if kind == 6:
        return square & (torch.floor((u + r) / (r / 2.5)) % 2 == 0)
    if kind == 7:
        return square & ((torch.floor((u + r) / (r / 2)) + torch.floor((v + r) / (r / 2))) % 2 == 0)
    if kind == 8:
        off = r * 0.6
        return (torch.sqrt((u - off) ** 2 + v ** 2) < r * 0.45) | (torch.sqrt((u + off) ** 2 + v ** 2) < r * 0.45)
    return (u / r) ** 2 + (v / (0.45 * r)) ** 2 < 1.0


def make_shape_images(num_images: int, img_size: int, seed: int, num_classes: int = 10):
    """(images (N, 3, S, S) float in [0, 1], labels (N,) int64), balanced over the classes."""
    g, labels = _seeded_labels("shapes", SHAPE_CLASSES, num_images, img_size, seed, num_classes)
    coords = (torch.arange(img_size, dtype=torch.float32) + 0.5) / img_size
    ys, xs = coords.view(-1, 1), coords.view(1, -1)
    images = torch.empty(num_images, 3, img_size, img_size)
    params = torch.rand(num_images, 12, generator=g)
    noise = torch.randn(num_images, 3, img_size, img_size, generator=g) * 0.04
    for i in range(num_images):
        p = params[i]
        r = 0.26 + 0.14 * p[0].item()
        cy = r + (1 - 2 * r) * p[1].item()
        cx = r + (1 - 2 * r) * p[2].item()
        # Stripes keep their orientation (a quarter turn would swap the two stripe classes).
        angle = (p[3].item() - 0.5) * 0.6 if labels[i] in (5, 6) else p[3].item() * math.pi
        fg = p[4:7]
        bg_a, bg_b = p[7:10], p[7:10].roll(1)
        # Background: a faint gradient in a colour kept away from the shape's.
        t = (ys * math.cos(p[10].item() * 6.28) + xs * math.sin(p[10].item() * 6.28)).clamp(0, 1)
        background = 0.2 * (bg_a.view(3, 1, 1) * (1 - t) + bg_b.view(3, 1, 1) * t) + 0.8 * (1 - fg).view(3, 1, 1)
        mask = _shape_mask(int(labels[i]), ys, xs, cy, cx, r, angle)
        images[i] = torch.where(mask, fg.view(3, 1, 1), background)
    return (images + noise).clamp(0, 1), labels


def _unit_spaced(points) -> torch.Tensor:
    """(P, 2) float64, rescaled so the smallest distance between two points is 1, centred on the
    bounding box."""
    pts = torch.tensor(points, dtype=torch.float64)
    d = torch.cdist(pts, pts) + torch.eye(len(pts)) * 1e9
    pts = pts / d.min()
    return pts - (pts.amax(0) + pts.amin(0)) / 2


def arrangement_templates() -> dict[str, torch.Tensor]:
    """Class name -> (8, 2) part positions (x, y) in units of the neighbour spacing."""
    arc = [(math.cos(math.pi * i / 7), math.sin(math.pi * i / 7)) for i in range(8)]
    circle = [(math.cos(math.pi * i / 4), math.sin(math.pi * i / 4)) for i in range(8)]
    return {name: _unit_spaced(pts) for name, pts in {
        "line": [(i, 0) for i in range(8)],
        "arc": arc,
        "circle": circle,
        "square": [(0, 0), (1, 0), (2, 0), (2, 1), (2, 2), (1, 2), (0, 2), (0, 1)],
        "ell": [(0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (1, 0), (2, 0), (3, 0)],
        "zigzag": [(i, i % 2) for i in range(8)],
        "plus": [(1, 0), (2, 0), (-1, 0), (-2, 0), (0, 1), (0, 2), (0, -1), (0, -2)],
        "two_rows": [(i, j) for j in (0, 2) for i in range(4)],
    }.items()}


ARRANGEMENT_CLASSES = tuple(arrangement_templates())
PARTS_PER_IMAGE = 8
SPECKS_PER_IMAGE = 3


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(...,) each -> (..., 3)."""
    k = (torch.tensor([5.0, 3.0, 1.0]) + h[..., None] * 6) % 6
    return v[..., None] - v[..., None] * s[..., None] * (torch.minimum(k, 4 - k).clamp(0, 1))


def arrangement_parts(num_images: int, img_size: int, seed: int, num_classes: int = 8):
    """The drawn scene, before rendering: (labels (N,), part centres (N, P, 2) in pixels (x, y),
    part radius (N,) in pixels, part colours (N, P, 3)) and the rest of the scene as a dict."""
    g, labels = _seeded_labels("arrangements", ARRANGEMENT_CLASSES, num_images, img_size, seed, num_classes, 24)
    templates = torch.stack(list(arrangement_templates().values()))[:num_classes]      # (C, P, 2)
    P = templates.shape[1]
    u = torch.rand(num_images, 8, generator=g, dtype=torch.float64)
    # Neighbour spacing and part radius scale with the image (tuned at 32 px: 3.1-3.7 px, 0.9-1.5 px).
    unit = img_size / 32
    spacing = unit * (3.1 + 0.6 * u[:, 0])
    radius = unit * (0.9 + 0.6 * u[:, 1])
    rot = _rotations(2 * math.pi * u[:, 2])                                              # (N, 2, 2)
    pts = torch.einsum("nij,npj->npi", rot, templates[labels]) * spacing[:, None, None]
    # Each part jitters a little; then the whole arrangement lands anywhere it fits.
    pts = pts + (torch.rand(num_images, P, 2, generator=g, dtype=torch.float64) - 0.5) * 0.4 * unit
    margin = radius[:, None] + unit
    lo = margin - pts.amin(1)
    hi = img_size - margin - pts.amax(1)
    shift = lo + (hi - lo).clamp_min(0) * u[:, 3:5]
    pts = pts + shift[:, None, :]
    part_rgb = _hsv_to_rgb(torch.rand(num_images, P, generator=g), 0.5 + 0.5 * torch.rand(num_images, P, generator=g),
                           0.75 + 0.25 * torch.rand(num_images, P, generator=g))
    scene = {
        # dark background: a gradient between two random colours, at a random direction
        "bg_a": _hsv_to_rgb(torch.rand(num_images, generator=g), torch.rand(num_images, generator=g),
                            0.1 + 0.25 * torch.rand(num_images, generator=g)),
        "bg_b": _hsv_to_rgb(torch.rand(num_images, generator=g), torch.rand(num_images, generator=g),
                            0.1 + 0.25 * torch.rand(num_images, generator=g)),
        "bg_angle": 2 * math.pi * u[:, 5],
        # clutter: small dim specks anywhere
        "specks": torch.rand(num_images, SPECKS_PER_IMAGE, 2, generator=g, dtype=torch.float64) * img_size,
        "speck_rgb": 0.25 + 0.3 * torch.rand(num_images, SPECKS_PER_IMAGE, 3, generator=g),
        "noise": torch.randn(num_images, 3, img_size, img_size, generator=g) * 0.03,
    }
    return labels, pts, radius, part_rgb, scene


def make_arrangement_images(num_images: int, img_size: int, seed: int, num_classes: int = 8):
    """(images (N, 3, S, S) float in [0, 1], labels (N,) int64), balanced over the classes."""
    labels, pts, radius, part_rgb, scene = arrangement_parts(num_images, img_size, seed, num_classes)
    coords = torch.arange(img_size, dtype=torch.float64) + 0.5
    ys, xs = coords.view(1, 1, -1, 1), coords.view(1, 1, 1, -1)
    # Direction of the background gradient; t in [0, 1] across the image.
    a = scene["bg_angle"].view(-1, 1, 1)
    t = ((xs[0] / img_size - 0.5) * a.cos() + (ys[0] / img_size - 0.5) * a.sin() + 0.71) / 1.42
    t = t.float().unsqueeze(1)                                                           # (N, 1, S, S)
    images = scene["bg_a"].view(-1, 3, 1, 1) * (1 - t) + scene["bg_b"].view(-1, 3, 1, 1) * t
    # Specks, then parts, each an anti-aliased disk (coverage ramps over one pixel at the rim).
    for centres, r, rgb in ((scene["specks"], torch.full((num_images,), 0.6, dtype=torch.float64), scene["speck_rgb"]),
                            (pts, radius, part_rgb)):
        dist = ((ys - centres[..., 1, None, None]) ** 2 + (xs - centres[..., 0, None, None]) ** 2).sqrt()
        alpha = (r.view(-1, 1, 1, 1) + 0.5 - dist).clamp(0, 1).float()                  # (N, P, S, S)
        cover, nearest = alpha.max(dim=1)
        colour = torch.gather(rgb, 1, nearest.flatten(1)[..., None].expand(-1, -1, 3))   # (N, S*S, 3)
        colour = colour.transpose(1, 2).reshape(num_images, 3, img_size, img_size)
        images = images * (1 - cover[:, None]) + colour * cover[:, None]
    return (images + scene["noise"]).clamp(0, 1), labels


def _polygon(vertices) -> list:
    return [(float(x), float(y)) for x, y in vertices]


def _regular(n: int, phase: float = 0.0) -> list:
    return [(math.cos(phase + 2 * math.pi * i / n), math.sin(phase + 2 * math.pi * i / n)) for i in range(n)]


OUTLINE_SEGMENTS = 24


def outline_templates() -> dict[str, torch.Tensor]:
    """Class name -> (OUTLINE_SEGMENTS + 1, 2) closed polyline (x, y): the outline's corners in
    order, padded by repeating the first corner (zero-length segments), scaled so its farthest
    point from the centre of its bounding circle is at distance 1."""
    star = [(r * math.cos(math.pi * i / 5 + math.pi / 2), r * math.sin(math.pi * i / 5 + math.pi / 2))
            for i, r in zip(range(10), [1.0, 0.42] * 5)]
    a = 1 / 3
    plus = [(a, 1), (-a, 1), (-a, a), (-1, a), (-1, -a), (-a, -a), (-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a)]
    arrow = [(1, 0), (0.1, 0.8), (0.1, 0.3), (-1, 0.3), (-1, -0.3), (0.1, -0.3), (0.1, -0.8)]
    half = [(math.cos(math.pi * i / 16), math.sin(math.pi * i / 16)) for i in range(17)]
    shapes = {
        "circle": _regular(OUTLINE_SEGMENTS),
        "triangle": _regular(3),
        "square": _regular(4, math.pi / 4),
        "hexagon": _regular(6),
        "star": star,
        "plus": plus,
        "arrow": arrow,
        "half_disk": half,
    }
    out = {}
    for name, pts in shapes.items():
        v = torch.tensor(_polygon(pts), dtype=torch.float64)
        # centre of the bounding circle (approximately: of the bounding box), unit farthest corner
        v = v - (v.amax(0) + v.amin(0)) / 2
        v = v / v.norm(dim=1).max()
        closed = torch.cat([v, v[:1].expand(OUTLINE_SEGMENTS + 1 - len(v), 2)])
        out[name] = closed
    return out


OUTLINE_CLASSES = tuple(outline_templates())


def outline_segments() -> list[int]:
    """Number of (non-zero-length) segments of each class's outline, in class order."""
    return [int(((t[1:] - t[:-1]).norm(dim=1) > 0).sum()) for t in outline_templates().values()]


def outline_parts(num_images: int, img_size: int, seed: int, num_classes: int = 8):
    """The drawn scene, before rendering: (labels (N,), outline polyline (N, OUTLINE_SEGMENTS + 1, 2)
    in pixels (x, y), stroke width (N,) in pixels, stroke colour (N, 3)) and the rest as a dict."""
    g, labels = _seeded_labels("outlines", OUTLINE_CLASSES, num_images, img_size, seed, num_classes, 24)
    templates = torch.stack(list(outline_templates().values()))[:num_classes]
    u = torch.rand(num_images, 8, generator=g, dtype=torch.float64)
    unit = img_size / 32
    # Large: the outline's bounding circle spans 60-86 % of the image (the most that always fits
    # with the stroke and a margin), so most patches hold part of it and a masked patch is best
    # guessed from the rest of the same outline.
    radius = img_size * (0.3 + 0.13 * u[:, 0])
    width = unit * (1.4 + 0.8 * u[:, 1])
    rot = _rotations(2 * math.pi * u[:, 2])
    pts = torch.einsum("nij,npj->npi", rot, templates[labels]) * radius[:, None, None]
    margin = width[:, None] / 2 + unit
    lo = margin - pts.amin(1)
    hi = img_size - margin - pts.amax(1)
    shift = lo + (hi - lo).clamp_min(0) * u[:, 3:5]
    pts = pts + shift[:, None, :]
    stroke = _hsv_to_rgb(torch.rand(num_images, generator=g), 0.4 + 0.6 * torch.rand(num_images, generator=g),
                         0.7 + 0.3 * torch.rand(num_images, generator=g))
    scene = {
        "bg_a": _hsv_to_rgb(torch.rand(num_images, generator=g), torch.rand(num_images, generator=g),
                            0.1 + 0.3 * torch.rand(num_images, generator=g)),
        "bg_b": _hsv_to_rgb(torch.rand(num_images, generator=g), torch.rand(num_images, generator=g),
                            0.1 + 0.3 * torch.rand(num_images, generator=g)),
        "bg_angle": 2 * math.pi * u[:, 5],
        "noise": torch.randn(num_images, 3, img_size, img_size, generator=g) * 0.03,
    }
    return labels, pts, width, stroke, scene


def _segment_distance(pts: torch.Tensor, img_size: int) -> torch.Tensor:
    """(N, S, S) distance of every pixel centre to the polyline pts (N, K + 1, 2)."""
    coords = torch.arange(img_size, dtype=torch.float32) + 0.5
    p = torch.stack(torch.meshgrid(coords, coords, indexing="xy"), -1).view(1, 1, -1, 2)   # (1, 1, S*S, 2) (x, y)
    pts = pts.float()
    a, b = pts[:, :-1, None, :], pts[:, 1:, None, :]                                        # (N, K, 1, 2)
    ab = b - a
    t = (((p - a) * ab).sum(-1) / (ab * ab).sum(-1).clamp_min(1e-12)).clamp(0, 1)
    d = (p - a - t[..., None] * ab).square().sum(-1)                                        # (N, K, S*S)
    return d.amin(1).sqrt().view(-1, img_size, img_size)


def make_outline_images(num_images: int, img_size: int, seed: int, num_classes: int = 8):
    """(images (N, 3, S, S) float in [0, 1], labels (N,) int64), balanced over the classes."""
    labels, pts, width, stroke, scene = outline_parts(num_images, img_size, seed, num_classes)
    coords = torch.arange(img_size, dtype=torch.float64) + 0.5
    ys, xs = coords.view(1, -1, 1), coords.view(1, 1, -1)
    a = scene["bg_angle"].view(-1, 1, 1)
    t = ((xs / img_size - 0.5) * a.cos() + (ys / img_size - 0.5) * a.sin() + 0.71) / 1.42
    t = t.float().unsqueeze(1)
    images = scene["bg_a"].view(-1, 3, 1, 1) * (1 - t) + scene["bg_b"].view(-1, 3, 1, 1) * t
    dist = torch.empty(num_images, img_size, img_size)
    for c, k in enumerate(outline_segments()[:num_classes]):
        # each class's own segments only (no padding), in bounded chunks of (chunk, K, S*S)
        idx = torch.nonzero(labels == c).flatten()
        for i in range(0, len(idx), 256):
            dist[idx[i:i + 256]] = _segment_distance(pts[idx[i:i + 256], : k + 1], img_size)
    # anti-aliased stroke: coverage ramps over one pixel at its edges
    cover = (width.float().view(-1, 1, 1) / 2 + 0.5 - dist).clamp(0, 1)[:, None]
    images = images * (1 - cover) + stroke.view(-1, 3, 1, 1) * cover
    return (images + scene["noise"]).clamp(0, 1), labels


def _rotated(v: tuple[float, float], angle: float) -> tuple[float, float]:
    c, s = math.cos(angle), math.sin(angle)
    return (c * v[0] - s * v[1], s * v[0] + c * v[1])


def lattice_templates() -> dict[str, torch.Tensor]:
    """Class name -> (2, 2) the lattice's two basis vectors as rows, in units of the mean dot
    spacing. Every lattice has one dot per unit area, so all classes hold the same number of dots
    per image; they differ in how far apart and in which directions neighbouring dots lie."""
    side = math.sqrt(2 / math.sqrt(3))        # side of a triangular lattice of unit density
    row = 0.62                                # dot spacing along a row; rows 1/0.62 apart
    cells = {
        "square": [(1, 0), (0, 1)],
        "square_45": [_rotated((1, 0), math.pi / 4), _rotated((0, 1), math.pi / 4)],
        "hexagonal": [(side, 0), _rotated((side, 0), math.pi / 3)],
        "hexagonal_30": [_rotated((side, 0), math.pi / 6), _rotated((side, 0), math.pi / 2)],
        "rows": [(row, 0), (0, 1 / row)],
        "columns": [(0, row), (1 / row, 0)],
        "diagonal_rows": [_rotated((row, 0), math.pi / 4), _rotated((0, 1 / row), math.pi / 4)],
        "antidiagonal_rows": [_rotated((row, 0), -math.pi / 4), _rotated((0, 1 / row), -math.pi / 4)],
    }
    return {name: torch.tensor(cell, dtype=torch.float64) for name, cell in cells.items()}


LATTICE_CLASSES = tuple(lattice_templates())
LATTICE_JITTER_TABLE = 32       # per-dot jitter is looked up by lattice index modulo this
LATTICE_SPACING = 5.0           # mean dot spacing, pixels at 32 px
LATTICE_SATURATION = 0.9
LATTICE_VALUES = (0.6, 0.8)     # HSV value of the background and of the dots


def lattice_parts(num_images: int, img_size: int, seed: int, num_classes: int = 8) -> dict:
    """The drawn scene, before rendering, in pixels (x, y): "labels" (N,), "cell" (N, 2, 2) basis
    vectors as rows, "offset" (N, 2) the lattice's origin, "jitter" (N, T, T, 2) each dot's
    displacement, looked up by its lattice index (i mod T, j mod T), "radius" (N,), "hue" (N,),
    "noise" (N, 3, S, S)."""
    g, labels = _seeded_labels("lattices", LATTICE_CLASSES, num_images, img_size, seed, num_classes, 24)
    unit = img_size / 32
    spacing = LATTICE_SPACING * unit
    cell = torch.stack(list(lattice_templates().values())[:num_classes])[labels] * spacing
    # A uniformly random origin within one cell: where the dots fall is not part of the class.
    u = torch.rand(num_images, 2, generator=g, dtype=torch.float64)
    offset = torch.einsum("nk,nkd->nd", u, cell)
    T = LATTICE_JITTER_TABLE
    jitter = (torch.randn(num_images, T, T, 2, generator=g, dtype=torch.float64) * 0.25 * unit).clamp(-0.6 * unit, 0.6 * unit)
    return {
        "labels": labels, "cell": cell, "offset": offset, "jitter": jitter,
        "radius": torch.full((num_images,), 1.3 * unit, dtype=torch.float64),
        "hue": torch.rand(num_images, generator=g),
        "noise": torch.randn(num_images, 3, img_size, img_size, generator=g) * 0.03,
    }


def lattice_dot_centres(parts: dict, index: int, img_size: int) -> torch.Tensor:
    """(P, 2) centres (x, y) of the dots of image ``index`` whose centre lies inside the image."""
    cell = parts["cell"][index]
    reach = int(math.ceil(2 * img_size / float(torch.linalg.svdvals(cell).min()))) + 2
    ij = torch.stack(torch.meshgrid(torch.arange(-reach, reach + 1), torch.arange(-reach, reach + 1), indexing="ij"), -1)
    ij = ij.reshape(-1, 2)
    jit = parts["jitter"][index][ij[:, 0] % LATTICE_JITTER_TABLE, ij[:, 1] % LATTICE_JITTER_TABLE]
    c = ij.double() @ cell + parts["offset"][index] + jit
    return c[((c >= 0) & (c < img_size)).all(1)]


def make_lattice_images(num_images: int, img_size: int, seed: int, num_classes: int = 8):
    """(images (N, 3, S, S) float in [0, 1], labels (N,) int64), balanced over the classes."""
    parts = lattice_parts(num_images, img_size, seed, num_classes)
    coords = torch.arange(img_size, dtype=torch.float64) + 0.5
    pix = torch.stack(torch.meshgrid(coords, coords, indexing="xy"), -1).view(1, -1, 2)    # (1, S*S, 2) (x, y)
    T = LATTICE_JITTER_TABLE
    nearest = torch.empty(num_images, img_size * img_size, dtype=torch.float64)
    # In chunks of about 2^20 pixels, so that the (images, pixels, 2) float64 temporaries stay
    # near 16 MB each at any image size.
    chunk = max(1, (1 << 20) // (img_size * img_size))
    for start in range(0, num_images, chunk):
        part = slice(start, start + chunk)
        cell, origin, jitter = parts["cell"][part], parts["offset"][part].unsqueeze(1), parts["jitter"][part]
        rows = torch.arange(len(cell)).view(-1, 1)
        base = torch.floor(torch.einsum("npd,nde->npe", pix - origin, torch.linalg.inv(cell)))
        # A dot close enough to cover a pixel is a corner of the cell the pixel lies in: the four
        # cells around a lattice point hold every pixel within a cell height (>= 0.62 spacings,
        # 3.1 px) of it, and a dot covers pixels at most 2.65 px from its lattice point (radius
        # 1.3, 0.5 of anti-aliasing, a jitter of at most 0.6 px per axis); all scale with the image.
        best = torch.full(base.shape[:2], float("inf"), dtype=torch.float64)
        for corner in ((0, 0), (1, 0), (0, 1), (1, 1)):
            ij = base + torch.tensor(corner, dtype=torch.float64)
            idx = ij.long() % T
            centre = torch.einsum("npe,ned->npd", ij, cell) + origin + jitter[rows, idx[..., 0], idx[..., 1]]
            best = torch.minimum(best, (pix - centre).norm(dim=-1))
        nearest[part] = best
    # anti-aliased dots: coverage ramps over one pixel at the edge
    cover = (parts["radius"].view(-1, 1) + 0.5 - nearest).clamp(0, 1).float().view(-1, 1, img_size, img_size)
    # One hue per image for dots and background alike, drawn anywhere on the circle; the dots
    # are a little brighter than the background. Hue is the only colour that varies, and the
    # per-view hue jitter of pretraining redraws it, so it cannot be predicted across views.
    hue = parts["hue"]
    background = _hsv_to_rgb(hue, torch.full_like(hue, LATTICE_SATURATION), torch.full_like(hue, LATTICE_VALUES[0]))
    dots = _hsv_to_rgb(hue, torch.full_like(hue, LATTICE_SATURATION), torch.full_like(hue, LATTICE_VALUES[1]))
    images = background.view(-1, 3, 1, 1) * (1 - cover) + dots.view(-1, 3, 1, 1) * cover
    return (images + parts["noise"]).clamp(0, 1), parts["labels"]


def make_synthetic_images(num_images: int, img_size: int, seed: int, num_classes: int | None = None,
                          kind: str = "lattices"):
    """(images (N, 3, S, S) float in [0, 1], labels (N,) int64) of the embedded dataset ``kind``
    ("lattices", "outlines" or "arrangements": 8 classes, "shapes": 10); ``num_classes`` keeps the
    first classes only."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    make = {"lattices": make_lattice_images, "outlines": make_outline_images, "arrangements": make_arrangement_images,
            "shapes": make_shape_images}[kind]
    return make(num_images, img_size, seed, num_classes or len(classes_of(kind)))


def classes_of(kind: str) -> tuple:
    """The class names of the embedded dataset ``kind``, in label order."""
    return {"lattices": LATTICE_CLASSES, "outlines": OUTLINE_CLASSES, "arrangements": ARRANGEMENT_CLASSES,
            "shapes": SHAPE_CLASSES}[kind]
