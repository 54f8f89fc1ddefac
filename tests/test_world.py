"""The procedural world (pipelines/world.py): the caption grammar both ways, and renders whose pixels carry
exactly the attributes their labels name: colour by channel, shape by area and outline, position by quadrant."""
import math

import numpy as np
import pytest
import torch

from latentwire.pipelines import world
from latentwire.pipelines.world import (ATTRIBUTES, COLOURS, JITTER, POSITIONS, QUADRANT_CENTRES, RGB,
                                        SHAPE_HALF_EXTENT as R, SHAPES, CaptionError, Scene, all_scenes,
                                        caption, dataset, parse_caption, render, sample_scenes)

torch.set_num_threads(1)


def _coverage(images):
    """(N, 32, 32) share of each pixel the shape covers: every lit channel holds -1 + 2 * cover."""
    return (images + 1).amax(1) / 2


def _centroids(images):
    """(N, 2) coverage-weighted (x, y) mass centre in pixels, pixel i's centre at i + 0.5."""
    cover = _coverage(images).double()
    c = torch.arange(world.IMAGE_SIZE, dtype=torch.float64) + 0.5
    mass = cover.sum((1, 2))
    return torch.stack([(cover.sum(1) * c).sum(1) / mass, (cover.sum(2) * c).sum(1) / mass], 1)


def test_caption_round_trip_over_all_scenes():
    scenes = all_scenes()
    assert len(scenes) == len(COLOURS) * len(SHAPES) * len(POSITIONS) == 48
    assert len(set(scenes)) == 48
    captions = [caption(s) for s in scenes]
    assert len(set(captions)) == 48
    assert [parse_caption(c) for c in captions] == scenes
    assert caption(Scene("red", "circle", "top left")) == "a red circle at the top left"
    assert parse_caption("a yellow triangle at the bottom right") == Scene("yellow", "triangle", "bottom right")


@pytest.mark.parametrize("text, message", [
    ("a purple circle at the top left", r"word 2 .* is 'purple'; allowed there: red, green, blue, yellow"),
    ("a red hexagon at the top left", r"word 3 .* is 'hexagon'; allowed there: circle, square, triangle"),
    ("a red circle in the top left", r"word 4 .* is 'in'; allowed there: at"),
    ("a red circle at a top left", r"word 5 .* is 'a'; allowed there: the"),
    ("a red circle at the middle left", r"word 6 .* is 'middle'; allowed there: top, bottom"),
    ("a red circle at the top centre", r"word 7 .* is 'centre'; allowed there: left, right"),
    ("A red circle at the top left", r"word 1 .* is 'A'; allowed there: a"),
    ("a red circle at the top left.", r"word 7 .* is 'left\.'"),
    ("a red circle at the left top", r"word 6 .* is 'left'"),
    ("a red circle at the top  left", r"word 3 .* allowed there: plain, striped, dotted"),  # 8 words: a texture?
    ("a red circle at the top", r"7 words .* got 6"),
    ("a red circle at the top left please", r"word 3 .* allowed there: plain, striped, dotted"),
    ("a red striped circle at the top left please", r"7 words .* got 9"),
    ("", r"7 words .* got 1"),
])
def test_parse_caption_is_strict_and_names_the_bad_word(text, message):
    with pytest.raises(CaptionError, match=message):
        parse_caption(text)


def test_caption_error_is_a_value_error_and_scene_checks_its_words():
    assert issubclass(CaptionError, ValueError)
    with pytest.raises(CaptionError, match="caption must be a str .* got bytes"):
        parse_caption(b"a red circle at the top left")
    with pytest.raises(ValueError, match="position must be one of top left, top right, bottom left, bottom right; "
                                         "got 'top middle'"):
        Scene("red", "circle", "top middle")
    with pytest.raises(ValueError, match="colour must be one of red, green, blue, yellow; got 'Red'"):
        Scene("Red", "circle", "top left")
    with pytest.raises(ValueError, match="shape must be one of circle, square, triangle; got 'star'"):
        Scene("red", "star", "top left")


def test_render_is_deterministic_float32_in_range():
    scenes = sample_scenes(200, 3)
    a, b = render(scenes, seed=9), render(scenes, seed=9)
    assert a.shape == (200, 3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, render(scenes, seed=10))  # the jitter follows the seed
    assert a.min().item() == -1.0 and a.max().item() == 1.0  # black background, fully covered interior
    assert bool(((a >= -1) & (a <= 1)).all())
    assert render([]).shape == (0, 3, 32, 32)


def test_render_does_not_depend_on_its_chunking(monkeypatch):
    """Images are drawn RENDER_CHUNK at a time; passes of 7 (uneven: the last one is short) give the same
    bits as one pass."""
    scenes = sample_scenes(40, 4)
    whole = render(scenes, seed=4)
    monkeypatch.setattr(world, "RENDER_CHUNK", 7)
    assert torch.equal(render(scenes, seed=4), whole)


@pytest.mark.parametrize("colour", COLOURS)
def test_a_colour_lights_exactly_its_channels(colour):
    """Black background: a channel the colour lacks stays at -1 everywhere; the channels it has are equal
    (yellow: red = green) and lit where the shape is."""
    scenes = [s for s in all_scenes() if s.colour == colour]
    images = render(scenes, seed=1)
    rgb = RGB[colour]
    on = [c for c in range(3) if rgb[c] == 1.0]
    off = [c for c in range(3) if rgb[c] == 0.0]
    assert len(on) + len(off) == 3 and on
    for c in off:
        assert bool((images[:, c] == -1).all()), (colour, c)
    for c in on:
        assert torch.equal(images[:, c], images[:, on[0]])
        assert bool((images[:, c].amax((1, 2)) == 1).all())  # every image has fully covered pixels


@pytest.mark.parametrize("jitter", [0.0, JITTER])
def test_each_shape_has_its_area(jitter):
    """Coverage sums to the analytic area, pi R^2, 4 R^2, 2 R^2 = 78.5, 100, 50 px^2 for R = 5. Measured
    max error over 3000 jittered renders: 0.71 (circle), 0 (square), 1.25 (triangle) px^2, from 4x4
    supersampling; the areas are 21 px^2 and more apart."""
    scenes = [s for s in all_scenes() for _ in range(5)]
    areas = _coverage(render(scenes, seed=2, jitter=jitter)).sum((1, 2))
    expected = torch.tensor([{"circle": math.pi * R * R, "square": 4 * R * R, "triangle": 2 * R * R}[s.shape]
                             for s in scenes])
    assert (areas - expected).abs().max().item() < 2.0


def test_shapes_differ_in_outline_where_their_areas_do_not_tell():
    """Unjittered, in the top-left quadrant (box [3, 13]^2): the square fills the box's top-left corner pixel,
    circle and triangle leave it empty; the triangle's mass centre is R/3 below the box centre (the centroid
    of a triangle is a third of the way up from its base), the circle's and square's are on it."""
    images = render([Scene("green", s, "top left") for s in SHAPES], jitter=0)
    cover = _coverage(images)
    corner = cover[:, 3, 3]
    assert corner.tolist() == [0.0, 1.0, 0.0]
    cx, cy = QUADRANT_CENTRES["top left"]
    centroids = _centroids(images)
    torch.testing.assert_close(centroids[0], torch.tensor([cx, cy], dtype=torch.float64), rtol=0, atol=1e-6)
    torch.testing.assert_close(centroids[1], torch.tensor([cx, cy], dtype=torch.float64), rtol=0, atol=1e-6)
    assert abs(centroids[2, 0].item() - cx) < 1e-6
    assert abs(centroids[2, 1].item() - (cy + R / 3)) < 0.05  # supersampling error of the centroid
    # the triangle narrows upwards: its top covered row is narrower than its bottom one
    rows = cover[2].sum(1)
    lit = rows.nonzero()[:, 0]
    assert rows[lit[0]] < rows[lit[-1]] / 4


def test_position_puts_the_whole_shape_in_its_quadrant():
    """Over random scenes and jitter: every pixel outside the named quadrant is black, and the mass centre
    lies within JITTER (+ R/3 down for a triangle) of the quadrant's centre on each axis."""
    scenes = sample_scenes(600, 7)
    images = render(scenes, seed=7)
    half = world.IMAGE_SIZE // 2
    centroids = _centroids(images)
    for img, s, (x, y) in zip(images, scenes, centroids.tolist()):
        rows = slice(0, half) if "top" in s.position else slice(half, None)
        cols = slice(0, half) if "left" in s.position else slice(half, None)
        outside = img.clone()
        outside[:, rows, cols] = -1
        assert bool((outside == -1).all()), s
        cx, cy = QUADRANT_CENTRES[s.position]
        dy = R / 3 if s.shape == "triangle" else 0.0
        assert abs(x - cx) <= JITTER + 0.05 and abs(y - cy - dy) <= JITTER + 0.05, (s, x, y)


def test_jitter_moves_shapes_uniformly_within_its_bound():
    """Circle mass centres = box centres: offsets spread over [-JITTER, JITTER] with the uniform's std
    JITTER / sqrt(3) = 1.15 px (800 draws: relative std of the sample std ~2.5%)."""
    scenes = [Scene("blue", "circle", p) for p in POSITIONS] * 200
    offsets = _centroids(render(scenes, seed=11)) - torch.tensor([QUADRANT_CENTRES[s.position] for s in scenes],
                                                                 dtype=torch.float64)
    assert offsets.abs().max().item() <= JITTER + 0.05
    assert offsets.abs().max().item() > 0.9 * JITTER
    std = offsets.std(0)
    assert bool(((std - JITTER / math.sqrt(3)).abs() < 0.1).all()), std.tolist()


def test_jitter_limit():
    scenes = all_scenes()[:2]
    render(scenes, jitter=JITTER)
    render(scenes, jitter=0)
    for bad in (JITTER + 0.01, -0.5):
        with pytest.raises(ValueError, match=r"jitter must be in \[0, 2.0\] px .* got"):
            render(scenes, jitter=bad)


def test_sample_scenes_is_seeded_uniform_and_leaves_global_rngs_alone():
    np_state, torch_state = np.random.get_state()[1].copy(), torch.get_rng_state().clone()
    a = sample_scenes(4800, 123)
    assert a == sample_scenes(4800, 123)
    assert a[:100] != sample_scenes(100, 124)
    assert (np.random.get_state()[1] == np_state).all() and torch.equal(torch.get_rng_state(), torch_state)
    n = len(a)
    for name in ATTRIBUTES:
        vocab = world.VOCABULARIES[name]
        for value in vocab:
            k = sum(getattr(s, name) == value for s in a)
            p = 1 / len(vocab)
            assert abs(k - n * p) < 4 * math.sqrt(n * p * (1 - p)), (name, value, k)
    assert set(a) == set(all_scenes())  # 100 draws expected per scene: every combination occurs
    assert sample_scenes(0, 1) == []
    with pytest.raises(ValueError, match="n must be >= 0, got -1"):
        sample_scenes(-1, 0)


def test_dataset_is_the_rendered_sample_with_its_labels():
    images, labels = dataset(300, 21)
    scenes = sample_scenes(300, 21)
    assert images.shape == (300, 3, 32, 32) and labels.shape == (300, 3) and labels.dtype == torch.int64
    assert torch.equal(images, render(scenes, 21))
    for s, row in zip(scenes, labels.tolist()):
        assert [world.VOCABULARIES[name][i] for name, i in zip(ATTRIBUTES, row)] == [s.colour, s.shape, s.position]
    again, labels_again = dataset(300, 21)
    assert torch.equal(images, again) and torch.equal(labels, labels_again)
    other, other_labels = dataset(300, 22)
    assert not torch.equal(labels, other_labels) and not torch.equal(images, other)


# -- high resolution and texture ----------------------------------------------------------------------------

def test_textures_are_drawn_at_high_resolution_only_and_leave_the_32px_world_as_it_was():
    scenes = world.sample_scenes(24, 5, textures=True)
    plain = [Scene(s.colour, s.shape, s.position) for s in scenes]
    assert [(s.colour, s.shape, s.position) for s in scenes] == [(s.colour, s.shape, s.position)
                                                                 for s in world.sample_scenes(24, 5)]
    assert {s.texture for s in scenes} == set(world.TEXTURES)
    assert torch.equal(render(scenes, 5), render(plain, 5))  # 32 px: texture is not resolved
    for scale in (2, 4):
        hi, hi_plain = render(scenes, 5, scale=scale), render(plain, 5, scale=scale)
        assert hi.shape == (24, 3, 32 * scale, 32 * scale)
        # the same scene at every scale: the plain render pooled to 32 px is the 32-px render, up to
        # anti-aliasing (16 samples a pixel at 32 px, 16 scale^2 at the high resolution)
        pooled = torch.nn.functional.avg_pool2d(hi_plain, scale)
        assert (pooled - render(plain, 5)).abs().max() < 0.5  # a triangle's apex: 16 samples see little of it
        assert (pooled - render(plain, 5)).abs().mean() < 2e-3
        mask = world.coverage(scenes, 5, scale=scale) > 0
        assert torch.equal(hi[~mask[:, None].expand_as(hi)], torch.full_like(hi[~mask[:, None].expand_as(hi)], -1))
        for i, s in enumerate(scenes):  # a texture only ever darkens, and only a textured shape
            darker = (hi[i] < hi_plain[i] - 1e-6).any()
            assert bool(darker) == (s.texture != "plain"), s


def test_texture_patterns_lie_on_the_32px_grid():
    scene = Scene("red", "square", "top left", "striped")
    hi = render([scene], 0, jitter=0, scale=4)[0, 0]  # red channel; square spans x, y in [3, 13)
    rows = hi[16:40, 24]  # inside the square: rows alternate bright, dark every 2 px (half a 32-px pixel)
    assert torch.equal(rows.reshape(-1, 4)[:, :2], torch.ones(6, 2))
    assert torch.allclose(rows.reshape(-1, 4)[:, 2:], torch.full((6, 2), 2 * world.TEXTURE_INK - 1))
    dotted = render([Scene("red", "square", "top left", "dotted")], 0, jitter=0, scale=4)[0, 0]
    assert float(dotted[16:40, 16:40].mean()) < 1 - 0.2  # about 28% of each pixel at TEXTURE_INK


def test_detail_captions_round_trip():
    for s in world.sample_scenes(30, 2, textures=True):
        assert parse_caption(caption(s, detail=True)) == s
        assert parse_caption(caption(s)) == Scene(s.colour, s.shape, s.position)
    with pytest.raises(ValueError, match="texture must be one of"):
        Scene("red", "circle", "top left", "furry")
    with pytest.raises(ValueError, match="scale must be one of"):
        render([Scene("red", "circle", "top left")], scale=3)
