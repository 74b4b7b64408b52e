"""The demo behind `make demo`: a VAE on scikit-learn's 8×8 digits, driven through the `vaelab`
command exactly as a user would type it, in about a minute on a laptop CPU.

    python examples/demo.py --out demo

1. `vaelab train digits --out demo/model ...`: 200 epochs, dynamically binarised digits (Burda et al.
   2015), a progress bar, checkpoints, metrics.jsonl and TensorBoard files in demo/model;
2. `vaelab evaluate demo/model`: the test-set ELBO, reconstruction and KL;
3. `vaelab sample` and `vaelab reconstruct`: demo/samples.png and demo/reconstructions.png;
4. demo/report.html: one self-contained page with the curves, pictures and latent space.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from vaelab import apply, cli
from vaelab.objectives import kl_per_dimension
from vaelab.report import LatentScatter, Metric, ReportContent, write_report

ACTIVE_UNIT_NATS = (
    0.01  # a latent dimension whose average KL stays below this carries no information
)


def vaelab(*args: object) -> None:
    """Run one `vaelab` command in this process; stop the demo if it fails."""
    print(f"\n$ vaelab {' '.join(map(str, args))}", flush=True)
    code = cli.main([str(a) for a in args])
    if code != 0:
        sys.exit(code)


def fresh_folder(folder: Path) -> None:
    """Remove the model of an earlier demo, but never a folder vaelab did not write."""
    if not folder.exists():
        return
    if not ((folder / "config.json").is_file() or (folder / "vaelab.json").is_file()):
        sys.exit(f"demo: {folder} exists and is not a vaelab run; choose another --out")
    shutil.rmtree(folder)


def write_demo_report(model_dir: Path, path: Path) -> Path:
    """A report from the library's own pieces: the evaluation, the run's metrics, samples,
    reconstructions, the latent space (two principal components) and the KL per dimension."""
    result = apply.evaluate(model_dir)
    estimator, document = apply.open_model(model_dir)
    test = apply.model_data(estimator, document)
    x = np.concatenate(list(test.chunks()))
    labels = test.split.labels
    history = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = [m["epoch"] for m in history]

    z = estimator.transform(x)
    centred = z - z.mean(0)
    _, _, components = np.linalg.svd(centred, full_matrices=False)
    with torch.no_grad():
        model = estimator.model_
        q = model.posterior(torch.from_numpy(x).to(estimator.device_))
        per_dim = kl_per_dimension(q, model.prior())
    kl_dims = [] if per_dim is None else per_dim.mean(0).cpu().tolist()
    active = sum(k > ACTIVE_UNIT_NATS for k in kl_dims)
    run = document["run"]
    training = document["training"]

    content = ReportContent(
        title="vaelab demo: a VAE on the digits",
        subtitle=(
            f"{run['likelihood']} likelihood, {run['latent_dim']}-dimensional latent code, "
            f"MLP {run['hidden']}, {training['epochs_run']} epochs on dynamically binarised digits"
        ),
        config={k: run[k] for k in ("data", "binarize", "latent_dim", "hidden", "epochs", "lr")},
        metrics=[
            Metric(
                "test ELBO", result["elbo"], f"± {result['elbo_standard_error']:.2f} nats/example"
            ),
            Metric("reconstruction", result["reconstruction"], "E_q[log p(x|z)], nats/example"),
            Metric("KL", result["kl"], "KL(q(z|x) ‖ p(z)), nats/example"),
            Metric("active units", active, f"of {len(kl_dims)} (KL > {ACTIVE_UNIT_NATS} nats)"),
            Metric("test examples", result["count"]),
        ],
        curves={
            "ELBO per epoch (nats/example)": {
                "train": (epochs, [m["elbo"] for m in history]),
                "validation": (epochs, [m["valid_elbo"] for m in history]),
            },
            "KL per epoch (nats/example)": {"train": (epochs, [m["kl"] for m in history])},
        },
        samples=estimator.sample(64, seed=0),
        reconstructions=(x[:20], estimator.reconstruct(x[:20])),
        latent_scatter=LatentScatter(centred @ components[:2].T, labels, ("PC1", "PC2")),
        kl_per_dimension=kl_dims,
        active_threshold=ACTIVE_UNIT_NATS,
        notes=[
            f"Test data: {result['data']} ({result['split']}, {result['count']} examples). The "
            "ELBO is a lower bound on log p(x) in nats per example; its reconstruction term uses "
            "16 Monte Carlo samples per example.",
        ],
    )
    return write_report(path, content)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo", help="output folder (default: demo)")
    parser.add_argument("--epochs", type=int, default=200, help="training epochs (default: 200)")
    args = parser.parse_args(argv)
    # A model this small runs fastest on one thread: more only add hand-off costs, and on a shared
    # machine they contend with everyone else.
    torch.set_num_threads(1)

    out = Path(args.out)
    model_dir = out / "model"
    fresh_folder(model_dir)
    out.mkdir(parents=True, exist_ok=True)

    vaelab(
        "train", "digits", "--out", model_dir, "--epochs", args.epochs, "--latent-dim", 8,
        "--hidden", 256, "--binarize", "dynamic", "--lr", 1e-3,
    )  # fmt: skip
    vaelab("evaluate", model_dir)
    vaelab("sample", model_dir, "-n", 64, "--out", out / "samples.png")
    vaelab("reconstruct", model_dir, "-n", 20, "--out", out / "reconstructions.png")
    report = write_demo_report(model_dir, out / "report.html")

    print("\nThe demo wrote:")
    for path, what in [
        (model_dir, "the trained model: vaelab.load('" + str(model_dir) + "'), or vaelab evaluate"),
        (model_dir / "metrics.jsonl", "per-epoch metrics (TensorBoard: tensorboard --logdir "
         + str(model_dir / "tensorboard") + ")"),
        (out / "samples.png", "64 samples from the model"),
        (out / "reconstructions.png", "test digits (odd rows) and their reconstructions (even rows)"),
        (report, "everything on one page; open it in a browser"),
    ]:  # fmt: skip
        print(f"  {path}  {what}")


if __name__ == "__main__":
    main()
