"""Every number vaelab can give about a trained MNIST model, as in docs/results.md.

    vaelab train mnist --data-dir ../shared/data --binarize dynamic --latent-dim 50 \\
        --hidden 200,200 --activation tanh --epochs 300 --out runs/burda
    python examples/mnist_evaluation.py runs/burda --data-dir ../shared/data --out burda.json

On the test set (one fixed binarisation): the ELBO on all 10,000 images, IWAE-5000 on the first
``--iwae-examples``, AIS on the first ``--ais-examples``, the inference gaps on the first
``--gap-examples``, the collapse diagnostics, and a BDMC sandwich on images simulated from the
model. Each figure is printed with its standard error and written to one JSON file.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from vaelab.estimator.facade import EVAL_SEED
from vaelab.evaluation.ais import HmcSettings, ais, bdmc
from vaelab.io.files import atomic_write_json
from vaelab.runs.evaluate import evaluate
from vaelab.runs.inference_gaps import gap
from vaelab.runs.model_data import load_examples, model_data, open_model


def timed(what: str, work: Any) -> Any:
    started = time.perf_counter()
    result = work()
    print(f"{what}: {time.perf_counter() - started:.0f} s", flush=True)
    return result


def _json(found: Any) -> dict[str, Any]:
    """A typed result (``Evaluation``, ``GapEvaluation``) as the JSON the results file holds."""
    return found.to_json()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a trained model folder")
    parser.add_argument("--data-dir", help="folder holding mnist/ (default: the training run's)")
    parser.add_argument("--out", required=True, help="JSON file for the results")
    parser.add_argument("--k", type=int, default=5000, help="IWAE samples (default: 5000)")
    parser.add_argument("--iwae-examples", type=int, default=2000)
    parser.add_argument("--ais-examples", type=int, default=100)
    parser.add_argument("--ais-steps", type=int, default=1000)
    parser.add_argument("--ais-chains", type=int, default=16)
    parser.add_argument("--gap-examples", type=int, default=100)
    parser.add_argument("--gap-steps", type=int, default=2000)
    parser.add_argument("--bdmc-examples", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    results: dict[str, Any] = {"model": args.model, "unit": "nats per example"}
    opened = open_model(args.model)
    estimator = opened.estimator
    examples = model_data(opened, None, args.data_dir)
    results["elbo"] = timed(
        "ELBO and diagnostics (all test images)",
        lambda: _json(evaluate(opened, examples)),
    )
    results["iwae"] = timed(
        f"IWAE-{args.k} ({args.iwae_examples} images)",
        lambda: _json(
            evaluate(
                opened,
                examples.subset(args.iwae_examples),
                k=args.k,
                diagnostics=False,
                progress=True,
            )
        ),
    )
    settings = {"chains": args.ais_chains, "steps": args.ais_steps, "hmc": HmcSettings()}
    x = load_examples(examples, args.ais_examples)
    found = timed(
        f"AIS ({args.ais_examples} images, {args.ais_steps} steps, {args.ais_chains} chains)",
        lambda: ais(
            estimator.model_,
            x,
            seed=EVAL_SEED,
            progress=True,
            **settings,
        ),
    )
    same = _json(evaluate(opened, examples.subset(args.ais_examples), k=args.k, diagnostics=False))
    results["ais"] = {
        **found.to_dict(),
        "elbo_same_images": same["elbo"],
        f"iwae_{args.k}_same_images": same["iwae"]["mean"],
    }
    results["gaps"] = timed(
        f"inference gaps ({args.gap_examples} images)",
        lambda: _json(
            gap(
                opened,
                examples.subset(args.gap_examples),
                k=args.k,
                steps=args.gap_steps,
                progress=True,
            )
        ),
    )
    sandwich = timed(
        f"BDMC ({args.bdmc_examples} simulated images)",
        lambda: bdmc(
            estimator.model_,
            args.bdmc_examples,
            seed=EVAL_SEED,
            **settings,
        ),
    )
    results["bdmc"] = {
        "examples": args.bdmc_examples,
        "forward_ais": sandwich.lower.to_dict(),
        "reverse_ais": sandwich.upper.to_dict(),
        "gap": sandwich.gap,
    }
    atomic_write_json(Path(args.out), results)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
