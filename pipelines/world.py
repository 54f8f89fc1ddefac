"""A procedural world of small captioned images: one coloured shape in one quadrant on black, exact labels.

    sample_scenes(n, seed)          -> [Scene]                 uniform over every attribute
    caption(scene)                  -> "a red circle at the top left"
    parse_caption(text)             -> Scene                   strict; CaptionError names the bad word
    render(scenes, seed)            -> (N, 3, 32, 32) float32 in [-1, 1]
    dataset(n, seed)                -> (images, labels)        labels (N, 3) int64 indices, ATTRIBUTES order
    all_scenes()                    -> the 48 scenes, each once

High resolution (hybrid super-resolution's ground truth):

    sample_scenes(n, seed, textures=True)  -> scenes with a texture too (plain, striped, dotted)
    caption(scene, detail=True)     -> "a red striped circle at the top left"
    render(scenes, seed, scale=S)   -> (N, 3, 32 S, 32 S): the same scene at S = 2 or 4, texture drawn
    coverage(scenes, seed, scale=S) -> (N, 32 S, 32 S) the exact share of each pixel the shape covers

Why this world (and not a richer one). It exists so that a small text-to-image diffusion model, trained on
this 2-core CPU machine, can be scored by exact labels instead of by CLIP/Inception, which know nothing
about 32x32 toys. Three attributes, each a different kind of difficulty, measured earlier on this machine
to be learnt in this order by a small diffusion model at 32x32:

    colour    red, green, blue, yellow          a global statistic: learnt first
    shape     circle, square, triangle          a local outline: learnt next
    position  top/bottom left/right quadrant    binding the prompt to a place: learnt slowest

so models of different capacity or training length separate on the per-attribute scores, and the
all-attributes score (one in 48 by chance) is strict. What was left out, and why:

- size. In the 4x8x8 latent the later models use, one latent cell covers 4x4 pixels: a small shape
  (~6 px) would span ~2x2 cells and its outline could hardly be represented, so "small" would mostly
  make shape unlearnable rather than add an attribute. Three attributes already give the ordering above.
- backgrounds, several objects. More to learn, nothing the demo needs; black keeps the colour of a pixel
  equal to the colour of the shape, so a colour check is a channel check.

Texture: detail only high resolution shows. A scene also has a texture (TEXTURES), which the 32-px camera
does not resolve: ``render(scale=1)`` draws every scene plain, exactly as before textures existed, so the
generators and every earlier table see the same world. At scale 2 and 4 the texture is drawn inside the
shape, darkening the ink to TEXTURE_INK of the colour on a pattern whose period is one 32-px pixel:
"striped", the lower half of every 32-px pixel row; "dotted", a disc of radius DOT_RADIUS (in 32-px
pixels) at the centre of every 32-px pixel. Both patterns lie on the 32-px grid, so one low-resolution
pixel (and one latent cell of an SR model whose factor is the scale) holds one whole period. A texture is
what the caption names and the low-resolution image cannot carry: an SR model that reads the caption can
draw it; one that sees only the image can at best draw the average. The background stays black, where
any SR is exact.

Geometry (pixel units, the image spans [0, 32) on both axes, y grows downwards). Every shape is inscribed
in the same 2R x 2R box (R = SHAPE_HALF_EXTENT = 5 px): a circle of radius R, an axis-aligned square of
half-side R, and an upward isosceles triangle with its apex at the top centre of the box and its base on
the box's bottom edge. So "a circle" and "a square" are the same size to the eye, and their areas differ
(pi R^2, 4 R^2, 2 R^2 = 78.5, 100, 50 px^2). The box is centred on its quadrant's centre (8 or 24) plus a
jitter uniform in [-JITTER, JITTER]^2 (2 px), drawn from the render seed: the images are not 48 templates,
yet a shape stays at least 16/2 - R - JITTER = 1 px inside its quadrant, never touching another.

Colours are saturated RGB corners, pairwise distinct in at least one channel by the full range; the
background is black (-1 in every channel). Anti-aliasing: coverage is sampled at SUPERSAMPLE^2 = 16
points per pixel (a 128x128 grid) and averaged, so an edge pixel takes the share of it the shape covers.
Rendering is vectorized over images: 10 000 in 2.7 s on one CPU thread.
"""
from dataclasses import dataclass

import numpy as np
import torch

COLOURS = ("red", "green", "blue", "yellow")
TEXTURES = ("plain", "striped", "dotted")  # not in ATTRIBUTES: the 32-px world does not show it
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
# Caption order; also the order of Scene's fields and of the columns of dataset()'s labels.
ATTRIBUTES = ("colour", "shape", "position")
VOCABULARIES = {"colour": COLOURS, "shape": SHAPES, "position": POSITIONS}

# RGB in [0, 1] per colour; the background is 0 (black).
RGB = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0), "yellow": (1.0, 1.0, 0.0)}

IMAGE_SIZE = 32           # pixels per side
SHAPE_HALF_EXTENT = 5.0   # R: every shape fits the 2R x 2R box centred on its (jittered) centre
JITTER = 2.0              # max offset in pixels of the box centre from the quadrant centre, per axis
SUPERSAMPLE = 4           # coverage samples per pixel per axis (anti-aliasing)
RENDER_CHUNK = 1024       # images per vectorized pass: 1024 x 128^2 floats = 64 MB per temporary
SCALES = (1, 2, 4)        # render's resolutions: 32, 64 and 128 px
TEXTURE_INK = 0.25        # a texture's dark parts: this share of the colour
DOT_RADIUS = 0.3          # "dotted": disc radius in 32-px pixels (28% of each pixel dark)
TEXTURE_STREAM = 1        # sample_scenes draws textures from its own stream: the 3 attributes stay the same

# "top left" -> (x, y) centre of its quadrant in pixels
QUADRANT_CENTRES = {p: ((IMAGE_SIZE / 4) * (1 if "left" in p else 3), (IMAGE_SIZE / 4) * (1 if "top" in p else 3))
                    for p in POSITIONS}

_GRAMMAR = "'a <colour> <shape> at the <top|bottom> <left|right>'"
# The words allowed at each place of a caption, in order.
_SLOTS = (("a",), COLOURS, SHAPES, ("at",), ("the",), ("top", "bottom"), ("left", "right"))
_DETAIL_SLOTS = _SLOTS[:2] + (TEXTURES,) + _SLOTS[2:]  # "a red striped circle at the top left"


class CaptionError(ValueError):
    """A caption outside the grammar 'a <colour> <shape> at the <top|bottom> <left|right>'."""


@dataclass(frozen=True)
class Scene:
    """One image's content: each attribute is a word (or two, for position) from its vocabulary."""

    colour: str
    shape: str
    position: str
    texture: str = "plain"  # drawn at scale 2 and 4 only

    def __post_init__(self):
        if self.texture not in TEXTURES:
            raise ValueError(f"texture must be one of {', '.join(TEXTURES)}; got {self.texture!r}")
        for name in ATTRIBUTES:
            value, allowed = getattr(self, name), VOCABULARIES[name]
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")

    def labels(self):
        """(colour index, shape index, position index) into COLOURS, SHAPES, POSITIONS."""
        return tuple(VOCABULARIES[name].index(getattr(self, name)) for name in ATTRIBUTES)


def all_scenes():
    """Every scene once: 4 colours x 3 shapes x 4 positions = 48, colour slowest, position fastest."""
    return [Scene(c, s, p) for c in COLOURS for s in SHAPES for p in POSITIONS]


def caption(scene, detail=False):
    """"a red circle at the top left"; with detail, the texture too: "a red striped circle at the top left"."""
    if detail:
        return f"a {scene.colour} {scene.texture} {scene.shape} at the {scene.position}"
    return f"a {scene.colour} {scene.shape} at the {scene.position}"


def parse_caption(text):
    """The Scene a caption describes; the inverse of ``caption``. Strict: lowercase words separated by single
    spaces, exactly the grammar 'a <colour> <shape> at the <top|bottom> <left|right>', or with a texture
    after the colour (caption(scene, detail=True)). Raises CaptionError naming the first bad word, its place
    and the words allowed there."""
    if not isinstance(text, str):
        raise CaptionError(f"caption must be a str {_GRAMMAR}, got {type(text).__name__}")
    words = text.split(" ")
    slots = _DETAIL_SLOTS if len(words) == len(_DETAIL_SLOTS) else _SLOTS
    if len(words) != len(slots):
        raise CaptionError(f"caption must be the {len(_SLOTS)} words {_GRAMMAR} separated by single spaces (or "
                           f"{len(_DETAIL_SLOTS)} with a texture after the colour), got {len(words)} in {text!r}")
    for place, (word, allowed) in enumerate(zip(words, slots), start=1):
        if word not in allowed:
            raise CaptionError(f"word {place} of caption {text!r} is {word!r}; allowed there: "
                               f"{', '.join(allowed)} (grammar {_GRAMMAR})")
    texture = words.pop(2) if slots is _DETAIL_SLOTS else "plain"
    _, colour, shape, _, _, vertical, horizontal = words
    return Scene(colour, shape, f"{vertical} {horizontal}", texture)


def sample_scenes(n, seed, textures=False):
    """n scenes, each attribute uniform and independent of the others, from numpy's PCG64 seeded with
    ``seed`` (the global RNGs are not touched). The same (n, seed) always gives the same list. textures:
    a texture for each too, uniform, from a stream of its own (the three attributes are the same as without)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = np.random.default_rng(seed)
    sizes = [len(VOCABULARIES[name]) for name in ATTRIBUTES]
    idx = rng.integers(0, sizes, size=(n, len(ATTRIBUTES)))  # (n, 3), one row per scene
    tex = np.random.default_rng((seed, TEXTURE_STREAM)).integers(0, len(TEXTURES), size=n) if textures else [0] * n
    return [Scene(*(VOCABULARIES[name][int(i)] for name, i in zip(ATTRIBUTES, row)), TEXTURES[int(k)])
            for row, k in zip(idx, tex)]


def _coverage(shape_ids, cx, cy, scale=1, texture_ids=None):
    """(B, 32 scale, 32 scale) float32 share of each pixel inside each shape; shape_ids (B,) int64, cx, cy (B,)
    in 32-px pixels. texture_ids (B,): weight each sample inside by its texture's ink instead of 1."""
    s = SUPERSAMPLE * IMAGE_SIZE * scale
    grid = (torch.arange(s, dtype=torch.float32) + 0.5) / (SUPERSAMPLE * scale)  # sample points, 32-px units
    dx = grid[None, None, :] - cx[:, None, None]  # (B, 1, S)
    dy = grid[None, :, None] - cy[:, None, None]  # (B, S, 1)
    r = SHAPE_HALF_EXTENT
    inside = torch.empty((len(shape_ids), s, s), dtype=torch.bool)
    for k, name in enumerate(SHAPES):
        sel = shape_ids == k
        if not bool(sel.any()):
            continue
        x, y = dx[sel], dy[sel]
        if name == "circle":
            inside[sel] = x.square() + y.square() <= r * r
        elif name == "square":
            inside[sel] = (x.abs() <= r) & (y.abs() <= r)
        else:  # triangle: apex (0, -R), base from (-R, R) to (R, R); half-width grows (y + R) / 2
            inside[sel] = (2 * x.abs() <= y + r) & (y <= r)
    weight = inside.float()
    if texture_ids is not None:
        weight = weight * _ink(texture_ids, grid)
    # mean of SUPERSAMPLE^2 samples per pixel = the covered share of the pixel (times the ink)
    return torch.nn.functional.avg_pool2d(weight[:, None], SUPERSAMPLE)[:, 0]


def _ink(texture_ids, grid):
    """(B, S, S) ink of each texture at the sample points ``grid`` (32-px units): 1, or TEXTURE_INK where the
    pattern is dark. The pattern is fixed to the 32-px grid, not to the shape."""
    f = grid - grid.floor()  # position inside its 32-px pixel, [0, 1)
    dark = {"plain": torch.zeros(len(grid), len(grid), dtype=torch.bool),
            "striped": (f[:, None] >= 0.5).expand(len(grid), len(grid)),  # rows: y is the first axis
            "dotted": (f[:, None] - 0.5).square() + (f[None, :] - 0.5).square() <= DOT_RADIUS ** 2}
    ink = torch.ones(len(texture_ids), len(grid), len(grid))
    for k, name in enumerate(TEXTURES):
        ink[texture_ids == k] = torch.where(dark[name], TEXTURE_INK, 1.0)
    return ink


def render(scenes, seed=0, jitter=JITTER, scale=1):
    """Images of ``scenes``: (N, 3, 32 scale, 32 scale) float32 in [-1, 1], black background (-1).

    The box of scene i is centred on its quadrant's centre plus an offset uniform in [-jitter, jitter]^2,
    drawn for all N at once from a torch Generator seeded with ``seed``; ``jitter=0`` gives the centred,
    canonical image. Deterministic: the same (scenes, seed, jitter) gives bit-identical images. scale: 1
    (32 px, every scene plain), 2 or 4 (the same scene, the same offsets, its texture drawn)."""
    cover = coverage(scenes, seed, jitter, scale, ink=True)  # (N, 32 scale, 32 scale) in [0, 1]
    rgb = torch.tensor([RGB[sc.colour] for sc in scenes], dtype=torch.float32).reshape(len(scenes), 3)
    # pixel = cover * colour + (1 - cover) * black, then [0, 1] -> [-1, 1]
    return 2 * cover[:, None] * rgb[:, :, None, None] - 1


def coverage(scenes, seed=0, jitter=JITTER, scale=1, ink=False):
    """(N, 32 scale, 32 scale) float32: the share of each pixel the shape of each scene covers, with the
    offsets render(scenes, seed, jitter, scale) draws; > 0 is the exact foreground mask. ink: weighted by the
    texture's ink (render's brightness), at scale 2 and 4."""
    if not 0 <= jitter <= JITTER:
        # beyond JITTER a shape could cross into the next quadrant and its position label would lie
        raise ValueError(f"jitter must be in [0, {JITTER}] px (a larger offset can leave the quadrant), got {jitter}")
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    n = len(scenes)
    offsets = (2 * torch.rand((n, 2), generator=torch.Generator().manual_seed(seed)) - 1) * jitter  # (N, 2)
    shape_ids = torch.tensor([SHAPES.index(sc.shape) for sc in scenes], dtype=torch.int64)
    texture_ids = torch.tensor([TEXTURES.index(sc.texture) for sc in scenes], dtype=torch.int64)
    centres = torch.tensor([QUADRANT_CENTRES[sc.position] for sc in scenes], dtype=torch.float32).reshape(n, 2)
    centres = centres + offsets
    size = IMAGE_SIZE * scale
    out = torch.empty((n, size, size), dtype=torch.float32)
    chunk = max(1, RENDER_CHUNK // scale ** 2)  # the same memory per pass at every scale
    for lo in range(0, n, chunk):
        hi = min(lo + chunk, n)
        textured = texture_ids[lo:hi] if ink and scale > 1 else None  # the 32-px camera does not resolve texture
        out[lo:hi] = _coverage(shape_ids[lo:hi], centres[lo:hi, 0], centres[lo:hi, 1], scale, textured)
    return out


def dataset(n, seed):
    """(images (N, 3, 32, 32) float32 in [-1, 1], labels (N, 3) int64): ``sample_scenes(n, seed)`` rendered
    with jitter from the same seed. labels[:, j] indexes VOCABULARIES[ATTRIBUTES[j]]."""
    scenes = sample_scenes(n, seed)
    labels = torch.tensor([sc.labels() for sc in scenes], dtype=torch.int64).reshape(n, len(ATTRIBUTES))
    return render(scenes, seed), labels
