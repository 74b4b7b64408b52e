"""The demo behind `make demo`: a VAE on scikit-learn's 8×8 digits, driven through the `vaelab`
command exactly as a user would type it, in about a minute on a laptop CPU.

    python examples/demo.py --out demo

1. `vaelab train digits --out demo/model ...`: 200 epochs, dynamically binarised digits (Burda et al.
   2015), a progress bar, checkpoints, metrics.jsonl and TensorBoard files in demo/model;
2. `vaelab evaluate demo/model`: the test-set ELBO, reconstruction and KL;
3. `vaelab sample` and `vaelab reconstruct`: demo/samples.png and demo/reconstructions.png;
4. `vaelab report`: demo/report.html, one self-contained page with the metrics (ELBO, IWAE-1000,
   inference gaps, active units), curves, pictures and latent space.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

from vaelab.cli import app as cli


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
    vaelab("report", model_dir, "--out", out / "report.html")
    report = out / "report.html"

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
