"""The options of a training run: names, defaults, types, help, TOML files and merging.

``RunConfig`` is the single list of options: the ``vaelab train`` flags, the keys of a ``--config``
TOML file and the fields of a run's ``config.json`` are its field names (``-`` or ``_``). Values are
merged defaults < TOML file < command-line flags; a resumed run starts from its saved configuration
instead of the defaults and refuses any setting that would change what is computed.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vaelab.components.flows import DEFAULT_FLOW_STEPS
from vaelab.components.networks import ACTIVATIONS, NETWORKS
from vaelab.data.sources import BINARIZATIONS, SCALINGS, SOURCES
from vaelab.estimator.facade import VAE, resolve_device
from vaelab.model.registry import (
    DEFAULT_CATEGORIES,
    INFERENCES,
    LATENTS,
    LIKELIHOODS,
    POSTERIORS,
    PRIORS,
    ModelConfig,
    plain_integers,
)
from vaelab.objectives.bounds import GRADIENTS, OBJECTIVES
from vaelab.train.config import LR_SCHEDULES, TrainConfig


class RunError(ValueError):
    """A mistake in a run's options or folder; the message says what is wrong and what to do."""


class ParameterError(RunError):
    """A bad value of one parameter of a library function, named as the library names it
    (``samples must be at least 1, got 0``); the command line says the same with its flag
    (``--samples must be …``), so the library never speaks in flags."""

    def __init__(self, parameter: str, problem: str) -> None:
        super().__init__(f"{parameter} {problem}")
        self.parameter = parameter
        self.problem = problem


def check_at_least(**values: tuple[int | None, int]) -> None:
    """Refuse the first ``name=(value, least)`` whose value (when given) is below ``least``."""
    for name, (value, least) in values.items():
        if value is not None and value < least:
            raise ParameterError(name, f"must be at least {least}, got {value}")


def _option(default: Any, help: str, kind: str, choices: tuple[str, ...] | None = None) -> Any:
    return field(default=default, metadata={"help": help, "kind": kind, "choices": choices})


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a training run. The command line's ``train`` options, the keys of a
    ``--config`` TOML file and the fields of ``config.json`` are these names (``-`` or ``_``)."""

    # data
    data: str | None = _option(None, "data set name or path (the DATA argument)", "str?")
    data_dir: str | None = _option(
        None, "folder holding mnist/, binarized_mnist/, frey_face/", "str?"
    )
    binarize: str = _option("none", "binarisation of the (scaled) data", "str", BINARIZATIONS)
    threshold: float = _option(0.5, "cut for --binarize threshold: x > t becomes 1", "float")
    scale: str = _option(
        "auto", "scaling: a data set's documented scale, none, or min-max", "str", SCALINGS
    )
    valid_fraction: float = _option(0.1, "share of examples held out for validation", "float")
    test_fraction: float = _option(
        0.1, "share held out for testing (data without its own test split)", "float"
    )
    split_seed: int = _option(0, "seed of the train/valid/test split", "int")
    # model
    latent_dim: int | tuple[int, ...] = _option(
        8,
        "size of the latent code z; sizes of several stochastic layers, z1 first (100,50)",
        "latent",
    )
    inference: str = _option(
        "bottom-up",
        "how q draws the layers: bottom-up, z1 from x first, or top-down, z_L first through the "
        "prior's networks (Ladder VAE)",
        "str",
        INFERENCES,
    )
    hidden: tuple[int, ...] = _option(
        (256,), "hidden layer sizes, comma-separated (400,400); 'none' for linear maps", "hidden"
    )
    likelihood: str = _option("bernoulli", "p(x|z)", "str", tuple(LIKELIHOODS))
    prior: str = _option(
        "normal", "p(z); conditional: a learned p(z|y) (needs --conditional)", "str", tuple(PRIORS)
    )
    conditional: bool = _option(
        False,
        "a conditional VAE, q(z|x,y) and p(x|z,y), on the data's class labels y (one-hot)",
        "bool",
    )
    posterior: str = _option(
        "diagonal",
        "q(z|x): diagonal or full-covariance Gaussian, or a planar or inverse autoregressive flow",
        "str",
        tuple(POSTERIORS),
    )
    flow_steps: int = _option(DEFAULT_FLOW_STEPS, "layers of a flow posterior", "int")
    network: str = _option(
        "mlp", "encoder/decoder body (conv needs images)", "str", tuple(NETWORKS)
    )
    activation: str = _option("relu", "hidden-layer non-linearity", "str", tuple(ACTIVATIONS))
    objective: str = _option(
        "elbo", "the bound training maximises: elbo, or iwae with K samples", "str", OBJECTIVES
    )
    k: int = _option(1, "importance samples of the IWAE objective", "int")
    gradient: str = _option(
        "standard",
        "gradient estimator: standard, stl (sticking the landing) or dreg (IWAE only); for a "
        "discrete --latent reinforce (what standard means there), vimco (IWAE), relaxed or "
        "enumerate",
        "str",
        GRADIENTS,
    )
    beta: float = _option(
        1.0, "weight of the KL term while training (beta-VAE; ELBO objective only)", "float"
    )
    samples: int = _option(1, "Monte Carlo samples per example and step (ELBO objective)", "int")
    # training
    epochs: int = _option(50, "passes over the training data", "int")
    batch_size: int = _option(100, "examples per step", "int")
    lr: float = _option(1e-3, "peak learning rate of Adam", "float")
    lr_schedule: str = _option("cosine", "learning rate after warm-up", "str", LR_SCHEDULES)
    warmup: float = _option(
        0.02, "fraction of all steps with a linear learning-rate warm-up", "float"
    )
    kl_warmup: float | None = _option(
        None,
        "epochs over which the KL weight rises from 0 to beta (with --objective iwae it tempers "
        "the weights' log p(z) - log q(z|x); --gradient standard only); none: for --inference "
        "top-down 500 steps with the ELBO, 5000 with IWAE (at most a quarter of the run), at "
        "least 1 epoch (at full KL from the start q collapses onto the prior), else 0",
        "float~",
    )
    free_bits: float = _option(0.0, "minimum KL per latent dimension, nats (0: off)", "float")
    grad_clip: float | None = _option(
        None, "maximum gradient norm (0 or none: no clipping)", "float?"
    )
    patience: int | None = _option(
        None,
        "stop after this many epochs without a better validation ELBO (0 or none: off)",
        "int?",
    )
    seed: int = _option(0, "seed of initialisation, data order and sampling noise", "int")
    device: str = _option("auto", "auto, cpu or cuda", "str")
    compile: bool = _option(
        False,
        "run the training step through torch.compile (vaelab.train.fastpath); eager, after one "
        "warning, where it cannot compile",
        "bool",
    )
    # checkpoints
    checkpoint_every: int = _option(0, "also checkpoint every N steps (0: off)", "int")
    checkpoint_seconds: float = _option(
        60.0, "also checkpoint every S seconds mid-epoch (0: off)", "float"
    )
    # training that survives
    layer_free_bits: float = _option(
        0.0, "minimum KL per stochastic layer, nats (0: off); beta weighs every layer", "float"
    )
    skip_grad_norm: float | None = _option(
        None,
        "skip an update whose gradient norm exceeds this or is not finite (none: never)",
        "float?",
    )
    max_rollbacks: int = _option(
        3,
        "on a NaN or infinite loss, return to the last epoch end with a lower learning rate, "
        "at most this many times (0: stop at once)",
        "int",
    )
    # semi-supervised (M2; after the rest, so that older config.json files keep their order)
    labelled: int | None = _option(
        None,
        "semi-supervised M2: keep N class labels of the training split, class-balanced and drawn "
        "with --split-seed, train on the rest unlabelled (needs --conditional; none: all labels)",
        "int?",
    )
    # discrete latents (vaelab.components.discrete, vaelab.objectives.discrete)
    latent: str = _option(
        "gaussian",
        "the code's family: gaussian, bernoulli (LATENT_DIM binary units) or categorical "
        "(LATENT_DIM groups of --categories classes); gradients reinforce, vimco, relaxed, "
        "enumerate",
        "str",
        LATENTS,
    )
    categories: int = _option(DEFAULT_CATEGORIES, "classes per group of a categorical code", "int")
    temperature: float = _option(
        1.0, "temperature of the relaxation (--gradient relaxed) at the start", "float"
    )
    temperature_final: float | None = _option(
        None,
        "anneal the temperature exponentially to this over training (none: constant)",
        "float?",
    )
    straight_through: bool = _option(
        False, "--gradient relaxed: discrete code forward, relaxed gradient backward", "bool"
    )
    labelled_batch_size: int = _option(
        100,
        "semi-supervised M2: labelled examples per step, drawn by cycling through the labelled "
        "ones beside each batch of --batch-size unlabelled ones (at most --labelled; 0: the "
        "labelled examples in the ordinary batches)",
        "int",
    )

    def train_config(self) -> TrainConfig:
        return TrainConfig.from_options(
            self, warmup_fraction="warmup", kl_warmup_epochs="kl_warmup"
        )

    def model_config(self, data_shape: tuple[int, ...], condition_dim: int = 0) -> ModelConfig:
        return self.estimator().model_config(
            data_shape, condition_dim, semi_supervised=self.labelled is not None
        )

    def estimator(self) -> VAE:
        """The ``vaelab.VAE`` these options describe (what ``vaelab.load`` of the run gives back)."""
        return VAE(
            latent_dim=self.latent_dim,
            hidden=tuple(self.hidden),
            likelihood=self.likelihood,
            prior=self.prior,
            posterior=self.posterior,
            beta=self.beta,
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            seed=self.seed,
            device=self.device,
            compile=self.compile,
            network=self.network,
            activation=self.activation,
            samples=self.samples,
            flow_steps=self.flow_steps,
            objective=self.objective,
            k=self.k,
            gradient=self.gradient,
            conditional=self.conditional,
            layer_free_bits=self.layer_free_bits,
            skip_grad_norm=self.skip_grad_norm,
            max_rollbacks=self.max_rollbacks,
            inference=self.inference,
            latent=self.latent,
            categories=self.categories,
            temperature=self.temperature,
            temperature_final=self.temperature_final,
            straight_through=self.straight_through,
        )

    def validate(self) -> None:
        """Check every option that does not need the data; ``RunError`` names the first bad one."""
        if self.data is None:
            raise RunError("no data given; pass DATA (a data set name or a path) or set data = ...")
        if self.labelled is not None and not self.conditional:
            raise ParameterError(
                "labelled",
                "needs a conditional model (--conditional): the labels kept are its condition y",
            )
        try:
            self.train_config().validate()
            # The condition's size comes with the data; any size checks the combinations.
            self.model_config((1,), 2 if self.conditional else 0).validate()
            self.model_config((1,)).check_gradient(self.gradient)
            resolve_device(self.device)
        except ValueError as error:
            raise RunError(str(error)) from None
        for name in ("checkpoint_every", "checkpoint_seconds"):
            if getattr(self, name) < 0:
                raise RunError(f"{name} must be 0 (off) or positive, got {getattr(self, name)}")
        if self.free_bits > 0 and isinstance(self.latent_dim, tuple):
            raise RunError(
                "free bits clamp each latent unit's closed-form KL, which a model with several "
                "stochastic layers does not have (its KL is a Monte Carlo estimate over all "
                "layers at once); use free_bits = 0 with several latent sizes (layer_free_bits "
                "clamps each layer's KL)"
            )

    def to_json(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["hidden"] = list(self.hidden)
        if isinstance(self.latent_dim, tuple):
            values["latent_dim"] = list(self.latent_dim)
        return values


OPTIONS = {f.name: f for f in dataclasses.fields(RunConfig)}
# Options that may change when a run resumes: where things are, not what is computed.
RESUMABLE = {"data_dir", "device", "compile", "checkpoint_every", "checkpoint_seconds"}


def parse_hidden(text: str) -> tuple[int, ...]:
    """``"400,400"`` → ``(400, 400)``; ``"none"`` (or ``""``) → ``()``: linear maps."""
    text = text.strip()
    if text.lower() in ("none", ""):
        return ()
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(
            f"hidden must be comma-separated layer sizes such as 400,400 or 'none', got {text!r}"
        ) from None
    if any(size < 1 for size in sizes):
        raise ValueError(f"hidden layer sizes must be positive, got {text!r}")
    return sizes


def parse_latent(value: Any) -> int | tuple[int, ...]:
    """``8`` or ``"8"`` → 8, one stochastic layer; ``"100,50"`` or ``[100, 50]`` →
    ``(100, 50)``, several, z₁ first (a single size in a list is one layer)."""
    if isinstance(value, int) and not isinstance(value, bool):
        sizes: tuple[Any, ...] = (value,)
    elif isinstance(value, str):
        sizes = tuple(part.strip() for part in value.split(","))
    elif isinstance(value, (list, tuple)):
        sizes = tuple(value)
    else:
        sizes = ()
    if sizes and all(isinstance(s, str) and s.isdecimal() for s in sizes):
        sizes = tuple(int(s) for s in sizes)
    if not sizes or any(not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in sizes):
        raise ValueError(
            "latent_dim must be a positive integer, or comma-separated sizes of several "
            f"stochastic layers such as 100,50 (z1 first), got {value!r}"
        )
    return sizes[0] if len(sizes) == 1 else sizes


def convert(name: str, value: Any) -> Any:
    """``value`` (a command-line string, a TOML value or an already typed value) as option
    ``name``'s type; a ``ValueError`` says what was expected.

    Kinds: ``int``, ``float``, ``str``, ``bool`` (``true``/``false``, ``yes``/``no``, ``on``/``off``, ``1``/``0``),
    ``hidden`` (layer sizes), ``latent`` (one size or several, ``parse_latent``), and ``int?`` /
    ``float?`` /
    ``str?`` that may be ``None`` (for numbers also spelt ``none`` or 0: the feature is off), and
    ``float~``, a number or ``None`` (``none``) for an automatic choice, 0 being a number."""
    spec = OPTIONS[name].metadata
    value = plain_integers(value)  # np.int64(3) from a library caller is the integer 3
    kind, choices = spec["kind"].rstrip("?"), spec["choices"]
    optional = spec["kind"].endswith("?")
    if spec["kind"] == "float~":  # None or "none" chooses automatically; 0 is a number here
        off = value is None or (isinstance(value, str) and value.strip().lower() == "none")
        return None if off else _scalar(name, "float", value)
    off = isinstance(value, str) and value.strip().lower() == "none" and kind != "str"
    if optional and (value is None or off):
        return None
    if kind == "hidden":
        return _hidden(value)
    if kind == "latent":
        return parse_latent(value)
    if kind == "bool":
        return _boolean(name, value)
    converted = _scalar(name, kind, value)
    if optional and kind != "str" and converted == 0:
        return None
    if choices is not None and converted not in choices:
        raise ValueError(f"unknown {name} {converted!r}; choose one of: {', '.join(choices)}")
    return converted


_BOOLEANS = {"true": True, "yes": True, "on": True, "1": True}
_BOOLEANS |= {"false": False, "no": False, "off": False, "0": False}


def _boolean(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _BOOLEANS:
        return _BOOLEANS[value.strip().lower()]
    raise ValueError(f"{name} must be true or false, got {value!r}")


def _hidden(value: Any) -> tuple[int, ...]:
    if isinstance(value, str):
        return parse_hidden(value)
    if isinstance(value, (list, tuple)) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        return parse_hidden(",".join(map(str, value)))
    raise ValueError(
        f"hidden must be a list of layer sizes or a string like '400,400', got {value!r}"
    )


def _scalar(name: str, kind: str, value: Any) -> Any:
    if kind == "str":
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string, got {value!r}")
        return value
    what = "an integer" if kind == "int" else "a finite number"
    wrong = ValueError(f"{name} must be {what}, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise wrong
    if kind == "int":
        if isinstance(value, float) or (
            isinstance(value, str) and not value.strip().lstrip("-").isdigit()
        ):
            raise wrong
        return int(value)
    try:
        number = float(value)
    except ValueError:
        raise wrong from None
    if not math.isfinite(number):
        raise wrong
    return number


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The options of a TOML file (keys as in ``RunConfig``, ``-`` or ``_``), converted."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            document = tomllib.load(handle)
    except FileNotFoundError:
        raise RunError(f"config file {path} does not exist; check the --config path") from None
    except IsADirectoryError:
        raise RunError(f"config file {path} is a folder; pass a .toml file to --config") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise RunError(f"config file {path} is not valid TOML ({error}); fix its syntax") from None
    values = {}
    for key, value in document.items():
        name = key.replace("-", "_")
        if name not in OPTIONS:
            known = ", ".join(n.replace("_", "-") for n in OPTIONS)
            raise RunError(f"config file {path} has an unknown key {key!r}; known keys: {known}")
        try:
            values[name] = convert(name, value)
        except ValueError as error:
            raise RunError(f"config file {path}: {error}") from None
    return values


def resolve(settings: Mapping[str, Any], saved: RunConfig | None = None) -> RunConfig:
    """Defaults, overridden by ``settings`` (config file merged with flags, flags winning); when
    resuming, the ``saved`` configuration instead of the defaults, and a setting that would change
    a result is refused."""
    unknown = [name for name in settings if name not in OPTIONS]
    if unknown:
        raise RunError(f"unknown option {unknown[0]!r}; known options: {', '.join(OPTIONS)}")
    try:
        settings = {name: convert(name, value) for name, value in settings.items()}
    except ValueError as error:
        raise RunError(str(error)) from None
    if settings.get("data"):
        settings["data"] = _data_source(settings["data"])
    if saved is None:
        return RunConfig(**settings)
    changed = [
        name
        for name, value in settings.items()
        if name not in RESUMABLE and _comparable(value) != _comparable(getattr(saved, name))
    ]
    if changed:
        name = changed[0]
        raise RunError(
            f"--resume continues a run with its saved settings, but {name} = "
            f"{_comparable(settings[name])!r} differs from the saved {_comparable(getattr(saved, name))!r}; "
            "drop that option or start a new run in another folder"
        )
    return dataclasses.replace(saved, **{k: v for k, v in settings.items() if k in RESUMABLE})


def _comparable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def config_from_json(document: Any, path: Path) -> RunConfig:
    try:
        values = {name: convert(name, value) for name, value in document.items()}
        if "labelled" in values and "labelled_batch_size" not in values:
            values["labelled_batch_size"] = 0  # a run written before the option trains as then
        return RunConfig(**values)
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        raise RunError(
            f"{path} is not a readable run configuration ({error}); it is corrupt"
        ) from None


def _data_source(data: str) -> str:
    """A data set name as it is; a path made absolute, so the run folder can be used from anywhere."""
    if data in SOURCES or not Path(data).expanduser().exists():
        return data  # a name, or a missing path that load_data reports
    return str(Path(data).expanduser().resolve())
