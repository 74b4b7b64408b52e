"""Discrete latent codes (issue 17): the models, the gradient estimators against gradients
computed by enumerating every state, exact evaluation against the bounds it brackets, files,
resumption and the refusals.

Oracles: with a handful of binary units every state can be summed, so log p(x), the ELBO and
the expected IWAE bound are exact numbers, and so are their gradients (autograd on the
enumerated sums, written out here independently of ``vaelab.objectives.discrete``).
"""

from __future__ import annotations

import copy
import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch.distributions import Bernoulli, Independent, OneHotCategorical

import vaelab
from conftest import CrashAfter, vaelab_cli
from vaelab.distributions.discrete import BernoulliCode, FlatGroups, OneHotCategoricalGroups
from vaelab.evaluation.exact import exact_elbo, exact_log_likelihood, exact_posterior
from vaelab.model.registry import ModelConfig, build_model
from vaelab.objectives.bounds import elbo
from vaelab.objectives.discrete import discrete_elbo, discrete_iwae, state_weights
from vaelab.train.checkpoint import CheckpointPolicy, load_checkpoint
from vaelab.train.config import TrainConfig
from vaelab.train.trainer import Trainer

CPU = torch.device("cpu")


def digits(n: int = 300) -> np.ndarray:
    return (load_digits().data[:n] / 16 > 0.5).astype(np.float32)


@pytest.fixture(scope="module")
def fitted() -> vaelab.VAE:
    """Eight binary units fitted by VAE.fit with the exact gradient (3 s; a KL of 2.5 nats)."""
    return vaelab.VAE(
        latent="bernoulli",
        latent_dim=8,
        hidden=(64,),
        epochs=30,
        lr=1e-2,
        gradient="enumerate",
        seed=0,
        device="cpu",
    ).fit(digits(500))


def small(latent: str = "bernoulli", d: int = 2, seed: int = 0, **options: object):
    """A tiny float64 model on 64 binary pixels, few enough states to enumerate tuples of them."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        config = ModelConfig(
            data_shape=(64,), latent_dim=d, hidden=(16,), latent=latent, categories=3, **options
        )
        return build_model(config).double().eval()


# ---------------------------------------------------------------------------- exact oracles


def brute_log_px(model, x: torch.Tensor) -> torch.Tensor:
    """log Σ_z p(x|z) p(z) with torch.distributions, one state at a time."""
    p = model.prior()
    states = p.enumerate_support(expand=False)
    joint = [
        Independent(Bernoulli(logits=model.likelihood.decoder_params(s)[0]), 1).log_prob(x)
        + p.log_prob(s)
        for s in states
    ]
    return torch.logsumexp(torch.stack(joint), 0)


@pytest.mark.parametrize("latent", ["bernoulli", "categorical"])
def test_exact_log_likelihood_is_the_sum_over_states(latent):
    model = small(latent, d=3)
    x = torch.from_numpy(digits(20)).double()
    with torch.no_grad():
        found = exact_log_likelihood(model, x)
        torch.testing.assert_close(found, brute_log_px(model, x))
        posterior = exact_posterior(model, x).exp()  # [states, n]
    torch.testing.assert_close(posterior.sum(0), torch.ones(20, dtype=torch.float64))


def test_elbo_iwae_and_exact_are_ordered_and_iwae_converges(fitted):
    x = digits(300)[:60]
    exact = fitted.log_likelihood(x, exact=True)
    with torch.no_grad():
        elbo_exact = exact_elbo(fitted.model_, torch.from_numpy(x)).double().numpy()
    iwae = {k: fitted.log_likelihood(x, k=k) for k in (1, 10, 1000)}
    # The exact and Monte Carlo ELBO agree; ELBO ≤ log p(x) for every example, the IWAE
    # estimates between them, reaching log p(x) to Monte Carlo noise as k grows.
    assert fitted.elbo(x, samples=500).mean() == pytest.approx(elbo_exact.mean(), abs=0.05)
    assert (elbo_exact <= exact + 1e-4).all()
    gap = exact.mean() - elbo_exact.mean()
    assert gap > 0.2  # a posterior q(z|x) visibly not the exact one
    assert elbo_exact.mean() + 0.5 * gap < iwae[10].mean() <= exact.mean() + 0.02
    assert abs(iwae[1000].mean() - exact.mean()) < 0.02 < abs(iwae[1].mean() - exact.mean())


# ------------------------------------------------------------------ gradients by enumeration


def grads(model, value: torch.Tensor) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    value.sum().backward()
    return torch.cat(
        [
            (p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
            for name, p in model.named_parameters()
            if not name.startswith("posterior.estimator")
        ]
    )


def enumerated_elbo_by_hand(model, x: torch.Tensor) -> torch.Tensor:
    """Σ_z q(z|x) [log p(x|z) + log p(z) − log q(z|x)], torch.distributions only."""
    logits = model.posterior.encoder(x)
    q = Independent(Bernoulli(logits=logits), 1)
    p = Independent(Bernoulli(logits=model.prior.logits), 1)
    total = 0
    for s in itertools.product([0.0, 1.0], repeat=logits.shape[-1]):
        z = torch.tensor(s, dtype=x.dtype)
        decoder = Independent(Bernoulli(logits=model.likelihood.decoder_params(z)[0]), 1)
        log_q = q.log_prob(z.expand_as(logits))
        total = total + log_q.exp() * (decoder.log_prob(x) + p.log_prob(z) - log_q)
    return total


def expected_iwae_by_hand(model, x: torch.Tensor, k: int) -> torch.Tensor:
    """E over every k-tuple of states of log (1/k) Σᵢ p(x, zᵢ)/q(zᵢ|x): the IWAE bound's
    expectation, exact."""
    q, p = model.posterior(x), model.prior()
    states = p.enumerate_support(expand=False)  # [S, d]
    log_w = torch.stack(
        [model.likelihood.log_prob(x, s.expand(x.shape[0], -1)) + p.log_prob(s) for s in states]
    ) - q.log_prob(states.unsqueeze(1))  # [S, batch]
    log_q = q.log_prob(states.unsqueeze(1))
    total = 0
    for tup in itertools.product(range(states.shape[0]), repeat=k):
        index = list(tup)
        weight = log_q[index].sum(0).exp()
        total = total + weight * (torch.logsumexp(log_w[index], 0) - math.log(k))
    return total


def test_enumerate_gives_the_exact_gradient():
    model = small(d=3)
    x = torch.from_numpy(digits(4)).double()
    found = grads(
        model,
        elbo(x, model.posterior, model.prior, model.likelihood, gradient="enumerate").objective,
    )
    expected = grads(model, enumerated_elbo_by_hand(model, x))
    torch.testing.assert_close(found, expected)
    value = elbo(x, model.posterior, model.prior, model.likelihood, gradient="enumerate").elbo
    torch.testing.assert_close(value, enumerated_elbo_by_hand(model, x).detach())


@pytest.mark.parametrize("latent", ["bernoulli", "categorical"])
def test_state_log_probs_is_log_prob_of_every_state_and_example(latent):
    """The [states, batch] table of log q that the enumerated ELBO sums over, one matrix product,
    against torch's own log-probabilities of every state broadcast over the batch, and against
    the probabilities summing to one per example."""
    torch.manual_seed(0)
    if latent == "bernoulli":
        q = BernoulliCode(torch.randn(5, 4, dtype=torch.float64) * 3)
        reference = Independent(Bernoulli(logits=q.logits), 1)
    else:
        logits = torch.randn(5, 3, 4, dtype=torch.float64) * 3
        q = OneHotCategoricalGroups(logits)
        reference = FlatGroups(Independent(OneHotCategorical(logits=logits), 1))
    states = q.enumerate_support(expand=False).flatten(0, -2)
    table = q.state_log_probs(states)
    assert table.shape == (q.state_count, 5)
    torch.testing.assert_close(table, reference.log_prob(states.unsqueeze(1)))
    torch.testing.assert_close(table.logsumexp(0), torch.zeros(5, dtype=torch.float64))


def test_state_weights_hold_no_subnormal_numbers_and_keep_the_exact_elbo():
    """q below the square root of float32's smallest normal number becomes exactly 0 (subnormal
    products slowed the enumerated step 3×), the rest is exp(log q); a sharp float32 posterior's enumerated ELBO and
    gradient still match the sum by hand."""
    log_q = torch.tensor([0.0, -20.0, -43.0, -44.0, -90.0, -200.0])
    weights = state_weights(log_q)
    tiny = torch.finfo(torch.float32).tiny
    assert not ((weights > 0) & (weights < tiny**0.5)).any()
    torch.testing.assert_close(weights[:3], log_q[:3].exp(), rtol=0, atol=0)
    assert (weights[3:] == 0).all()
    model = small(d=8).float()
    with torch.no_grad():
        for parameter in model.posterior.encoder.parameters():
            parameter.mul_(30)  # logits of tens: most states' q far below e^−87
    x = torch.from_numpy(digits(4))
    q = model.posterior(x)
    log_q = q.state_log_probs(q.enumerate_support(expand=False).flatten(0, -2))
    assert (log_q < math.log(tiny)).float().mean() > 0.3
    found = elbo(x, model.posterior, model.prior, model.likelihood, gradient="enumerate")
    reference = copy.deepcopy(model).double()  # by hand in float64: float32 rounding aside
    expected = enumerated_elbo_by_hand(reference, x.double())
    torch.testing.assert_close(found.elbo.double(), expected.detach(), rtol=1e-4, atol=1e-2)
    torch.testing.assert_close(
        grads(model, found.objective).double(), grads(reference, expected), rtol=1e-3, atol=1e-3
    )


def mean_gradient(model, objective, draws: int, repeats: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard error of ``repeats`` gradients, each of the mean of ``draws`` draws."""
    found = torch.stack([grads(model, objective(draws)) / draws for _ in range(repeats)])
    return found.mean(0), found.std(0) / math.sqrt(repeats)


def one_example_repeated(n: int) -> torch.Tensor:
    return torch.from_numpy(digits(3)[2:3]).double().expand(n, -1)


@pytest.mark.parametrize("baseline", [True, False], ids=["nvil", "plain"])
def test_reinforce_is_unbiased_for_the_elbo(baseline):
    model = small(d=2)
    torch.manual_seed(0)
    x = one_example_repeated(1)
    exact = grads(model, enumerated_elbo_by_hand(model, x))

    def objective(n: int) -> torch.Tensor:
        return discrete_elbo(
            one_example_repeated(n), model.posterior(one_example_repeated(n)), model.posterior,
            model.prior(), model.likelihood, baseline=baseline,
        )[3]  # fmt: skip

    mean, error = mean_gradient(model, objective, 200, 100)
    t = (mean - exact) / error.clamp_min(1e-8)
    assert t.abs().max() < 4, t


def test_nvil_normalisation_scales_the_whole_encoder_gradient_alike():
    """With NVIL's running standard deviation at 20, the encoder's gradient is the exact ELBO
    gradient divided by 20 — the closed-form KL's part too, not only the normalised score
    (unscaled, the KL outweighed the score 20 to 1 and pulled q onto the prior: 16 binary units
    on MNIST collapsed to a KL of 0.001 nats) — and the decoder's is the exact one."""
    model = small(d=2)
    model.posterior.estimator.signal_var.fill_(400.0)
    torch.manual_seed(0)
    x = one_example_repeated(1)
    factor = torch.cat(
        [
            torch.full((p.numel(),), 1 / 20 if name.startswith("posterior.encoder") else 1.0)
            for name, p in model.named_parameters()
            if not name.startswith("posterior.estimator")
        ]
    ).double()
    expected = grads(model, enumerated_elbo_by_hand(model, x)) * factor

    def objective(n: int) -> torch.Tensor:
        return discrete_elbo(
            one_example_repeated(n), model.posterior(one_example_repeated(n)), model.posterior,
            model.prior(), model.likelihood,
        )[3]  # fmt: skip

    mean, error = mean_gradient(model, objective, 200, 100)
    t = (mean - expected) / error.clamp_min(1e-8)
    assert t.abs().max() < 4, t


@pytest.mark.parametrize("gradient", ["vimco", "reinforce"])
def test_iwae_estimators_are_unbiased_for_the_expected_bound(gradient):
    model, k = small(d=2), 3
    torch.manual_seed(1)
    exact = grads(model, expected_iwae_by_hand(model, one_example_repeated(1), k))

    def objective(n: int) -> torch.Tensor:
        x = one_example_repeated(n)
        return discrete_iwae(x, model.posterior(x), model.posterior, model.prior(), model.likelihood, k=k, gradient=gradient)[2]  # fmt: skip

    mean, error = mean_gradient(model, objective, 200, 100)
    t = (mean - exact) / error.clamp_min(1e-8)
    assert t.abs().max() < 4, t


def test_the_relaxed_gradient_is_biased_and_its_bias_shrinks_with_the_temperature():
    model = small(d=2)
    exact = grads(model, enumerated_elbo_by_hand(model, one_example_repeated(1)))
    bias = {}
    for temperature in (2.0, 0.2):
        model.posterior.estimator.temperature = temperature
        torch.manual_seed(2)

        def objective(n: int) -> torch.Tensor:
            x = one_example_repeated(n)
            return elbo(
                x, model.posterior, model.prior, model.likelihood, gradient="relaxed"
            ).objective

        mean, error = mean_gradient(model, objective, 500, 40)
        bias[temperature] = float((mean - exact).norm())
        if temperature == 2.0:  # far beyond the noise: a biased estimator
            assert ((mean - exact).abs() / error.clamp_min(1e-8)).max() > 10
    assert bias[0.2] < 0.5 * bias[2.0], bias


def encoder_variance(model, objective, draws: int = 400) -> float:
    """Summed variance of one draw's encoder gradient (per-parameter variances added)."""
    encoder = [p for p in model.posterior.encoder.parameters()]
    found = []
    for _ in range(draws):
        model.zero_grad(set_to_none=True)
        objective().sum().backward()
        found.append(torch.cat([p.grad.flatten() for p in encoder]))
    return float(torch.stack(found).var(0).sum())


def test_vimco_and_nvil_have_lower_variance_than_plain_reinforce(fitted):
    model = copy.deepcopy(fitted.model_).double().eval()
    x = torch.from_numpy(digits(6)[5:6]).double()
    k = 5

    def iwae_with(gradient: str, baseline: bool = True):
        return lambda: discrete_iwae(x, model.posterior(x), model.posterior, model.prior(), model.likelihood, k=k, gradient=gradient, baseline=baseline)[2]  # fmt: skip

    def elbo_with(baseline: bool):
        return lambda: discrete_elbo(x, model.posterior(x), model.posterior, model.prior(), model.likelihood, samples=k, baseline=baseline)[3]  # fmt: skip

    torch.manual_seed(3)
    state = model.posterior.estimator
    state.eval()  # no normalisation (moments 0 and 1, not updated): a fair comparison
    # NVIL's baseline b_ψ(x), trained on its own loss for this example (a fit trains it).
    optimiser = torch.optim.Adam(state.baseline.parameters(), lr=0.05)
    for _ in range(200):
        optimiser.zero_grad()
        (-elbo_with(True)().sum()).backward()
        optimiser.step()
    plain_iwae = encoder_variance(model, iwae_with("reinforce", baseline=False))
    vimco = encoder_variance(model, iwae_with("vimco"))
    plain_elbo = encoder_variance(model, elbo_with(False))
    nvil = encoder_variance(model, elbo_with(True))
    assert vimco < 0.5 * plain_iwae, (vimco, plain_iwae)
    assert nvil < 0.5 * plain_elbo, (nvil, plain_elbo)


# ------------------------------------------------------------------------ files and resuming


def test_save_load_round_trip(fitted, tmp_path):
    fitted.save(tmp_path / "m")
    loaded = vaelab.load(tmp_path / "m")
    assert loaded.latent == "bernoulli" and loaded.model_config_.latent == "bernoulli"
    x = digits(20)
    np.testing.assert_array_equal(loaded.transform(x), fitted.transform(x))
    np.testing.assert_array_equal(
        loaded.log_likelihood(x, exact=True), fitted.log_likelihood(x, exact=True)
    )
    torch.testing.assert_close(
        loaded.model_.posterior.estimator.signal_var, fitted.model_.posterior.estimator.signal_var
    )


def test_old_model_configurations_load_as_gaussian():
    old = ModelConfig(data_shape=(4,)).to_json()
    del old["latent"], old["categories"]
    assert ModelConfig.from_json(old).latent == "gaussian"


@pytest.mark.parametrize(
    ("latent", "settings"),
    [
        ("bernoulli", {}),
        ("categorical", {"objective": "iwae", "k": 3, "gradient": "vimco"}),
        ("bernoulli", {"gradient": "relaxed", "temperature": 2.0, "temperature_final": 0.5}),
    ],
    ids=["nvil", "vimco", "relaxed-annealed"],
)
def test_a_discrete_run_killed_mid_epoch_resumes_bit_identical(tmp_path, latent, settings):
    x = torch.from_numpy(digits(96))
    config = TrainConfig(epochs=2, batch_size=16, lr=3e-3, **settings)
    from vaelab.train.batches import IndexedBatches

    def fit(path: Path | None, observer=None, seed: int = 0) -> Trainer:
        train = IndexedBatches(x, 16, 5)
        policy = None if path is None else CheckpointPolicy(path, every_steps=3, every_seconds=None)
        trainer = Trainer(
            small(latent, d=3, seed=seed).float().train(), config, CPU, observer=observer, checkpoint=policy
        )  # fmt: skip
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(11)
            trainer.fit(train)
        return trainer

    reference = fit(None)
    path = tmp_path / "checkpoint.safetensors"
    with pytest.raises(SystemExit):
        fit(path, CrashAfter(8))
    tensors, state = load_checkpoint(path)
    resumed = Trainer(small(latent, d=3, seed=99).float().train(), config, CPU)
    train = IndexedBatches(x, 16, 5)
    resumed.restore(tensors, state, train)
    resumed.fit(train)
    a, b = reference.model.state_dict(), resumed.model.state_dict()
    assert any("signal_var" in key for key in a)  # NVIL's running moments are in the state
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ---------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"latent": "bernoulli", "gradient": "stl"}, "needs reparameterised draws"),
        ({"latent": "bernoulli", "objective": "iwae", "k": 3, "gradient": "dreg"}, "needs reparameterised draws"),
        ({"gradient": "reinforce"}, "is an estimator for discrete latents"),
        ({"latent": "bernoulli", "gradient": "vimco"}, "is an estimator for the IWAE bound"),
        ({"latent": "bernoulli", "objective": "iwae", "k": 1, "gradient": "vimco"}, "needs k ≥ 2"),
        ({"latent": "bernoulli", "objective": "iwae", "k": 2, "gradient": "enumerate"}, "sums the ELBO over every state"),
        ({"latent": "bernoulli", "latent_dim": 17, "gradient": "enumerate"}, "more than 65536"),
        ({"latent": "bernoulli", "posterior": "full"}, "a discrete posterior is its encoder's logits"),
        ({"latent": "categorical", "posterior": "iaf"}, "flows transform continuous codes"),
        ({"latent": "bernoulli", "prior": "vamp"}, "a discrete prior is factorised"),
        ({"latent": "bernoulli", "prior": "mixture"}, "a discrete prior is factorised"),
        ({"latent": "bernoulli", "latent_dim": (3, 2)}, "has one stochastic layer"),
        ({"latent": "categorical", "categories": 1}, "categories must be an integer of at least 2"),
        ({"latent": "binary"}, "unknown latent 'binary'"),
        ({"latent": "bernoulli", "temperature": 0.5}, "set the relaxation of gradient='relaxed'"),
        ({"latent": "bernoulli", "gradient": "relaxed", "temperature": 0.0}, "temperature must be positive"),
    ],
)  # fmt: skip
def test_meaningless_combinations_are_refused_in_one_line(options, fragment):
    with pytest.raises(ValueError, match=fragment):
        vaelab.VAE(hidden=(8,), epochs=1, device="cpu", **options).fit(digits(40))


def test_conditional_discrete_models_are_refused():
    with pytest.raises(ValueError, match="implemented without conditioning"):
        vaelab.VAE(latent="bernoulli", conditional=True, epochs=1, device="cpu").fit(
            digits(40), load_digits().target[:40]
        )


def test_exact_evaluation_refuses_gaussian_codes_and_too_many_states():
    gaussian = vaelab.VAE(latent_dim=2, hidden=(8,), epochs=1, device="cpu").fit(digits(40))
    with pytest.raises(ValueError, match="this model's is Gaussian"):
        gaussian.log_likelihood(digits(4), exact=True)
    large = vaelab.VAE(latent="categorical", latent_dim=7, categories=8, hidden=(8,), epochs=1, device="cpu").fit(digits(40))  # fmt: skip
    with pytest.raises(ValueError, match="2097152 states, more than 1048576"):
        large.log_likelihood(digits(4), exact=True)


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("runs")
    data = folder / "digits.npz"
    np.savez(data, images=digits(240).reshape(-1, 1, 8, 8), labels=load_digits().target[:240])
    return data


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--latent", "bernoulli", "--gradient", "stl"], "needs reparameterised draws"),
        (["--latent", "bernoulli", "--prior", "vamp"], "a discrete prior is factorised"),
        (["--gradient", "vimco", "--objective", "iwae", "--k", "3"], "is an estimator for discrete latents"),
    ],
)  # fmt: skip
def test_the_command_line_refuses_in_one_line(capsys, saved_run, tmp_path, argv, fragment):
    code, out, err = vaelab_cli(capsys, "train", saved_run, "--out", tmp_path / "m", *argv)
    assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "m").exists()


def test_evaluate_exact_and_the_refusals_of_a_discrete_model(capsys, saved_run, tmp_path):
    folder = tmp_path / "m"
    argv = ["train", saved_run, "--out", folder, "--quiet", "--epochs", "1", "--hidden", "16"]
    assert vaelab_cli(capsys, *argv, "--latent", "bernoulli", "--latent-dim", "4")[0] == 0
    code, out, err = vaelab_cli(capsys, "evaluate", folder, "--exact", "--k", "50", "--json")
    assert code == 0, err
    import json

    result = json.loads(out)
    assert result["exact"]["states"] == 16 and result["exact"]["bound"] == "exact"
    assert result["elbo"] <= result["iwae"]["mean"] <= result["exact"]["mean"] + 0.01
    for argv, fragment in (
        (["evaluate", folder, "--ais", "5"], "needs a continuous code"),
        (["gap", folder, "--n", "3"], "its exact gap is log p(x) − ELBO"),
    ):
        code, out, err = vaelab_cli(capsys, *argv)
        assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.slow  # onnxruntime: the export extra, which make test-slow installs
@pytest.mark.parametrize("latent", ["bernoulli", "categorical"])
def test_onnx_export_of_a_discrete_model_gives_the_probabilities(latent, tmp_path):
    runtime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = vaelab.VAE(
        latent=latent, latent_dim=3, categories=3, hidden=(8,), epochs=1, device="cpu"
    )
    model.fit(digits(40))
    model.export_onnx(tmp_path / "onnx")
    session = runtime.InferenceSession(str(tmp_path / "onnx" / "encoder.onnx"))
    x = digits(5)
    (loc, *_) = session.run(None, {"x": x})
    np.testing.assert_allclose(loc, model.transform(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("straight_through", [False, True])
def test_a_relaxed_objective_reports_the_discrete_bounds(straight_through):
    model = small(d=3)
    x = torch.from_numpy(digits(8)).double()
    model.posterior.estimator.straight_through = straight_through
    model.posterior.estimator.temperature = 0.3
    noise = torch.randn(4, 8, 3, dtype=torch.float64)
    relaxed = model.elbo(x, samples=4, noise=noise, gradient="relaxed")
    discrete = model.elbo(x, samples=4, noise=noise, gradient="reinforce")
    torch.testing.assert_close(relaxed.elbo, discrete.elbo, rtol=0, atol=0)
    torch.testing.assert_close(relaxed.objective.detach(), discrete.elbo, rtol=0, atol=0)
    bound = model.iwae(x, k=4, noise=noise, gradient="relaxed").bound
    torch.testing.assert_close(bound, model.iwae(x, k=4, noise=noise, gradient="vimco").bound)


def test_the_temperature_is_annealed_exponentially_during_training():
    config = TrainConfig(gradient="relaxed", temperature=2.0, temperature_final=0.5)
    assert config.temperature_at(0, 100) == 2.0 and config.temperature_at(100, 100) == 0.5
    assert config.temperature_at(50, 100) == pytest.approx(1.0)
    model = vaelab.VAE(
        latent="bernoulli", latent_dim=3, hidden=(8,), epochs=2, batch_size=20, device="cpu",
        gradient="relaxed", temperature=2.0, temperature_final=0.5, seed=0,
    ).fit(digits(40))  # fmt: skip
    # The last of 4 steps ran at 2 · (1/4)^(3/4).
    assert model.model_.posterior.estimator.temperature == pytest.approx(2 * 0.25**0.75)


def test_a_discrete_code_refuses_top_down_inference():
    with pytest.raises(ValueError, match="leave inference='bottom-up'"):
        vaelab.VAE(latent="bernoulli", latent_dim=4, inference="top-down", epochs=1).fit(
            np.zeros((20, 4), dtype=np.float32)
        )
