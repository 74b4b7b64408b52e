"""M1+M2 on MNIST with 100 labels (Kingma, Rezende, Mohamed & Welling 2014, §3.2): M2 trained
on the codes of a VAE (M1) that saw every training image, labelled or not.

    vaelab train mnist --data-dir ../shared/data --binarize dynamic --latent-dim 50 \\
        --hidden 500,500 --epochs 30 --seed 0 --out runs/m1-mnist            # M1, no labels
    python examples/mnist_m1_m2.py --m1 runs/m1-mnist --data-dir ../shared/data --epochs 100

The labelled examples are the ones ``vaelab train mnist --conditional --labelled 100`` keeps
(``vaelab.runs.labelled.choose_labelled`` on the training split of the same split seed: ten of
each digit), so M1+M2 and M2 on the pixels see the same 100 labels. M1's posterior means
E_q[z₁|x] of the grey-level training images are M2's data, standardised per dimension, and only
the units M1 uses are kept (the standard deviation of their means over the training images above
0.1, as the authors' code does); M2 models them with a Gaussian likelihood and its classifier
q(y|z₁) labels the test images' codes. Beside it, for scale: a logistic regression trained on
the same 100 labelled codes alone, and on their 100 images alone.

Prints the test error of each and writes them, with the budget, to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

import vaelab
from vaelab.data.sources import load_data
from vaelab.runs.labelled import choose_labelled

ACTIVE_SPREAD = 0.1  # a unit is kept when its posterior means vary more than this over the data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--m1", required=True, help="run folder of M1 (vaelab train mnist ...)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--labelled", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=100, help="M2's epochs on the codes")
    parser.add_argument("--latent-dim", type=int, default=50, help="M2's latent size")
    parser.add_argument("--hidden", type=int, default=300, help="M2's hidden units")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="m1_m2.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    m1 = vaelab.load(args.m1, device="cpu")
    config = json.loads((Path(args.m1) / "config.json").read_text())
    # Grey levels (no binarisation) on the run's split: the same train / test images.
    splits = load_data(
        "mnist",
        data_dir=args.data_dir or config.get("data_dir"),
        valid_fraction=config["valid_fraction"],
        test_fraction=config["test_fraction"],
        seed=config["split_seed"],
    )
    train_x, test_x = np.asarray(splits.train), np.asarray(splits.test)
    train_y, test_y = np.asarray(splits.train.labels), np.asarray(splits.test.labels)
    classes = np.unique(train_y)
    kept = choose_labelled(train_y, classes, args.labelled, config["split_seed"])
    partial = np.full(train_y.shape, -1)
    partial[kept] = train_y[kept]

    codes, test_codes = m1.transform(train_x), m1.transform(test_x)  # [n, 50]
    used = codes.std(0) > ACTIVE_SPREAD
    mean, spread = codes[:, used].mean(0), codes[:, used].std(0)
    codes = ((codes[:, used] - mean) / spread).astype(np.float32)
    test_codes = ((test_codes[:, used] - mean) / spread).astype(np.float32)
    print(f"M1 uses {int(used.sum())} of {used.size} units; {kept.size} labels of {train_y.size}")

    m2 = vaelab.VAE(
        conditional=True,
        likelihood="gaussian",
        latent_dim=args.latent_dim,
        hidden=(args.hidden,),
        epochs=args.epochs,
        seed=args.seed,
        device="cpu",
        verbose=True,
    )
    start = time.perf_counter()
    m2.fit(codes, partial)
    seconds = time.perf_counter() - start
    m1_m2_error = float((m2.predict(test_codes) != test_y).mean())

    def logistic_error(train: np.ndarray, test: np.ndarray) -> float:
        model = LogisticRegression(max_iter=2000).fit(train[kept], train_y[kept])
        return float((model.predict(test) != test_y).mean())

    results = {
        "labelled": int(kept.size),
        "m1": str(args.m1),
        "m1_units_used": int(used.sum()),
        "m2_epochs": args.epochs,
        "m2_latent_dim": args.latent_dim,
        "m2_hidden": args.hidden,
        "m2_training_seconds": round(seconds, 1),
        "test_examples": int(test_y.size),
        "test_error": {
            "m1_m2": m1_m2_error,
            "logistic_regression_on_codes": logistic_error(codes, test_codes),
            "logistic_regression_on_pixels": logistic_error(
                train_x.reshape(len(train_x), -1), test_x.reshape(len(test_x), -1)
            ),
        },
    }
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    for name, error in results["test_error"].items():
        print(f"  {name:32s} test error {error:.4f}")
    print(f"M2 trained {args.epochs} epochs in {seconds / 60:.1f} min; wrote {args.out}")


if __name__ == "__main__":
    main()
