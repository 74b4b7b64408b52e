"""The loss of one training step: ``StepObjective``, the module ``DistributedDataParallel`` wraps,
which scales a worker's share of the batch so that DDP's average is the gradient of the batch
mean, applies free bits, and carries the workers' stop / checkpoint flags through the gradients'
all-reduce; and the shape of the noise ε every step draws."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from vaelab.model.vae_model import VAEModel
from vaelab.objectives.bounds import ElboTerms, IwaeTerms, kl_per_dimension
from vaelab.objectives.discrete import update_signal_moments
from vaelab.train.config import TrainConfig
from vaelab.train.distributed import World

FLAGS = 2  # stop requested, checkpoint due
STOP, CHECKPOINT = range(FLAGS)


class StepObjective(nn.Module):
    """The loss of one worker's share of a batch: a module, so that ``DistributedDataParallel``
    sees the forward pass it synchronises the gradients of.

    For a batch of ``size`` examples over N workers the loss is −(N / size) Σ of this worker's
    per-example objectives; DDP averages gradients over the workers, which gives the gradient of
    the mean over the whole batch. With free bits the clamp acts on each dimension's mean KL over
    the whole batch (summed over the workers), as on one process. ``flags``, when given, is added
    as ``(flag_parameter · flags).sum()``, which is 0 and makes the parameter's gradient the
    workers' mean of ``flags``.
    """

    def __init__(self, model: VAEModel, config: TrainConfig, world: World) -> None:
        super().__init__()
        self.model = model
        self.config = config
        self.world = world
        # Not in the optimiser: it only carries flags through the gradients' all-reduce.
        self.flags = nn.Parameter(torch.zeros(FLAGS)) if world.size > 1 else None

    def forward(
        self,
        x: torch.Tensor,
        noise: torch.Tensor | None,
        kl_weight: float,
        size: int,
        flags: torch.Tensor | None = None,
        condition: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ElboTerms | IwaeTerms]:
        config, scale = self.config, self.world.size / size
        # A conditional model's batch comes with its examples' conditions, bound for this step.
        model = self.model if condition is None else self.model.given(condition)
        terms: ElboTerms | IwaeTerms
        if config.objective == "iwae":
            terms = model.iwae(x, k=config.k, gradient=config.gradient, noise=noise)
            loss = -terms.objective.sum() * scale
        else:
            terms = model.elbo(
                x, samples=config.samples, beta=kl_weight, gradient=config.gradient, noise=noise
            )
            if config.free_bits > 0:
                loss = self._free_bits_loss(model, x, terms, kl_weight, size)
            else:
                loss = -terms.objective.sum() * scale
        # NVIL's running moments move by the whole batch's signal, summed over the workers.
        update_signal_moments(self.model.posterior, self.world.sum if self.world.size > 1 else None)
        if flags is not None and self.flags is not None:
            loss = loss + (self.flags * flags).sum()
        return loss, terms

    def _free_bits_loss(
        self, model: VAEModel, x: torch.Tensor, terms: ElboTerms, kl_weight: float, size: int
    ) -> torch.Tensor:
        """Free bits (Kingma et al. 2016): each latent dimension's batch-mean KL counts at least
        λ. On N workers the batch mean is the global one: its value comes from the workers' sum,
        its gradient from this worker's examples (scaled by N / size, as the reconstruction)."""
        q, p = model.posterior(x), model.prior()
        per_dim = kl_per_dimension(q, p)
        if per_dim is None:
            raise ValueError("free bits need a diagonal posterior and a factorised Gaussian prior")
        scale = self.world.size / size
        mean = per_dim.sum(0) * scale  # [latent]
        if self.world.size > 1:
            total = self.world.sum(per_dim.sum(0).detach().double().cpu())
            mean = mean + ((total / size).to(mean) - mean).detach()
        kl = mean.clamp(min=self.config.free_bits).sum()
        return -(terms.reconstruction.sum() * scale - kl_weight * kl)


def data_parallel(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` in ``DistributedDataParallel``. Its buffers (a decoder's offset, a pixel grid)
    never change, so they are not re-broadcast at every step."""
    from torch.nn.parallel import DistributedDataParallel

    options: dict[str, Any] = {"device_ids": [device.index]} if device.type == "cuda" else {}
    parameters = inspect.signature(DistributedDataParallel.__init__).parameters
    options[
        "forward_sync_buffers" if "forward_sync_buffers" in parameters else "broadcast_buffers"
    ] = False
    return DistributedDataParallel(module, **options)


def noise_shape(model: VAEModel) -> tuple[tuple[int, ...], torch.dtype]:
    """The event shape of the latent code (a draw of ε is ``[samples, batch, *event]``) and the
    dtype of the model's parameters."""
    with torch.no_grad():
        event = (model.latent_dim,)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return event, dtype
