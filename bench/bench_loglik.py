"""Importance-weighted log p(x), k = 5000: vaelab's ``log_likelihood`` against pythae's ``get_nll``.

One network, two implementations. A vaelab MLP VAE (diagonal Gaussian q, N(0, I) prior, Bernoulli
likelihood) is trained here, or loaded with ``--model``, and rebuilt inside pythae 0.1.2 from the
same weights, in the peers venv (``bench/peers.py``). Before any timing the two must agree, on
shared noise ε, to float32 precision on each example's ELBO and IWAE-k estimate: same network, same
estimator, so a time difference is the implementation's alone.

Then the two estimates on the same N binarized-MNIST test images are timed alternately
(pythae, vaelab, floor, pythae, vaelab, floor, …), and the medians, their ratio and the machine's
load are printed and written to ``bench/results/loglik-<time>.json``. The third side, the floor, is
the decoder's matrix products for k codes per image and nothing else: work that any estimator of
log p(x) with k exact float32 evaluations of p(x|z) must do, so pythae's time over the floor's is
the largest speed-up over pythae that any implementation could reach on this machine.

pythae's ``get_nll`` (``pythae/models/vae/vae_model.py``) loops over examples one at a time,
re-encodes ``batch_size`` copies of each example for every batch of samples, evaluates
``(n_samples // batch_size) · batch_size`` samples (more than asked when ``n_samples <
batch_size``: then exactly ``batch_size``), runs with autograd on unless the caller disables it, and
returns the mean over examples only. ``--pythae-batch-size`` must divide k so both sides evaluate k
samples; the baseline runs under ``torch.no_grad()`` (its best case) unless ``--pythae-grad``.

A fourth side, **vaelab compiled** (``--no-compile`` to skip), is vaelab's estimate with the
likelihood's log p(x|z) compiled by ``torch.compile`` (``vaelab.train.fastpath.compile_evaluation``, what
``vaelab evaluate --compile`` does), checked first to agree with the eager estimate to 10⁻⁴ nats
per image; its compilation (from an empty TorchInductor cache unless ``--warm-compile-cache``) is
timed apart. ``--no-pythae`` leaves pythae out (no peers venv needed): vaelab, compiled and floor.

Each side runs one torch thread by default: the machine's two cores are shared, and with two
threads per process OpenMP's spinning turns other people's load into 5x swings in wall time, where
one thread keeps runs within about 10% (``--threads 2`` to use both cores anyway).

Usage (from the repository root, in vaelab's venv)::

    .venv/bin/python bench/bench_loglik.py                    # train 5 epochs, N=50, 3 rounds
    .venv/bin/python bench/bench_loglik.py --model runs/m1    # a saved vaelab model folder
    .venv/bin/python bench/bench_loglik.py --save-model /tmp/m --epochs 10 --examples 20
    .venv/bin/python bench/bench_loglik.py --model runs/m1 --no-pythae   # compiled vs eager only
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import peers
import vaelab
from vaelab.components.likelihoods import BernoulliLikelihood
from vaelab.components.networks import MLP
from vaelab.components.posteriors import DiagonalGaussianPosterior
from vaelab.components.priors import StandardNormalPrior
from vaelab.data.sources import DataSplits, load_data
from vaelab.evaluation.loglik import log_likelihood, log_likelihood_with_proposal
from vaelab.model.vae_model import VAEModel

PEER_SCRIPT = peers.BENCH_DIR / "pythae_loglik_peer.py"
# float32 sums of ~800 log-probabilities in two orders agree to ~1e-4 nats; a different network,
# offset or likelihood is off by whole nats.
SANITY_TOLERANCE = 1e-3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a saved vaelab model folder (default: train)")
    parser.add_argument(
        "--save-model", type=Path, help="save the model trained here to this folder"
    )
    parser.add_argument("--epochs", type=int, default=5, help="training epochs (default 5)")
    parser.add_argument("--examples", type=int, default=50, help="test images timed (default 50)")
    parser.add_argument("-k", type=int, default=5000, help="importance samples per image")
    parser.add_argument("--pythae-batch-size", type=int, default=1000)
    parser.add_argument("--vaelab-batch-size", type=int, default=100)
    parser.add_argument(
        "--vaelab-chunk-size", type=int, help="samples per chunk (default: vaelab's)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="pythae/vaelab pairs (default 3)")
    parser.add_argument("--sanity-examples", type=int, default=5)
    parser.add_argument("--sanity-k", type=int, default=200)
    parser.add_argument("--pythae-grad", action="store_true", help="time get_nll with autograd on")
    parser.add_argument(
        "--no-pythae", action="store_true", help="leave pythae out: vaelab, compiled, floor"
    )
    parser.add_argument("--no-compile", action="store_true", help="leave out vaelab compiled")
    parser.add_argument(
        "--warm-compile-cache",
        action="store_true",
        help="compile with TorchInductor's usual cache (default: an empty one, as a first run)",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads per side (default 1; 0: torch's)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", type=Path, help="default: $VAELAB_DATA or ../shared/data")
    parser.add_argument("--out", type=Path, help="result JSON (default: bench/results/...)")
    args = parser.parse_args(argv)
    if args.k % args.pythae_batch_size:
        parser.error(
            f"--pythae-batch-size {args.pythae_batch_size} must divide k={args.k}: pythae's "
            "get_nll evaluates (k // batch_size) · batch_size samples and would be timed on fewer"
        )
    return args


# ---------------------------------------------------------------------------------- the model


def trained_or_loaded(args: argparse.Namespace, splits: DataSplits) -> tuple[VAEModel, str]:
    if args.model is not None:
        return vaelab.load(args.model).model_, f"loaded from {args.model}"
    estimator = vaelab.VAE(
        latent_dim=50,
        hidden=(200, 200),
        activation="tanh",
        likelihood="bernoulli",
        epochs=args.epochs,
        seed=args.seed,
        device="cpu",
        verbose=True,
    )
    start = time.perf_counter()
    estimator.fit(np.asarray(splits.train))
    seconds = time.perf_counter() - start
    if args.save_model is not None:
        estimator.save(args.save_model)
    return estimator.model_, f"trained here: {args.epochs} epochs in {seconds:.0f} s"


def mlp_spec(mlp: nn.Module, prefix: str, arrays: dict[str, np.ndarray]) -> list[dict[str, str]]:
    """The MLP as ``[{"linear": name}, {"activation": "Tanh"}, …]``; weights go into ``arrays``."""
    spec = []
    for i, layer in enumerate(mlp.layers):
        if isinstance(layer, nn.Linear):
            name = f"{prefix}{i}"
            arrays[name + ".weight"] = layer.weight.detach().cpu().numpy()
            arrays[name + ".bias"] = layer.bias.detach().cpu().numpy()
            spec.append({"linear": name})
        elif hasattr(nn, type(layer).__name__):
            spec.append({"activation": type(layer).__name__})
        else:
            raise SystemExit(f"layer {layer} has no torch.nn counterpart to rebuild in pythae")
    return spec


def export(model: VAEModel) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The architecture (JSON) and weights (arrays) pythae needs to rebuild ``model``."""
    posterior, prior, likelihood = model.posterior, model.prior, model.likelihood
    fits = (
        isinstance(posterior, DiagonalGaussianPosterior)
        and isinstance(posterior.encoder, MLP)
        and isinstance(prior, StandardNormalPrior)
        and isinstance(likelihood, BernoulliLikelihood)
        and isinstance(likelihood.decoder, MLP)
    )
    if not fits:
        raise SystemExit(
            "pythae's VAE can only express an MLP VAE with a diagonal Gaussian posterior, a "
            "standard normal prior and a Bernoulli likelihood; train one with network='mlp', "
            "posterior='diagonal', prior='normal', likelihood='bernoulli'"
        )
    arrays = {"offset": likelihood.offset.detach().cpu().numpy()}
    spec = {
        "data_shape": list(likelihood.data_shape),
        "latent_dim": posterior.latent_dim,
        "encoder": mlp_spec(posterior.encoder, "enc", arrays),
        "decoder": mlp_spec(likelihood.decoder, "dec", arrays),
    }
    return spec, arrays


# ------------------------------------------------------------------------------ the two sides


@torch.no_grad()
def sanity_check(
    model: VAEModel, x: torch.Tensor, spec: dict[str, Any], weights: dict[str, np.ndarray], k: int
) -> dict[str, Any]:
    """Both libraries on the same ε: per-example ELBO (one sample) and IWAE-k estimate."""
    generator = torch.Generator().manual_seed(1)
    eps = torch.randn(x.shape[0], model.posterior.latent_dim, generator=generator)
    eps_iw = torch.randn(k, *eps.shape, generator=generator)
    ours_elbo = model.elbo(x, samples=1, noise=eps[None]).elbo
    q = model.posterior(x)
    ours_iw = log_likelihood_with_proposal(x, q, model.prior(), model.likelihood, k, noise=eps_iw)
    arrays = {**weights, "x": x.numpy(), "eps": eps.numpy(), "eps_iw": eps_iw.numpy()}
    theirs = peers.run(PEER_SCRIPT, arrays=arrays, args={**spec, "job": "sanity"}).result
    elbo_diff = np.abs(np.array(theirs["elbo"]) - ours_elbo.double().numpy()).max()
    iw_diff = np.abs(np.array(theirs["log_px"]) - ours_iw.log_px.numpy()).max()
    return {
        "examples": int(x.shape[0]),
        "k": k,
        "vaelab_elbo": ours_elbo.tolist(),
        "pythae_elbo": theirs["elbo"],
        "vaelab_iwae": ours_iw.log_px.tolist(),
        "pythae_iwae": theirs["log_px"],
        "max_abs_diff_elbo": float(elbo_diff),
        "max_abs_diff_iwae": float(iw_diff),
        "passed": bool(max(elbo_diff, iw_diff) < SANITY_TOLERANCE),
    }


def time_pythae(
    spec: dict[str, Any], weights: dict[str, np.ndarray], x: torch.Tensor, args: argparse.Namespace
) -> dict[str, Any]:
    job = {
        **spec,
        "job": "time",
        "k": args.k,
        "batch_size": args.pythae_batch_size,
        "grad": args.pythae_grad,
        "seed": args.seed,
        "threads": args.threads,
    }
    peer = peers.run(PEER_SCRIPT, arrays={**weights, "x": x.numpy()}, args=job)
    return {**peer.result, "process_seconds": peer.wall_seconds}


def time_vaelab(model: VAEModel, x: torch.Tensor, args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    cpu = time.process_time()
    start = time.perf_counter()
    estimate = log_likelihood(
        model, x, k=args.k, batch_size=args.vaelab_batch_size, chunk_size=args.vaelab_chunk_size
    )
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "cpu_seconds": time.process_time() - cpu,
        "mean_log_px": estimate.mean,
        "standard_error": estimate.standard_error,
        "mean_mc_standard_error": float(estimate.mc_standard_error.mean()),
        "examples": int(x.shape[0]),
    }


def compiled_model(
    model: VAEModel, x: torch.Tensor, args: argparse.Namespace
) -> tuple[VAEModel, dict[str, Any]]:
    """A copy of ``model`` with its log p(x|z) compiled (``vaelab.train.fastpath``), compiled here on
    the first images: the first call of log p(x|z) is eager, the second compiles, both within
    the first estimate. Checked against eager with the same draws (``seed``)."""
    import copy

    from vaelab.train.fastpath import compile_evaluation

    if not args.warm_compile_cache:
        # Read when TorchInductor first compiles: an empty cache times a first run's compile.
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench-inductor-")
    compiled = compile_evaluation(copy.deepcopy(model))
    n = min(5, x.shape[0])

    def estimate(m: VAEModel) -> tuple[Any, float]:
        started = time.perf_counter()
        found = log_likelihood(
            m, x[:n], k=args.k, batch_size=args.vaelab_batch_size, seed=args.seed
        )
        return found, time.perf_counter() - started

    found, first = estimate(compiled)  # compiles
    expected, _ = estimate(model)
    difference = float((found.log_px - expected.log_px).abs().max())
    if difference > 1e-4:
        raise SystemExit(f"compiled and eager IWAE differ by {difference:.2e} nats: a bug")
    if not compiled.likelihood.log_prob.active:  # type: ignore[attr-defined]
        raise SystemExit("torch.compile failed here (see the warning): nothing to time")
    # What compiling costs: the estimate that compiled, less the same estimate compiled.
    _, again = estimate(compiled)
    compile_seconds = first - again
    return compiled, {"compile_seconds": compile_seconds, "max_abs_diff": difference, "examples": n}


@torch.no_grad()
def time_floor(model: VAEModel, x: torch.Tensor, args: argparse.Namespace) -> dict[str, Any]:
    """The decoder's matrix products for k latent codes per image and nothing else: no encoder,
    no log-density, no log-sum-exp, all k codes in one product per layer. Any estimator that
    evaluates log p(x|z) exactly in float32 for k samples must do at least this work, so pythae's
    time over this one bounds the speed-up any implementation can have over it on this machine."""
    decoder = model.likelihood.decoder
    generator = torch.Generator().manual_seed(args.seed)
    codes = torch.randn(args.k, model.latent_dim, generator=generator)  # [k, latent]
    decoder(codes[:10])  # warm-up
    cpu = time.process_time()
    start = time.perf_counter()
    for _ in range(x.shape[0]):
        decoder(codes)  # [k, D]
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "cpu_seconds": time.process_time() - cpu}


def decoder_flops(model: VAEModel, k: int) -> int:
    """Floating-point operations of ``time_floor`` per image: 2 per multiply-add of each layer."""
    layers = [m for m in model.likelihood.decoder.modules() if isinstance(m, nn.Linear)]
    return sum(2 * k * m.in_features * m.out_features for m in layers)


# ------------------------------------------------------------------------------- reporting


def print_table(report: dict[str, Any]) -> None:
    n = report["examples"]
    p, v, c = report["pythae"], report["vaelab"], report["vaelab_compiled"]
    columns = [(f"vaelab {vaelab.__version__}", v)]
    if c is not None:
        columns.append((f"vaelab compiled ({c['compile_seconds']:.0f} s to compile)", c))
    batch = [f"{report['vaelab_batch_size']} images"] * len(columns)
    samples = [f"{report['k']}"] * len(columns)
    if p is not None:
        columns.insert(0, (f"pythae {report['versions']['pythae']} get_nll", p))
        batch.insert(0, f"{report['pythae_batch_size']} samples")
        samples.insert(0, f"{p['samples']:.0f}")
    sides = [side for _, side in columns]
    rows = [
        ("", *(name for name, _ in columns)),
        ("samples / image", *samples),
        ("batch size", *batch),
        ("runs, s (N images)", *(" ".join(f"{t:.2f}" for t in side["runs"]) for side in sides)),
        ("median, s", *(f"{side['median']:.3f}" for side in sides)),
        ("median CPU time, s", *(f"{side['median_cpu']:.3f}" for side in sides)),
        ("median, ms / image", *(f"{1e3 * side['median'] / n:.1f}" for side in sides)),
        ("mean log p(x), nats", *(f"{side['mean_log_px']:.2f}" for side in sides)),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print()
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    floor = report["decoder_floor"]
    print(
        f"\ndecoder products alone (the floor of any exact float32 estimator): "
        f"{1e3 * floor['median'] / n:.1f} ms / image, {floor['gflops_per_second']:.0f} GFLOP/s; "
        f"vaelab / floor = {report['ratio_vaelab_floor']:.2f}"
    )
    if c is not None:
        print(
            f"vaelab compiled / eager: {c['ratio_to_eager']:.3f} (rounds paired: "
            f"{c['ratio_to_eager_paired_median']:.3f}); compiled / floor {c['ratio_to_floor']:.2f}"
        )
    if p is not None:
        print(
            f"pythae / floor = {report['ratio_ceiling']:.2f}x, the most any implementation can "
            f"gain; pythae / vaelab (median time, same {n} images, k={report['k']}): "
            f"{report['ratio']:.2f}x"
        )
    print(
        f"load average {report['load_average_start'][0]:.2f} → "
        f"{report['load_average_end'][0]:.2f} on {os.cpu_count()} cores, torch threads per side: "
        f"{report['threads']}"
    )
    for other in report["other_processes"]:
        print(f"  also running: {other['percent_of_a_core']}% of a core: {other['command'][:100]}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_start, watch = os.getloadavg(), peers.ProcessWatch()
    data_dir = peers.data_dir(args.data_dir)
    splits = load_data("binarized-mnist", data_dir=data_dir)
    # The test file is sorted by digit: a seeded random subset, never the first N.
    order = np.random.default_rng(args.seed).permutation(len(splits.test))
    test = torch.from_numpy(np.asarray(splits.test)[order[: args.examples]]).float()
    model, source = trained_or_loaded(args, splits)
    model = model.cpu().eval()
    spec, weights = export(model)
    sanity = None
    if not args.no_pythae:
        peers.ensure_venv()
        sanity = sanity_check(model, test[: args.sanity_examples], spec, weights, args.sanity_k)
        print(
            f"sanity ({sanity['examples']} images, shared ε): max |Δ ELBO| "
            f"{sanity['max_abs_diff_elbo']:.2e}, max |Δ IWAE-{sanity['k']}| "
            f"{sanity['max_abs_diff_iwae']:.2e} nats"
        )
        if not sanity["passed"]:
            raise SystemExit("the two networks disagree: fix the export before timing anything")

    log_likelihood(model, test[:1], k=min(args.k, 500))  # warm-up, as the peer warms up
    compiled = None
    if not args.no_compile:
        compiled, compiling = compiled_model(model, test, args)
        print(
            f"compiled: {compiling['compile_seconds']:.1f} s to compile; max |Δ IWAE-{args.k}| "
            f"against eager {compiling['max_abs_diff']:.1e} nats on {compiling['examples']} images"
        )
    sides = ["pythae"] * (not args.no_pythae) + ["vaelab"] + ["compiled"] * (compiled is not None)
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in [*sides, "floor"]}
    for round_ in range(args.rounds):
        for side in runs:
            load = os.getloadavg()[0]
            if side == "pythae":
                run = time_pythae(spec, weights, test, args)
            elif side == "vaelab":
                run = time_vaelab(model, test, args)
            elif side == "compiled":
                assert compiled is not None
                run = time_vaelab(compiled, test, args)
            else:
                run = time_floor(model, test, args)
            run["load1_before"] = load
            runs[side].append(run)
            print(
                f"round {round_ + 1} {side}: {run['seconds']:.2f} s (load {load:.2f})", flush=True
            )

    def summary(side: str) -> dict[str, Any]:
        seconds = [r["seconds"] for r in runs[side]]
        result = {
            "runs": seconds,
            "median": statistics.median(seconds),
            "median_cpu": statistics.median(r["cpu_seconds"] for r in runs[side]),
            "details": runs[side],
        }
        if side != "floor":
            result["mean_log_px"] = statistics.fmean(r["mean_log_px"] for r in runs[side])
        return result

    ours, floor = summary("vaelab"), summary("floor")
    floor["gflops_per_second"] = (
        decoder_flops(model, args.k) * args.examples / floor["median"] / 1e9
    )
    ours["standard_error"] = runs["vaelab"][0]["standard_error"]
    pythae, versions = None, peers.versions()
    if "pythae" in runs:
        pythae = summary("pythae")
        pythae["samples"] = runs["pythae"][0]["decoded_per_example"]
        pythae["autograd"] = args.pythae_grad
        versions["pythae"] = runs["pythae"][0]["versions"]["pythae"]
        versions["peers_torch"] = runs["pythae"][0]["versions"]["torch"]
    fast = None
    if "compiled" in runs:
        fast = summary("compiled") | compiling
        pairs = [
            c["seconds"] / v["seconds"]
            for c, v in zip(runs["compiled"], runs["vaelab"], strict=True)
        ]
        fast["ratio_to_eager_paired_median"] = statistics.median(pairs)
        fast["ratio_to_eager"] = fast["median"] / ours["median"]
        fast["ratio_to_floor"] = fast["median"] / floor["median"]
    report: dict[str, Any] = {
        "benchmark": "loglik",
        "examples": args.examples,
        "k": args.k,
        "pythae_batch_size": args.pythae_batch_size,
        "vaelab_batch_size": args.vaelab_batch_size,
        "vaelab_chunk_size": args.vaelab_chunk_size,
        "model": source,
        "seed": args.seed,
        "sanity": sanity,
        "pythae": pythae,
        "vaelab": ours,
        "vaelab_compiled": fast,
        "ratio": None if pythae is None else pythae["median"] / ours["median"],
        "decoder_floor": floor,
        "ratio_ceiling": None if pythae is None else pythae["median"] / floor["median"],
        "ratio_vaelab_floor": ours["median"] / floor["median"],
        "threads": torch.get_num_threads(),
        **peers.run_context(load_start, watch, argv),
        "versions": versions,
    }
    print_table(report)
    peers.save_result(report, "loglik", args.out)
    return report


if __name__ == "__main__":
    main()
