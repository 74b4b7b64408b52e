"""The pythae side of ``bench_iwae.py``; runs in the peers venv, launched through ``peers.run``.

It rebuilds a vaelab MLP VAE (diagonal Gaussian q, standard normal prior, Bernoulli likelihood)
as pythae 0.1.2's ``IWAE`` (``number_samples=k``, ``reconstruction_loss="bce"``) from the exported
weights, with the encoder and decoder classes of ``pythae_loglik_peer.py``, and does one of two
jobs:

- ``"sanity"``: with the caller's noise ε ``[k, batch, latent]``, one forward pass and one backward
  pass of ``IWAE.forward(...).loss``; it returns pythae's per-sample log weights (read off the
  arguments of its own ``loss_function``), the IWAE-k bound they give, the loss value, and the
  gradient of every ``Linear`` layer, for comparison with vaelab's;
- ``"time"``: ``epochs`` epochs of the minimal training loop over the data sent (a permutation per
  epoch, one slice per batch, ``torch.optim.Adam`` as pythae's ``BaseTrainer`` builds it, the loss
  that ``IWAE.forward`` returns, ``backward``, ``step``), after one warm-up step, timed.

pythae's ``IWAE.loss_function`` returns −Σᵢ w̃ᵢ log wᵢ with the normalised weights w̃ detached: a
surrogate whose gradient is the IWAE bound's (Burda et al. 2016, eq. 14), not the bound itself,
so the bound is computed here from the same log weights, as log (1/k) Σᵢ wᵢ.
"""

from __future__ import annotations

import importlib.metadata
import math
import time
from typing import Any

import numpy as np
import torch
from pythae.models import IWAE, IWAEConfig

import peers
from pythae_loglik_peer import Decoder, Encoder, body


def build(args: dict[str, Any], weights: dict[str, np.ndarray]) -> IWAE:
    config = IWAEConfig(
        input_dim=tuple(args["data_shape"]),
        latent_dim=args["latent_dim"],
        reconstruction_loss="bce",
        number_samples=args["k"],
    )
    encoder = Encoder(body(args["encoder"], weights), args["latent_dim"])
    decoder = Decoder(body(args["decoder"], weights), torch.from_numpy(weights["offset"]))
    return IWAE(config, encoder=encoder, decoder=decoder).train()


def linear_gradients(model: IWAE) -> dict[str, np.ndarray]:
    """Gradients of the encoder's and decoder's ``Linear`` layers, named as the exported weights
    (``enc0.weight``, …; ``body`` keeps the export's layer order)."""
    found = {}
    for prefix, part in (("enc", model.encoder.layers), ("dec", model.decoder.layers)):
        linears = [m for m in part if isinstance(m, torch.nn.Linear)]
        for i, layer in enumerate(linears):
            found[f"grad.{prefix}{i}.weight"] = layer.weight.grad.numpy()
            found[f"grad.{prefix}{i}.bias"] = layer.bias.grad.numpy()
    return found


def sanity(
    model: IWAE, arrays: dict[str, np.ndarray]
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    x = torch.from_numpy(arrays["x"])  # [batch, D]
    eps = torch.from_numpy(arrays["eps"])  # [k, batch, latent], vaelab's layout
    k = eps.shape[0]
    # pythae repeats μ and σ to [batch, k, latent] before drawing; give it the same ε there.
    model._sample_gauss = lambda mu, std: (  # type: ignore[method-assign]
        mu + eps.transpose(0, 1) * std,
        eps.transpose(0, 1),
    )
    seen: dict[str, torch.Tensor] = {}
    original = model.loss_function

    def spy(recon_x, x_, mu, log_var, z):  # type: ignore[no-untyped-def]
        # pythae's own log weights, from the arguments its loss sees (the same formula).
        recon = torch.nn.functional.binary_cross_entropy(
            recon_x, x_.reshape(recon_x.shape[0], -1).unsqueeze(1).repeat(1, k, 1), reduction="none"
        ).sum(-1)
        log_q = (-0.5 * (log_var + (z - mu).pow(2) / log_var.exp())).sum(-1)
        log_p = -0.5 * z.pow(2).sum(-1)
        seen["log_w"] = (-(recon + log_q - log_p)).detach()  # [batch, k]
        return original(recon_x, x_, mu, log_var, z)

    model.loss_function = spy  # type: ignore[method-assign]
    model.zero_grad(set_to_none=True)
    loss = model({"data": x}).loss
    loss.backward()
    log_w = seen["log_w"]
    bound = torch.logsumexp(log_w, dim=1) - math.log(k)  # [batch]
    result = {"loss": float(loss), "bound": bound.tolist(), "k": k}
    return result, {"log_w": log_w.numpy(), **linear_gradients(model)}


def timed(model: IWAE, args: dict[str, Any], arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    x = torch.from_numpy(arrays["x"])  # [n, D]
    batch_size, epochs = args["batch_size"], args["epochs"]
    generator = torch.Generator().manual_seed(args["seed"])
    torch.manual_seed(args["seed"])
    optimizer = torch.optim.Adam(model.parameters(), lr=args["lr"])  # as pythae's BaseTrainer

    def step(batch: torch.Tensor) -> None:
        loss = model({"data": batch}).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step(x[:batch_size])  # warm-up: allocator, Adam state
    n = x.shape[0]
    cpu = time.process_time()
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for lo in range(0, n, batch_size):
            step(x[order[lo : lo + batch_size]])
    seconds = time.perf_counter() - start
    return {
        "seconds_per_epoch": seconds / epochs,
        "cpu_seconds_per_epoch": (time.process_time() - cpu) / epochs,
        "epochs": epochs,
    }


def main() -> None:
    folder = peers.job_folder()
    args, arrays = peers.read_job(folder)
    if args.get("threads"):
        torch.set_num_threads(args["threads"])
    model = build(args, arrays)
    outputs: dict[str, np.ndarray] = {}
    if args["job"] == "sanity":
        result, outputs = sanity(model, arrays)
    else:
        result = timed(model, args, arrays)
    result["versions"] = {
        name: importlib.metadata.version(name) for name in ("torch", "pythae", "numpy")
    }
    result["threads"] = torch.get_num_threads()
    peers.write_result(folder, result, outputs)


if __name__ == "__main__":
    main()
