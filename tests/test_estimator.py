"""``vaelab.VAE`` as a scikit-learn estimator, and its inputs and outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.datasets import load_digits
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import vaelab
from vaelab.components.networks import InputScale

DIGITS = load_digits()
X = (DIGITS.data[:400] / 16.0).astype(np.float32)
SMALL = {"latent_dim": 2, "hidden": (16,), "epochs": 2, "seed": 0}


@parametrize_with_checks(
    [
        vaelab.VAE(
            likelihood="gaussian", latent_dim=2, hidden=(16,), epochs=2, batch_size=50, seed=0
        )
    ],
    # The only check not run is scikit-learn's own array-API check, which skips itself unless
    # SCIPY_ARRAY_API is set; vaelab converts inputs to numpy / torch, not array-API namespaces.
)
def test_scikit_learn_compatible(estimator, check):
    check(estimator)


@pytest.fixture(scope="module")
def fitted() -> vaelab.VAE:
    return vaelab.VAE(**SMALL).fit(X)


def test_init_stores_parameters_verbatim_and_clone_round_trips():
    model = vaelab.VAE(latent_dim=3, hidden=[64, 32], likelihood="laplace", beta=2.5)
    assert model.hidden == [64, 32] and model.beta == 2.5
    assert clone(model).get_params() == model.get_params()
    assert not hasattr(model, "model_")


def test_fit_returns_self_and_sets_learned_state(fitted):
    assert fitted.n_features_in_ == 64
    assert fitted.data_shape_ == (64,)
    assert len(fitted.history_) == 2
    assert isinstance(fitted.model_, vaelab.VAEModel)


def test_outputs_have_documented_shapes(fitted):
    assert fitted.transform(X[:7]).shape == (7, 2)
    assert fitted.inverse_transform(np.zeros((5, 2))).shape == (5, 64)
    assert fitted.reconstruct(X[:4]).shape == (4, 64)
    assert fitted.sample(6).shape == (6, 64)
    assert fitted.elbo(X[:3]).shape == (3,) and fitted.elbo(X[:3]).dtype == np.float64


def test_scores_are_the_elbo_of_the_closed_form(fitted_linear):
    """score_samples is each example's ELBO and score their mean: on a fitted linear-Gaussian
    model both agree with the ELBO in closed form (``LinearGaussianModel.elbo`` of the encoder's
    q) within the Monte Carlo error of the reconstruction term."""
    from vaelab.evaluation.linear import linear_gaussian_from_vae

    estimator, x = fitted_linear
    with torch.no_grad():
        q = estimator.model_.posterior(x)
        exact = linear_gaussian_from_vae(estimator.model_).elbo(
            x.double(), q.mean.double(), q_var=q.variance.double()
        )
    estimated = torch.from_numpy(estimator.score_samples(x.numpy()))
    error = estimated - exact
    assert abs(float(error.mean())) < 4 * float(error.std()) / len(error) ** 0.5
    assert estimator.score(x.numpy()) == pytest.approx(float(exact.mean()), abs=0.05)


def test_scores_do_not_depend_on_batch_composition_or_order(fitted):
    full = fitted.score_samples(X)
    order = np.random.default_rng(0).permutation(len(X))
    # Equal up to float32 rounding: a matrix product's summation order depends on the batch.
    assert np.allclose(fitted.score_samples(X[order]), full[order], rtol=1e-6, atol=1e-5)
    assert np.allclose(fitted.score_samples(X[10:20]), full[10:20], rtol=1e-6, atol=1e-5)


def test_same_seed_same_model_and_global_random_state_untouched():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = vaelab.VAE(**SMALL).fit(X)
    assert torch.equal(torch.get_rng_state(), before)
    b = vaelab.VAE(**SMALL).fit(X)
    assert np.array_equal(a.transform(X), b.transform(X))
    c = vaelab.VAE(**{**SMALL, "seed": 1}).fit(X)
    assert not np.array_equal(a.transform(X), c.transform(X))


def test_verbose_prints_one_line_per_epoch_with_the_history_numbers(capsys):
    """``verbose=True`` prints each epoch's line as it ends, with the numbers of ``history_``;
    under the IWAE bound the line leads with it. ``verbose=False`` prints nothing."""
    quiet = vaelab.VAE(**SMALL).fit(X)
    assert capsys.readouterr().out == ""
    loud = vaelab.VAE(**SMALL, verbose=True).fit(X)
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        f"epoch {m.epoch}/2: ELBO {m.elbo:.3f} (reconstruction {m.reconstruction:.3f}, "
        f"KL {m.kl:.3f}) nats/example"
        for m in loud.history_
    ]
    assert [m.elbo for m in loud.history_] == [m.elbo for m in quiet.history_]
    iwae = vaelab.VAE(**{**SMALL, "epochs": 1}, objective="iwae", k=3, verbose=True).fit(X)
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith(f"epoch 1/1: IWAE-3 {iwae.history_[0].iwae:.3f}, ELBO ")


def test_seed_none_means_fresh_randomness_and_leaves_the_caller_alone():
    """``seed=None``: two fits differ, two samples differ (once, both repeated: None forked the
    global generator and restored it, so every run started from the same state)."""
    torch.manual_seed(5)
    before = torch.get_rng_state()
    a = vaelab.VAE(**{**SMALL, "seed": None}).fit(X)
    b = vaelab.VAE(**{**SMALL, "seed": None}).fit(X)
    assert not np.array_equal(a.transform(X), b.transform(X))
    assert not np.array_equal(a.sample(4), a.sample(4))
    assert torch.equal(torch.get_rng_state(), before)


def test_seeding_never_touches_the_callers_cuda_generators(fitted, monkeypatch):
    """``torch.manual_seed`` reseeds every CUDA device; vaelab seeds only the device it trains
    on, and forks it."""

    def refuse(*args: object) -> None:
        raise AssertionError("a CUDA generator was reseeded")

    monkeypatch.setattr(torch.cuda, "manual_seed_all", refuse)
    monkeypatch.setattr(torch.cuda, "manual_seed", refuse)
    vaelab.VAE(**{**SMALL, "device": "cpu"}).fit(X[:100])
    fitted.sample(2, seed=3)
    fitted.sample(2)


def test_sample_is_reproducible_with_a_seed(fitted):
    assert np.array_equal(fitted.sample(4, seed=7), fitted.sample(4, seed=7))
    drawn = fitted.sample(4, mean=False, seed=7)
    assert set(np.unique(drawn)) <= {0.0, 1.0}  # Bernoulli draws


def test_torch_tensors_give_the_same_model_as_numpy(fitted):
    from_tensor = vaelab.VAE(**SMALL).fit(torch.from_numpy(X))
    assert np.array_equal(from_tensor.transform(torch.from_numpy(X)), fitted.transform(X))


def test_datasets_and_dataloaders_are_accepted():
    labels = torch.from_numpy(DIGITS.target[:400])
    dataset = TensorDataset(torch.from_numpy(X), labels)
    from_dataset = vaelab.VAE(**SMALL).fit(dataset)
    assert from_dataset.transform(X).shape == (400, 2)
    loader = DataLoader(TensorDataset(torch.from_numpy(X)), batch_size=64, shuffle=True)
    from_loader = vaelab.VAE(**SMALL).fit(loader)
    assert from_loader.data_shape_ == (64,) and from_loader.n_features_in_ == 64
    assert len(from_loader.history_) == 2


def test_every_dataloader_batch_is_checked_as_it_streams():
    """Not only the first batch: a value outside the support or a NaN in the sixth batch is
    refused naming that batch, before it reaches the model."""
    outside, missing = X.copy(), X.copy()
    outside[350, 3], missing[350, 3] = 2.0, np.nan
    for bad, problem in (
        (outside, r"bernoulli likelihood needs data in \[0, 1\]"),
        (missing, "NaN"),
    ):
        loader = DataLoader(TensorDataset(torch.from_numpy(bad)), batch_size=64)
        with pytest.raises(ValueError, match=rf"batch 6 of the DataLoader \(epoch 1\).*{problem}"):
            vaelab.VAE(**SMALL).fit(loader)


def test_the_decoder_starts_at_the_mean_of_many_batches_not_the_first():
    """Examples ordered from faint to bold: the first batch's mean is far from the data's; the
    offset must be the data's (the first INIT_EXAMPLES examples, streamed)."""
    order = np.argsort(X.mean(1))
    loader = DataLoader(TensorDataset(torch.from_numpy(X[order])), batch_size=50)
    model = vaelab.VAE(**{**SMALL, "likelihood": "gaussian", "epochs": 1}).fit(loader)
    # The offset is the data mean; the learned σ started at the data's deviation.
    fresh = vaelab.VAE(**{**SMALL, "likelihood": "gaussian", "epochs": 1})
    reference = fresh.fit(X[order])  # arrays: moments of all 400 examples at once
    offset = model.model_.likelihood.offset
    assert torch.allclose(offset, torch.from_numpy(X.mean(0)), atol=1e-6)
    assert torch.allclose(offset, reference.model_.likelihood.offset, atol=1e-6)


def test_float64_and_integer_tensors_follow_the_rules_of_arrays():
    """float64 and uint8 batches are converted to float32 with their values kept, as arrays are:
    the same model as from float32, and 0..16 pixels refused by the Bernoulli naming the batch."""

    def loader(x: torch.Tensor) -> DataLoader:
        return DataLoader(TensorDataset(x), batch_size=64, shuffle=False)

    options = {**SMALL, "likelihood": "gaussian", "device": "cpu"}
    single = vaelab.VAE(**options).fit(loader(torch.from_numpy(X)))
    double = vaelab.VAE(**options).fit(loader(torch.from_numpy(X.astype(np.float64))))
    assert np.array_equal(single.transform(X), double.transform(X))
    pixels = torch.from_numpy(DIGITS.data[:400].astype(np.uint8))
    integers = vaelab.VAE(**options).fit(loader(pixels))
    floats = vaelab.VAE(**options).fit(loader(pixels.float()))
    assert np.array_equal(integers.transform(pixels.numpy()), floats.transform(pixels.numpy()))
    with pytest.raises(ValueError, match=r"batch 1 of the DataLoader .*needs data in \[0, 1\]"):
        vaelab.VAE(**SMALL).fit(loader(pixels))


def test_image_models_take_flat_rows_and_name_both_shapes():
    """An MLP on images [1, 8, 8] reads rows [n, 64] as the same examples (once: "X has 64
    features, but VAE is expecting 1 features"); any other shape is refused naming both."""
    images = X.reshape(-1, 1, 8, 8)
    model = vaelab.VAE(latent_dim=2, hidden=(16,), epochs=1, seed=0).fit(images)
    assert np.array_equal(model.transform(X[:5]), model.transform(images[:5]))
    assert np.array_equal(model.score_samples(X[:5]), model.score_samples(images[:5]))
    assert model.reconstruct(X[:5]).shape == (5, 64)
    with pytest.raises(ValueError, match=r"pass an array \[n, 1, 8, 8\] or flat rows \[n, 64\]"):
        model.transform(X[:, :10])


def test_a_model_saved_on_a_gpu_opens_on_a_machine_without_one(fitted, tmp_path):
    """The file says cuda; loading defaults to a device that exists here."""
    import json

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the file's device exists")
    fitted.save(tmp_path / "m")
    path = tmp_path / "m" / "vaelab.json"
    document = json.loads(path.read_text())
    document["estimator"]["device"] = "cuda"
    path.write_text(json.dumps(document))
    loaded = vaelab.load(tmp_path / "m")
    assert loaded.device_.type == "cpu" and loaded.device == "cpu"
    assert np.array_equal(loaded.transform(X[:5]), fitted.transform(X[:5]))
    assert vaelab.load(tmp_path / "m", device="cpu").device_.type == "cpu"
    with pytest.raises(ValueError, match="'cuda' is not available here"):
        vaelab.load(tmp_path / "m", device="cuda")


def test_hidden_empty_gives_linear_maps():
    model = vaelab.VAE(hidden=(), latent_dim=3, epochs=1, seed=0, likelihood="gaussian").fit(X)
    # An encoder's InputScale divides by a constant: the map stays linear.
    for network in (model.model_.posterior.encoder, model.model_.likelihood.decoder):
        layers = [m for m in network.modules() if not isinstance(m, (nn.Sequential, InputScale))]
        assert [type(m) for m in layers][1:] == [nn.Linear]


def test_images_with_a_convolutional_network():
    images = X.reshape(-1, 1, 8, 8)
    model = vaelab.VAE(network="conv", latent_dim=2, hidden=(32,), epochs=1, seed=0).fit(images)
    assert model.data_shape_ == (1, 8, 8)
    assert model.reconstruct(images[:3]).shape == (3, 1, 8, 8)
    with pytest.raises(ValueError, match=r"shape \(1, 4, 16\), but this VAE was fitted on"):
        model.transform(images.reshape(-1, 1, 4, 16))


def test_pipeline_with_a_scaler():
    pipeline = make_pipeline(StandardScaler(), vaelab.VAE(likelihood="gaussian", **SMALL))
    z = pipeline.fit(DIGITS.data[:400]).transform(DIGITS.data[:10])
    assert z.shape == (10, 2) and np.isfinite(z).all()
    assert np.isfinite(pipeline.score(DIGITS.data[:50]))


def test_data_outside_the_likelihood_support_is_refused(fitted):
    with pytest.raises(ValueError, match=r"bernoulli likelihood needs data in \[0, 1\]"):
        vaelab.VAE(**SMALL).fit(DIGITS.data[:100])  # raw 0..16 values
    with pytest.raises(ValueError, match=r"needs data in \[0, 1\]"):
        fitted.score_samples(X * 2)


def test_nan_and_bad_shapes_are_refused(fitted):
    bad = X.copy()
    bad[3, 5] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        vaelab.VAE(**SMALL).fit(bad)
    with pytest.raises(ValueError, match="X has 10 features, but VAE is expecting 64"):
        fitted.transform(X[:, :10])
    with pytest.raises(ValueError, match="expected latent codes with 2 columns, got 3"):
        fitted.inverse_transform(np.zeros((2, 3)))


def test_unknown_options_are_refused_at_fit():
    with pytest.raises(ValueError, match="unknown likelihood 'poisson'"):
        vaelab.VAE(likelihood="poisson", **SMALL).fit(X)
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        vaelab.VAE(device="tpu", **SMALL).fit(X)


@pytest.mark.parametrize("device", ["mps", "xpu", "meta"])
def test_a_device_torch_cannot_use_here_is_refused_at_fit(device):
    """Once torch's own error from the first tensor moved there (a RuntimeError, an
    AssertionError, or for meta a failed ``.item()``)."""
    if device != "meta" and getattr(torch, device).is_available():
        pytest.skip(f"this machine has a {device} device")
    with pytest.raises(ValueError, match=f"device '{device}' ") as refused:
        vaelab.VAE(device=device, **SMALL).fit(X)
    assert "\n" not in str(refused.value)


def test_log_likelihood_is_above_the_elbo_and_reproducible(fitted):
    log_px = fitted.log_likelihood(X[:50], k=500)
    assert log_px.shape == (50,) and log_px.dtype == np.float64
    assert np.array_equal(log_px, fitted.log_likelihood(X[:50], k=500))
    assert log_px.mean() > fitted.elbo(X[:50]).mean()


def test_refine_reaches_the_best_elbo_of_the_family_and_tightens_iwae(fitted_linear):
    """Non-amortised VI on a fitted linear-Gaussian model, whose best diagonal q for each x and
    whose log p(x) are known in closed form (Cremer et al. 2018's gaps; vaelab.evaluation.ppca): refine's
    ELBO reaches log p(x) − approximation gap, above the encoder's; IWAE with the refined q*
    as proposal is closer to log p(x) than with the encoder's q at the same k."""
    from vaelab.evaluation.linear import linear_gaussian_from_vae

    estimator, x = fitted_linear
    x = x[:40]
    truth = linear_gaussian_from_vae(estimator.model_)
    with torch.no_grad():
        q = estimator.model_.posterior(x)
    exact = truth.inference_gaps(
        x.double(), q.mean.double(), q_var=q.variance.double(), family="diagonal"
    )
    refined = estimator.refine(x.numpy(), steps=1000)
    assert refined.codes.shape == (40, 2) and refined.elbo.shape == (40,)
    difference = torch.from_numpy(refined.elbo) - exact.elbo_optimal
    noise = float(np.sqrt((refined.elbo_standard_error**2).mean() / len(x)))
    # Never above the optimum beyond Monte Carlo noise; below it by the little that 1000 steps
    # of stochastic optimisation leave (about 0.005 nats after 2000).
    assert -0.02 < float(difference.mean()) < 3 * noise
    assert float(torch.from_numpy(refined.elbo).mean()) > float(exact.elbo_amortised.mean())
    log_px = exact.log_px
    amortised = torch.from_numpy(estimator.log_likelihood(x.numpy(), k=20))
    tight = torch.from_numpy(
        estimator.log_likelihood(x.numpy(), k=20, proposal="refined", refine_steps=1000)
    )
    assert float((log_px - tight).abs().mean()) < float((log_px - amortised).abs().mean())
    assert abs(float((tight - log_px).mean())) < 0.01
    with pytest.raises(ValueError, match="unknown proposal 'prior'"):
        estimator.log_likelihood(x.numpy(), proposal="prior")


@pytest.mark.parametrize("flow", ["planar", "iaf"])
def test_refine_gives_codes_for_a_posterior_without_a_closed_form_mean(flow):
    """A flow's q* has no closed-form mean: refine's codes must be E_q*[z] of each example's
    refined q*, not of its amortised q. Checked against a Monte Carlo mean of q* drawn here
    (20 000 draws of torch's sampler) within 4 standard errors of the difference of the two
    estimates (refine's averages ``MEAN_SAMPLES`` draws), where the refined means have moved
    from the amortised codes by many of them. And q* is the better posterior: its ELBO is at
    least the amortised q's on every example, up to 4 standard errors."""
    from vaelab.estimator.facade import EVAL_SEED
    from vaelab.evaluation.gap import estimate_elbo, fit_local_posteriors
    from vaelab.objectives.noise import MEAN_SAMPLES

    x = (load_digits().data[:200] > 8).astype(np.float32)
    estimator = vaelab.VAE(
        posterior=flow, flow_steps=2, latent_dim=2, hidden=(16,), epochs=1, seed=0, device="cpu"
    ).fit(x)
    examples, steps, draws = x[:4], 100, 20_000
    refined = estimator.refine(examples, steps=steps, samples=500)
    assert refined.codes.shape == (4, 2) and np.isfinite(refined.codes).all()

    # The same q* as refine's (same steps and seed), its mean estimated here on its own.
    model = estimator.model_
    local = fit_local_posteriors(model, examples, steps=steps, seed=EVAL_SEED)
    torch.manual_seed(0)
    with torch.no_grad():
        z = local.distribution().sample((draws,)).double()  # [draws, 4, latent]
    mean, spread = z.mean(0).numpy(), z.std(0).numpy()
    error = spread * np.sqrt(1 / draws + 1 / MEAN_SAMPLES)  # of refine's codes − our mean
    assert (np.abs(refined.codes - mean) < 4 * error).all()
    moved = np.abs(estimator.transform(examples) - mean) / error
    assert moved.max() > 8  # amortised codes in place of refined ones would fail above

    with torch.no_grad():
        x_t = torch.from_numpy(examples)
        (amortised,) = estimate_elbo(
            x_t, [model.posterior(x_t)], model.prior(), model.likelihood, 2000, seed=1
        )
    gain = refined.elbo - amortised.elbo.double().numpy()
    noise = np.hypot(refined.elbo_standard_error, amortised.mc_standard_error.double().numpy())
    assert (gain > -4 * noise).all() and gain.mean() > 0


def test_numpy_integers_are_integers_in_a_grid_search_and_in_the_saved_file(tmp_path):
    """``GridSearchCV(VAE(), {"latent_dim": np.arange(2, 4)})`` hands np.int64 sizes; layer sizes
    may be integer arrays: all train, and save as plain JSON integers that load back."""
    import json

    from sklearn.model_selection import GridSearchCV

    base = vaelab.VAE(hidden=np.array([16]), epochs=1, batch_size=100, seed=0, device="cpu")
    search = GridSearchCV(base, {"latent_dim": np.arange(2, 4)}, cv=2).fit(X)
    assert search.best_params_["latent_dim"] in (2, 3)
    flows = vaelab.VAE(
        posterior="planar", flow_steps=np.int64(2), latent_dim=np.int32(2),
        hidden=np.array([8, 8], dtype=np.uint8), epochs=1, seed=0, device="cpu",
    ).fit(X)  # fmt: skip
    layers = vaelab.VAE(latent_dim=np.array([3, 2]), hidden=(8,), epochs=1, seed=0).fit(X)
    assert layers.model_config((64,)).latent_dim == (3, 2)
    for name, model in (("best", search.best_estimator_), ("flows", flows), ("layers", layers)):
        model.save(tmp_path / name)
        document = json.loads((tmp_path / name / "vaelab.json").read_text())
        for part in ("model", "estimator"):
            for key in ("latent_dim", "hidden", "flow_steps"):
                value = document[part][key]
                assert all(type(v) is int for v in (value if isinstance(value, list) else [value]))
        loaded = vaelab.load(tmp_path / name)
        assert np.array_equal(loaded.score_samples(X[:20]), model.score_samples(X[:20]))
    assert document["model"]["latent_dim"] == [3, 2]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"latent_dim": 2.0}, "latent_dim must be a positive integer"),
        ({"latent_dim": np.float64(2)}, "latent_dim must be a positive integer"),
        ({"latent_dim": np.array([2.0, 1.0])}, "latent_dim must be a positive integer"),
        ({"latent_dim": True}, "latent_dim must be a positive integer"),
        ({"hidden": (8.0,)}, "hidden must be a tuple of positive integers"),
        ({"hidden": np.array([True])}, "hidden must be a tuple of positive integers"),
        ({"hidden": (True,)}, "hidden must be a tuple of positive integers"),
        ({"posterior": "planar", "flow_steps": 2.0}, "flow_steps must be a positive integer"),
        ({"posterior": "planar", "flow_steps": np.bool_(True)}, "flow_steps must be a positive"),
    ],
)
def test_floats_and_booleans_are_not_layer_sizes(options, message):
    with pytest.raises(ValueError, match=message):
        vaelab.VAE(**{**SMALL, **options}).fit(X)


def test_a_count_in_the_place_of_y_is_refused_naming_the_keyword_it_meant(fitted):
    """``elbo(X, 100)`` passes 100 as y (the second positional argument), which a VAE without
    conditioning refuses: the message says so and names ``samples=100``."""
    cases = [
        (lambda: fitted.elbo(X[:3], 100), "the number of samples by name, samples=100"),
        (lambda: fitted.elbo_terms(X[:3], np.int64(8)), "the number of samples by name, samples=8"),
        (lambda: fitted.log_likelihood(X[:3], 50), "importance samples by name, k=50"),
        (lambda: fitted.refine(X[:3], 10), "the number of steps by name, steps=10"),
    ]
    for call, words in cases:
        with pytest.raises(ValueError) as refused:
            call()
        message = str(refused.value)
        assert "the second positional argument is y" in message and words in message, message


@pytest.mark.parametrize(
    "options",
    [
        {"objective": "iwae", "k": 3.0},
        {"epochs": 1.5},
        {"batch_size": True},
        {"samples": 2.0},
    ],
)
def test_counts_of_training_are_integers(options):
    """``k=3.0`` once trained as k = 3; a count that is not an integer is refused by name."""
    name = next(key for key in options if key != "objective")
    with pytest.raises(ValueError, match=f"{name} must be an integer, got "):
        vaelab.VAE(**{**SMALL, **options}).fit(X)


def test_numpy_integer_counts_train():
    model = vaelab.VAE(**{**SMALL, "objective": "iwae", "k": np.int64(2), "epochs": np.int32(1)})
    assert np.isfinite(model.fit(X).history_[-1].elbo)
