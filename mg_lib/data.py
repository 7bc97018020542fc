"""Datasets and seeded splits (batches and augmentation are in loader.py).

Every dataset is held whole in memory as uint8 (N, 3, H, W) tensors (CIFAR is 150 MB), which
a `Loader` moves to the training device once. The split depends only on (dataset, seed,
limit, val_fraction).
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import MgError
from .recipe import DataConfig

# Per-channel statistics of the training sets (pixels scaled to [0, 1]).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

IMAGEFOLDER_TEST_FRACTION = 0.1  # held out as test when an image folder has no val/test split
DEFAULT_ROOT = Path("~/.cache/mg")


@dataclass
class Split:
    images: Tensor  # uint8 (N, 3, H, W)
    labels: Tensor  # int64 (N,)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device | str) -> Split:
        return Split(self.images.to(device), self.labels.to(device))

    def subset(self, index: Tensor) -> Split:
        return Split(self.images[index], self.labels[index])


@dataclass
class Data:
    train: Split
    val: Split  # held out of the train pool (seeded); empty when val_fraction == 0
    test: Split
    classes: int
    mean: tuple[float, float, float]  # normalisation constants the loaders must use
    std: tuple[float, float, float]


# ---------------------------------------------------------------- class counts


def num_classes(cfg: DataConfig) -> int:
    """The class count, read without loading any image (mg flops and model building use it)."""
    if cfg.dataset == "cifar10":
        return 10
    if cfg.dataset == "cifar100":
        return 100
    if cfg.dataset == "synthetic":
        return cfg.synthetic_classes
    if cfg.classes is not None:
        return cfg.classes
    if cfg.dataset == "npz":
        path = _npz_path(cfg)
        with _open_npz(path) as z:  # an NpzFile reads one member at a time: images stay on disk
            return _npz_classes(z, path, None)
    from torchvision.datasets.folder import find_classes

    train_dir, _ = _imagefolder_dirs(cfg)
    try:
        return len(find_classes(train_dir)[0])
    except OSError as e:
        raise MgError(f"{train_dir}: no class folders ({e})") from None


# ---------------------------------------------------------------- loading


def load_data(cfg: DataConfig, seed: int) -> Data:
    """Load a dataset and split its train pool into train and val (seeded)."""
    if cfg.dataset == "imagefolder":  # splits the file list first: decodes only what it uses
        train, val, test, classes = _load_imagefolder(cfg, seed)
    else:
        if cfg.dataset == "npz":
            pool, test, classes = _load_npz(cfg)
        elif cfg.dataset in ("cifar10", "cifar100"):
            pool, test, classes = _load_cifar(cfg)
        elif cfg.dataset == "synthetic":
            pool, test, classes = _synthetic(cfg, seed)
        else:  # pragma: no cover - the recipe's Literal rules this out
            raise MgError(f"data.dataset: unknown dataset {cfg.dataset!r}")
        train, val = _split(pool, seed, cfg.limit, cfg.val_fraction)
    if cfg.dataset == "cifar100":
        mean, std = CIFAR100_MEAN, CIFAR100_STD
    else:
        mean, std = CIFAR10_MEAN, CIFAR10_STD
    return Data(train, val, test, classes, mean, std)


def _split(pool: Split, seed: int, limit: int | None, val_fraction: float) -> tuple[Split, Split]:
    """The pool's train and val images (see split_indices)."""
    train, val = split_indices(len(pool), seed, limit, val_fraction)
    return pool.subset(train), pool.subset(val)


def split_indices(n: int, seed: int, limit: int | None,
                  val_fraction: float) -> tuple[Tensor, Tensor]:
    """Seeded permutation of a pool of n, then the first `limit`, then val held out of those."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    if limit is not None:
        order = order[:limit]
    n = len(order)
    n_val = round(val_fraction * n)
    if val_fraction > 0 and n >= 2:
        n_val = max(n_val, 1)
    n_val = min(n_val, max(n - 1, 0))  # always leave at least one training image
    return order[n_val:], order[:n_val]


def _hwc_to_split(images: np.ndarray, labels: Any) -> Split:
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    return Split(x, torch.as_tensor(np.asarray(labels), dtype=torch.int64))


# npz: the layout of shared/data/README.md


def _npz_path(cfg: DataConfig) -> Path:
    if not cfg.path:
        raise MgError("data.path: the npz dataset needs a path to an .npz file")
    path = Path(cfg.path).expanduser()
    if path.is_dir():
        raise MgError(f"{path}: is a folder; data.path of an npz dataset is an .npz file")
    if not path.is_file():
        raise MgError(f"{path}: npz file not found (data.path)")
    return path


def _open_npz(path: Path) -> Any:
    import zipfile

    # numpy reads a non-zip file as a pickle and then blames "pickled data": say what it is.
    if not zipfile.is_zipfile(path):
        raise MgError(f"{path}: not an .npz file (an npz is a zip archive of .npy arrays)")
    try:
        return np.load(path, allow_pickle=False)
    except Exception as e:  # numpy raises several types for a file that is not an npz
        raise MgError(f"{path}: not a readable .npz file ({e})") from None


def _npz_get(z: Any, path: Path, key: str) -> np.ndarray:
    if key not in z.files:
        raise MgError(f"{path}: key '{key}' missing (found: {', '.join(z.files) or 'none'})")
    try:
        return z[key]
    except Exception as e:  # pickled object arrays, corrupt zip members
        raise MgError(f"{path}: key '{key}' cannot be read ({e})") from None


def _npz_classes(z: Any, path: Path, override: int | None) -> int:
    if override is not None:
        return override
    if "classes" not in z.files:
        raise MgError(f"{path}: key 'classes' missing (add it, or set data.classes)")
    names = _npz_get(z, path, "classes")
    if names.ndim != 1 or len(names) < 2:
        raise MgError(f"{path}: key 'classes': expected a list of >= 2 names, got shape "
                      f"{names.shape}")
    return len(names)


def _load_npz(cfg: DataConfig) -> tuple[Split, Split, int]:
    path = _npz_path(cfg)
    with _open_npz(path) as z:
        classes = _npz_classes(z, path, cfg.classes)
        out = []
        for part in ("train", "test"):
            x = _npz_get(z, path, f"x_{part}")
            y = _npz_get(z, path, f"y_{part}")
            _check_npz_part(path, part, x, y, classes)
            out.append((x, y))
    (xtr, ytr), (xte, yte) = out
    if xtr.shape[1:] != xte.shape[1:]:
        raise MgError(f"{path}: key 'x_test': image shape {xte.shape[1:]} differs from "
                      f"x_train's {xtr.shape[1:]}")
    return _hwc_to_split(xtr, ytr), _hwc_to_split(xte, yte), classes


def _check_npz_part(path: Path, part: str, x: np.ndarray, y: np.ndarray, classes: int) -> None:
    kx, ky = f"x_{part}", f"y_{part}"
    if x.dtype != np.uint8:
        raise MgError(f"{path}: key '{kx}': expected dtype uint8, got {x.dtype}")
    if x.ndim != 4 or x.shape[-1] != 3 or x.shape[0] == 0:
        raise MgError(f"{path}: key '{kx}': expected shape (N, H, W, 3) with N > 0 (HWC RGB), "
                      f"got {x.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise MgError(f"{path}: key '{ky}': expected integer labels, got dtype {y.dtype}")
    if y.shape != (x.shape[0],):
        raise MgError(f"{path}: key '{ky}': expected shape ({x.shape[0]},) to match '{kx}', "
                      f"got {y.shape}")
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= classes:
        raise MgError(f"{path}: key '{ky}': labels must lie in 0..{classes - 1}, found "
                      f"{lo}..{hi}")


# cifar10 / cifar100 through torchvision


def _load_cifar(cfg: DataConfig) -> tuple[Split, Split, int]:
    from torchvision.datasets import CIFAR10, CIFAR100

    cls, name, classes = (CIFAR10, "CIFAR-10", 10) if cfg.dataset == "cifar10" else (
        CIFAR100, "CIFAR-100", 100)
    root = Path(cfg.path).expanduser() if cfg.path else DEFAULT_ROOT.expanduser()
    where = root / cls.base_folder
    try:
        # torchvision prints download progress; mg's stdout is reserved for results.
        with contextlib.redirect_stdout(sys.stderr):
            train = cls(str(root), train=True, download=cfg.download)
            test = cls(str(root), train=False, download=False)
    except Exception as e:  # no internet, bad checksum, unreadable files: all the user's to fix
        if cfg.download:
            raise MgError(
                f"{where}: {name} is missing and the download failed ({e}); connect to the "
                f"internet, or extract {cls.filename} from another machine into {root} "
                f"(data.path)") from None
        raise MgError(
            f"{where}: {name} not found or corrupted; set data.download = true (needs internet) "
            f"or extract {cls.filename} into {root} (data.path)") from None
    return _hwc_to_split(train.data, train.targets), _hwc_to_split(test.data, test.targets), \
        classes


# imagefolder: class subfolders of images, decoded once into memory (the images in use only)


def _imagefolder_dirs(cfg: DataConfig) -> tuple[Path, Path | None]:
    """(train dir, test dir or None). root/train + root/val|test, else root alone."""
    if not cfg.path:
        raise MgError("data.path: the imagefolder dataset needs a folder")
    root = Path(cfg.path).expanduser()
    if not root.is_dir():
        raise MgError(f"{root}: image folder not found (data.path)")
    if (root / "train").is_dir():
        for name in ("val", "test"):
            if (root / name).is_dir():
                return root / "train", root / name
        return root / "train", None
    return root, None


def _decode(path: str, size: int) -> np.ndarray:
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as img:
            # Shorter side to `size`, centre crop: a square without distorting the aspect.
            img = ImageOps.fit(img.convert("RGB"), (size, size), Image.Resampling.BILINEAR)
            return np.asarray(img, dtype=np.uint8)
    except OSError as e:
        raise MgError(f"{path}: cannot decode image ({e})") from None


def _decode_all(samples: list[tuple[str, int]], size: int, workers: int) -> Split:
    """Decode straight into one preallocated (N, 3, H, W) array: peak memory is the result."""
    out = np.empty((len(samples), 3, size, size), dtype=np.uint8)

    def fill(i: int) -> None:
        out[i] = _decode(samples[i][0], size).transpose(2, 0, 1)

    if workers > 0:
        from concurrent.futures import ThreadPoolExecutor

        # PIL releases the GIL while decoding and resizing, so threads scale.
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(fill, range(len(samples))))
    else:
        for i in range(len(samples)):
            fill(i)
    return Split(torch.from_numpy(out), torch.tensor([c for _, c in samples], dtype=torch.int64))


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux MemAvailable), None if unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_fits(images: int, size: int, what: str, available: int | None = None) -> None:
    """Refuse before decoding, not an hour later when the kernel's OOM killer strikes.

    Decoded images are uint8, 3·size² bytes each, held once (the Loader's device copy is the
    same tensor on CPU); ask for a quarter of the available memory as headroom for training.
    """
    need = images * 3 * size * size
    avail = available_memory() if available is None else available
    if avail is not None and need * 5 // 4 > avail:
        raise MgError(f"{what}: {images:,} images at {size}x{size} need {_bytes(need)} in "
                      f"memory and {_bytes(avail)} is available; lower data.image_size or "
                      "use data.limit")


def _bytes(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _load_imagefolder(cfg: DataConfig, seed: int) -> tuple[Split, Split, Split, int]:
    """(train, val, test, classes), decoding only the images those splits use."""
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    train_dir, test_dir = _imagefolder_dirs(cfg)
    try:
        listing = ImageFolder(str(train_dir))  # lists files and classes; we decode ourselves
    except OSError as e:
        raise MgError(f"{train_dir}: not an image folder ({e})") from None
    classes = cfg.classes if cfg.classes is not None else len(listing.classes)
    if classes < len(listing.classes):
        raise MgError(f"{train_dir}: {len(listing.classes)} class folders but data.classes is "
                      f"{classes}")
    pool = listing.samples
    if test_dir is not None:
        try:
            unknown = set(find_classes(test_dir)[0]) - set(listing.class_to_idx)
        except OSError as e:
            raise MgError(f"{test_dir}: no class folders ({e})") from None
        if unknown:
            raise MgError(f"{test_dir}: class folders not in {train_dir}: "
                          f"{', '.join(sorted(unknown))}")
        # Label by the train folder's class indices, so a class missing from val keeps its id.
        test = make_dataset(str(test_dir), listing.class_to_idx, extensions=IMG_EXTENSIONS,
                            allow_empty=True)
        if not test:
            raise MgError(f"{test_dir}: no images found")
    else:
        if len(pool) < 2:
            raise MgError(f"{train_dir}: need at least 2 images to hold out a test split")
        # Fixed seed, not the run's: every run of this folder is tested on the same images.
        order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(0)).tolist()
        n_test = min(max(1, round(IMAGEFOLDER_TEST_FRACTION * len(pool))), len(pool) - 1)
        pool, test = [pool[i] for i in order[n_test:]], [pool[i] for i in order[:n_test]]
    train_i, val_i = split_indices(len(pool), seed, cfg.limit, cfg.val_fraction)
    train, val = [pool[i] for i in train_i.tolist()], [pool[i] for i in val_i.tolist()]
    check_fits(len(train) + len(val) + len(test), cfg.image_size, str(train_dir))
    size, workers = cfg.image_size, cfg.workers
    return (_decode_all(train, size, workers), _decode_all(val, size, workers),
            _decode_all(test, size, workers), classes)


# synthetic: learnable images for smoke tests, no files needed


def _synthetic(cfg: DataConfig, seed: int) -> tuple[Split, Split, int]:
    """Class prototypes (a smooth colour pattern each) plus heavy per-image noise.

    A linear model separates the classes, so a few steps of training beat chance clearly,
    but individual pixels are too noisy to be read off directly.
    """
    g = torch.Generator().manual_seed(seed)
    k, size = cfg.synthetic_classes, 32
    coarse = torch.randn(k, 3, 4, 4, generator=g)
    pattern = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    pattern = pattern / pattern.std(dim=(1, 2, 3), keepdim=True)
    colour = 0.5 * torch.randn(k, 3, 1, 1, generator=g)
    proto = 128 + 40 * (pattern + colour)

    def make(n: int) -> Split:
        labels = torch.arange(n) % k  # round robin: every prefix is balanced
        chunks = []
        for lo in range(0, n, 4096):  # bounded float memory for large requests
            y = labels[lo:lo + 4096]
            noise = 64 * torch.randn(len(y), 3, size, size, generator=g)
            bright = 16 * torch.randn(len(y), 1, 1, 1, generator=g)
            chunks.append((proto[y] + noise + bright).round().clamp(0, 255).to(torch.uint8))
        return Split(torch.cat(chunks), labels)

    train = make(cfg.synthetic_images)
    return train, make(max(1, cfg.synthetic_images // 5)), k
