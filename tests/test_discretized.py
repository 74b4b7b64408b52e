"""The discretised logistic likelihoods of 8-bit pixels, checked on their own terms: mass functions
over the 256 levels that sum to one, against scipy and high-precision arithmetic, sampled at the
stated frequencies, on either pixel grid, trained and evaluated in bits per dimension."""

from __future__ import annotations

import json
import math

import mpmath
import numpy as np
import pytest
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import vaelab
from conftest import Constant
from vaelab.cli import app as cli
from vaelab.components.likelihoods import (
    DataMoments,
    DiscretizedLogisticLikelihood,
    DiscretizedLogisticMixtureLikelihood,
)
from vaelab.distributions.discretized_logistic import (
    LOGISTIC_MIXTURE_COMPONENTS,
    LOGISTIC_SCALE_FLOOR,
    DiscretizedLogistic,
)

GRIDS = (1.0, 255.0)  # the top level: pixels / 255 (--scale auto) or the integers (--scale none)
SOME = settings(max_examples=60, deadline=None)


def on_grid(likelihood, grid_max: float, pixels: int):
    """``likelihood`` in float64 on the grid with top level ``grid_max``, read off two examples
    (all 0, all top) by ``initialise``, with the starting offsets removed so that the decoder's
    features are the parameters themselves (in units of the pixel range)."""
    likelihood = likelihood.double()
    likelihood.initialise(torch.tensor([[0.0] * pixels, [grid_max] * pixels]))
    with torch.no_grad():
        likelihood.offset.zero_()
        likelihood.log_scale_offset.zero_()
    return likelihood


def single(loc: float, log_scale: float, grid_max: float) -> DiscretizedLogisticLikelihood:
    """A one-pixel discretised logistic likelihood with these decoder outputs."""
    features = torch.tensor([loc, log_scale], dtype=torch.float64)
    return on_grid(DiscretizedLogisticLikelihood(Constant(features), (1,)), grid_max, 1)


def mixture(logits, locs, log_scales, grid_max: float) -> DiscretizedLogisticMixtureLikelihood:
    """A one-pixel mixture likelihood; the decoder's features are K logits, K locations, K
    log-scales."""
    features = torch.tensor([*logits, *locs, *log_scales], dtype=torch.float64)
    likelihood = DiscretizedLogisticMixtureLikelihood(Constant(features), (1,), len(logits))
    return on_grid(likelihood, grid_max, 1)


def level_log_probs(likelihood, grid_max: float) -> torch.Tensor:
    """log P of each of the 256 levels of the one pixel, ``[256]``, through ``log_prob(x, z)``."""
    levels = torch.arange(256, dtype=torch.float64)[:, None] * (grid_max / 255)
    return likelihood.log_prob(levels, torch.zeros(256, 1, dtype=torch.float64))


# Locations from far below the lowest level to far above the highest (units of the pixel range),
# raw log-scales from far below the floor to e²⁰⁰ times the whole range (where Δ/s underflows).
locations = st.floats(-1e4, 1e4) | st.floats(-3.0, 4.0)
log_scales = st.floats(-40.0, 15.0) | st.floats(15.0, 200.0)


# ------------------------------------------------------------------------------ a mass function
@SOME
@given(loc=locations, log_scale=log_scales, grid_max=st.sampled_from(GRIDS))
def test_the_256_levels_of_a_discretised_logistic_sum_to_one(loc, log_scale, grid_max):
    log_p = level_log_probs(single(loc, log_scale, grid_max), grid_max)
    assert bool(log_p.isfinite().all()), "log P is finite at every level, 0 and 255 included"
    assert abs(float(log_p.exp().sum()) - 1.0) < 1e-6


@SOME
@given(
    logits=st.lists(st.floats(-30.0, 30.0), min_size=3, max_size=3),
    locs=st.lists(locations, min_size=3, max_size=3),
    scales=st.lists(log_scales, min_size=3, max_size=3),
    grid_max=st.sampled_from(GRIDS),
)
def test_the_256_levels_of_a_mixture_sum_to_one(logits, locs, scales, grid_max):
    log_p = level_log_probs(mixture(logits, locs, scales, grid_max), grid_max)
    assert bool(log_p.isfinite().all())
    assert abs(float(log_p.exp().sum()) - 1.0) < 1e-6


@SOME
@given(
    loc=locations,
    log_scale=log_scales,
    grid_max=st.sampled_from(GRIDS),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_log_probabilities_and_their_gradients_are_finite_at_the_end_levels(
    loc, log_scale, grid_max, dtype
):
    """At 0 and 255 and in between, in float32 too, however extreme the parameters: no −∞, and
    no NaN gradient from a branch that is not taken."""
    likelihood = single(loc, log_scale, grid_max).to(dtype)
    features = likelihood.decoder.features.to(dtype).requires_grad_()
    likelihood.decoder.features = features
    x = torch.tensor([[0.0], [1.0], [128.0], [254.0], [255.0]], dtype=dtype) * (grid_max / 255)
    log_p = likelihood.log_prob(x, torch.zeros(5, 1, dtype=dtype))
    assert bool(log_p.isfinite().all())
    log_p.sum().backward()
    assert features.grad is not None and bool(features.grad.isfinite().all())


# ------------------------------------------------------------------ against other computations
@SOME
@given(
    loc=st.floats(-0.5, 1.5),
    log_scale=st.floats(-7.5, 1.0),
    grid_max=st.sampled_from(GRIDS),
)
def test_a_discretised_logistic_matches_scipy_cdf_differences(loc, log_scale, grid_max):
    """log P against differences of scipy's logistic CDF in float64, at every level whose
    probability that difference still resolves (above 10⁻⁸; tails: next test)."""
    log_p = level_log_probs(single(loc, log_scale, grid_max), grid_max).numpy()
    # The parameters in data units, as the likelihood reads them: the scale floored smoothly.
    scale = grid_max * math.exp(
        math.log(LOGISTIC_SCALE_FLOOR)
        + math.log1p(math.exp(log_scale - math.log(LOGISTIC_SCALE_FLOOR)))
    )
    logistic = scipy.stats.logistic(loc * grid_max, scale)
    half = 0.5 * grid_max / 255
    x = np.arange(256) * (grid_max / 255)
    p = logistic.cdf(x + half) - logistic.cdf(x - half)
    p[0], p[-1] = logistic.cdf(x[0] + half), logistic.sf(x[-1] - half)
    resolved = p > 1e-8
    assert resolved.any()
    np.testing.assert_allclose(log_p[resolved], np.log(p[resolved]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scales_away", [-1000.0, -40.0, -3.0, 0.0, 2.5, 40.0, 1000.0])
def test_far_tails_match_fifty_digit_arithmetic(scales_away, dtype):
    """Where σ(a) − σ(b) is 1 − 1 = 0 in floating point, log P is still exact: against the same
    difference in 50-digit arithmetic (mpmath), to 10⁻⁶ relative in float32 as in float64."""
    mpmath.mp.dps = 50
    scale, level = 2.0, 100  # in levels, on the 0..255 grid
    loc = level - scales_away * scale
    d = DiscretizedLogistic(
        torch.tensor(loc, dtype=dtype), torch.tensor(math.log(scale), dtype=dtype), 1.0
    )
    found = float(d.log_prob(torch.tensor(float(level), dtype=dtype)))

    def cdf(t: float) -> mpmath.mpf:
        return 1 / (1 + mpmath.exp(-(mpmath.mpf(t) - mpmath.mpf(loc)) / scale))

    def sf(t: float) -> mpmath.mpf:
        return 1 / (1 + mpmath.exp((mpmath.mpf(t) - mpmath.mpf(loc)) / scale))

    # The same difference from the side where both terms are small: no digits cancel.
    if level < loc:
        expected = float(mpmath.log(cdf(level + 0.5) - cdf(level - 0.5)))
    else:
        expected = float(mpmath.log(sf(level - 0.5) - sf(level + 0.5)))
    assert found == pytest.approx(expected, rel=1e-6, abs=1e-6)


@SOME
@given(
    logits=st.lists(st.floats(-10.0, 10.0), min_size=4, max_size=4),
    locs=st.lists(st.floats(-0.5, 1.5), min_size=4, max_size=4),
    scales=st.lists(st.floats(-9.0, 1.0), min_size=4, max_size=4),
    grid_max=st.sampled_from(GRIDS),
)
def test_a_mixture_is_the_logsumexp_of_its_components(logits, locs, scales, grid_max):
    """The mixture likelihood (decoder layout: logits, locations, log-scales) against a direct
    log Σⱼ πⱼ Pⱼ over one-component likelihoods, one per (location, log-scale)."""
    found = level_log_probs(mixture(logits, locs, scales, grid_max), grid_max)
    parts = torch.stack(
        [
            level_log_probs(single(m, s, grid_max), grid_max)
            for m, s in zip(locs, scales, strict=True)
        ]
    )  # [K, 256]
    weights = torch.log_softmax(torch.tensor(logits, dtype=torch.float64), 0)[:, None]
    expected = torch.logsumexp(weights + parts, dim=0)
    assert torch.allclose(found, expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize(
    "cls", [DiscretizedLogisticLikelihood, DiscretizedLogisticMixtureLikelihood]
)
def test_one_decoder_gives_the_same_probabilities_on_either_grid(cls):
    """Parameters are read in units of the pixel range, so pixels 0..255 and pixels / 255 get
    the same log-probabilities: bits per dimension do not depend on the scaling."""
    torch.manual_seed(0)
    per_dim = 2 if cls is DiscretizedLogisticLikelihood else 3 * LOGISTIC_MIXTURE_COMPONENTS
    decoder = nn.Linear(3, per_dim * 6).double()
    x = torch.randint(0, 256, (10, 6)).double()
    z = torch.randn(4, 10, 3, dtype=torch.float64)
    found = {}
    for grid_max in GRIDS:
        likelihood = cls(decoder, (6,)).double()
        likelihood.initialise(x * (grid_max / 255))
        found[grid_max] = likelihood.log_prob(x * (grid_max / 255), z)
    assert torch.allclose(found[1.0], found[255.0], rtol=1e-12, atol=1e-10)


def test_the_mean_is_the_probability_weighted_sum_of_the_levels():
    for grid_max in GRIDS:
        for likelihood in (
            single(0.02, -3.0, grid_max),
            single(0.6, -5.0, grid_max),
            mixture([0.0, 1.0], [0.1, 0.9], [-4.0, -2.0], grid_max),
        ):
            levels = torch.arange(256, dtype=torch.float64) * (grid_max / 255)
            expected = (levels * level_log_probs(likelihood, grid_max).exp()).sum()
            mean = likelihood.mean(torch.zeros(1, 1, dtype=torch.float64))
            assert float(mean) == pytest.approx(float(expected), rel=1e-10)


def test_the_scale_stays_above_its_floor_and_keeps_a_gradient_below_it():
    likelihood = single(0.5, -1e3, 255.0)
    d = likelihood(torch.zeros(1, 1, dtype=torch.float64)).base_dist
    assert float(d.scale) == pytest.approx(255.0 * LOGISTIC_SCALE_FLOOR, rel=1e-12)
    below = math.log(LOGISTIC_SCALE_FLOOR) - 3.0  # below the floor, not far
    features = torch.tensor([0.5, below], dtype=torch.float64, requires_grad=True)
    likelihood.decoder.features = features
    likelihood.log_prob(torch.tensor([[40.0]], dtype=torch.float64), torch.zeros(1, 1)).backward()
    assert features.grad is not None and float(features.grad[1]) != 0.0


# ---------------------------------------------------------------------------------- sampling
def chi_square_p_value(samples: torch.Tensor, log_p: torch.Tensor, grid_max: float) -> float:
    """Pearson's χ² of the samples' level counts against n P, levels with expected counts
    under 5 pooled."""
    levels = (samples.flatten() * (255 / grid_max)).round().long()
    counts = torch.bincount(levels, minlength=256).double().numpy()
    expected = samples.numel() * log_p.exp().numpy()
    small = expected < 5
    observed = np.append(counts[~small], counts[small].sum())
    wanted = np.append(expected[~small], expected[small].sum())
    return float(scipy.stats.chisquare(observed, wanted * observed.sum() / wanted.sum()).pvalue)


@pytest.mark.parametrize("grid_max", GRIDS)
def test_samples_follow_the_level_probabilities(grid_max):
    """200,000 draws of one pixel, near the lowest level so that its edge bin carries mass, and of
    a two-mode mixture: the level frequencies pass a χ² test, and every draw is on the grid."""
    torch.manual_seed(1)
    for likelihood in (
        single(3 / 255, math.log(2.5 / 255), grid_max),
        mixture([0.5, -0.5], [0.02, 0.7], [math.log(0.01), math.log(0.05)], grid_max),
    ):
        p = likelihood(torch.zeros(1, 1, dtype=torch.float64))
        samples = p.sample((200_000,))
        assert samples.shape == (200_000, 1, 1)
        likelihood.check_support(samples.reshape(-1, 1))
        assert chi_square_p_value(samples, level_log_probs(likelihood, grid_max), grid_max) > 1e-3


def test_a_sampler_half_a_level_off_fails_the_chi_square_test():
    """The χ² test above can fail: draws shifted by half a level (rounded down instead of to
    the nearest level) are refused."""
    torch.manual_seed(1)
    likelihood = single(40 / 255, math.log(2.5 / 255), 255.0)
    continuous = 40.0 + 2.5 * torch.logit(torch.rand(200_000))
    floored = continuous.floor().clamp(0, 255)
    assert chi_square_p_value(floored, level_log_probs(likelihood, 255.0), 255.0) < 1e-6


# ------------------------------------------------------------------------------ the pixel grid
@pytest.mark.parametrize(
    "cls", [DiscretizedLogisticLikelihood, DiscretizedLogisticMixtureLikelihood]
)
def test_support_is_the_256_levels_of_either_grid(cls):
    likelihood = cls(Constant(torch.zeros(1)), (256,))
    integers = torch.arange(256, dtype=torch.float32)[None]
    # Before the grid is read off training data: either grid, float32 rounding included.
    likelihood.check_support(integers)
    likelihood.check_support(integers / 255)
    for bad, shown in (
        (integers / 256, "0.00390625"),  # Kingma's /256 for Frey Face: off the /255 grid
        (torch.tensor([[0.0, 0.0625, 1.0]]), "0.0625"),  # digits / 16
        (torch.tensor([[0.0, 17.5, 200.0]]), "17.5"),
        (torch.tensor([[-1.0, 0.0]]), "-1"),
        (torch.tensor([[0.0, 256.0]]), "256"),
    ):
        with pytest.raises(
            ValueError, match=rf"needs 8-bit pixels, the integers 0\.\.255.*data hold {shown};"
        ):
            likelihood.check_support(bad)
        with pytest.raises(ValueError, match="needs 8-bit pixels"):
            likelihood.initialise(bad)


def test_once_trained_only_the_training_grid_is_accepted_and_it_is_saved():
    torch.manual_seed(0)
    likelihood = DiscretizedLogisticLikelihood(nn.Linear(2, 2 * 4), (4,))
    x = torch.randint(0, 256, (30, 4)).float()
    likelihood.initialise(x / 255)
    likelihood.check_support(x / 255)
    assert likelihood.why_not_a_probability(x / 255) is None
    with pytest.raises(ValueError, match=r"trained on 8-bit pixels divided by 255.*hold 2\b"):
        likelihood.check_support(torch.tensor([[0.0, 2.0, 1.0, 0.0]]))
    assert "not all on it" in likelihood.why_not_a_probability(torch.tensor([[2.0, 0, 0, 0]]))
    # The grid is a buffer: a likelihood loaded from the state dict knows it.
    loaded = DiscretizedLogisticLikelihood(nn.Linear(2, 2 * 4), (4,))
    with pytest.raises(ValueError, match="has not read its pixel grid"):
        loaded(torch.zeros(1, 2))
    loaded.load_state_dict(likelihood.state_dict())
    with pytest.raises(ValueError, match="divided by 255"):
        loaded.check_support(x)
    z = torch.randn(3, 2)
    z = z[:, None].expand(3, 30, 2)
    assert torch.equal(loaded.log_prob(x / 255, z), likelihood.log_prob(x / 255, z))
    # The integer grid, the other way round.
    likelihood.initialise(x)
    with pytest.raises(ValueError, match=r"as the integers 0\.\.255, but the data hold 0\.5;"):
        likelihood.check_support(torch.tensor([[0.0, 0.5, 1.0, 0.0]]))


def test_the_grid_is_read_off_a_stream_of_batches_as_off_the_whole_data():
    """A DataLoader's batches reach ``initialise`` as ``DataMoments``: the largest value over all
    of them sets the grid (here the first batch, dark, holds only 0s and 1s, on both grids), and
    the start is the one the whole tensor gives."""
    torch.manual_seed(0)
    x = torch.randint(0, 256, (40, 4)).double()
    x[:20] = x[:20].clamp(max=1.0)
    moments = DataMoments()
    for batch in x.split(20):
        moments.update(batch)
    from_stream = DiscretizedLogisticLikelihood(nn.Linear(2, 8), (4,)).double()
    from_stream.initialise(moments)
    whole = DiscretizedLogisticLikelihood(nn.Linear(2, 8), (4,)).double()
    whole.initialise(x)
    assert from_stream.grid.bin_width == whole.grid.bin_width == 1.0
    assert torch.allclose(from_stream.offset, whole.offset)
    assert torch.allclose(from_stream.log_scale_offset, whole.log_scale_offset)
    # VAE.fit on a DataLoader of pixels / 255: checked batch by batch, the grid read at the start.
    loader = DataLoader(TensorDataset((x / 255).float()), batch_size=10)
    model = vaelab.VAE(likelihood="discretized-logistic", latent_dim=2, hidden=(8,), epochs=1)
    grid = model.fit(loader).model_.likelihood.grid
    assert grid.bin_width == pytest.approx(1 / 255, rel=1e-15)


def test_the_distribution_has_the_likelihood_shapes_and_a_grid_support():
    for cls, per_dim in (
        (DiscretizedLogisticLikelihood, 2),
        (DiscretizedLogisticMixtureLikelihood, 3 * LOGISTIC_MIXTURE_COMPONENTS),
    ):
        torch.manual_seed(0)
        decoder = nn.Linear(3, per_dim * 16)
        likelihood = cls(decoder, (1, 4, 4))
        likelihood.initialise(torch.randint(0, 256, (20, 1, 4, 4)).float())
        p = likelihood(torch.randn(7, 5, 3))
        assert p.batch_shape == (7, 5) and p.event_shape == (1, 4, 4)
        assert p.sample((2,)).shape == (2, 7, 5, 1, 4, 4)
        assert p.mean.shape == (7, 5, 1, 4, 4)
        assert bool(p.base_dist.support.check(p.sample()).all())


# ----------------------------------------------------------------- trained and evaluated in bits
def eight_bit_digits() -> np.ndarray:
    """scikit-learn's digits (levels 0..16) spread over 0..255 and rounded, uint8 [1797, 1, 8, 8]."""
    return np.round(load_digits().data * (255 / 16)).astype(np.uint8).reshape(-1, 1, 8, 8)


@pytest.mark.parametrize("likelihood", ["discretized-logistic", "discretized-logistic-mixture"])
def test_a_model_trained_on_8_bit_digits_improves_and_scores_in_bits(likelihood):
    """Pixels / 255: the ELBO rises from epoch to epoch, and the score beats coding each pixel
    uniformly over its 256 levels (8 bits per dimension) by far."""
    x = eight_bit_digits().astype(np.float32) / 255
    model = vaelab.VAE(
        likelihood=likelihood, latent_dim=4, hidden=(64,), epochs=6, lr=3e-3, seed=0, device="cpu"
    ).fit(x[:1400])
    elbos = [epoch.elbo for epoch in model.history_]
    assert elbos[-1] > elbos[0] + 5.0 and elbos[-1] > elbos[-2]
    bits = -float(np.mean(model.score_samples(x[1400:]))) / (64 * math.log(2))
    assert bits < 5.0


def test_vaelab_trains_and_evaluates_the_same_model_on_pixels_0_to_255_and_over_255(
    tmp_path, capsys
):
    """`vaelab train` on uint8 images, pixels / 255 (--scale auto) or 0..255 (--scale none), then
    `vaelab evaluate --k` of the saved model: bits per dimension are shown, −mean log p / (D ln 2),
    and both scalings give the same run (the encoder reads 0..255 in units of 255, and the model
    file keeps that unit): ELBOs to float rounding, bits/dim to Monte Carlo error."""
    path = tmp_path / "digits8.npy"
    np.save(path, eight_bit_digits()[:400])
    runs = {}
    for scale in ("auto", "none"):
        folder = tmp_path / scale
        argv = ["train", path, "--out", folder, "--quiet", "--epochs", "3", "--hidden", "32",
                "--latent-dim", "2", "--likelihood", "discretized-logistic", "--scale", scale]  # fmt: skip
        assert cli.main([str(a) for a in argv]) == 0
        capsys.readouterr()
        lines = (folder / "metrics.jsonl").read_text().splitlines()
        elbos = [json.loads(line)["elbo"] for line in lines]
        assert cli.main(["evaluate", str(folder), "--k", "10", "--json"]) == 0
        iwae = json.loads(capsys.readouterr().out)["iwae"]
        assert iwae["bits_per_dim"] == pytest.approx(-iwae["mean"] / (64 * math.log(2)), rel=1e-12)
        runs[scale] = (elbos, iwae["bits_per_dim"])
    (fractions, fraction_bits), (integers, integer_bits) = runs["auto"], runs["none"]
    assert fractions[-1] > fractions[0] and 0 < fraction_bits < 8
    assert integers == pytest.approx(fractions, rel=1e-5)
    # Scores draw their noise from each example's bytes, so the two grids draw differently.
    assert integer_bits == pytest.approx(fraction_bits, rel=1e-2)


def test_a_model_trained_on_pixels_0_to_255_is_the_model_trained_on_pixels_over_255():
    """The encoder reads 0..255 pixels in the decoder's units (/ 255): fitted with one seed on
    either grid, the ELBO of every epoch agrees to float rounding and the test bits/dim to Monte
    Carlo error, where the encoder fed 0..255 as they are made a first KL of about 10²² nats."""
    x = eight_bit_digits().astype(np.float32)
    fitted = {}
    for top in (255.0, 1.0):
        data = x * (top / 255)
        model = vaelab.VAE(
            likelihood="discretized-logistic", latent_dim=4, hidden=(64,), epochs=6, lr=3e-3, seed=0
        ).fit(data[:1400])
        bits = -float(np.mean(model.score_samples(data[1400:]))) / (64 * math.log(2))
        fitted[top] = ([epoch.elbo for epoch in model.history_], bits)
    (integers, integer_bits), (fractions, fraction_bits) = fitted[255.0], fitted[1.0]
    assert integers == pytest.approx(fractions, rel=1e-5)
    # Scores draw their noise from each example's bytes, so the two grids draw differently.
    assert integer_bits == pytest.approx(fraction_bits, rel=1e-2)
    assert integers[-1] > integers[0] and integer_bits < 5.0
