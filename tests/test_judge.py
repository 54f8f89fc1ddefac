"""The committed judge (pipelines/assets/judge.pt) and the two scores on it: renders it never saw score
near-perfect, noise scores at chance, and the Frechet distance tells renders from noise and from a collapsed
generator, against a formula checked on features whose answer is known in closed form."""
import numpy as np
import pytest
import torch

from latentwire.pipelines import judge as J
from latentwire.pipelines import world

torch.set_num_threads(1)

HELD_OUT_SEED = 4242  # below FIRST_TRAINING_SEED: never rendered during training
N = 600


@pytest.fixture(scope="module")
def judge():
    return J.load_judge()


@pytest.fixture(scope="module")
def held_out():
    assert HELD_OUT_SEED < J.FIRST_TRAINING_SEED
    scenes = world.sample_scenes(N, HELD_OUT_SEED)
    return world.render(scenes, HELD_OUT_SEED), scenes


@pytest.fixture(scope="module")
def noise():
    """Gaussian noise clamped to the image range: an image with no attributes at all."""
    return torch.randn((N, 3, 32, 32), generator=torch.Generator().manual_seed(5)).clamp(-1, 1)


def test_committed_weights_are_a_small_state_dict():
    assert J.JUDGE_PATH.is_file() and J.JUDGE_PATH.stat().st_size < 1 << 20
    state = torch.load(J.JUDGE_PATH, map_location="cpu", weights_only=True)
    assert set(state) == set(J.Judge().state_dict())
    assert all(v.dtype == torch.float32 for v in state.values())


def test_judge_reads_held_out_renders(judge, held_out):
    images, scenes = held_out
    scores = J.attribute_scores(images, scenes, judge)
    assert all(scores[name] >= 0.99 for name in world.ATTRIBUTES), scores
    assert scores["all"] >= 0.99, scores
    per_attribute, every = J.attribute_accuracy(images, scenes, judge)
    assert per_attribute >= 0.99 and every >= 0.99


def test_judge_reads_every_scene_centred_and_jittered(judge):
    """All 48 scenes, unjittered, and five times each with random jitter up to the full bound."""
    scenes = world.all_scenes()
    assert J.attribute_accuracy(world.render(scenes, jitter=0), scenes, judge) == (1.0, 1.0)
    many = scenes * 5
    per_attribute, every = J.attribute_accuracy(world.render(many, seed=77), many, judge)
    assert per_attribute >= 0.99 and every >= 0.99


def test_judge_is_told_the_prompt_not_the_picture(judge, held_out):
    """Scoring renders against other scenes' prompts: the score counts agreement with the prompt, so it
    falls to the share of attributes the two draws happen to share (chance, ~0.28 and ~0.02)."""
    images, scenes = held_out
    wrong = world.sample_scenes(N, HELD_OUT_SEED + 1)
    per_attribute, every = J.attribute_accuracy(images, wrong, judge)
    assert per_attribute < 0.4 and every < 0.08, (per_attribute, every)


def test_noise_scores_near_chance(judge, held_out, noise):
    """Chance: (1/4 + 1/3 + 1/4) / 3 = 0.28 per attribute and 1/48 = 0.021 for all three; measured 0.277 and
    0.020 here. The bounds sit ~10 binomial standard deviations above chance."""
    _, scenes = held_out
    per_attribute, every = J.attribute_accuracy(noise, scenes, judge)
    assert per_attribute < 0.4 and every < 0.08, (per_attribute, every)


def test_frechet_distance_separates_renders_from_noise_and_from_a_collapsed_generator(judge, held_out, noise):
    """Two independent render sets are close (measured 113 here, 173 for another pair at N = 500: what
    remains is the finite-sample bias, ~ D / N times the feature variance; 500 is a sanity bound), renders
    vs noise are 1670x farther (188 000), and a 'generator' that draws only red, with the right shapes and
    places, is 54x farther (6058)."""
    images, scenes = held_out
    other_scenes = world.sample_scenes(N, HELD_OUT_SEED + 2)
    other = world.render(other_scenes, HELD_OUT_SEED + 2)
    all_red = world.render([world.Scene("red", s.shape, s.position) for s in other_scenes], HELD_OUT_SEED + 2)
    same = J.frechet_distance(images, other, judge)
    to_noise = J.frechet_distance(images, noise, judge)
    to_red = J.frechet_distance(images, all_red, judge)
    assert 0 < same < 500, same
    assert to_noise >= 50 * same, (same, to_noise)
    assert to_red >= 10 * same, (same, to_red)
    assert J.frechet_distance(images, images, judge) < 1e-6 * same


def test_scores_are_deterministic(judge, held_out, noise):
    images, scenes = held_out
    mixed = torch.cat([images[: N // 2], noise[: N // 2]])
    a = J.attribute_scores(mixed, scenes, judge)
    assert a == J.attribute_scores(mixed.clone(), scenes, J.load_judge())
    assert J.frechet_distance(images, mixed, judge) == J.frechet_distance(images.clone(), mixed.clone(), judge)
    assert torch.equal(J.features(images, judge), J.features(images, judge))


def test_judge_reads_clamped_pixels(judge, held_out):
    """Decoded images overshoot [-1, 1]; the judge reads them as they would be shown, clamped."""
    images, _ = held_out
    overshoot = images * 1.3
    assert torch.equal(J.features(overshoot, judge), J.features(overshoot.clamp(-1, 1), judge))
    assert torch.equal(J.predict(overshoot, judge), J.predict(images, judge))


def _frechet_ref(fa, fb):
    """The textbook formula with the product's square root from the eigenvalues of the non-symmetric
    S_a S_b (real and >= 0, as S_a S_b is similar to a PSD matrix): a different route from the module's."""
    fa, fb = fa.double(), fb.double()
    s_a, s_b = torch.cov(fa.T), torch.cov(fb.T)
    ev = torch.linalg.eigvals(s_a @ s_b)
    assert ev.imag.abs().max() < 1e-8 * ev.real.abs().max()
    tr_sqrt = ev.real.clamp(min=0).sqrt().sum()
    return ((fa.mean(0) - fb.mean(0)).square().sum() + s_a.trace() + s_b.trace() - 2 * tr_sqrt).item()


def _tol(fa, fb):
    """0 for full-rank covariances (both routes are then accurate to rounding; rel 1e-9 covers them). For
    rank-deficient S_a S_b its zero eigenvalues come out as +-eps * lambda_max, and their square roots (up to
    sqrt(eps * lambda_max) each, D of them) differ between routes: that, and no more, is allowed."""
    if min(len(fa), len(fb)) > fa.shape[1]:
        return 0
    lam = torch.linalg.eigvals(torch.cov(fa.T) @ torch.cov(fb.T)).real.max().item()
    return fa.shape[1] * (torch.finfo(torch.float64).eps * lam) ** 0.5


@pytest.mark.parametrize("n_a, n_b, d", [(300, 257, 7), (50, 80, 33), (2, 2, 3), (12, 40, 20)])
def test_frechet_formula(n_a, n_b, d):
    g = torch.Generator().manual_seed(n_a + d)
    mix = torch.randn((d, d), generator=g, dtype=torch.float64)
    fa = torch.randn((n_a, d), generator=g, dtype=torch.float64) @ mix
    fb = 0.5 + 2 * torch.randn((n_b, d), generator=g, dtype=torch.float64)
    ours = J.frechet_distance_of_features(fa, fb)
    assert ours == pytest.approx(_frechet_ref(fa, fb), rel=1e-9, abs=_tol(fa, fb))
    assert ours == pytest.approx(J.frechet_distance_of_features(fb, fa), rel=1e-9, abs=_tol(fa, fb))  # symmetric
    # a shift v with the same covariance: d^2 = ||v||^2 exactly
    v = torch.randn(d, generator=g, dtype=torch.float64)
    assert J.frechet_distance_of_features(fa, fa + v) == pytest.approx(v.square().sum().item(), rel=1e-9,
                                                                       abs=_tol(fa, fa))
    # a scaling by c: mean term (1 - c)^2 ||mu||^2, covariance term Tr(S + c^2 S - 2 c S) = (1 - c)^2 Tr S
    c = 3.0
    expected = (1 - c) ** 2 * (fa.mean(0).square().sum() + torch.cov(fa.T).trace()).item()
    assert J.frechet_distance_of_features(fa, c * fa) == pytest.approx(expected, rel=1e-9, abs=_tol(fa, c * fa))


def test_frechet_of_singular_covariances_is_finite_and_zero_on_itself():
    """Fewer rows than features (N = 10, D = 64, as a small image set gives): rank-deficient covariances,
    rounding's negative eigenvalues must not make NaN."""
    f = torch.randn((10, 64), generator=torch.Generator().manual_seed(0))
    assert J.frechet_distance_of_features(f, f) == pytest.approx(0, abs=1e-9)
    assert np.isfinite(J.frechet_distance_of_features(f, f[:5] * 2))


def test_bad_inputs_are_refused_with_a_reason(judge, held_out):
    images, scenes = held_out
    with pytest.raises(ValueError, match=r"images must be a tensor \(N, 3, 32, 32\), got \(600, 3, 16, 16\)"):
        J.attribute_accuracy(images[:, :, :16, :16], scenes, judge)
    with pytest.raises(ValueError, match=r"images must be a tensor .* got \(3, 32, 32\)"):
        J.frechet_distance(images[0], images, judge)
    with pytest.raises(ValueError, match=r"floats in \[-1, 1\], got dtype torch.uint8; .* x / 127.5 - 1"):
        J.attribute_accuracy(((images + 1) * 127.5).to(torch.uint8), scenes, judge)
    with pytest.raises(ValueError, match="NaN or inf"):
        J.attribute_accuracy(torch.full_like(images, float("nan")), scenes, judge)
    with pytest.raises(ValueError, match="one scene per image: got 599 scenes for 600 images"):
        J.attribute_accuracy(images, scenes[:-1], judge)
    with pytest.raises(ValueError, match="at least one image"):
        J.attribute_accuracy(images[:0], [], judge)
    with pytest.raises(ValueError, match=r"fa must be \(N, D\) with N >= 2 rows .* got \(1, 64\)"):
        J.frechet_distance(images[:1], images, judge)
    J.frechet_distance(images[:2], images[2:4], judge)  # the edge: two rows are enough
    with pytest.raises(ValueError, match="same feature width, got 3 and 4"):
        J.frechet_distance_of_features(torch.zeros(5, 3), torch.zeros(5, 4))
    with pytest.raises(FileNotFoundError, match="no judge weights at .*train_judge --out"):
        J.load_judge("/nonexistent/judge.pt")


def test_training_is_deterministic_and_leaves_the_global_rng_alone():
    """A few steps only: the same seed gives bit-identical weights, another seed other weights."""
    state = torch.get_rng_state().clone()
    a = J.train_judge(steps=3, batch_size=8, seed=0).state_dict()
    assert torch.equal(torch.get_rng_state(), state)
    b = J.train_judge(steps=3, batch_size=8, seed=0).state_dict()
    c = J.train_judge(steps=3, batch_size=8, seed=1).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    with pytest.raises(ValueError, match="steps and batch_size must be >= 1, got 0 and 8"):
        J.train_judge(steps=0, batch_size=8)
