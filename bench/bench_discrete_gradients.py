"""Gradient estimators for a discrete code, side by side, and exact log p(x) on MNIST.

Part 1, the estimators (``vaelab.objectives.discrete``) on one model and one minibatch: a VAE with
8 binary units fitted on scikit-learn's digits (binarised at 8/16) with the exact gradient
(``gradient="enumerate"``), copied to float64. For each estimator ``--draws`` gradients of the
minibatch-mean objective are drawn, and per encoder parameter the mean and the variance over the
draws are taken. Reported: the summed variance of one draw's encoder gradient (relative to plain
REINFORCE's with the same number of draws), the median signal-to-noise ratio |mean| / std over
the encoder's parameters, and, for the ELBO estimators, the bias ‖mean − exact‖ / ‖exact‖ against
the exact gradient by enumeration (with its Monte Carlo floor, the same norm for an unbiased
estimator being noise: compare with the REINFORCE rows). NVIL's baseline b_ψ(x) is first trained
on its own loss for the minibatch (a fit trains it alongside the model); variance normalisation
is off, so that the variances compare estimators, not step sizes.

Part 2, exact evaluation: a 16-unit Bernoulli VAE on binarised MNIST (fitted for
``--mnist-epochs`` epochs with NVIL's REINFORCE; 0 keeps it untrained), then log p(x) of the
10,000 test images summed over all 65,536 states (``vaelab.evaluation.exact``), timed.

Usage (from the repository root)::

    .venv/bin/python bench/bench_discrete_gradients.py              # about a minute on one core
    .venv/bin/python bench/bench_discrete_gradients.py --skip-mnist --draws 2000
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers  # noqa: E402
import vaelab  # noqa: E402
from vaelab.data.sources import load_data  # noqa: E402
from vaelab.evaluation.exact import exact_log_likelihood  # noqa: E402
from vaelab.objectives.discrete import discrete_elbo, discrete_iwae  # noqa: E402


def fitted_digits_model(seed: int) -> tuple[vaelab.VAE, torch.Tensor]:
    x = (load_digits().data / 16 > 0.5).astype(np.float32)
    model = vaelab.VAE(
        latent="bernoulli", latent_dim=8, hidden=(64,), epochs=30, lr=1e-2,
        gradient="enumerate", seed=seed, device="cpu",
    ).fit(x[:1500])  # fmt: skip
    return model, torch.from_numpy(x[1500:1520]).double()


def encoder_gradients(model, objective: Callable[[], torch.Tensor], draws: int) -> torch.Tensor:
    """``[draws, encoder parameters]``: the gradient of the minibatch-mean objective per draw."""
    encoder = list(model.posterior.encoder.parameters())
    found = []
    for _ in range(draws):
        model.zero_grad(set_to_none=True)
        objective().mean().backward()
        found.append(torch.cat([p.grad.flatten() for p in encoder]))
    return torch.stack(found)


def gradient_table(args: argparse.Namespace) -> list[dict[str, object]]:
    estimator, x = fitted_digits_model(args.seed)
    model = copy.deepcopy(estimator.model_).double().eval()
    q_of = lambda: model.posterior(x)  # noqa: E731
    args_of = lambda: (x, q_of(), model.posterior, model.prior(), model.likelihood)  # noqa: E731
    state = model.posterior.estimator
    optimiser = torch.optim.Adam(state.baseline.parameters(), lr=0.02)
    for _ in range(300):  # NVIL's baseline, trained on its own loss
        optimiser.zero_grad()
        (-discrete_elbo(*args_of())[3].mean()).backward()
        optimiser.step()
    k = args.k

    def elbo_with(gradient: str, baseline: bool = True, temperature: float = 1.0, st: bool = False):
        def objective() -> torch.Tensor:
            state.temperature, state.straight_through = temperature, st
            return discrete_elbo(*args_of(), gradient=gradient, baseline=baseline)[3]

        return objective

    def iwae_with(gradient: str, baseline: bool = True):
        return lambda: discrete_iwae(*args_of(), k=k, gradient=gradient, baseline=baseline)[2]

    rows: list[tuple[str, str, Callable[[], torch.Tensor]]] = [
        ("ELBO", "enumerate (exact)", elbo_with("enumerate")),
        ("ELBO", "REINFORCE, no baseline", elbo_with("reinforce", baseline=False)),
        ("ELBO", "REINFORCE + NVIL baseline", elbo_with("reinforce")),
        ("ELBO", "relaxed λ=1", elbo_with("relaxed", temperature=1.0)),
        ("ELBO", "relaxed λ=0.5", elbo_with("relaxed", temperature=0.5)),
        ("ELBO", "relaxed λ=0.1", elbo_with("relaxed", temperature=0.1)),
        ("ELBO", "straight-through λ=1", elbo_with("relaxed", temperature=1.0, st=True)),
        (f"IWAE-{k}", "REINFORCE, no baseline", iwae_with("reinforce", baseline=False)),
        (f"IWAE-{k}", "REINFORCE + NVIL baseline", iwae_with("reinforce")),
        (f"IWAE-{k}", "VIMCO", iwae_with("vimco")),
    ]
    torch.manual_seed(args.seed)
    exact = encoder_gradients(model, rows[0][2], 1)[0]
    results = []
    for bound, name, objective in rows:
        started = time.perf_counter()
        draws = 1 if name.startswith("enumerate") else args.draws
        grads = encoder_gradients(model, objective, draws)
        seconds = (time.perf_counter() - started) / draws
        mean = grads.mean(0)
        variance = float(grads.var(0).sum()) if draws > 1 else 0.0
        std = grads.std(0) if draws > 1 else torch.zeros_like(mean)
        live = mean.abs() > 0
        snr = (mean.abs()[live] / std[live]).median() if draws > 1 else torch.tensor(np.inf)
        bias = float((mean - exact).norm() / exact.norm()) if bound == "ELBO" else None
        results.append(
            dict(bound=bound, estimator=name, variance=variance, snr=float(snr), bias=bias, ms=seconds * 1e3)
        )  # fmt: skip
    return results


def print_table(results: list[dict[str, object]], draws: int) -> None:
    plain = {r["bound"]: r["variance"] for r in results if "no baseline" in str(r["estimator"])}
    print(f"\nencoder gradient of the minibatch mean, {draws} draws per estimator (float64)")
    print(f"{'bound':<9}{'estimator':<28}{'variance':>12}{'÷ plain':>10}{'SNR (median)':>14}"
          f"{'rel. bias':>11}{'ms/grad':>9}")  # fmt: skip
    for r in results:
        ratio = r["variance"] / plain[r["bound"]] if plain.get(r["bound"]) else float("nan")
        bias = "—" if r["bias"] is None else f"{r['bias']:.3f}"
        snr = "exact" if r["snr"] == float("inf") else f"{r['snr']:.3f}"
        print(f"{r['bound']:<9}{r['estimator']:<28}{r['variance']:>12.4g}{ratio:>10.4f}{snr:>14}"
              f"{bias:>11}{r['ms']:>9.2f}")  # fmt: skip


def mnist_exact(args: argparse.Namespace) -> None:
    splits = load_data("binarized-mnist", data_dir=peers.data_dir(args.data_dir))
    train = np.asarray(splits.train, dtype=np.float32)
    test = torch.from_numpy(np.asarray(splits.test, dtype=np.float32))
    model = vaelab.VAE(
        latent="bernoulli", latent_dim=16, hidden=(200,), epochs=max(args.mnist_epochs, 1),
        seed=args.seed, device="cpu",
    )  # fmt: skip
    if args.mnist_epochs > 0:
        model.fit(train)
    else:
        model.set_params(epochs=1).fit(train[:100])
    torch.set_num_threads(torch.get_num_threads())
    with torch.no_grad():
        started = time.perf_counter()
        log_px = exact_log_likelihood(model.model_, test)
        seconds = time.perf_counter() - started
    print(
        f"\nexact log p(x), binarised MNIST test set: {test.shape[0]:,} images × 65,536 states "
        f"in {seconds:.2f} s on {torch.get_num_threads()} threads; mean {float(log_px.mean()):.3f} "
        f"nats (16 binary units, {args.mnist_epochs} epochs of NVIL's REINFORCE)"
    )
    elbo = model.elbo(test.numpy()[:1000], samples=100).mean()
    print(f"ELBO (100 draws) of the first 1,000 test images: {elbo:.3f}; exact log p(x) of them: "
          f"{float(log_px[:1000].mean()):.3f}")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--draws", type=int, default=500)
    parser.add_argument("--k", type=int, default=5, help="draws of the IWAE bound")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mnist-epochs", type=int, default=1)
    parser.add_argument("--skip-mnist", action="store_true")
    parser.add_argument("--data-dir", type=Path, help="default: $VAELAB_DATA or ../shared/data")
    args = parser.parse_args(argv)
    print_table(gradient_table(args), args.draws)
    if not args.skip_mnist:
        mnist_exact(args)


if __name__ == "__main__":
    main()
