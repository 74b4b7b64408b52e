"""The loss of one training step: ``StepObjective``, the module ``DistributedDataParallel`` wraps,
which scales a worker's share of the batch so that DDP's average is the gradient of the batch
mean, applies free bits (per dimension or per stochastic layer), and carries the workers' stop / checkpoint flags through the gradients'
all-reduce; and the shape of the noise ε every step draws."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from vaelab.distributions.sampling import reparameterise, rsample_with_log_prob
from vaelab.model.semi_supervised import SemiSupervisedModel
from vaelab.model.vae_model import VAEModel
from vaelab.objectives.bounds import ElboTerms, IwaeTerms, kl_per_dimension
from vaelab.objectives.discrete import estimator_state, update_signal_moments
from vaelab.objectives.layers import kl_per_layer
from vaelab.train.config import TrainConfig
from vaelab.train.distributed import World

FLAGS = 3  # stop requested, checkpoint due, the loss not finite (on some worker)
STOP, CHECKPOINT, NONFINITE = range(FLAGS)
LAYER_KL_EVERY = 8  # batches: the KL per layer of bottom-up layers is reported from one in 8


class StepObjective(nn.Module):
    """The loss of one worker's share of a batch: a module, so that ``DistributedDataParallel``
    sees the forward pass it synchronises the gradients of.

    For a batch of ``size`` examples over N workers the loss is −(N / size) Σ of this worker's
    per-example objectives; DDP averages gradients over the workers, which gives the gradient of
    the mean over the whole batch. With free bits the clamp acts on each dimension's mean KL over
    the whole batch (summed over the workers), as on one process. ``flags``, when given, is added
    as ``(flag_parameter · flags).sum()``, which is 0 and makes the parameter's gradient the
    workers' mean of ``flags``; its ``NONFINITE`` entry is set here, after the loss, so that
    every worker learns that one of them saw a NaN or infinite loss.

    After each call ``layer_kl`` holds the step's KL per stochastic layer, ``[rows, L]``
    (detached; ``vaelab.objectives.layers.kl_per_layer``), which the trainer reports per epoch;
    ``None`` when ``report_layers`` is False and nothing needed it: with several bottom-up
    layers it costs one more pass through the posterior and the prior (measured,
    ``bench/bench_survival.py``: about a quarter of a step), so the trainer asks for it on every
    ``LAYER_KL_EVERY``-th batch. A top-down model's bound gives it with the step's own draw
    (``ElboTerms.layer_kl``), at no cost, so it is reported from every batch (and a compiled
    step has one graph, not one for each kind of batch).
    """

    def __init__(self, model: VAEModel, config: TrainConfig, world: World) -> None:
        super().__init__()
        self.model = model
        self.config = config
        self.world = world
        # Not in the optimiser: it only carries flags through the gradients' all-reduce.
        self.flags = nn.Parameter(torch.zeros(FLAGS)) if world.size > 1 else None
        self.layers = len(model.latent_sizes)
        self.layer_kl: torch.Tensor | None = None
        self.report_layers = True
        # A discrete posterior's estimator state (NVIL's moments), looked up once: None for others.
        self.estimator = estimator_state(model.posterior)

    def forward(
        self,
        x: torch.Tensor,
        noise: torch.Tensor | None,
        kl_weight: float,
        size: int,
        flags: torch.Tensor | None = None,
        condition: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ElboTerms | IwaeTerms]:
        config, scale = self.config, self.world.size / size
        if isinstance(self.model, SemiSupervisedModel) and condition is not None:
            loss, recorded = semi_supervised_loss(
                self.model, config, x, condition, noise, kl_weight, weights
            )
            # Weights are the whole batch's: DDP's mean over N workers needs N times the sum.
            loss = loss * (scale if weights is None else self.world.size)
            if flags is not None and self.flags is not None:
                loss = loss + (self.flags * flags).sum()
            return loss, recorded
        # A conditional model's batch comes with its examples' conditions, bound for this step.
        model = self.model if condition is None else self.model.given(condition)
        terms: ElboTerms | IwaeTerms
        if config.objective == "iwae":
            terms = model.iwae(
                x, k=config.k, gradient=config.gradient, noise=noise, kl_weight=kl_weight
            )
            loss = terms.objective.sum() * -scale
        else:
            terms = model.elbo(
                x, samples=config.samples, beta=kl_weight, gradient=config.gradient, noise=noise
            )
            if config.free_bits > 0:
                loss = self._free_bits_loss(model, x, terms, kl_weight, size)
            else:
                loss = terms.objective.sum() * -scale
        if config.layer_free_bits > 0 and isinstance(terms, ElboTerms):
            layer_kl = self._kl_per_layer(model, x, terms, noise)
            kl = self._batch_mean(layer_kl, size).clamp(min=config.layer_free_bits).sum()
            loss = -(terms.reconstruction.sum() * scale - kl_weight * kl)
            self.layer_kl = layer_kl.detach()
        elif terms.layer_kl is not None:  # given with the bound's draw: every step, at no cost
            self.layer_kl = terms.layer_kl.detach()
        elif self.layers == 1 or self.report_layers:
            with torch.no_grad():
                self.layer_kl = self._kl_per_layer(model, x, terms, noise).detach()
        else:
            self.layer_kl = None
        # NVIL's running moments move by the whole batch's signal, summed over the workers.
        if self.estimator is not None:
            update_signal_moments(self.estimator, self.world.sum if self.world.size > 1 else None)
        if flags is not None and self.flags is not None:
            flags = flags.clone()
            flags[NONFINITE] = (~torch.isfinite(loss.detach())).to(flags)
            loss = loss + (self.flags * flags).sum()
        return loss, terms

    def _kl_per_layer(
        self,
        model: VAEModel,
        x: torch.Tensor,
        terms: ElboTerms | IwaeTerms,
        noise: torch.Tensor | None,
    ) -> torch.Tensor:
        """The KL per stochastic layer of this step's examples, ``[rows, L]``: for one layer the
        terms' own KL; for several, the terms' own where the bound gave it (top-down), else
        Monte Carlo from the step's ε (the draws the bound used) in a second pass."""
        if self.layers == 1:
            return terms.kl.unsqueeze(-1)
        if terms.layer_kl is not None:
            return terms.layer_kl
        q, p = model.posterior(x), model.prior()
        samples = self.config.k if self.config.objective == "iwae" else self.config.samples
        z = (
            rsample_with_log_prob(q, (samples,))[0]
            if noise is None
            else reparameterise(q, noise)[0]
        )
        return kl_per_layer(q, p, z)

    def _batch_mean(self, per_example: torch.Tensor, size: int) -> torch.Tensor:
        """The mean over the whole batch of ``per_example [rows, K]``, ``[K]``: on N workers its
        value comes from the workers' sum, its gradient from this worker's examples (scaled by
        N / size, as the reconstruction)."""
        mean = per_example.sum(0) * (self.world.size / size)
        if self.world.size > 1:
            total = self.world.sum(per_example.sum(0).detach().double().cpu())
            mean = mean + ((total / size).to(mean) - mean).detach()
        return mean

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
        kl = self._batch_mean(per_dim, size).clamp(min=self.config.free_bits).sum()  # [latent]
        return -(terms.reconstruction.sum() * (self.world.size / size) - kl_weight * kl)


def semi_supervised_loss(
    model: SemiSupervisedModel,
    config: TrainConfig,
    x: torch.Tensor,
    labels: torch.Tensor,
    noise: torch.Tensor | None,
    kl_weight: float,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ElboTerms]:
    """M2's loss on a batch whose missing labels are rows of zeros: −Σ of each example's L(x, y)
    or U(x) (with β on the KL) plus the classification term, each weighted by ``weights`` when
    given (``vaelab.train.labelled_batches``); the terms recorded are its bound
    (L or U) and that bound's expected reconstruction and KL. The ELBO objective alone: IWAE and
    free bits have no form over a summed-out y here, and are refused."""
    if config.objective != "elbo" or config.free_bits > 0:
        raise ValueError(
            "a semi-supervised model (labels missing) trains on the ELBO without free bits; "
            "use objective='elbo' and free_bits=0"
        )
    terms = model.semi_supervised(
        x,
        labels,
        samples=config.samples,
        beta=kl_weight,
        noise=noise,
        gradient=config.gradient,
        classification_weight=config.classification_weight,
    )
    recorded = ElboTerms(terms.reconstruction, terms.kl, terms.bound, terms.objective)
    objective = terms.objective if weights is None else terms.objective * weights
    return -objective.sum(), recorded


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
