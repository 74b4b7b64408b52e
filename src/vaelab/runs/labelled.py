"""Which training examples keep their labels in a semi-supervised run (``vaelab train
--conditional --labelled N``, M2): a class-balanced choice drawn from a seed, the rest of the
training split trained without labels (rows of zeros among the one-hot conditions,
``vaelab.model.semi_supervised``)."""

from __future__ import annotations

import numpy as np

from vaelab.runs.options import ParameterError

__all__ = ["choose_labelled", "drop_labels"]


def choose_labelled(labels: np.ndarray, classes: np.ndarray, count: int, seed: int) -> np.ndarray:
    """The positions (sorted, int64) of ``count`` examples of ``labels`` ``[n]`` that keep their
    label: ``count // C`` of each of the C ``classes``, and one more of each of ``count % C``
    classes drawn from ``seed``; each class's examples drawn from ``numpy.random.default_rng(
    seed)`` without replacement. 100 labels of MNIST's ten digits are ten of each.

    Raises ``ParameterError("labelled", …)`` when ``count`` is below C (a class would have no
    label), above ``n``, or asks a class for more examples than it has."""
    labels = np.asarray(labels)
    n, c = labels.shape[0], len(classes)
    if count < c:
        raise ParameterError(
            "labelled",
            f"must be at least the number of classes ({c}), so that every class has a label; "
            f"got {count}",
        )
    if count > n:
        raise ParameterError("labelled", f"must be at most the {n} training examples, got {count}")
    rng = np.random.default_rng(seed)
    quota = np.full(c, count // c)
    quota[rng.permutation(c)[: count % c]] += 1
    chosen = []
    for j, value in enumerate(classes):
        members = np.flatnonzero(labels == value)
        if quota[j] > members.size:
            raise ParameterError(
                "labelled",
                f"asks for {quota[j]} labels of class {value!r}, which has {members.size} "
                "training examples; choose fewer labels",
            )
        chosen.append(rng.choice(members, int(quota[j]), replace=False))
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def drop_labels(conditions: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """One-hot ``conditions`` ``[n, C]`` with every row but ``kept`` set to zeros (no label)."""
    out = np.zeros_like(conditions)
    out[kept] = conditions[kept]
    return out
