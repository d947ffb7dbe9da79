"""Per-sample random streams (EDM's ``StackedRandomGenerator``): sample ``i`` of a call draws the same noise
whatever the batch size, the number of devices or the rank that generates it.

Sample ``i`` of a run with seed ``s`` owns a ``torch.Generator`` seeded from ``SeedSequence([s, i])``; a batch
holding samples ``first .. first + n - 1`` stacks one draw of each. Every random draw of a sampler (the start and
each ancestral / churn noise) goes through :func:`noise_like`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor


def sample_seed(seed: int, index: int) -> int:
    """A 63-bit seed for sample ``index`` of a run seeded ``seed`` (independent streams via numpy's SeedSequence)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


class SampleGenerators:
    """One generator per sample of a batch: ``indices`` are the samples' global positions in the run."""

    def __init__(self, seed: int, indices: Sequence[int], device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.indices = list(indices)
        self.generators = [torch.Generator(self.device).manual_seed(sample_seed(seed, i)) for i in self.indices]

    @classmethod
    def for_batch(cls, seed: int, first: int, size: int, device: torch.device | str = "cpu") -> SampleGenerators:
        """Generators of the samples ``first .. first + size - 1``."""
        return cls(seed, range(first, first + size), device)

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32,
              device: torch.device | str | None = None) -> Tensor:
        """``[len(indices), *shape[1:]]`` standard normal draws, row ``k`` from sample ``indices[k]``'s stream."""
        if shape[0] != len(self.generators):
            raise ValueError(f"a batch of {shape[0]} needs {shape[0]} sample generators; have {len(self.generators)}")
        rows = [torch.randn(tuple(shape[1:]), generator=g, device=self.device, dtype=dtype) for g in self.generators]
        return torch.stack(rows).to(device or self.device)


Generator = torch.Generator | SampleGenerators | None


def noise_like(x: Tensor, generator: Generator) -> Tensor:
    """N(0, I) shaped like ``x``: per sample for :class:`SampleGenerators`, else one draw from ``generator``."""
    if isinstance(generator, SampleGenerators):
        return generator.randn(x.shape, x.dtype, x.device)
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def initial_noise(shape: Sequence[int], generator: Generator, device: torch.device | str | None = None,
                  dtype: torch.dtype = torch.float32) -> Tensor:
    """The sampler's starting noise N(0, I) on ``device`` (default: the generator's device, else the CPU)."""
    if isinstance(generator, SampleGenerators):
        return generator.randn(shape, dtype, device)
    if device is None:
        device = generator.device if generator is not None else "cpu"
    return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
