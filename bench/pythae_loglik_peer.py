"""The pythae side of ``bench_loglik.py``; runs in the peers venv, launched through ``peers.run``.

It rebuilds a vaelab MLP VAE (diagonal Gaussian q, standard normal prior, Bernoulli likelihood)
inside pythae 0.1.2 from the exported weights and does one of two jobs:

- ``"sanity"``: with the noise ε chosen by the caller, each example's one-sample ELBO through
  ``VAE.forward`` and its IWAE-k estimate through ``VAE.get_nll``, for comparison with vaelab;
- ``"time"``: one warm-up, then ``VAE.get_nll(x, n_samples=k, batch_size=...)`` timed.

The network is the same function as vaelab's: ``[μ, log σ²] = encoder(x)`` (first half μ), and
the decoder gives ``sigmoid(logits + offset)``, because pythae's "bce" likelihood takes
probabilities where vaelab's Bernoulli takes logits.
"""

from __future__ import annotations

import importlib.metadata
import time
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
from pythae.models import VAE, VAEConfig
from pythae.models.base.base_utils import ModelOutput
from pythae.models.nn import BaseDecoder, BaseEncoder
from torch import nn

import peers


def body(spec: list[dict[str, str]], weights: dict[str, np.ndarray]) -> nn.Sequential:
    """Linear layers and activations in ``spec`` order, e.g. ``{"linear": "enc0"}`` (weights
    ``enc0.weight``, ``enc0.bias``) and ``{"activation": "Tanh"}`` (a ``torch.nn`` class)."""
    layers: list[nn.Module] = []
    for item in spec:
        if "linear" in item:
            weight = torch.from_numpy(weights[item["linear"] + ".weight"])
            bias = torch.from_numpy(weights[item["linear"] + ".bias"])
            linear = nn.Linear(weight.shape[1], weight.shape[0])
            with torch.no_grad():
                linear.weight.copy_(weight)
                linear.bias.copy_(bias)
            layers.append(linear)
        else:
            layers.append(getattr(nn, item["activation"])())
    return nn.Sequential(*layers)


class Encoder(BaseEncoder):
    """x ``[batch, *data_shape]`` → μ, log σ² ``[batch, latent]`` each."""

    def __init__(self, layers: nn.Sequential, latent_dim: int) -> None:
        BaseEncoder.__init__(self)
        self.layers = layers
        self.latent_dim = latent_dim

    def forward(self, x: torch.Tensor) -> ModelOutput:
        mu, log_var = self.layers(x.reshape(x.shape[0], -1)).split(self.latent_dim, dim=-1)
        return ModelOutput(embedding=mu, log_covariance=log_var)


class Decoder(BaseDecoder):
    """z ``[batch, latent]`` → Bernoulli means ``[batch, *data_shape]``; counts the codes it
    decodes, to report how many samples ``get_nll`` really evaluates."""

    def __init__(self, layers: nn.Sequential, offset: torch.Tensor) -> None:
        BaseDecoder.__init__(self)
        self.layers = layers
        self.register_buffer("offset", offset)
        self.decoded = 0

    def forward(self, z: torch.Tensor) -> ModelOutput:
        self.decoded += z.shape[0]
        logits = self.layers(z).reshape(z.shape[0], *self.offset.shape) + self.offset
        return ModelOutput(reconstruction=torch.sigmoid(logits))


def build(args: dict[str, Any], weights: dict[str, np.ndarray]) -> VAE:
    config = VAEConfig(
        input_dim=tuple(args["data_shape"]),
        latent_dim=args["latent_dim"],
        reconstruction_loss="bce",
    )
    encoder = Encoder(body(args["encoder"], weights), args["latent_dim"])
    decoder = Decoder(body(args["decoder"], weights), torch.from_numpy(weights["offset"]))
    return VAE(config, encoder=encoder, decoder=decoder).eval()


def with_noise(model: VAE, eps: torch.Tensor) -> None:
    """Make the model's reparameterised draws use ``eps`` (``[rows, latent]``) instead of
    ``randn_like``: the only way to give ``forward`` and ``get_nll`` the caller's noise."""
    model._sample_gauss = lambda mu, std: (mu + eps * std, eps)  # type: ignore[method-assign]


def sanity(model: VAE, args: dict[str, Any], arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    x = torch.from_numpy(arrays["x"])
    eps = torch.from_numpy(arrays["eps"])  # [n, latent]
    eps_iw = torch.from_numpy(arrays["eps_iw"])  # [k, n, latent]
    k = eps_iw.shape[0]
    elbo, log_px = [], []
    with torch.no_grad():
        for i in range(x.shape[0]):
            with_noise(model, eps[i : i + 1])
            elbo.append(-float(model({"data": x[i : i + 1]}).loss))
            with_noise(model, eps_iw[:, i])
            log_px.append(float(model.get_nll(x[i : i + 1], n_samples=k, batch_size=k)))
    return {"elbo": elbo, "log_px": log_px, "k": k}


def timed(model: VAE, args: dict[str, Any], arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    x = torch.from_numpy(arrays["x"])
    k, batch_size = args["k"], args["batch_size"]
    torch.manual_seed(args["seed"])
    grad = nullcontext() if args["grad"] else torch.no_grad()
    with grad:
        # Warm-up: one example, one batch of samples (allocator, thread pool, first-call costs).
        model.get_nll(x[:1], n_samples=batch_size, batch_size=batch_size)
        model.decoder.decoded = 0
        cpu = time.process_time()
        start = time.perf_counter()
        estimate = model.get_nll(x, n_samples=k, batch_size=batch_size)
        seconds = time.perf_counter() - start
        cpu = time.process_time() - cpu
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "mean_log_px": float(estimate),
        "examples": int(x.shape[0]),
        "decoded_per_example": model.decoder.decoded / x.shape[0],
    }


def main() -> None:
    folder = peers.job_folder()
    args, arrays = peers.read_job(folder)
    if args.get("threads"):
        torch.set_num_threads(args["threads"])
    model = build(args, arrays)
    result = sanity(model, args, arrays) if args["job"] == "sanity" else timed(model, args, arrays)
    result["versions"] = {
        name: importlib.metadata.version(name) for name in ("torch", "pythae", "numpy")
    }
    result["threads"] = torch.get_num_threads()
    peers.write_result(folder, result)


if __name__ == "__main__":
    main()
