"""Batches of an in-memory split, augmented on tensors, on the training device.

A `Loader` moves its split to the device once: a step then never waits on a host transfer
or a worker process. Augmentation (crop, flip, cutout) runs on whole batches with tensor ops,
never per image through PIL. A training epoch depends only on its seed, and batch s of an
epoch only on (seed, s), so a run resumed mid-epoch sees exactly the batches an
uninterrupted run would have seen.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from .data import Split
from .errors import MgError

PAD = 4  # random crop: zero padding on each side, as in the WRN and MixtureGrowth recipes



def _mix(seed: int, step: int) -> int:
    """A 63-bit generator seed for batch `step` of the epoch seeded `seed`."""
    digest = hashlib.blake2b(f"mg-aug:{seed}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _draws(seed: int, step: int, batch: int, h: int, w: int) -> Tensor:
    """Augmentation draws of one global batch: (batch, 5) = crop dy, dx, flip, cutout cy, cx.

    Every draw is made whether or not its augmentation is on, so switching one on or off
    leaves the others' draws unchanged.
    """
    g = torch.Generator().manual_seed(_mix(seed, step))
    return torch.stack([
        torch.randint(0, 2 * PAD + 1, (batch,), generator=g),
        torch.randint(0, 2 * PAD + 1, (batch,), generator=g),
        torch.randint(0, 2, (batch,), generator=g),
        torch.randint(0, h, (batch,), generator=g),
        torch.randint(0, w, (batch,), generator=g),
    ], dim=1)


def _share(n: int, rank: int, world: int) -> tuple[int, int]:
    """[lo, hi) of rank's contiguous share of n items (sizes differ by at most one)."""
    q, r = divmod(n, world)
    lo = rank * q + min(rank, r)
    return lo, lo + q + (rank < r)


class Loader:
    """Batches of one split, augmented on tensors in batches (no per-image PIL), on `device`.

    train=True: a seeded shuffle per epoch plus crop/flip/cutout; `batch_size` is the global
    batch and rank r of `world` gets the r-th contiguous share of every global batch.
    train=False: fixed order, no augmentation; rank r gets a disjoint contiguous shard of the
    split (every image exactly once across ranks) in batches of `batch_size`.
    A split smaller than one batch still gives one (short) batch, so tiny smoke runs train.
    """

    def __init__(self, split: Split, batch_size: int, *, mean: tuple[float, float, float],
                 std: tuple[float, float, float], train: bool, crop: bool = False,
                 flip: bool = False, cutout: int = 0, device: torch.device | str = "cpu",
                 drop_last: bool | None = None, rank: int = 0, world: int = 1):
        if batch_size < 1:
            raise MgError(f"batch size must be >= 1, got {batch_size}")
        if not 0 <= rank < world:
            raise MgError(f"rank {rank} is outside 0..{world - 1}")
        if train and batch_size % world:
            raise MgError(f"batch size {batch_size} is not divisible by the {world} processes")
        self.device = torch.device(device)
        self.images = split.images.to(self.device)  # once: no host transfer per step
        self.labels = split.labels.to(self.device)
        self.batch_size, self.train = batch_size, train
        self.crop, self.flip, self.cutout = crop, flip, cutout
        self.drop_last = train if drop_last is None else drop_last
        self.rank, self.world = rank, world
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        # Images this rank walks through: the whole split (train) or its shard (eval).
        self.lo, self.hi = (0, len(split)) if train else _share(len(split), rank, world)

    def __len__(self) -> int:
        n, b = self.hi - self.lo, self.batch_size
        return n // b if (self.drop_last and n >= b) else -(-n // b)

    def epoch(self, seed: int, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """Batches from step `start` on: (float32 normalised images, int64 labels) on device."""
        if not 0 <= start <= len(self):
            raise ValueError(f"start step {start} is outside 0..{len(self)}")
        return self._train_epoch(seed, start) if self.train else self._eval_epoch(start)

    def normalise(self, x: Tensor) -> Tensor:
        """uint8 pixels to float32 (x / 255 - mean) / std."""
        return (x.float() / 255 - self.mean) / self.std

    def _eval_epoch(self, start: int) -> Iterator[tuple[Tensor, Tensor]]:
        b = self.batch_size
        for s in range(start, len(self)):
            lo, hi = self.lo + s * b, min(self.lo + (s + 1) * b, self.hi)
            yield self.normalise(self.images[lo:hi]), self.labels[lo:hi]

    def _train_epoch(self, seed: int, start: int) -> Iterator[tuple[Tensor, Tensor]]:
        steps, b = len(self), self.batch_size
        if start == steps:
            return
        order = torch.randperm(self.hi, generator=torch.Generator().manual_seed(seed))
        _, _, h, w = self.images.shape
        draws = torch.stack([_draws(seed, s, b, h, w) for s in range(start, steps)])
        # One transfer per epoch; a per-step copy would synchronise the GPU every step.
        order, draws = order.to(self.device), draws.to(self.device)
        for s in range(start, steps):
            index = order[s * b:(s + 1) * b]
            lo, hi = _share(len(index), self.rank, self.world)
            index = index[lo:hi]
            yield self._augment(self.images[index], draws[s - start, lo:hi]), self.labels[index]

    def _augment(self, x: Tensor, d: Tensor) -> Tensor:
        """Crop and flip as one gather on uint8 pixels, then normalise, then cutout."""
        n, c, h, w = x.shape
        dev = x.device
        if self.crop or self.flip:
            rows = torch.arange(h, device=dev).expand(n, h)
            cols = torch.arange(w, device=dev).expand(n, w)
            if self.flip:  # mirrored column order for the flipped images
                cols = torch.where(d[:, 2:3].bool(), w - 1 - cols, cols)
            if self.crop:
                # Zero padding in pixel space (black), as torchvision's RandomCrop(padding=4)
                # on the raw image; the window's top-left corner in the padded image is (dy, dx).
                x = F.pad(x, (PAD, PAD, PAD, PAD))
                rows, cols = rows + d[:, 0:1], cols + d[:, 1:2]
            x = x[torch.arange(n, device=dev).view(n, 1, 1, 1),
                  torch.arange(c, device=dev).view(1, c, 1, 1),
                  rows.view(n, 1, h, 1), cols.view(n, 1, 1, w)]
        x = self.normalise(x)
        if self.cutout:
            # After normalisation, so the hole is 0 in normalised space (the dataset mean), as
            # in DeVries & Taylor. Centre anywhere in the image: the square may be clipped.
            y0 = d[:, 3:4] - self.cutout // 2
            x0 = d[:, 4:5] - self.cutout // 2
            ys = torch.arange(h, device=dev).view(1, h)
            xs = torch.arange(w, device=dev).view(1, w)
            in_y = (ys >= y0) & (ys < y0 + self.cutout)
            in_x = (xs >= x0) & (xs < x0 + self.cutout)
            x = x.masked_fill((in_y[:, :, None] & in_x[:, None, :])[:, None], 0.0)
        return x
