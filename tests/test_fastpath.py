"""The fast path (``vaelab.train.fastpath``, ``--compile``): compiled training and evaluation give the
numbers of eager execution to float rounding, and a compilation that fails falls back to eager
execution after one warning.

The tests that compile for real need TorchInductor's C++ compiler and skip without it, naming
what is missing; the fallback tests take the compiler away on purpose and run everywhere.
"""

from __future__ import annotations

import copy
import math
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import vaelab
from vaelab.cli import app as cli
from vaelab.evaluation.loglik import log_likelihood
from vaelab.model.registry import ModelConfig, build_model
from vaelab.model.vae_model import VAEModel
from vaelab.runs import options as runconfig
from vaelab.train.batches import IndexedBatches
from vaelab.train.config import TrainConfig
from vaelab.train.fastpath import Compiled, CompileWarning, compile_evaluation
from vaelab.train.trainer import Trainer


def _missing_compiler() -> str | None:
    """Why ``torch.compile`` cannot run here, or None when it can."""
    import torch._inductor.config as inductor_config

    if not torch._dynamo.is_dynamo_supported():
        return "TorchDynamo does not support this Python version or platform"
    compiler = inductor_config.cpp.cxx[-1]
    if compiler is None or shutil.which(compiler) is None:
        return f"TorchInductor's C++ compiler {compiler!r} is not installed (set CXX)"
    return None


needs_compiler = pytest.mark.skipif(
    _missing_compiler() is not None, reason=str(_missing_compiler())
)


def small_model(seed: int = 0) -> VAEModel:
    torch.manual_seed(seed)
    config = ModelConfig(data_shape=(64,), latent_dim=4, hidden=(32,), likelihood="bernoulli")
    return build_model(config)


def binary_data(n: int, seed: int = 1) -> torch.Tensor:
    return (torch.rand(n, 64, generator=torch.Generator().manual_seed(seed)) < 0.3).float()


@pytest.fixture
def no_compiler():
    """TorchInductor pointed at a C++ compiler that does not exist, as on a machine without one,
    and TorchDynamo's compiled code forgotten, as in a fresh process (TorchInductor's own caches
    do not help: it checks the compiler before it reads them)."""
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    with inductor_config.patch({"cpp.cxx": (None, "/nonexistent/c++")}):
        yield
    torch._dynamo.reset()


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# ------------------------------------------------------------------------------ agreement


@pytest.mark.slow
@needs_compiler
def test_a_compiled_dreg_loss_has_the_value_and_gradients_of_the_eager_one():
    """The IWAE-4 loss with DReG, whose gradient goes through a hook on z, compiled, against
    autograd on the eager one, on two batch sizes (one compilation with dynamic shapes serves
    both)."""
    model = small_model()

    def loss(x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return -model.iwae(x, k=4, gradient="dreg", noise=eps).objective.mean()

    compiled = Compiled(loss, "the test loss")
    for size in (32, 32, 17):  # the first call is eager, the second compiles, the third reuses
        x = binary_data(size, seed=size)
        eps = torch.randn(4, size, 4, generator=torch.Generator().manual_seed(size))
        model.zero_grad()
        expected = loss(x, eps)
        expected.backward()
        eager = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        found = compiled(x, eps)
        found.backward()
        assert abs(found.item() - expected.item()) <= 1e-6 * abs(expected.item())
        for p, g in zip(model.parameters(), eager, strict=True):
            assert _relative(p.grad, g) < 1e-5
    assert compiled.active


@needs_compiler
def test_training_with_compile_follows_eager_training():
    """Three epochs of the trainer, compiled and eager, from the same start: the same epoch
    ELBOs and weights to float rounding (Adam divides by √v, so a parameter whose gradient is
    nearly 0 would amplify rounding; none is here: every pixel varies). Batches of 50 and a
    last one of 20: one compilation, with dynamic shapes, serves both."""
    start = small_model()
    x = binary_data(620)
    start.initialise(x)
    config = TrainConfig(epochs=3, batch_size=50)
    runs = {}
    for compile in (False, True):
        model = copy.deepcopy(start)
        trainer = Trainer(model, copy.copy(config), torch.device("cpu"), seed=3, compile=compile)
        history = trainer.fit(IndexedBatches(x, 50, 4, binarize=True))
        runs[compile] = (np.array([m.elbo for m in history]), model)
        if compile:
            assert trainer._compiled is not None and trainer._compiled.active
    np.testing.assert_allclose(runs[True][0], runs[False][0], rtol=1e-5)
    for p, q in zip(runs[True][1].parameters(), runs[False][1].parameters(), strict=True):
        assert _relative(p.detach(), q.detach()) < 1e-4


@needs_compiler
@pytest.mark.parametrize("validating", [True, False])
def test_compiling_leaves_the_distributions_argument_validation_as_it_was(validating):
    """TorchDynamo turns torch.distributions' validation off process-wide when it traces a
    Distribution; after a compiled training step (which builds q(z|x) and p(x|z)) it is as the
    caller set it, so eager code later in the process still refuses NaN parameters."""
    from torch.distributions import Distribution, Normal

    before = Distribution._validate_args
    Distribution.set_default_validate_args(validating)
    try:
        model = small_model()
        x = binary_data(100)
        model.initialise(x)
        trainer = Trainer(
            model, TrainConfig(epochs=1, batch_size=50), torch.device("cpu"), compile=True
        )
        trainer.fit(IndexedBatches(x, 50, 0, binarize=True))
        assert trainer._compiled is not None and trainer._compiled.active
        assert Distribution._validate_args is validating
        if validating:
            with pytest.raises(ValueError, match="loc"):
                Normal(torch.tensor(math.nan), 1.0)
    finally:
        Distribution.set_default_validate_args(before)


@needs_compiler
def test_compiled_evaluation_gives_the_estimates_of_eager_evaluation():
    """IWAE-30 in chunks of 7 samples (chunks of 7 and 2) and the ELBO, from a model whose
    likelihood is compiled in place, against the same model uncompiled."""
    eager = small_model()
    x = binary_data(40)
    eager.initialise(x)
    fast = compile_evaluation(copy.deepcopy(eager))
    assert compile_evaluation(fast) is fast  # a second call changes nothing
    for _ in range(2):  # the first call of the compiled log-density runs eagerly
        found = log_likelihood(fast, x, 30, chunk_size=7, seed=5).log_px
    expected = log_likelihood(eager, x, 30, chunk_size=7, seed=5).log_px
    np.testing.assert_allclose(found.numpy(), expected.numpy(), rtol=1e-6)
    eps = torch.randn(3, 40, 4, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        np.testing.assert_allclose(
            fast.elbo(x, samples=3, noise=eps).elbo.numpy(),
            eager.elbo(x, samples=3, noise=eps).elbo.numpy(),
            rtol=1e-6,
        )
    assert fast.likelihood.log_prob.active
    assert set(fast.state_dict()) == set(eager.state_dict())  # saving is unchanged


@pytest.mark.slow
def test_a_planar_posteriors_inverse_compiles_without_a_graph_break(capfd):
    """The STL ELBO of a planar posterior evaluates log q(z) through the flow's inverse, whose
    root search loops until it converges. Traced by TorchDynamo (its own "eager" backend: no C++
    compiler needed), it once split the graph at every iteration and printed a 27-line
    graph-break warning; now nothing is printed, and the compiled loss and its gradients are the
    eager ones."""
    torch.manual_seed(0)
    config = ModelConfig(data_shape=(16,), latent_dim=2, hidden=(8,), posterior="planar")
    model = build_model(config)
    x = binary_data(32)[:, :16]
    model.initialise(x)

    def loss(x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return -model.elbo(x, noise=eps, gradient="stl").objective.mean()

    compiled = Compiled(loss, "the test loss", backend="eager")
    torch._dynamo.reset()
    for size in (32, 32, 17):  # eager, then traced, then the traced graph reused
        eps = torch.randn(1, size, 2, generator=torch.Generator().manual_seed(size))
        model.zero_grad()
        expected = loss(x[:size], eps)
        expected.backward()
        eager = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        found = compiled(x[:size], eps)
        found.backward()
        assert abs(found.item() - expected.item()) <= 1e-6 * abs(expected.item())
        for p, g in zip(model.parameters(), eager, strict=True):
            assert _relative(p.grad, g) < 1e-5
    assert compiled.active
    out, err = capfd.readouterr()
    assert "Graph break" not in err and err == "", err[:500]


@pytest.mark.slow
@needs_compiler
def test_training_a_planar_posterior_with_compile_prints_nothing_but_progress(tmp_path, capfd):
    """`vaelab train --posterior planar --gradient stl --compile` once printed 27 lines of
    TorchDynamo's graph-break warning, from the planar inverse's root search."""
    folder = tmp_path / "run"
    tiny = ["--epochs", "1", "--hidden", "8", "--latent-dim", "2", "--batch-size", "128"]
    planar = ["--posterior", "planar", "--gradient", "stl", "--compile", "-q"]
    assert cli.main(["train", "digits", "--out", str(folder), *planar, *tiny]) == 0
    _, err = capfd.readouterr()
    assert len(err.strip().splitlines()) <= 1, err[:2000]


# ------------------------------------------------------------------------------- fallback


@pytest.mark.slow  # 4 s: keeps make test within its 3 minutes
def test_without_a_compiler_training_falls_back_to_eager_after_one_warning(no_compiler):
    """The trainer's compiled step fails to compile, warns once, and trains eagerly: the very
    weights of an eager run."""
    start = small_model()
    x = binary_data(300)
    start.initialise(x)
    weights = {}
    for compile in (False, True):
        model = copy.deepcopy(start)
        trainer = Trainer(
            model,
            TrainConfig(epochs=2, batch_size=50),
            torch.device("cpu"),
            seed=2,
            compile=compile,
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(IndexedBatches(x, 50, 4))
        found = [w for w in caught if issubclass(w.category, CompileWarning)]
        assert len(found) == (1 if compile else 0)
        assert len(caught) == len(found)
        weights[compile] = model.state_dict()
    assert "could not compile the training step" in str(found[0].message)
    assert "\n" not in str(found[0].message)
    for name, value in weights[False].items():
        assert torch.equal(weights[True][name], value), name


def test_a_backend_that_fails_falls_back_once_and_errors_of_the_function_pass_through():
    def failing(graph, inputs):
        raise RuntimeError("this backend compiles nothing")

    def f(x: torch.Tensor) -> torch.Tensor:
        if bool((x < 0).any()):
            raise ValueError("x must be non-negative")
        return torch.sqrt(x).sum()

    x = torch.arange(5.0)
    compiled = Compiled(f, "f", backend=failing)
    with pytest.warns(CompileWarning, match="could not compile f .*this backend compiles nothing"):
        assert [float(compiled(x)) for _ in range(2)] == [float(f(x))] * 2
    assert not compiled.active
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert float(compiled(x)) == float(f(x))  # no second warning
    # Dynamo's own backend ("eager": traced, not compiled to C++) runs f's graph; f's own
    # error comes through as itself, and the wrapper stays compiled.
    traced = Compiled(f, "f", backend="eager")
    assert float(traced(x)) == float(traced(x)) == float(f(x))
    with pytest.raises(ValueError, match="non-negative"):
        traced(-x)
    assert traced.active


# ------------------------------------------------------------------------------ the doors


def test_compile_is_an_option_of_runs_and_of_the_command_line(tmp_path):
    assert runconfig.resolve({"compile": "yes"}).compile is True
    assert runconfig.resolve({}).compile is False
    with pytest.raises(runconfig.RunError, match="compile must be true or false"):
        runconfig.resolve({"compile": "sometimes"})
    toml = tmp_path / "run.toml"
    toml.write_text("compile = true\n")
    assert runconfig.read_config_file(toml) == {"compile": True}
    parser = cli.build_parser()
    for flags, expected in (([], None), (["--compile"], True), (["--no-compile"], False)):
        args = parser.parse_args(["train", "digits", "--out", "x", *flags])
        assert getattr(args, "compile", None) is expected
    assert parser.parse_args(["evaluate", "x", "--compile"]).compile is True
    # Compiling changes how, not what: a run may resume with or without it.
    saved = runconfig.resolve({"data": "digits"})
    assert runconfig.resolve({"compile": True}, saved).compile is True
    assert vaelab.VAE(compile=True).get_params()["compile"] is True


@pytest.mark.slow  # 5 s: keeps make test within its 3 minutes
@pytest.mark.filterwarnings(
    "default::vaelab.train.fastpath.CompileWarning"
)  # shown, as outside pytest
def test_the_command_line_says_a_failed_compilation_in_one_line(tmp_path, capsys, no_compiler):
    folder = Path(tmp_path) / "run"
    tiny = ["--epochs", "1", "--hidden", "8", "--latent-dim", "2", "--batch-size", "128"]
    assert cli.main(["train", "digits", "--out", str(folder), "-q", "--compile", *tiny]) == 0
    _, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vaelab: warning: torch.compile could not")
    assert json_config(folder)["compile"] is True
    assert cli.main(["evaluate", str(folder), "--compile", "--no-diagnostics", "--k", "5"]) == 0
    _, err = capsys.readouterr()
    assert err.count("vaelab: warning: torch.compile could not compile") == 1


def json_config(folder: Path) -> dict:
    import json

    return json.loads((folder / "config.json").read_text())
