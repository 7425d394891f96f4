"""Training batches made ahead of the training loop, in DataLoader worker processes.

Decoding the training images and synthesising focus pairs (:mod:`ray_mff.train.synthetic_pairs`,
or any other generator) takes longer than a GPU step, so done inline it leaves the GPU idle
between steps. Here the training loop only names, per step, the images to use (from its Ray Data
shard); a ``torch.utils.data.DataLoader`` with ``workers`` processes reads them and calls the
generator, ``prefetch`` steps ahead per worker, and hands back tensors (pinned when training on
CUDA). Batches are the same whatever the number of workers: step ``s`` on rank ``r`` always
draws from ``numpy.random.default_rng([seed, s, r])``.

Example::

    >>> steps = step_uris(shard, batch_size=8, start=0, stop=1000)              # doctest: +SKIP
    >>> for step, batch in synthetic_batches(steps, objective.make_batch, cfg, rank=0, workers=2):
    ...     loss = objective.loss(model, {k: v.to(device) for k, v in batch.items()}, cfg)  # doctest: +SKIP
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np

MakeBatch = Callable[[list[np.ndarray], np.random.Generator, dict], dict[str, np.ndarray]]


def step_uris(shard, batch_size: int, start: int, stop: int) -> Iterator[tuple[int, list[str]]]:
    """(step, image uris) for steps ``start`` .. ``stop - 1``, epoch after epoch over a Ray Data shard
    of ``{"uri": ...}`` rows (``ray.train.get_dataset_shard``), full batches only."""
    step = start
    while step < stop:
        produced = False
        for batch in shard.iter_batches(batch_size=batch_size, drop_last=True, batch_format="numpy"):
            produced = True
            yield step, [str(u) for u in batch["uri"]]
            step += 1
            if step >= stop:
                return
        if not produced:
            raise ValueError(f"the training shard holds fewer than batch_size={batch_size} images")


class _StepSampler:
    """Yields the (step, uris) pairs the DataLoader sends to its workers, in step order."""

    def __init__(self, steps: Iterable[tuple[int, list[str]]]):
        self.steps = steps

    def __iter__(self):
        return iter(self.steps)


class _SyntheticStepData:
    """Map-style dataset indexed by (step, uris): reads the images (cached per worker process) and
    makes the step's batch with its own seeded generator."""

    def __init__(self, make_batch: MakeBatch, cfg: dict, rank: int):
        self.make_batch, self.cfg, self.rank = make_batch, cfg, rank
        self.cache: dict[str, np.ndarray] = {}

    def __getitem__(self, key: tuple[int, list[str]]):
        from ray_mff.io import read_image

        step, uris = key
        images = []
        for uri in uris:
            if uri not in self.cache:
                self.cache[uri] = read_image(uri, s3_endpoint=self.cfg.get("s3_endpoint"))
            images.append(self.cache[uri])
        rng = np.random.default_rng([self.cfg.get("seed", 0), step, self.rank])
        return step, self.make_batch(images, rng, self.cfg)


def synthetic_batches(steps: Iterable[tuple[int, list[str]]], make_batch: MakeBatch, cfg: dict, *, rank: int = 0,
                      workers: int = 2, prefetch: int = 2, pin_memory: bool = False) -> Iterator[tuple[int, dict]]:
    """(step, {name: torch.Tensor}) for each (step, uris) of ``steps``, made by ``make_batch(images,
    rng, cfg)`` in ``workers`` DataLoader processes (0: in this process, one step at a time)."""
    import torch.utils.data

    loader = torch.utils.data.DataLoader(
        _SyntheticStepData(make_batch, cfg, rank), sampler=_StepSampler(steps), batch_size=None,
        num_workers=int(workers), prefetch_factor=int(prefetch) if workers else None,
        pin_memory=pin_memory, persistent_workers=False)
    yield from loader
