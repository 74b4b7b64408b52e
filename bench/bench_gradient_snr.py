"""Signal-to-noise ratio of the IWAE bound's encoder gradient: the standard estimator against DReG.

Rainforth et al. (2018, "Tighter variational bounds are not necessarily better") show that the
standard reparameterised gradient of the IWAE bound has an encoder signal-to-noise ratio that
shrinks like O(1/√k) as the number of importance samples k grows, while the decoder's grows like
O(√k). Tucker et al. (2018, "Doubly reparameterized gradient estimators for Monte Carlo
objectives") remove the score term that causes it: with DReG the encoder's SNR grows with k
instead. This script measures both on a small real model, with vaelab's ``iwae_bound(gradient=)``.

The model: scikit-learn's digits scaled to [0, 1] (/16), a seeded split, and an MLP VAE (diagonal
Gaussian q, N(0, I) prior, Bernoulli likelihood) trained briefly with ``vaelab.VAE(...).fit``, then
copied to float64 so that the statistics are not limited by rounding. On a fixed minibatch of
held-out images, for each k, ``--draws`` gradients of the minibatch-mean objective are drawn with
each estimator; draw m uses the same ε for every estimator (seeded), so the differences are the
estimators' alone. The decoder's gradient must be the same for the standard estimator and DReG,
draw by draw: that is checked before anything is reported.

Per parameter, SNR = |mean| / standard deviation over the draws. The table summarises it by the
median and the mean over the encoder's parameters (those whose gradient is not identically 0: the
weights from the digits' always-blank border pixels and into dead ReLU units are left out, and
counted in the results), with the decoder's median beside it,
and the time per gradient with DReG over the standard estimator's, measured in the same loop.
``--gradients`` may add ``stl``, which is biased for k > 1 (its SNR measures noise, not
correctness). Results go to ``bench/results/gradient-snr-<time>.json``.

Usage (from the repository root, in vaelab's venv)::

    .venv/bin/python bench/bench_gradient_snr.py        # k = 1, 8, 64; about 40 s on one core
    .venv/bin/python bench/bench_gradient_snr.py --ks 1 8 64 512 --draws 2000 --gradients standard stl dreg
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import peers  # bench/peers.py, beside this script
import vaelab
from vaelab.model.vae_model import VAEModel
from vaelab.objectives.bounds import GRADIENTS, iwae_bound


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 8, 64], help="importance samples")
    parser.add_argument("--draws", type=int, default=1000, help="gradients per estimator and k")
    parser.add_argument("--batch", type=int, default=32, help="held-out images in the minibatch")
    parser.add_argument(
        "--gradients", nargs="+", default=["standard", "dreg"], choices=GRADIENTS, metavar="NAME"
    )
    parser.add_argument("--epochs", type=int, default=30, help="training epochs (default 30)")
    parser.add_argument("--latent", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", type=Path, help="result JSON (default: bench/results/...)")
    args = parser.parse_args(argv)
    if "standard" not in args.gradients:
        parser.error("--gradients must include standard, the baseline")
    if min(args.ks) < 1 or args.draws < 2 or args.batch < 1:
        parser.error("--ks must be positive, --draws at least 2 and --batch at least 1")
    return args


def trained_model(args: argparse.Namespace) -> tuple[VAEModel, torch.Tensor, dict[str, Any]]:
    """A briefly trained digits VAE as float64, and the held-out minibatch ``[batch, 64]``."""
    from sklearn.datasets import load_digits  # slow to import; only here

    x = load_digits().data.astype(np.float32) / 16.0  # [1797, 64] in [0, 1]
    order = np.random.default_rng(args.seed).permutation(len(x))
    held_out = order[: args.batch]
    train = x[order[args.batch :]]
    started = time.perf_counter()
    vae = vaelab.VAE(
        latent_dim=args.latent,
        hidden=(args.hidden,),
        likelihood="bernoulli",
        epochs=args.epochs,
        seed=args.seed,
        device="cpu",
    ).fit(train)
    seconds = time.perf_counter() - started
    model = copy.deepcopy(vae.model_).double()
    batch = torch.from_numpy(x[held_out]).double()
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        elbo = float(model.elbo(batch, samples=100).elbo.mean())
    info = {
        "train_examples": len(train),
        "epochs": args.epochs,
        "train_seconds": seconds,
        "final_train_elbo": vae.history_[-1].elbo,
        "held_out_elbo": elbo,
    }
    return model, batch, info


def gradient_draws(
    model: VAEModel, x: torch.Tensor, k: int, gradients: list[str], draws: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """For each estimator, ``draws`` gradients of the minibatch-mean objective: encoder
    ``[draws, encoder params]``, decoder ``[draws, decoder params]``, and seconds per gradient.
    Draw m uses seed m for every estimator; the estimators take turns within each draw, so that
    the machine's load falls on all of them alike."""
    encoder = list(model.posterior.parameters())
    decoder = list(model.likelihood.parameters())
    enc: dict[str, list[torch.Tensor]] = {g: [] for g in gradients}
    dec: dict[str, list[torch.Tensor]] = {g: [] for g in gradients}
    seconds = dict.fromkeys(gradients, 0.0)
    for m in range(-1, draws):  # draw -1 warms up, untimed and unrecorded
        for gradient in gradients:
            started = time.perf_counter()
            torch.manual_seed(max(m, 0))
            terms = iwae_bound(
                x, model.posterior, model.prior, model.likelihood, k=k, gradient=gradient
            )
            grads = torch.autograd.grad(terms.objective.mean(), encoder + decoder)
            if m < 0:
                continue
            seconds[gradient] += time.perf_counter() - started
            enc[gradient].append(torch.cat([g.flatten() for g in grads[: len(encoder)]]))
            dec[gradient].append(torch.cat([g.flatten() for g in grads[len(encoder) :]]))
    return {g: (torch.stack(enc[g]), torch.stack(dec[g]), seconds[g] / draws) for g in gradients}


def snr(draws: torch.Tensor) -> tuple[torch.Tensor, int]:
    """|mean| / std per parameter over the draws (dimension 0), for parameters whose gradient is
    not identically zero; and how many were left out."""
    std = draws.std(0)
    alive = std > 0
    return draws.mean(0)[alive].abs() / std[alive], int((~alive).sum())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    load_start, watch = os.getloadavg(), peers.ProcessWatch()
    model, x, training = trained_model(args)
    print(
        f"digits VAE: {training['epochs']} epochs in {training['train_seconds']:.1f} s, "
        f"held-out ELBO {training['held_out_elbo']:.2f} nats on {args.batch} images",
        flush=True,
    )
    rows: list[dict[str, Any]] = []
    for k in args.ks:
        results = gradient_draws(model, x, k, args.gradients, args.draws)
        _, standard_decoder, standard_seconds = results["standard"]
        if "dreg" in results:
            # DReG leaves the decoder's gradient as it is: the same draws must give the same.
            gap = float((results["dreg"][1] - standard_decoder).abs().max())
            if gap > 1e-9 * float(standard_decoder.abs().max()):
                raise SystemExit(f"DReG changed the decoder's gradient (max |Δ| {gap:.2e})")
        for gradient, (encoder, decoder, seconds) in results.items():
            encoder_snr, dead = snr(encoder)
            decoder_snr, _ = snr(decoder)
            rows.append(
                {
                    "k": k,
                    "gradient": gradient,
                    "encoder_snr_median": float(encoder_snr.median()),
                    "encoder_snr_mean": float(encoder_snr.mean()),
                    "encoder_parameters": int(encoder.shape[1]),
                    "encoder_parameters_without_gradient": dead,
                    "decoder_snr_median": float(decoder_snr.median()),
                    "seconds_per_gradient": seconds,
                    "time_vs_standard": seconds / standard_seconds,
                }
            )
        print(f"k={k}: done", flush=True)
        watch.snapshot()
    report: dict[str, Any] = {
        "benchmark": "gradient-snr",
        "data": "sklearn digits / 16",
        "model": {"latent": args.latent, "hidden": [args.hidden], "likelihood": "bernoulli"},
        "training": training,
        "batch": args.batch,
        "draws": args.draws,
        # |mean| / std of a gradient whose true mean is 0, estimated from the draws: E|N(0, 1/M)|.
        "snr_noise_floor": math.sqrt(2 / math.pi / args.draws),
        "seed": args.seed,
        "rows": rows,
        "threads": torch.get_num_threads(),
        **peers.run_context(load_start, watch, argv),
    }
    print_table(report)
    peers.save_result(report, "gradient-snr", args.out)
    return report


def print_table(report: dict[str, Any]) -> None:
    header = (
        "k",
        "gradient",
        "encoder SNR median",
        "mean",
        "decoder SNR median",
        "ms / grad",
        "time vs standard",
    )
    rows = [header] + [
        (
            str(r["k"]),
            r["gradient"],
            f"{r['encoder_snr_median']:.3f}",
            f"{r['encoder_snr_mean']:.3f}",
            f"{r['decoder_snr_median']:.3f}",
            f"{1e3 * r['seconds_per_gradient']:.2f}",
            f"{r['time_vs_standard']:.2f}x",
        )
        for r in report["rows"]
    ]  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    print(
        f"\nIWAE gradient SNR, |mean| / std over {report['draws']} draws per parameter, on "
        f"{report['batch']} held-out digits (same ε for every estimator); a gradient with mean 0 "
        f"would show an SNR of about {report['snr_noise_floor']:.3f} from this many draws"
    )
    for row in rows:
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)))
    print(
        f"load average {report['load_average_start'][0]:.2f} → {report['load_average_end'][0]:.2f} "
        f"on {os.cpu_count()} cores, torch threads: {report['threads']}"
    )


if __name__ == "__main__":
    main()
