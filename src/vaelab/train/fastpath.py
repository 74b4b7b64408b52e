"""The fast path: the training step and evaluation's log p(x|z) compiled by ``torch.compile``
(TorchInductor), falling back to eager execution, with one warning, where they cannot compile.

What is compiled is where the time goes and where fusing kernels helps:

- **training** (``Trainer(compile=True)``, ``VAE(compile=True)``, ``vaelab train --compile``):
  the trainer's loss module, from x to the batch's loss: encoder, z = μ + σ ε, decoder,
  log p(x|z), the KL and the sum, one graph whose backward AOTAutograd compiles with it;
- **evaluation** (:func:`compile_evaluation`, ``vaelab evaluate --compile``): the likelihood's
  ``log_prob(x, z)``, decoder, log-density and sum over data dimensions in one graph, which the
  ELBO, IWAE-k and AIS estimates all call, with ``[samples, batch, *data_shape]`` decoder
  outputs that the fused log-density reads once instead of several times.

Matrix products stay the BLAS's: what compiling removes is the elementwise passes between them
and the Python between the kernels. On the CPU the training step of an MLP VAE is mostly matrix
products, and compiling gains little there; docs/results.md has the measurements.

Shapes are compiled as dynamic (``dynamic=True``): one compilation serves every batch size and
chunk size (the last batch of an epoch, the last chunk of k samples), where static shapes would
compile again for each. The first call runs eagerly and compiling starts at the second, so that
lazy caches are filled before tracing (``torch.distributions`` looks up a KL function by type
pair once and memoises it; tracing through the look-up would split the graph in several).

Compiled code sums in other orders than eager code: numbers agree to float rounding (about
10⁻⁶ relative), not to the last bit. A run resumed with the same setting is still bit-identical
to an uninterrupted one on the CPU.

When compiling fails (no C++ compiler, a Python version TorchDynamo does not support, an
operation the backend cannot lower), the wrapper warns once with the reason in one line
(:class:`CompileWarning`) and calls the eager function from then on; an error of the function
itself (a ``ValueError`` for bad data) is raised as in eager mode. AOTAutograd lowers a graph's
backward lazily, at the first backward pass, which is outside this wrapper; the first compiled
call asks for it to be lowered with the forward, so that a failure there falls back too.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, Generic, ParamSpec, TypeVar

import torch
from torch.distributions import Distribution

from vaelab.model.vae_model import VAEModel

__all__ = ["CompileWarning", "Compiled", "compile_evaluation"]

P = ParamSpec("P")
R = TypeVar("R")


class CompileWarning(UserWarning):
    """``torch.compile`` failed for a piece of vaelab, which runs eagerly instead."""


class _Refused(Exception):
    """``torch.compile`` refused to start (a Python version or platform it does not support)."""


def _compile_failures() -> tuple[type[BaseException], ...]:
    """The exceptions by which TorchDynamo and TorchInductor say that compiling failed, as
    opposed to an error of the compiled function itself, which they re-raise unchanged."""
    from torch._dynamo.exc import TorchDynamoException

    failures: list[type[BaseException]] = [_Refused, TorchDynamoException]
    try:
        from torch._inductor.exc import CppCompileError
    except ImportError:  # pragma: no cover - inductor's layout in other torch versions
        pass
    else:
        failures.append(CppCompileError)
    return tuple(failures)


class Compiled(Generic[P, R]):
    """``function`` run through ``torch.compile``, or ``function`` itself once compiling failed.

    ``what`` names the piece in the warning (e.g. "the training step"). The first call is
    eager; the second compiles (``dynamic`` shapes by default) and later ones reuse the result.
    ``backend`` is ``torch.compile``'s (TorchInductor by default). ``active`` says whether calls
    still go through the compiled function."""

    def __init__(
        self,
        function: Callable[P, R],
        what: str,
        *,
        dynamic: bool | None = True,
        backend: str | Callable[..., Any] = "inductor",
    ) -> None:
        self.function = function
        self.what = what
        self.dynamic = dynamic
        self.backend = backend
        self.active = True
        self._calls = 0
        self._compiled: Callable[P, R] | None = None

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        self._calls += 1
        if not self.active or self._calls == 1:
            return self.function(*args, **kwargs)
        # TorchDynamo switches torch.distributions' argument validation off for the whole process
        # when it traces code that builds a Distribution (torch 2.13), and leaves it off: every
        # later eager Normal(NaN, …) would then pass silently. Put it back after every compiled
        # call, since any call may trace again (a new shape, a failed guard).
        validating = Distribution._validate_args
        try:
            if self._compiled is None:
                return self._compile_and_call(*args, **kwargs)
            return self._compiled(*args, **kwargs)
        except _compile_failures() as error:
            self._fall_back(error)
        finally:
            Distribution.set_default_validate_args(validating)
        return self.function(*args, **kwargs)

    def _compile_and_call(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """The first compiled call. Its backward graph is lowered together with the forward
        (``force_non_lazy_backward_lowering``), so that a failure there is raised here, and
        torch's deprecation warnings about itself are silenced: its compiler imports deprecated
        parts of torch (``torch.jit``) as it starts, which is not the caller's business, and
        would be fatal under ``-W error``."""
        import torch._functorch.config as functorch_config

        name = "force_non_lazy_backward_lowering"
        before = getattr(functorch_config, name, None)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.")
            try:
                compiled = torch.compile(self.function, dynamic=self.dynamic, backend=self.backend)
            except RuntimeError as error:  # refused at once: an unsupported Python or platform
                raise _Refused(str(error)) from error
            self._compiled = compiled
            if before is not None:
                setattr(functorch_config, name, True)
            try:
                return compiled(*args, **kwargs)
            finally:
                if before is not None:
                    setattr(functorch_config, name, before)

    def _fall_back(self, error: BaseException) -> None:
        self.active = False
        self._compiled = None
        # A backend's failure carries the error that says why; dynamo's text around it says how
        # to debug, which is not this warning's business.
        cause = getattr(error, "inner_exception", None) or error
        lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
        reason = f"{type(cause).__name__}: {lines[0][:300]}" if lines else type(cause).__name__
        warnings.warn(
            f"torch.compile could not compile {self.what} ({reason}); "
            "running it eagerly, which gives the same numbers more slowly",
            CompileWarning,
            stacklevel=3,
        )


def compile_evaluation(model: VAEModel) -> VAEModel:
    """Compile, in place, what evaluating ``model`` spends its time in: its likelihood's
    ``log_prob(x, z)`` (decoder, log-density and the sum over data dimensions), which the ELBO,
    IWAE-k and AIS estimates call; as ``nn.Module.compile`` does for ``forward``. Calling it
    again changes nothing. Returns ``model``."""
    likelihood = model.likelihood
    if not isinstance(vars(likelihood).get("log_prob"), Compiled):
        # An instance attribute: it shadows the class's method for this likelihood only, and is
        # not part of the state dict, so saving and loading the model are unchanged.
        compiled = Compiled(likelihood.log_prob, "the likelihood's log p(x|z)")
        setattr(likelihood, "log_prob", compiled)  # noqa: B010  (mypy: a method is not assignable)
    return model
