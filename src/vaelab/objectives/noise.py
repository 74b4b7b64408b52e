"""Monte Carlo noise drawn per example, from a stream that belongs to that example alone.

An estimate such as ``VAE.score_samples`` or an IWAE-k log-likelihood should give an example the
same number whichever other examples are passed with it, in whatever order, batch or chunk.
Drawing ε from one generator for the whole batch breaks that; sharing one ε across all examples
keeps it but correlates every example's error, so a data-set average no longer improves with more
data. ``ExampleNoise`` gives each example its own random streams, seeded from a hash of its own
values and a seed: independent errors across distinct examples, and a value per example that
depends on nothing else. Every estimator in vaelab draws its noise through it (the ELBO, IWAE,
AIS, the inference gap's q*, the collapse diagnostics).

Normal draws come from each example's generator in blocks of ``BLOCK`` rows, so that asking for
5000 samples at once or 13 at a time (as chunked estimators do, with chunk sizes that depend on the
batch) yields the same sequence.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator, Sequence

import torch
from torch.distributions import Distribution

from vaelab.distributions.sampling import a_parameter, has_noise_form, reparameterise

BLOCK = 64  # rows of normal draws per example and refill

__all__ = [
    "BLOCK",
    "ExampleNoise",
    "example_keys",
    "fresh_seed",
    "posterior_mean",
    "seeded",
]


def fresh_seed() -> int:
    """A seed from the operating system's entropy: what ``seed=None`` means everywhere."""
    return int.from_bytes(os.urandom(8), "little") >> 2


@contextlib.contextmanager
def seeded(seed: int | None, device: torch.device | str = "cpu") -> Iterator[int]:
    """Run with torch's global generators seeded, and the caller's random state restored after.

    Seeds the CPU generator and, when ``device`` is a CUDA device, that device's generator
    (forked too, so the caller's CUDA stream is left as it was; other devices are not touched,
    unlike ``torch.manual_seed``). ``seed=None`` means fresh randomness: a seed from
    :func:`fresh_seed`. Yields the seed used.
    """
    device = torch.device(device)
    chosen = fresh_seed() if seed is None else int(seed)
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.random.default_generator.manual_seed(chosen)
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(chosen)
        yield chosen


def example_keys(x: torch.Tensor, seed: int, stream: bytes = b"") -> list[int]:
    """One 63-bit key per example of ``x: [batch, ...]``: BLAKE2b of the example's bytes (as
    stored: dtype and values), keyed by ``seed`` and personalised by ``stream``."""
    rows = x.detach().cpu().contiguous().reshape(x.shape[0], -1).numpy()
    key = int(seed).to_bytes(16, "little", signed=True)
    return [
        int.from_bytes(
            hashlib.blake2b(row.tobytes(), digest_size=8, key=key, person=stream).digest(),
            "little",
        )
        >> 1
        for row in rows
    ]


class ExampleNoise:
    """Random streams for a batch of examples, one pair (normal, uniform) per example.

    ``ExampleNoise(x, seed)`` keys example b's streams by ``x[b]``'s values and ``seed``;
    ``seed=None`` draws the keys from torch's global generator instead (fresh noise, reproducible
    under ``torch.manual_seed``). Draws are returned on ``x``'s device, samples leading:
    ``normal(S, event_shape)`` is ``[S, batch, *event_shape]``.

    Successive calls continue each example's streams. One instance serves one event shape for
    its normal draws.
    """

    def __init__(self, x: torch.Tensor, seed: int | None) -> None:
        self.batch = int(x.shape[0])
        self.device = x.device
        if seed is None:
            seeds = torch.randint(0, 2**62, (2, self.batch)).tolist()
            normal_keys, uniform_keys = seeds[0], seeds[1]
        else:
            normal_keys = example_keys(x, seed, b"normal")
            uniform_keys = example_keys(x, seed, b"uniform")
        self._normal = [torch.Generator().manual_seed(k) for k in normal_keys]
        self._uniform = [torch.Generator().manual_seed(k) for k in uniform_keys]
        self._buffer: torch.Tensor | None = None  # [rows, batch, *event], float32, CPU
        self._used = 0

    def normal(
        self,
        samples: int,
        event_shape: Sequence[int] = (),
        like: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Standard normal ε ``[samples, batch, *event_shape]`` in ``like``'s dtype and device
        (default float32 on the examples' device)."""
        event = tuple(int(s) for s in event_shape)
        if self._buffer is not None and tuple(self._buffer.shape[2:]) != event:
            raise ValueError(
                f"this ExampleNoise draws normals of event shape {tuple(self._buffer.shape[2:])}, "
                f"not {event}; make another one for a second shape"
            )
        parts = []
        needed = samples
        while needed > 0:
            if self._buffer is None or self._used == self._buffer.shape[0]:
                self._buffer = torch.stack(
                    [torch.randn(BLOCK, *event, generator=g) for g in self._normal], dim=1
                )
                self._used = 0
            take = min(needed, BLOCK - self._used)
            parts.append(self._buffer[self._used : self._used + take])
            self._used += take
            needed -= take
        eps = torch.cat(parts) if parts else torch.empty(0, self.batch, *event)
        return _like(eps, like, self.device)

    def uniform(self, samples: int, like: torch.Tensor | None = None) -> torch.Tensor:
        """U[0, 1) draws ``[samples, batch]``."""
        u = torch.stack(
            [torch.rand(samples, generator=g, dtype=torch.float64) for g in self._uniform], dim=1
        )
        return _like(u, like, self.device)

    def sample(self, q: Distribution, samples: int) -> torch.Tensor:
        """``samples`` draws from ``q``, ``[samples, batch, *event_shape]``; see :meth:`draw`."""
        return self.draw(q, samples)[0]

    def draw(self, q: Distribution, samples: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``samples`` draws from ``q``, ``[samples, batch, *event_shape]``, not differentiable,
        with log q of them ``[samples, batch]`` where the same pass gives it (a flow), else None.

        A distribution with a noise form (:func:`has_noise_form`: a Gaussian, a flow) and
        ``batch_shape [batch]`` or ``[]`` is sampled from ε drawn with :meth:`normal`; any other
        distribution with ``batch_shape []`` (a mixture prior) example by example under torch's
        global generator, forked and seeded from the example's stream.
        """
        event = tuple(q.event_shape)
        if tuple(q.batch_shape) in ((self.batch,), ()) and has_noise_form(q):
            like = a_parameter(q)
            z, log_q = reparameterise(q, self.normal(samples, event, like=like))
            return z.detach(), None if log_q is None else log_q.detach()
        if tuple(q.batch_shape) != ():
            raise ValueError(
                f"cannot draw per-example noise for a {type(q).__name__} with batch_shape "
                f"{tuple(q.batch_shape)}; it needs a location-scale form"
            )
        draws = []
        for generator in self._uniform:
            seed = int(torch.randint(0, 2**62, (), generator=generator))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                draws.append(q.sample((samples,)))
        return torch.stack(draws, dim=1), None


MEAN_SAMPLES = 1000  # draws behind a Monte Carlo posterior mean


def posterior_mean(q: Distribution, x: torch.Tensor, seed: int | None) -> torch.Tensor:
    """E_q[z] ``[batch, latent]`` for q(z|x) with ``batch_shape [batch]``: exact where the
    distribution knows it (a Gaussian's μ), else the mean of ``MEAN_SAMPLES`` draws from each
    example's own stream (a flow), so that the number depends on the example alone. ``x`` keys
    the streams."""
    try:
        return q.mean
    except NotImplementedError:
        return ExampleNoise(x, seed).sample(q, MEAN_SAMPLES).mean(0)


def _like(values: torch.Tensor, like: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    if like is None:
        return values.to(device=device, dtype=torch.float32)
    return values.to(device=like.device, dtype=like.dtype)
