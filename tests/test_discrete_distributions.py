"""The discrete codes of ``vaelab.distributions.discrete`` against torch.distributions, Monte Carlo
and enumeration."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributions import Bernoulli, Independent, OneHotCategorical, kl_divergence

from vaelab.distributions.discrete import (
    BernoulliCode,
    OneHotCategoricalGroups,
    bernoulli_states,
    categorical_states,
)


def test_states_are_every_code_once():
    assert bernoulli_states(3).unique(dim=0).shape == (8, 3)
    states = categorical_states(3, 4)
    assert states.shape == (64, 12)
    assert states.unique(dim=0).shape == (64, 12)
    assert torch.equal(states.unflatten(-1, (3, 4)).sum(-1), torch.ones(64, 3))


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 5), st.integers(0, 10_000))
def test_bernoulli_probabilities_sum_to_one_and_match_torch(d, seed):
    torch.manual_seed(seed)
    logits = 3 * torch.randn(2, d, dtype=torch.float64)
    q = BernoulliCode(logits)
    states = q.enumerate_support()  # [2^d, 2, d]
    log_q = q.log_prob(states)
    assert torch.allclose(log_q.logsumexp(0), torch.zeros(2, dtype=torch.float64), atol=1e-12)
    reference = Independent(Bernoulli(logits=logits), 1).log_prob(states)
    assert torch.allclose(log_q, reference)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3), st.integers(2, 4), st.integers(0, 10_000))
def test_categorical_probabilities_sum_to_one_and_match_torch(d, k, seed):
    torch.manual_seed(seed)
    logits = 3 * torch.randn(2, d, k, dtype=torch.float64)
    q = OneHotCategoricalGroups(logits)
    states = q.enumerate_support()  # [k^d, 2, d·k]
    log_q = q.log_prob(states)
    assert torch.allclose(log_q.logsumexp(0), torch.zeros(2, dtype=torch.float64), atol=1e-12)
    reference = Independent(OneHotCategorical(logits=logits), 1).log_prob(
        states.unflatten(-1, (d, k))
    )
    assert torch.allclose(log_q, reference)
    entropy = -(log_q.exp() * log_q).sum(0)
    assert torch.allclose(q.entropy(), entropy)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 4), st.integers(0, 10_000))
def test_bernoulli_kl_is_the_enumerated_sum(d, seed):
    torch.manual_seed(seed)
    q = BernoulliCode(4 * torch.randn(3, d, dtype=torch.float64))
    p = BernoulliCode(4 * torch.randn(d, dtype=torch.float64))
    states = q.enumerate_support()
    log_q = q.log_prob(states)
    exact = (log_q.exp() * (log_q - p.log_prob(states))).sum(0)
    assert torch.allclose(kl_divergence(q, p), exact, atol=1e-10)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3), st.integers(2, 4), st.integers(0, 10_000))
def test_categorical_kl_is_the_enumerated_sum(d, k, seed):
    torch.manual_seed(seed)
    q = OneHotCategoricalGroups(4 * torch.randn(3, d, k, dtype=torch.float64))
    p = OneHotCategoricalGroups(torch.zeros(d, k, dtype=torch.float64))
    states = q.enumerate_support()
    log_q = q.log_prob(states)
    exact = (log_q.exp() * (log_q - p.log_prob(states))).sum(0)
    assert torch.allclose(kl_divergence(q, p), exact, atol=1e-10)
    # Against the uniform prior the KL is d log k minus the entropy.
    assert torch.allclose(kl_divergence(q, p), d * math.log(k) - q.entropy(), atol=1e-10)


def test_samples_have_the_code_frequencies():
    torch.manual_seed(0)
    q = OneHotCategoricalGroups(torch.tensor([[0.0, 1.0, 2.0], [2.0, 0.0, -1.0]]))
    z = q.sample((40_000,))  # [40000, 6]
    assert z.shape == (40_000, 6)
    assert torch.allclose(z.mean(0), q.mean, atol=0.01)
    b = BernoulliCode(torch.tensor([-1.0, 0.0, 2.0]))
    assert torch.allclose(b.sample((40_000,)).mean(0), torch.sigmoid(b.logits), atol=0.01)


@pytest.mark.parametrize("family", ["bernoulli", "categorical"])
def test_relaxed_samples_approach_the_discrete_ones_as_the_temperature_falls(family):
    torch.manual_seed(0)
    logits = torch.randn(4, 3) if family == "bernoulli" else torch.randn(4, 3, 5)
    q = BernoulliCode(logits) if family == "bernoulli" else OneHotCategoricalGroups(logits)
    distances = []
    for temperature in (2.0, 0.5, 0.1):
        z = q.relaxed(temperature).rsample((2000,))
        assert z.shape == (2000, *q.batch_shape, *q.event_shape)
        distances.append((z - z.round()).abs().mean().item())
    assert distances[0] > distances[1] > distances[2]
    assert distances[2] < 0.05
    logits.requires_grad_(True)
    q = BernoulliCode(logits) if family == "bernoulli" else OneHotCategoricalGroups(logits)
    q.relaxed(0.5).rsample().sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
