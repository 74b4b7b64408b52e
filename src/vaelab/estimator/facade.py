"""``vaelab.VAE``: a variational autoencoder with the scikit-learn estimator interface.

``__init__`` stores hyper-parameters verbatim; ``fit`` validates, builds and trains; learned state ends
in ``_``. ``score_samples`` gives each example's ELBO (a lower bound on log p(x), in nats) and
``score`` their mean, as ``PCA.score_samples`` gives a log-likelihood.

With ``conditional=True`` it is a conditional VAE (Sohn, Lee & Yan 2015): ``fit(X, y)`` with class
labels ``y [n]`` (one-hot internally, the classes kept in ``classes_`` as a classifier keeps them)
or condition vectors ``y [n, c]``, and every method that reads examples or draws them takes their
``y``. A model without conditioning refuses a ``y`` it would ignore, except where scikit-learn
passes one to any estimator (``fit``, ``fit_transform``, ``score``), where an unsupervised
estimator ignores it.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_array, check_is_fitted, validate_data
from torch.utils.data import DataLoader, Dataset

from vaelab.components.flows import DEFAULT_FLOW_STEPS
from vaelab.components.likelihoods import DataMoments
from vaelab.data.sources import DataError
from vaelab.estimator.onnx_export import OnnxExport, export_onnx
from vaelab.estimator.serialization import (
    CONFIG_FILE,
    ModelFileError,
    SavedModel,
    read_model,
    save_model,
)
from vaelab.model.conditioning import one_hot
from vaelab.model.registry import DEFAULT_CATEGORIES, ModelConfig, build_model
from vaelab.model.semi_supervised import (
    SemiSupervisedModel,
    classification_weight,
    missing_rows,
)
from vaelab.model.vae_model import VAEModel, given_rows
from vaelab.objectives.bounds import ElboTerms
from vaelab.objectives.noise import ExampleNoise, posterior_mean, seeded
from vaelab.train.batches import BatchSource, IndexedBatches, LoaderBatches
from vaelab.train.config import TrainConfig
from vaelab.train.fastpath import compile_evaluation
from vaelab.train.labelled_batches import semi_supervised_batches
from vaelab.train.progress import EpochMetrics
from vaelab.train.start import INIT_EXAMPLES, start_model, start_training
from vaelab.train.trainer import Trainer, TrainingObserver

EVAL_BATCH = 1024
PROPOSALS = ("amortised", "refined")
EVAL_SEED = 20131220  # salt of the per-example evaluation noise (vaelab.objectives.noise)


def resolve_device(device: str) -> torch.device:
    """``"auto"`` is CUDA when available, else the CPU; anything else is passed to ``torch.device``
    and must exist here (a ``ValueError`` says so, rather than torch failing at the first
    tensor moved there).

    CUDA devices are checked against ``torch.cuda``; any other kind (``mps``, ``xpu``, …) by
    allocating an empty tensor there, the one test every backend answers the same way (torch
    raises a ``RuntimeError`` for mps and an ``AssertionError`` for xpu when it was built
    without them). ``meta`` always allocates but holds no data, so nothing can be trained or
    evaluated on it.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use 'auto', 'cpu' or 'cuda'") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {device!r} is not available here (torch sees no CUDA GPU); "
            "use device='cpu' or 'auto'"
        )
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        raise ValueError(
            f"device {device!r} does not exist: torch sees {torch.cuda.device_count()} CUDA GPU(s)"
        )
    if resolved.type == "meta":
        raise ValueError(f"device {device!r} holds no data; use device='cpu' or 'auto'")
    if resolved.type not in ("cpu", "cuda"):
        try:
            torch.empty(0, device=resolved)
        except Exception:  # backends disagree on what they raise (see above)
            raise ValueError(
                f"device {device!r} is not available here (this torch cannot use it); "
                "use device='cpu' or 'auto'"
            ) from None
    return resolved


class _PrintEpochs(TrainingObserver):
    """``VAE(verbose=True)``: one line per epoch as it ends, its bound and terms in nats per
    example."""

    def epoch_end(self, trainer: Trainer, metrics: EpochMetrics) -> None:
        config = trainer.config
        bound = "" if metrics.iwae is None else f"IWAE-{config.k} {metrics.iwae:.3f}, "
        print(
            f"epoch {metrics.epoch}/{config.epochs}: {bound}ELBO {metrics.elbo:.3f} "
            f"(reconstruction {metrics.reconstruction:.3f}, KL {metrics.kl:.3f}) nats/example",
            flush=True,
        )

    def rolled_back(self, trainer: Trainer, reason: str) -> None:
        print(f"rollback {trainer.rollbacks}: {reason.split(';')[0]}", flush=True)


@dataclass(frozen=True)
class RefinedPosteriors:
    """What ``VAE.refine`` found for each example: its ELBO under its own optimised q* (float64
    ``[n]``, nats) with the Monte Carlo standard error of that estimate, and the codes E_q*[z]
    (``[n, latent]``)."""

    elbo: np.ndarray
    elbo_standard_error: np.ndarray
    codes: np.ndarray


class VAE(TransformerMixin, BaseEstimator):
    """A variational autoencoder (Kingma & Welling 2014) trained by maximising the ELBO.

    A scikit-learn estimator: ``__init__`` stores the options, ``fit`` trains, and the learned
    state ends in ``_``. ``vaelab.load`` opens a model saved by ``save`` or trained by ``vaelab
    train``.

    Parameters
    ----------
    latent_dim : int or tuple of int, default 8
        Size of the latent code z; a tuple such as ``(100, 50)`` for several stochastic layers,
        z₁ (the one the decoder reads) first: p(x|z₁) p(z₁|z₂) p(z₂) with q(z₁|x) q(z₂|z₁)
        (Burda et al. 2016; ``vaelab.components.hierarchy``). Codes are then the layers
        concatenated, ``[n, 100 + 50]``.
    hidden : tuple of int, default (256,)
        Hidden layer sizes of the encoder; the decoder mirrors them. ``()`` gives linear maps.
        With several stochastic layers they are the x ↔ z₁ networks'; the networks between z_l
        and z_{l+1} have as many hidden layers, each as wide as z_l.
    likelihood : str, default "bernoulli"
        ``"bernoulli"``, ``"continuous-bernoulli"``, ``"gaussian"`` (one learned σ),
        ``"gaussian-fixed"`` (σ = 1), ``"gaussian-per-dimension"``, ``"gaussian-decoder"``,
        ``"laplace"``, ``"discretized-logistic"`` or ``"discretized-logistic-mixture"``.
    prior : str, default "normal"
        ``"normal"``, ``"learnable"``, ``"mixture"``, ``"vamp"`` or ``"conditional"``.
    posterior : str, default "diagonal"
        ``"diagonal"``, ``"full"`` (full covariance through a Cholesky factor), ``"planar"``
        (planar flow, Rezende & Mohamed 2015) or ``"iaf"`` (inverse autoregressive flow, Kingma
        et al. 2016).
    beta : float, default 1.0
        Weight of the KL term in the ELBO objective (β-VAE; the IWAE bound has no KL term to
        weigh); reported ELBOs use β = 1.
    epochs, batch_size, lr : int, int, float
        Optimisation: Adam with warm-up and cosine decay (``TrainConfig``); defaults 50, 100
        and 1e-3.
    seed : int or None, default None
        Seeds initialisation, minibatch order and sampling noise; ``None`` draws fresh ones.
    device : str, default "auto"
        ``"auto"``, ``"cpu"`` or ``"cuda"``.
    network : str, default "mlp"
        ``"mlp"`` or ``"conv"`` (images ``[n, C, H, W]``).
    activation : str, default "relu"
        Hidden-layer non-linearity, e.g. ``"relu"`` or ``"tanh"``.
    samples : int, default 1
        Monte Carlo samples per example in each training step.
    verbose : bool, default False
        Print one line per epoch.
    flow_steps : int, default 4
        Layers of a flow posterior.
    objective : str, default "elbo"
        The bound training maximises: ``"elbo"`` or ``"iwae"`` (Burda et al. 2016, with ``k``
        importance samples).
    k : int, default 1
        Importance samples of the IWAE objective.
    gradient : str, default "standard"
        How the objective's gradient flows: ``"standard"``, ``"stl"`` (sticking the landing,
        Roeder et al. 2017) or ``"dreg"`` (doubly reparameterised, Tucker et al. 2018; IWAE
        only). Combinations without a meaning are refused at ``fit``.
    conditional : bool, default False
        A conditional VAE, q(z|x, y) and p(x|z, y) with p(z) or, with ``prior="conditional"``,
        a learned p(z|y) (Sohn, Lee & Yan 2015): ``fit(X, y)`` takes class labels ``[n]``
        (integers or strings, one-hot internally; ``classes_``) or condition vectors ``[n, c]``
        (floats), and ``sample(n, y=...)``, ``transform``, ``reconstruct``, ``elbo``,
        ``score_samples``, ``log_likelihood`` and ``refine`` take the examples' ``y``. One
        stochastic layer, no VampPrior, arrays only (no ``DataLoader``).
    compile : bool, default False
        Run the training step, and the likelihood's log p(x|z) in ``elbo``, ``score_samples``
        and ``log_likelihood``, through ``torch.compile`` (``vaelab.train.fastpath``): the same
        numbers to float rounding; eager, after one warning, where it cannot compile. The first
        calls pay for compiling (seconds to a minute).
    layer_free_bits : float, default 0.0
        Each stochastic layer's batch-mean KL counts as at least this many nats (free bits per
        layer, Kingma et al. 2016; ``TrainConfig.layer_free_bits``); 0 is off.
    skip_grad_norm : float or None, default None
        Skip an update whose gradient norm exceeds this or is not finite (counted in
        ``history_[i].skipped_updates``).
    max_rollbacks : int, default 3
        On a NaN or infinite loss, return to the last epoch's end with half the learning rate,
        at most this many times (``history_[i].rollbacks``); 0 raises at once.
    alpha : float or None, default None
        With ``conditional=True`` and some labels missing (−1, or NaN) in ``fit(X, y)``, the
        model is M2 (Kingma et al. 2014): y is a latent variable where it is missing, and a
        classifier q(y|x) is trained beside the conditional VAE (``predict``,
        ``predict_proba``). ``alpha`` weighs its classification term, α · Σ_labelled log q(y|x)
        against the bound summed over the N training examples; ``None`` is the paper's α = 0.1·N
        (with ``labelled_batch_size=0``, α weighs the labelled examples' mean instead).
    inference : str, default "bottom-up"
        How the posterior over the stochastic layers is drawn: ``"bottom-up"``, q(z₁|x)
        q(z₂|z₁) ⋯, or ``"top-down"``, the Ladder VAE's z_L first through the prior's own
        networks, each layer's posterior the precision-weighted merge of the prior's conditional
        and bottom-up evidence from x (Sønderby et al. 2016; ``vaelab.components.top_down``).
        Top-down takes ``posterior="diagonal"``, a Gaussian ``prior`` (``"normal"`` or
        ``"learnable"``) and no condition.
    latent : str, default "gaussian"
        The code's family: ``"gaussian"``, ``"bernoulli"`` (``latent_dim`` binary units) or
        ``"categorical"`` (``latent_dim`` groups of ``categories`` classes, each one-hot, laid
        flat: codes ``[n, latent_dim · categories]``). A discrete code's prior is uniform
        (``prior="normal"``, the default) or learned and factorised (``"learnable"``); its
        gradient is ``"reinforce"`` (NVIL), ``"vimco"`` (IWAE), ``"relaxed"`` (Gumbel-softmax)
        or ``"enumerate"`` (exact ELBO; ``vaelab.objectives.discrete``); ``"standard"`` means
        ``"enumerate"`` for the ELBO of a code of at most 256 states, else ``"reinforce"``.
        Reported numbers are always the discrete model's.
    categories : int, default 10
        Classes per group of a categorical code.
    temperature, temperature_final : float, float or None, default 1.0, None
        The relaxation's temperature (``gradient="relaxed"``), annealed exponentially to
        ``temperature_final`` over training when given (Jang, Gu & Poole 2017).
    straight_through : bool, default False
        ``gradient="relaxed"``: the decoder reads the discrete code, the gradient is the
        relaxed one's.
    labelled_batch_size : int, default 100
        M2 only: every training step sees a batch of ``batch_size`` unlabelled examples and one
        of this many labelled examples (at most their number), drawn by cycling through the
        labelled set, as in the paper; the step's objective is an unbiased estimate of the
        paper's J^α up to a factor 1/N (``vaelab.train.labelled_batches``). An epoch is one pass
        over the unlabelled examples. 0 puts the labelled examples in the ordinary shuffled
        batches instead, each seen once per epoch (vaelab's first M2).

    Attributes
    ----------
    model_ : VAEModel
        The trained model: posterior, prior and likelihood modules (the best weights by
        validation ELBO).
    model_config_ : ModelConfig
        The resolved configuration the model was built from (``build_model(model_config_)``
        builds it again).
    data_shape_ : tuple of int
        The shape of one example, ``(features,)`` or ``(C, H, W)``.
    n_features_in_ : int
        ``X.shape[1]`` as ``fit`` saw it (the channels of images), as scikit-learn counts it.
    history_ : list of EpochMetrics
        One entry per epoch: the training ELBO and its terms, the learning rate and the
        validation ELBO (empty for a model opened by ``load``).
    device_ : torch.device
        Where the model lives.
    classes_ : numpy.ndarray
        A conditional model's class labels, in the order of the one-hot columns (only when
        ``fit`` was given labels).

    Examples
    --------
    >>> from sklearn.datasets import load_digits
    >>> import vaelab
    >>> X = load_digits().data / 16.0  # [1797, 64] in [0, 1]
    >>> model = vaelab.VAE(latent_dim=2, hidden=(64,), epochs=2, seed=0, device="cpu").fit(X)
    >>> model.transform(X[:5]).shape  # posterior means
    (5, 2)
    >>> model.elbo(X[:5]).shape  # per-example ELBO in nats
    (5,)
    >>> model.log_likelihood(X[:5], k=100).shape  # IWAE-100 estimates of log p(x)
    (5,)
    >>> model.sample(3).shape  # decoder means at z ~ p(z)
    (3, 64)
    >>> len(model.history_)
    2
    """

    def __init__(
        self,
        latent_dim: int | tuple[int, ...] = 8,
        hidden: tuple[int, ...] = (256,),
        likelihood: str = "bernoulli",
        prior: str = "normal",
        posterior: str = "diagonal",
        beta: float = 1.0,
        epochs: int = 50,
        batch_size: int = 100,
        lr: float = 1e-3,
        seed: int | None = None,
        device: str = "auto",
        network: str = "mlp",
        activation: str = "relu",
        samples: int = 1,
        verbose: bool = False,
        flow_steps: int = DEFAULT_FLOW_STEPS,
        objective: str = "elbo",
        k: int = 1,
        gradient: str = "standard",
        conditional: bool = False,
        compile: bool = False,
        layer_free_bits: float = 0.0,
        skip_grad_norm: float | None = None,
        max_rollbacks: int = 3,
        alpha: float | None = None,
        inference: str = "bottom-up",
        latent: str = "gaussian",
        categories: int = DEFAULT_CATEGORIES,
        temperature: float = 1.0,
        temperature_final: float | None = None,
        straight_through: bool = False,
        labelled_batch_size: int = 100,
    ) -> None:
        self.latent_dim = latent_dim
        self.hidden = hidden
        self.likelihood = likelihood
        self.prior = prior
        self.posterior = posterior
        self.beta = beta
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.seed = seed
        self.device = device
        self.network = network
        self.activation = activation
        self.samples = samples
        self.verbose = verbose
        self.flow_steps = flow_steps
        self.objective = objective
        self.k = k
        self.gradient = gradient
        self.conditional = conditional
        self.compile = compile
        self.layer_free_bits = layer_free_bits
        self.skip_grad_norm = skip_grad_norm
        self.max_rollbacks = max_rollbacks
        self.alpha = alpha
        self.inference = inference
        self.latent = latent
        self.categories = categories
        self.temperature = temperature
        self.temperature_final = temperature_final
        self.straight_through = straight_through
        self.labelled_batch_size = labelled_batch_size

    # ----------------------------------------------------------------------------- configuration
    def model_config(
        self, data_shape: tuple[int, ...], condition_dim: int = 0, semi_supervised: bool = False
    ) -> ModelConfig:
        """The architecture these hyper-parameters describe, for data of ``data_shape`` (and
        conditions of ``condition_dim`` numbers, for a conditional model; with a classifier
        q(y|x), M2, when ``semi_supervised``)."""
        latent = self.latent_dim
        return ModelConfig(
            data_shape=tuple(int(s) for s in data_shape),
            latent_dim=tuple(latent) if isinstance(latent, list) else latent,
            hidden=tuple(self.hidden),
            likelihood=self.likelihood,
            prior=self.prior,
            posterior=self.posterior,
            network=self.network,
            activation=self.activation,
            flow_steps=self.flow_steps,
            condition_dim=condition_dim,
            semi_supervised=semi_supervised,
            inference=self.inference,
            latent=self.latent,
            categories=self.categories,
        )

    def train_config(self) -> TrainConfig:
        return TrainConfig.from_options(self)

    # ----------------------------------------------------------------------------------- inputs
    def _validate(self, X: Any, reset: bool) -> np.ndarray:
        """``X`` as a float32 array ``[n, *data_shape]``; NaN, inf and wrong shapes are refused.

        A fitted model of image-shaped data ``[C, H, W]`` also takes flat rows ``[n, C·H·W]``
        (each example flattened in C order, as ``x.reshape(n, -1)`` gives), which it reshapes.
        """
        if isinstance(X, torch.Tensor):
            X = X.detach().cpu().numpy()
        if not reset:
            X = self._as_data_shape(X)
        # Two examples at least: one has no spread to start the decoder's scale from.
        X = validate_data(
            self,
            X,
            reset=reset,
            dtype=np.float32,
            allow_nd=True,
            ensure_min_samples=2 if reset else 1,
        )
        if not reset and tuple(X.shape[1:]) != self.data_shape_:
            raise ValueError(
                f"X has examples of shape {tuple(X.shape[1:])}, but this VAE was fitted on "
                f"examples of shape {self.data_shape_}"
            )
        return X

    def _as_data_shape(self, X: Any) -> Any:
        """Flat rows of a multi-dimensional data shape reshaped to it; any other shape that does
        not match is refused naming both accepted shapes. Tabular data is left to
        ``validate_data``, whose message scikit-learn's checks expect."""
        check_is_fitted(self, "data_shape_")
        shape = self.data_shape_
        if len(shape) < 2:
            return X
        found = np.shape(X)
        size = math.prod(shape)
        if len(found) == 2 and found[1] == size:
            return np.reshape(np.asarray(X), (found[0], *shape))
        if tuple(found[1:]) != tuple(shape):
            dims = ", ".join(map(str, shape))
            raise ValueError(
                f"X has examples of shape {tuple(found[1:])}, but this VAE was fitted on examples "
                f"of shape {tuple(shape)}: pass an array [n, {dims}] or flat rows [n, {size}]"
            )
        return X

    def _compile_evaluation(self) -> None:
        """With ``compile``, the likelihood's log p(x|z) compiled (``vaelab.train.fastpath``)."""
        if self.compile:
            compile_evaluation(self.model_)

    def _tensor(self, X: Any) -> torch.Tensor:
        check_is_fitted(self, "model_")
        x = torch.from_numpy(self._validate(X, reset=False))
        self.model_.likelihood.check_support(x)
        return x

    # ------------------------------------------------------------------------------ conditions
    def _learn_conditions(self, y: Any, n: int) -> np.ndarray:
        """The conditions of ``n`` training examples, float32 ``[n, c]``, from their ``y``: class
        labels ``[n]`` become one-hot over their classes (kept in ``classes_``), condition
        vectors ``[n, c]`` are taken as they are."""
        if y is None:
            raise ValueError(
                "conditional=True needs y, the examples' conditions: fit(X, y) with class labels "
                "[n] or condition vectors [n, c]"
            )
        if isinstance(y, torch.Tensor):
            y = y.detach().cpu().numpy()
        found = np.asarray(y)
        if found.ndim not in (1, 2) or found.shape[0] != n:
            raise ValueError(
                f"y must hold one label per example, [{n}], or one condition vector per example, "
                f"[{n}, c]; got shape {found.shape}"
            )
        if found.ndim == 1:
            missing = missing_labels(found)
            given = found[~missing]
            if given.size == 0:
                raise ValueError("y holds no labels (all are -1 or NaN); give some examples theirs")
            _check_labels(given)
            self.classes_ = np.unique(given)
            # Rows of zeros stand for missing labels: M2 (vaelab.model.semi_supervised).
            codes = np.zeros((n, len(self.classes_)), dtype=np.float32)
            codes[~missing] = one_hot(given, self.classes_)
            return codes
        if hasattr(self, "classes_"):
            del self.classes_  # a refit on vectors: the labels of a previous fit no longer apply
        return _condition_vectors(found, found.shape[1])

    def conditions(self, y: Any, n: int | None = None) -> np.ndarray:
        """The conditions the networks read for ``y``, float32 ``[m, c]``: one-hot rows over
        ``classes_`` for class labels ``[m]``, or condition vectors ``[m, c]`` as they are.
        With ``n``, a single label (or vector) stands for n examples, and m must be n."""
        check_is_fitted(self, "model_")
        size = self.model_.condition_dim
        if size == 0:
            raise ValueError(
                "this VAE is not conditional; fit one with conditional=True to condition on y"
            )
        if isinstance(y, torch.Tensor):
            y = y.detach().cpu().numpy()
        found = np.asarray(y)
        labels = hasattr(self, "classes_")
        rows = 1 if labels else 2  # the dimensions of y for several examples
        if n is not None and found.ndim == rows - 1:
            found = np.broadcast_to(found, (n,) if labels else (n, size))
        if found.ndim != rows or (n is not None and found.shape[0] != n):
            what = "class labels [n]" if labels else f"condition vectors [n, {size}]"
            count = "" if n is None else f" with n = {n} (or one for all)"
            raise ValueError(f"y must be {what}{count} for this VAE, got shape {found.shape}")
        return one_hot(found, self.classes_) if labels else _condition_vectors(found, size)

    def _condition(
        self,
        y: Any,
        n: int,
        *,
        ignored: bool = False,
        shared: bool = False,
        count: str | None = None,
    ) -> torch.Tensor | None:
        """The conditions of ``n`` examples as a tensor ``[n, c]`` (None for a VAE without
        conditioning); with ``shared``, one label or vector may stand for all of them. A
        conditional VAE needs ``y``; one without refuses a ``y`` it would silently ignore, unless
        ``ignored`` (scikit-learn passes a y to ``score`` of any estimator). ``count`` is the
        keyword of the method's count after y (``samples``), which an integer in y's place,
        ``elbo(X, 100)``, was most likely meant as: the refusal names it."""
        check_is_fitted(self, "model_")
        if self.model_.condition_dim == 0:
            integer = isinstance(y, (int, np.integer)) and not isinstance(y, bool)
            if y is not None and not ignored and count is not None and integer:
                raise ValueError(
                    f"this VAE is not conditional, so it would ignore y, and the second "
                    f"positional argument is y (here {y}); give {_COUNTS[count]} by name, "
                    f"{count}={y}"
                )
            if y is not None and not ignored:
                raise ValueError(
                    "this VAE is not conditional, so it would ignore y; leave y out, or fit a "
                    "conditional VAE (conditional=True) to condition on it"
                )
            return None
        if y is None:
            what = "class labels" if hasattr(self, "classes_") else "condition vectors"
            raise ValueError(f"this VAE is conditional: pass y, the examples' {what}")
        found = self.conditions(y, n if shared else None)
        if found.shape[0] != n:
            raise ValueError(
                f"y holds the conditions of {found.shape[0]} examples for {n} examples; give "
                "one per example"
            )
        return torch.from_numpy(found)

    # ---------------------------------------------------------------------------------- fitting
    def fit(self, X: Any, y: Any = None) -> VAE:
        """Train on ``X``: an array or tensor ``[n, *data_shape]``, a torch ``Dataset`` or a
        ``DataLoader`` (for data that does not fit in memory). ``y`` is ignored, except by a
        conditional VAE (``conditional=True``), which trains on arrays ``X`` with their class
        labels ``y [n]`` or condition vectors ``y [n, c]``."""
        device = resolve_device(self.device)
        train_config = self.train_config()
        train_config.validate()
        self.model_config((1,)).check_gradient(train_config.gradient)
        if self.conditional and isinstance(X, (Dataset, DataLoader)):
            raise ValueError(
                "conditional=True trains on arrays X with their y; a Dataset or DataLoader "
                "is not supported for a conditional VAE"
            )
        if isinstance(X, (Dataset, DataLoader)):
            dataset = X

            def build(streams_seed: int) -> tuple[VAEModel, ModelConfig, BatchSource]:
                generator = torch.Generator().manual_seed(streams_seed)
                if isinstance(dataset, DataLoader):
                    loader = dataset
                else:
                    loader = self._loader(dataset, generator)
                batches = LoaderBatches(loader)
                model, config = self._start_from_stream(batches, device)
                return model, config, batches

        else:
            x = torch.from_numpy(self._validate(X, reset=True))
            conditions = None
            if self.conditional:
                conditions = torch.from_numpy(self._learn_conditions(y, x.shape[0]))
            labelled = None if conditions is None else int((~missing_rows(conditions)).sum())
            semi = labelled is not None and labelled < x.shape[0]
            if semi:
                assert labelled is not None
                weight = classification_weight(
                    self.alpha, len(x), labelled, mean=self.labelled_batch_size == 0
                )
                train_config = dataclasses.replace(train_config, classification_weight=weight)

            def build(streams_seed: int) -> tuple[VAEModel, ModelConfig, BatchSource]:
                size = 0 if conditions is None else conditions.shape[1]
                config = self.model_config(tuple(x.shape[1:]), size, semi)
                model = start_model(
                    config,
                    device,
                    x[:INIT_EXAMPLES],
                    check=lambda model: model.likelihood.check_support(x),
                )
                batches: IndexedBatches
                if semi:
                    batches = semi_supervised_batches(
                        x,
                        self.batch_size,
                        streams_seed,
                        condition=conditions,
                        labelled_batch_size=self.labelled_batch_size,
                    )
                else:
                    batches = IndexedBatches(x, self.batch_size, streams_seed, condition=conditions)
                return model, config, batches

        with start_training(
            self.seed,
            device,
            build,
            train_config,
            observer=_PrintEpochs() if self.verbose else None,
            compile=self.compile,
        ) as start:
            history = start.trainer.fit(start.batches)
        model, config = start.model, start.config
        self._set_fitted(model, config, device, history)
        return self

    def _start_from_stream(
        self, batches: LoaderBatches, device: torch.device
    ) -> tuple[VAEModel, ModelConfig]:
        """Build the model from the first batch's shape and start its decoder at the moments of
        the first ``INIT_EXAMPLES`` examples of the stream; from the model's creation on, every
        batch is checked against its likelihood's support as it streams."""
        moments = DataMoments()
        model: VAEModel | None = None
        config: ModelConfig | None = None
        for batch in batches.batches(0):
            x = batch.x
            if model is None:
                config = self.model_config(tuple(x.shape[1:]))
                model = build_model(config).to(device)
                batches.check = model.likelihood.check_support
                x = batches.prepare(x, "batch 1 of the DataLoader (epoch 1)")
            moments.update(x)
            if moments.count >= INIT_EXAMPLES:
                break
        if model is None or config is None:
            raise DataError("the DataLoader yields no batches; give it data")
        model.initialise(moments)
        return model, config

    def _loader(self, dataset: Dataset, generator: torch.Generator) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=True, generator=generator)

    # ------------------------------------------------------------------------------- inference
    def _chunks(
        self, x: torch.Tensor, condition: torch.Tensor | None = None
    ) -> Iterator[tuple[torch.Tensor, VAEModel]]:
        """``x`` in chunks on the model's device, each with the model given its conditions."""
        if condition is not None:
            condition = condition.to(self.device_)
        for start in range(0, x.shape[0], EVAL_BATCH):
            rows = slice(start, start + EVAL_BATCH)
            yield x[rows].to(self.device_), given_rows(self.model_, condition, rows)

    @torch.no_grad()
    def transform(self, X: Any, y: Any = None) -> np.ndarray:
        """Posterior means E_q[z|x] (E_q[z|x, y] of a conditional VAE), ``[n, latent]`` (for a
        flow or several stochastic layers, whose mean has no closed form, a Monte Carlo average
        from each example's own draws: ``vaelab.objectives.noise.posterior_mean``)."""
        x = torch.from_numpy(self._validate_fitted(X))
        condition = self._condition(y, x.shape[0])
        means = [
            posterior_mean(model.encode(chunk), chunk, EVAL_SEED)
            for chunk, model in self._chunks(x, condition)
        ]
        return torch.cat([m.cpu() for m in means]).numpy()

    def fit_transform(self, X: Any, y: Any = None, **fit_params: Any) -> np.ndarray:
        """``fit(X, y)``, then ``transform(X)`` (``transform(X, y)`` for a conditional VAE)."""
        return self.fit(X, y, **fit_params).transform(X, y if self.conditional else None)

    def _validate_fitted(self, X: Any) -> np.ndarray:
        check_is_fitted(self, "model_")
        return self._validate(X, reset=False)

    @torch.no_grad()
    def inverse_transform(self, X: Any, y: Any = None) -> np.ndarray:
        """Decoder means E[x|z] (E[x|z, y] of a conditional VAE) for latent codes ``[n, latent]``
        → ``[n, *data_shape]`` (with several stochastic layers, codes of all of them, of which
        the decoder reads z₁)."""
        check_is_fitted(self, "model_")
        z = torch.as_tensor(check_array(X, dtype=np.float32))
        if z.shape[1] != self.model_.latent_dim:
            raise ValueError(
                f"expected latent codes with {self.model_.latent_dim} columns, got {z.shape[1]}"
            )
        condition = self._condition(y, z.shape[0])
        means = [model.likelihood.mean(chunk).cpu() for chunk, model in self._chunks(z, condition)]
        return torch.cat(means).numpy()

    @torch.no_grad()
    def sample(
        self, n: int = 1, *, y: Any = None, mean: bool = True, seed: int | None = None
    ) -> np.ndarray:
        """``n`` examples from the model, ``[n, *data_shape]``: z ~ p(z), then E[x|z] when ``mean``
        (what figures show), else x ~ p(x|z). A conditional VAE needs ``y``: one label (or one
        condition vector) for all n examples, or one per example, ``[n]`` (``[n, c]``); then
        z ~ p(z|y) and x from p(x|z, y)."""
        condition = self._condition(y, n, shared=True)
        model = self.model_ if condition is None else self.model_.given(condition.to(self.device_))
        with seeded(seed, self.device_):
            z = model.sample_latent(n)
            p = model.decode(z)
            x = p.mean if mean else p.sample()
        return x.cpu().numpy()

    @torch.no_grad()
    def reconstruct(self, X: Any, y: Any = None) -> np.ndarray:
        """E[x | z = E_q[z|x]]: the decoder mean at the posterior mean, ``[n, *data_shape]``
        (given the examples' ``y`` for a conditional VAE)."""
        return self.inverse_transform(self.transform(X, y), y).reshape(np.shape(X))

    @torch.no_grad()
    def elbo_terms(self, X: Any, y: Any = None, samples: int = 16) -> ElboTerms:
        """Each example's ELBO with its reconstruction and KL terms: float64 CPU tensors ``[n]`` in
        nats, computed exactly as ``elbo`` computes them (``objective`` equals ``elbo``: β = 1);
        for a top-down model also ``layer_kl`` ``[n, L]``, each stochastic layer's share of the
        KL from the same draws (z₁'s first), else None."""
        x = self._tensor(X)
        condition = self._condition(y, x.shape[0], count="samples")
        self._compile_evaluation()
        parts = []
        for chunk, model in self._chunks(x, condition):
            noise = ExampleNoise(chunk, EVAL_SEED).normal(
                samples, (self.model_.latent_dim,), like=chunk
            )
            parts.append(model.elbo(chunk, samples=samples, noise=noise))

        def joined(field: str) -> torch.Tensor:
            return torch.cat([getattr(p, field).cpu() for p in parts]).double()

        layers = [p.layer_kl for p in parts]
        layer_kl = None if any(t is None for t in layers) else joined("layer_kl")
        return ElboTerms(
            joined("reconstruction"), joined("kl"), joined("elbo"), joined("objective"), layer_kl
        )

    def elbo(self, X: Any, y: Any = None, samples: int = 16) -> np.ndarray:
        """Each example's ELBO in nats (float64 ``[n]``), with the exact KL where one exists and
        ``samples`` Monte Carlo draws for the reconstruction term. The draws are seeded by the
        example's own values, so its estimate does not depend on the others passed with it. A
        conditional VAE's is the bound on log p(x|y), given the examples' ``y``."""
        return self.elbo_terms(X, y, samples).elbo.numpy()

    def log_likelihood(
        self,
        X: Any,
        y: Any = None,
        k: int = 5000,
        batch_size: int = 100,
        *,
        proposal: str = "amortised",
        refine_steps: int = 2000,
        exact: bool = False,
    ) -> np.ndarray:
        """Each example's importance-weighted estimate of log p(x) in nats (float64 ``[n]``):

        log p̂(x) = log (1/k) Σᵢ p(x, zᵢ) / q(zᵢ|x),  zᵢ ~ q(z|x)

        (Burda et al. 2016), a stochastic lower bound that tightens as ``k`` grows, computed in
        bounded memory for any ``k`` (``vaelab.evaluation.loglik``). The draws are seeded by each example's
        own values, so repeated calls agree and an example's estimate does not depend on the
        others passed with it.

        ``proposal="refined"`` samples from each example's own optimised q* (``refine`` with
        ``refine_steps`` steps, in the full-covariance family for a Gaussian encoder, which
        contains the diagonal one: a too-narrow diagonal proposal makes the weights' variance
        infinite) instead of the encoder's q(z|x): a better proposal, so a tighter estimate for
        the same k, the encoder's amortisation gap no longer in the way. A conditional VAE's
        estimate is of log p(x|y), given the examples' ``y``.

        ``exact=True`` (a discrete code) sums p(x|z) p(z) over every state instead
        (``vaelab.evaluation.exact``): log p(x) itself, no ``k``; refused for a Gaussian code
        and beyond ``MAX_EXACT_STATES`` states."""
        from vaelab.evaluation.loglik import log_likelihood, log_likelihood_with_proposal

        if exact:
            from vaelab.evaluation.exact import exact_log_likelihood

            with torch.no_grad():
                return exact_log_likelihood(self.model_, self._tensor(X)).double().cpu().numpy()
        if proposal not in PROPOSALS:
            raise ValueError(f"unknown proposal {proposal!r}; choose one of {PROPOSALS}")
        x = self._tensor(X)
        condition = self._condition(y, x.shape[0], count="k")
        self._compile_evaluation()
        if proposal == "amortised":
            with torch.no_grad():
                found = log_likelihood(
                    self.model_,
                    x,
                    k,
                    batch_size=batch_size,
                    seed=EVAL_SEED,
                    condition=None if condition is None else condition.to(self.device_),
                )
            return found.log_px.double().numpy()
        parts = []
        for chunk, model in self._chunks(x, condition):
            local = self._refined(model, chunk, refine_steps, proposal_family=True)
            with torch.no_grad():
                found = log_likelihood_with_proposal(
                    chunk, local.distribution(), model.prior(), model.likelihood, k, seed=EVAL_SEED
                )
            parts.append(found.log_px.double())
        return torch.cat(parts).numpy()

    def refine(
        self,
        X: Any,
        y: Any = None,
        steps: int = 2000,
        *,
        samples: int = 1000,
        lr: float = 1e-2,
    ) -> RefinedPosteriors:
        """Non-amortised variational inference, the derivation's first step: for each example on
        its own, q*(z) = argmax ELBO(q) = argmin KL(q ‖ p(z|x)) over the model's posterior family,
        with the decoder and prior frozen, starting at the encoder's q(z|x) (Adam for ``steps``
        steps; ``vaelab.evaluation.gap.fit_local_posteriors``). Returns each example's ELBO under q*
        (``samples`` draws, exact KL where one exists) with its Monte Carlo standard error, and
        the codes E_q*[z]: always at least the amortised ELBO up to noise, and the difference is
        the example's amortisation gap (Cremer, Li & Duvenaud 2018). A conditional VAE's q*
        approximates p(z|x, y), given the examples' ``y``."""
        from vaelab.evaluation.gap import estimate_elbo

        x = self._tensor(X)
        condition = self._condition(y, x.shape[0], count="steps")
        elbos, errors, codes = [], [], []
        for chunk, model in self._chunks(x, condition):
            local = self._refined(model, chunk, steps, lr=lr)
            with torch.no_grad():
                q = local.distribution()
                (found,) = estimate_elbo(
                    chunk, [q], model.prior(), model.likelihood, samples, seed=EVAL_SEED
                )
            elbos.append(found.elbo.double())
            errors.append(found.mc_standard_error.double())
            codes.append(posterior_mean(q, chunk, EVAL_SEED).detach().cpu())
        return RefinedPosteriors(
            elbo=torch.cat(elbos).numpy(),
            elbo_standard_error=torch.cat(errors).numpy(),
            codes=torch.cat(codes).numpy(),
        )

    def _refined(
        self,
        model: VAEModel,
        x: torch.Tensor,
        steps: int,
        *,
        lr: float = 1e-2,
        proposal_family: bool = False,
    ) -> Any:
        """Each example's q* for ``x`` (one chunk, ``model`` given its conditions): in the
        model's family, or, as a proposal for importance sampling, in the richest family that
        contains it."""
        from vaelab.evaluation.gap import families_containing, fit_local_posteriors

        with torch.no_grad():
            families = families_containing(model.posterior(x))
        family = families[-1] if proposal_family else families[0]
        return fit_local_posteriors(model, x, family, steps=steps, lr=lr, seed=EVAL_SEED)

    def score_samples(self, X: Any, y: Any = None) -> np.ndarray:
        """Per-example ELBO, a lower bound on log p(x) (log p(x|y) of a conditional VAE, given
        the examples' ``y``) in nats. A semi-supervised model (M2) without ``y`` gives the bound
        on log p(x) with y summed out under q(y|x), U(x) (``unlabelled_bound``)."""
        if y is None and isinstance(getattr(self, "model_", None), SemiSupervisedModel):
            return self.unlabelled_bound(X)
        return self.elbo(X, y)

    def score(self, X: Any, y: Any = None) -> float:
        """Mean ELBO over ``X`` in nats per example. ``y`` is the examples' conditions for a
        conditional VAE, and ignored otherwise (scikit-learn passes it to every estimator)."""
        check_is_fitted(self, "model_")
        condition = y if self.model_.condition_dim else None
        return float(np.mean(self.score_samples(X, condition)))

    # ------------------------------------------------------------------- semi-supervised (M2)
    def _classifier(self) -> SemiSupervisedModel:
        check_is_fitted(self, "model_")
        if not isinstance(self.model_, SemiSupervisedModel):
            raise ValueError(
                "this VAE has no classifier q(y|x): only a conditional VAE fitted with some "
                "labels missing (-1 or NaN in y) trains one (M2)"
            )
        return self.model_

    # predict and predict_proba exist only where they can answer (a fitted model without a
    # classifier raises AttributeError, so hasattr is False and scikit-learn does not take the
    # VAE for a classifier), with the sentence of _classifier.
    @property
    def predict_proba(self) -> Callable[[Any], np.ndarray]:
        """q(y|x) of a semi-supervised model (M2) for each example, ``[n, classes]`` in the
        order of ``classes_``. A fitted model without a classifier has no ``predict_proba``
        (``AttributeError``, saying why)."""
        self._has_classifier()
        return self._predict_proba

    @property
    def predict(self) -> Callable[[Any], np.ndarray]:
        """The most probable class under q(y|x) of a semi-supervised model (M2), ``[n]``, as
        labels of ``classes_``. A fitted model without a classifier has no ``predict``
        (``AttributeError``, saying why)."""
        self._has_classifier()
        return self._predict

    def _has_classifier(self) -> None:
        if hasattr(self, "model_") and not isinstance(self.model_, SemiSupervisedModel):
            try:
                self._classifier()
            except ValueError as error:
                raise AttributeError(str(error)) from None

    @torch.no_grad()
    def _predict_proba(self, X: Any) -> np.ndarray:
        model = self._classifier()
        x = self._tensor(X)
        parts = [
            torch.softmax(model.classifier.logits(chunk), dim=1).cpu()
            for chunk, _ in self._chunks(x)
        ]
        return torch.cat(parts).double().numpy()

    def _predict(self, X: Any) -> np.ndarray:
        probabilities = self._predict_proba(X)
        return np.asarray(self.classes_)[np.argmax(probabilities, axis=1)]

    @torch.no_grad()
    def unlabelled_bound(self, X: Any, samples: int = 16) -> np.ndarray:
        """Each example's U(x) = Σ_y q(y|x) L(x, y) + H(q(y|x)), a lower bound on log p(x) with
        the label summed out (Kingma et al. 2014, eq. 7), float64 ``[n]`` in nats, for a
        semi-supervised model (M2); ``samples`` draws of z per example, seeded by its values
        and shared by its C labels (``vaelab.objectives.semi_supervised``)."""
        model = self._classifier()
        x = self._tensor(X)
        self._compile_evaluation()
        parts = []
        for chunk, _ in self._chunks(x):
            noise = ExampleNoise(chunk, EVAL_SEED).normal(samples, (model.latent_dim,), like=chunk)
            parts.append(model.unlabelled_bound(chunk, samples=samples, noise=noise).bound.cpu())
        return torch.cat(parts).double().numpy()

    # ---------------------------------------------------------------------------------- saving
    def export_onnx(self, folder: str | os.PathLike[str]) -> OnnxExport:
        """Write the fitted model's encoder and decoder to folder ``folder`` as ONNX graphs,
        ``encoder.onnx`` (input ``x``; outputs ``loc``, what ``transform`` returns, and the
        posterior's other parameters) and ``decoder.onnx`` (input ``z``; outputs ``mean``, what
        ``inverse_transform`` returns, and the likelihood's parameters), with
        ``vaelab-onnx.json`` naming every input and output, its shape and meaning
        (``vaelab.estimator.onnx_export``). A conditional model's graphs take its conditions
        ``y [batch, c]`` too (one-hot over ``classes_`` for labels).

        Needs the optional packages of ``pip install vaelab[export]``. A model whose posterior
        has no closed-form mean (a flow, several stochastic layers) is refused with a
        ``ValueError`` naming it, and nothing is written."""
        check_is_fitted(self, "model_")
        return export_onnx(
            self.model_,
            folder,
            config=self.model_config_,
            classes=getattr(self, "classes_", None),
        )

    def save(self, path: str | os.PathLike[str], extra: dict[str, Any] | None = None) -> None:
        """Write the fitted model to folder ``path``: safetensors weights, JSON configuration
        (with ``extra``'s entries beside the model's: a run's data record and options)."""
        check_is_fitted(self, "model_")
        save_model(
            path,
            self.model_,
            self.model_config_,
            self.get_params(),
            getattr(self, "classes_", None),
            extra,
        )

    def _set_fitted(
        self,
        model: VAEModel,
        config: ModelConfig,
        device: torch.device,
        history: list[EpochMetrics],
        classes: np.ndarray | None = None,
    ) -> None:
        """The fitted state, set here alone: by ``fit``, by a run in a folder and by ``load``."""
        self.model_: VAEModel = model
        self.model_config_ = config
        self.data_shape_ = config.data_shape
        # As validate_data counts features in fit: X.shape[1] (the channels of images [n, C, H, W]).
        self.n_features_in_ = int(config.data_shape[0])
        self.history_: list[EpochMetrics] = history
        self.device_ = device
        if classes is not None:
            self.classes_ = classes

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.non_deterministic = self.seed is None
        tags.target_tags.required = bool(self.conditional)
        # The networks compute in float32, whatever the input's precision.
        if tags.transformer_tags is not None:
            tags.transformer_tags.preserves_dtype = ["float32"]
        return tags


# The counts that follow y in a method's arguments, for the refusal of ``elbo(X, 100)``.
_COUNTS = {
    "samples": "the number of samples",
    "k": "the number of importance samples",
    "steps": "the number of steps",
}


def _check_labels(labels: np.ndarray) -> None:
    """Refuse a column of labels that are not class labels: real numbers other than integers
    (a condition vector of one number is ``[n, 1]``), or NaN."""
    if labels.dtype.kind == "f":
        if not bool(np.isfinite(labels).all()):
            raise ValueError("y holds NaN or infinite labels; give every example its class")
        if not bool((labels == np.round(labels)).all()):
            raise ValueError(
                "y holds real numbers in one column; give class labels (integers or strings) as "
                "[n], or real conditions as vectors [n, c] (one number each as [n, 1])"
            )
    elif labels.dtype.kind not in "iubUSO":
        raise ValueError(f"y holds {labels.dtype} values, which are not class labels")


def missing_labels(labels: np.ndarray) -> np.ndarray:
    """Which of class labels ``[n]`` are missing, bool ``[n]``: −1 in numbers, NaN in reals."""
    if labels.dtype.kind == "f":
        return np.isnan(labels) | (labels == -1)
    if labels.dtype.kind in "iu":
        return labels == -1
    return np.zeros(labels.shape, dtype=bool)


def _condition_vectors(y: np.ndarray, size: int) -> np.ndarray:
    """Condition vectors ``[n, size]`` as float32, finite."""
    if y.ndim != 2 or y.shape[1] != size:
        raise ValueError(f"y must be condition vectors [n, {size}], got shape {y.shape}")
    if y.dtype.kind not in "iufb":
        raise ValueError(f"condition vectors must be numbers, got {y.dtype} values")
    vectors = y.astype(np.float32)
    if not bool(np.isfinite(vectors).all()):
        raise ValueError("y holds NaN or infinite values; give finite condition vectors")
    return vectors


def load(path: str | os.PathLike[str], device: str | None = None) -> VAE:
    """A fitted ``vaelab.VAE`` read from folder ``path`` (as written by ``VAE.save``), on
    ``device`` (``"auto"``, ``"cpu"``, ``"cuda"``, ...).

    By default the model goes where it was trained when that device exists here, else on the CPU:
    a model trained on a GPU opens on a machine without one. The estimator's ``device`` parameter
    then names the device it is on, so a refit or a save stays possible here.
    """
    return from_saved(read_model(path), device)


def from_saved(saved: SavedModel, device: str | None = None) -> VAE:
    """The fitted ``VAE`` of a model folder already read (``read_model``), on ``device`` (as
    ``load``)."""
    try:
        estimator = VAE(**saved.params)
    except TypeError as error:
        raise ModelFileError(
            f"{saved.folder / CONFIG_FILE} describes no model this vaelab can build ({error})"
        ) from None
    try:
        chosen = resolve_device(estimator.device if device is None else device)
    except ValueError:
        if device is not None:
            raise
        chosen = torch.device("cpu")  # trained on a device this machine lacks
        estimator.device = "cpu"
    if device is not None:
        estimator.device = device
    estimator._set_fitted(saved.model.to(chosen), saved.config, chosen, [], saved.classes)
    return estimator
