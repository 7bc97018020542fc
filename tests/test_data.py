"""Datasets, splits and the batched tensor augmentation of mg_lib/data.py."""

from __future__ import annotations

import hashlib
import pickle
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from mg_lib import data as mgdata
from mg_lib.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    Split,
    load_data,
    num_classes,
)
from mg_lib.errors import MgError
from mg_lib.loader import Loader
from mg_lib.recipe import DataConfig

NPZ = Path(__file__).parents[2] / "shared/data/cifar10_5k.npz"
needs_npz = pytest.mark.skipif(
    not NPZ.is_file(), reason=f"{NPZ} is absent (the shared CIFAR-10 subset ships only with "
    "the project's machines)")


def keys(images: torch.Tensor) -> list[bytes]:
    """One hashable key per image, to compare splits by content."""
    return [bytes(x) for x in images.reshape(len(images), -1).numpy()]


def norm(images: torch.Tensor, mean=CIFAR10_MEAN, std=CIFAR10_STD) -> torch.Tensor:
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return (images.float() / 255 - m) / s


# ---------------------------------------------------------------- npz


@needs_npz
def test_npz_real_subset_shapes_limit_and_val():
    d = load_data(DataConfig(dataset="npz", path=str(NPZ), limit=1000, val_fraction=0.1), 0)
    assert (len(d.train), len(d.val), len(d.test)) == (900, 100, 1000)
    assert d.train.images.shape == (900, 3, 32, 32) and d.train.images.dtype == torch.uint8
    assert d.train.labels.dtype == torch.int64 and d.test.images.shape == (1000, 3, 32, 32)
    assert int(d.train.labels.min()) >= 0 and int(d.train.labels.max()) <= 9
    assert d.classes == 10 and d.mean == CIFAR10_MEAN and d.std == CIFAR10_STD
    full = load_data(DataConfig(dataset="npz", path=str(NPZ), val_fraction=0.0), 0)
    assert (len(full.train), len(full.val)) == (5000, 0)


@needs_npz
def test_npz_split_disjoint_labelled_and_seeded():
    cfg = DataConfig(dataset="npz", path=str(NPZ), limit=2000, val_fraction=0.2)
    d = load_data(cfg, 0)
    with np.load(NPZ, allow_pickle=False) as z:
        x, y = z["x_train"], z["y_train"]
    chw = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    truth = dict(zip(keys(chw), y.tolist(), strict=True))
    tr, va = keys(d.train.images), keys(d.val.images)
    assert len(set(tr)) == 1600 and len(set(va)) == 400 and not set(tr) & set(va)
    # Every image comes from x_train and kept its own label through the permutation.
    assert [truth[k] for k in tr] == d.train.labels.tolist()
    assert [truth[k] for k in va] == d.val.labels.tolist()
    again = load_data(cfg, 0)
    assert torch.equal(again.train.images, d.train.images)
    assert torch.equal(again.val.labels, d.val.labels)
    other = load_data(cfg, 1)
    assert set(keys(other.val.images)) != set(va)
    assert torch.equal(other.test.images, d.test.images)  # test is never permuted or limited


def test_split_sizes_edge_cases():
    cfg = DataConfig(dataset="synthetic", synthetic_images=50)
    d = load_data(cfg.model_copy(update={"val_fraction": 0.0}), 0)
    assert (len(d.train), len(d.val)) == (50, 0)
    d = load_data(cfg.model_copy(update={"limit": 2, "val_fraction": 0.01}), 0)
    assert (len(d.train), len(d.val)) == (1, 1)  # at least one val image, one train image
    d = load_data(cfg.model_copy(update={"limit": 30, "val_fraction": 0.25}), 0)
    assert (len(d.train), len(d.val), len(d.test)) == (22, 8, 10)  # round(7.5) == 8


def tiny_npz(n: int = 20, **changes) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
        "y_train": np.arange(n, dtype=np.int64) % 10,
        "x_test": rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8),
        "y_test": np.arange(10, dtype=np.int64),
        "classes": np.array([f"c{i}" for i in range(10)]),
    }
    arrays.update(changes)
    return {k: v for k, v in arrays.items() if v is not None}


def test_tiny_npz_loads_hwc_as_chw(tmp_path):
    arrays = tiny_npz()
    np.savez(tmp_path / "ok.npz", **arrays)
    d = load_data(DataConfig(dataset="npz", path=str(tmp_path / "ok.npz"), val_fraction=0), 0)
    assert torch.equal(d.test.images, torch.from_numpy(arrays["x_test"]).permute(0, 3, 1, 2))
    assert d.test.labels.tolist() == list(range(10)) and d.classes == 10


@pytest.mark.parametrize("key, changes", [
    ("x_test", {"x_test": None}),
    ("y_train", {"y_train": None}),
    ("classes", {"classes": None}),
    ("x_train", {"x_train": np.zeros((20, 32, 32), np.uint8)}),
    ("x_train", {"x_train": np.zeros((20, 3, 32, 32), np.uint8)}),
    ("x_train", {"x_train": np.zeros((20, 32, 32, 3), np.float32)}),
    ("y_train", {"y_train": np.full(20, 10, np.int64)}),
    ("y_test", {"y_test": -np.ones(10, np.int64)}),
    ("y_train", {"y_train": np.zeros(20, np.float32)}),
    ("y_train", {"y_train": np.zeros(19, np.int64)}),
    ("x_test", {"x_test": np.zeros((10, 16, 16, 3), np.uint8)}),
])
def test_bad_npz_names_file_and_key(tmp_path, key, changes):
    path = tmp_path / "bad.npz"
    np.savez(path, **tiny_npz(**changes))
    with pytest.raises(MgError) as e:
        load_data(DataConfig(dataset="npz", path=str(path)), 0)
    assert str(path) in str(e.value) and f"'{key}'" in str(e.value)


def test_npz_missing_or_not_npz(tmp_path):
    missing = tmp_path / "nowhere.npz"
    with pytest.raises(MgError, match="nowhere.npz"):
        load_data(DataConfig(dataset="npz", path=str(missing)), 0)
    with pytest.raises(MgError, match="nowhere.npz"):
        num_classes(DataConfig(dataset="npz", path=str(missing)))
    junk = tmp_path / "junk.npz"
    junk.write_text("not a zip")
    with pytest.raises(MgError, match="junk.npz"):
        load_data(DataConfig(dataset="npz", path=str(junk)), 0)
    with pytest.raises(MgError, match="data.path"):
        load_data(DataConfig(dataset="npz"), 0)


def test_npz_classes_override(tmp_path):
    path = tmp_path / "nc.npz"
    np.savez(path, **tiny_npz(classes=None))
    d = load_data(DataConfig(dataset="npz", path=str(path), classes=12), 0)
    assert d.classes == 12 and num_classes(DataConfig(dataset="npz", path=str(path),
                                                      classes=12)) == 12
    with pytest.raises(MgError, match="'y_train'"):  # labels 0..9 do not fit 5 classes
        load_data(DataConfig(dataset="npz", path=str(path), classes=5), 0)


# ---------------------------------------------------------------- num_classes


def test_num_classes_reads_no_images(tmp_path, monkeypatch):
    only = tmp_path / "only_classes.npz"  # no image arrays in the file at all
    np.savez(only, classes=np.array(["a", "b", "c"]))
    assert num_classes(DataConfig(dataset="npz", path=str(only))) == 3

    def no_disk(*args, **kwargs):
        raise AssertionError("num_classes touched the disk")

    monkeypatch.setattr(mgdata.np, "load", no_disk)
    nowhere = str(tmp_path / "absent")
    assert num_classes(DataConfig(dataset="cifar10", path=nowhere)) == 10
    assert num_classes(DataConfig(dataset="cifar100", path=nowhere)) == 100
    assert num_classes(DataConfig(dataset="synthetic", synthetic_classes=7, path=nowhere)) == 7
    assert not (tmp_path / "absent").exists()


# ---------------------------------------------------------------- CIFAR (fabricated copies)

CIFAR = {  # kind: (class, folder, train files, test file, meta file, meta key, label key, k)
    "cifar10": ("CIFAR10", "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)],
                "test_batch", "batches.meta", "label_names", "labels", 10),
    "cifar100": ("CIFAR100", "cifar-100-python", ["train"], "test", "meta", "fine_label_names",
                 "fine_labels", 100),
}


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def fake_cifar(root: Path, kind: str, monkeypatch) -> dict[str, np.ndarray]:
    """Write a tiny copy in torchvision's layout; point the dataset class's md5s at it.

    torchvision unpickles with encoding="latin1", which turns the original Python 2 str keys
    into str; so the dicts here have str keys ("data", "labels"), not bytes.
    """
    import torchvision.datasets.cifar as tvc

    cls_name, folder, train_files, test_file, meta_file, meta_key, label_key, k = CIFAR[kind]
    base = root / folder
    base.mkdir(parents=True)
    rng = np.random.default_rng(1)
    made: dict[str, list] = {"x_train": [], "y_train": []}
    listed = {}
    for name in [*train_files, test_file]:
        n = 4 if name != test_file else 6
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        y = rng.integers(0, k, n).tolist()
        entry = {"data": x, label_key: y, "filenames": [f"{name}_{i}.png" for i in range(n)]}
        if kind == "cifar100":
            entry["coarse_labels"] = [c % 20 for c in y]
        with open(base / name, "wb") as f:
            pickle.dump(entry, f)
        listed[name] = md5(base / name)
        if name == test_file:
            made["x_test"], made["y_test"] = x, np.array(y)
        else:
            made["x_train"].append(x)
            made["y_train"] += y
    with open(base / meta_file, "wb") as f:
        pickle.dump({meta_key: [f"class{i}" for i in range(k)]}, f)
    cls = getattr(tvc, cls_name)
    monkeypatch.setattr(cls, "train_list", [[n, listed[n]] for n in train_files])
    monkeypatch.setattr(cls, "test_list", [[test_file, listed[test_file]]])
    monkeypatch.setattr(cls, "meta", {"filename": meta_file, "key": meta_key,
                                      "md5": md5(base / meta_file)})
    return {"x_train": np.concatenate(made["x_train"]), "y_train": np.array(made["y_train"]),
            "x_test": made["x_test"], "y_test": made["y_test"]}


def check_cifar(d, made: dict[str, np.ndarray], kind: str) -> None:
    k = CIFAR[kind][-1]
    assert d.classes == k and d.mean == (CIFAR100_MEAN if kind == "cifar100" else CIFAR10_MEAN)
    # The rows are CHW-flattened, so they match the loaded (3, 32, 32) images byte for byte.
    assert torch.equal(d.test.images.reshape(-1, 3072), torch.from_numpy(made["x_test"]))
    assert d.test.labels.tolist() == made["y_test"].tolist()
    pool = torch.cat([d.train.images, d.val.images])
    labels = torch.cat([d.train.labels, d.val.labels]).tolist()
    truth = {bytes(row): int(y) for row, y in zip(made["x_train"], made["y_train"], strict=True)}
    assert sorted(keys(pool)) == sorted(truth)
    assert [truth[key] for key in keys(pool)] == labels


@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
def test_cifar_local_copy(tmp_path, monkeypatch, kind):
    made = fake_cifar(tmp_path, kind, monkeypatch)
    d = load_data(DataConfig(dataset=kind, path=str(tmp_path), download=False), 0)
    n = len(made["y_train"])  # 20 (cifar10: five files) or 4 (cifar100: one)
    n_val = max(1, round(0.1 * n))
    assert (len(d.train), len(d.val), len(d.test)) == (n - n_val, n_val, 6)
    check_cifar(d, made, kind)


@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
def test_cifar_download_path(tmp_path, monkeypatch, capsys, kind):
    import torchvision.datasets.cifar as tvc

    made = fake_cifar(tmp_path / "stage", kind, monkeypatch)
    tgz = tmp_path / "archive.tar.gz"
    with tarfile.open(tgz, "w:gz") as t:
        t.add(tmp_path / "stage" / CIFAR[kind][1], arcname=CIFAR[kind][1])
    calls = []

    def fake_download(url, download_root, extract_root=None, filename=None, md5=None,
                      remove_finished=False):
        calls.append((url, Path(download_root)))
        print(f"Downloading {url}")  # as torchvision does, on stdout
        with tarfile.open(tgz) as t:
            extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            t.extractall(extract_root or download_root, **extra)

    monkeypatch.setattr(tvc, "download_and_extract_archive", fake_download)
    root = tmp_path / "cache"
    d = load_data(DataConfig(dataset=kind, path=str(root), download=True), 0)
    cls = getattr(tvc, CIFAR[kind][0])
    assert calls == [(cls.url, root)]
    check_cifar(d, made, kind)
    out = capsys.readouterr()
    assert out.out == "" and "Downloading" in out.err  # stdout is for results only


@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
def test_cifar_missing_is_a_user_error(tmp_path, monkeypatch, kind):
    import torchvision.datasets.cifar as tvc

    root = tmp_path / "empty"
    with pytest.raises(MgError) as e:
        load_data(DataConfig(dataset=kind, path=str(root), download=False), 0)
    assert str(root / CIFAR[kind][1]) in str(e.value) and "data.download = true" in str(e.value)

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(tvc, "download_and_extract_archive", offline)
    with pytest.raises(MgError, match="download failed.*no route to host"):
        load_data(DataConfig(dataset=kind, path=str(root), download=True), 0)


# ---------------------------------------------------------------- imagefolder


def write_images(folder: Path, colour: tuple[int, int, int], n: int, size=(40, 24)) -> None:
    from PIL import Image

    folder.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", size, colour).save(folder / f"{i}.png")


COLOURS = {"a": (255, 0, 0), "b": (0, 255, 0), "c": (0, 0, 255)}


def colour_labels(split: Split) -> list[int]:
    """Class index implied by each image's (uniform) colour."""
    order = {v: i for i, v in enumerate(COLOURS.values())}
    return [order[tuple(int(v) for v in img[:, 0, 0])] for img in split.images]


def test_imagefolder_train_val(tmp_path):
    for name, colour in COLOURS.items():
        write_images(tmp_path / "train" / name, colour, 4)
    for name in ("a", "c"):  # val lacks class b: labels must still follow train's indices
        write_images(tmp_path / "val" / name, COLOURS[name], 2)
    cfg = DataConfig(dataset="imagefolder", path=str(tmp_path), image_size=16, val_fraction=0.25)
    assert num_classes(cfg) == 3
    d = load_data(cfg, 0)
    assert d.classes == 3 and (len(d.train), len(d.val), len(d.test)) == (9, 3, 4)
    assert d.train.images.shape == (9, 3, 16, 16) and d.train.images.dtype == torch.uint8
    for split in (d.train, d.val, d.test):
        assert colour_labels(split) == split.labels.tolist()
    assert sorted(d.test.labels.tolist()) == [0, 0, 2, 2]
    write_images(tmp_path / "val" / "z", (9, 9, 9), 1)
    with pytest.raises(MgError, match="z"):
        load_data(cfg, 0)


def test_imagefolder_flat_holds_out_fixed_test(tmp_path):
    for name in ("a", "b"):
        write_images(tmp_path / name, COLOURS[name], 10)
    cfg = DataConfig(dataset="imagefolder", path=str(tmp_path), image_size=8, val_fraction=0.1)
    d0, d1 = load_data(cfg, 0), load_data(cfg.model_copy(update={"workers": 2}), 1)
    assert (len(d0.train), len(d0.val), len(d0.test)) == (16, 2, 2)
    assert colour_labels(d0.train) == d0.train.labels.tolist()
    # The test split does not depend on the run's seed or on the decoding threads.
    assert torch.equal(d0.test.images, d1.test.images)
    assert torch.equal(d0.test.labels, d1.test.labels)
    with pytest.raises(MgError, match="absent"):
        load_data(cfg.model_copy(update={"path": str(tmp_path / "absent")}), 0)


def test_imagefolder_decodes_only_the_images_in_use(tmp_path, monkeypatch):
    for name in ("a", "b"):
        write_images(tmp_path / name, COLOURS[name], 10)  # 20 images: 2 test, 18 pool
    decoded = []
    real = mgdata._decode
    monkeypatch.setattr(mgdata, "_decode", lambda p, size: decoded.append(p) or real(p, size))
    cfg = DataConfig(dataset="imagefolder", path=str(tmp_path), image_size=8, val_fraction=0.2,
                     limit=5)
    d = load_data(cfg, 3)
    assert (len(d.train), len(d.val), len(d.test)) == (4, 1, 2)
    assert len(decoded) == len(set(decoded)) == 7  # not the other 13
    for split in (d.train, d.val, d.test):
        assert colour_labels(split) == split.labels.tolist()
    # The same split as cutting the whole decoded pool: the seeded order's first 5, val first.
    full = load_data(cfg.model_copy(update={"limit": None, "val_fraction": 0.0}), 3)
    assert torch.equal(d.test.images, full.test.images)
    assert torch.equal(d.val.labels, full.train.labels[:1])
    assert torch.equal(d.train.labels, full.train.labels[1:5])
    assert torch.equal(d.train.images, full.train.images[1:5])


def test_imagefolder_refuses_what_does_not_fit_before_decoding(tmp_path, monkeypatch):
    write_images(tmp_path / "a", COLOURS["a"], 3)
    write_images(tmp_path / "b", COLOURS["b"], 3)
    monkeypatch.setattr(mgdata, "_decode", lambda p, size: pytest.fail("decoded"))
    # 6 images at 224x224 are 903,168 bytes: with a quarter more as headroom, 1 MB is short.
    monkeypatch.setattr(mgdata, "available_memory", lambda: 1_000_000)
    cfg = DataConfig(dataset="imagefolder", path=str(tmp_path), image_size=224)
    msg = r"6 images at 224x224 need 0\.9 MiB in memory and 1\.0 MiB .*data\.limit"
    with pytest.raises(MgError, match=msg):
        load_data(cfg, 0)
    mgdata.check_fits(6, 224, "x", available=1_130_000)  # 903,168 x 1.25 = 1,128,960 fits
    with pytest.raises(MgError):
        mgdata.check_fits(6, 224, "x", available=1_128_000)


# ---------------------------------------------------------------- synthetic


def test_synthetic_deterministic_balanced_learnable():
    cfg = DataConfig(dataset="synthetic", synthetic_images=1000, synthetic_classes=10)
    a, b, c = load_data(cfg, 0), load_data(cfg, 0), load_data(cfg, 1)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels,
                                                                       b.test.labels)
    assert not torch.equal(a.test.images, c.test.images)
    assert a.train.images.shape[1:] == (3, 32, 32) and len(a.test) == 200 and a.classes == 10
    pool = torch.cat([a.train.labels, a.val.labels])
    assert pool.bincount().tolist() == [100] * 10 and a.test.labels.bincount().tolist() == [20] * 10
    # Learnable: nearest class mean (fit on train) classifies the test split far above chance.
    x = a.train.images.flatten(1).float()
    means = torch.stack([x[a.train.labels == k].mean(0) for k in range(10)])
    pred = torch.cdist(a.test.images.flatten(1).float(), means).argmin(1)
    assert (pred == a.test.labels).float().mean() > 0.5


# ---------------------------------------------------------------- Loader


def ident_split(n: int = 64, size: int = 32) -> Split:
    """Random images whose label is their index, so a batch says where each image came from."""
    g = torch.Generator().manual_seed(123)
    return Split(torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8),
                 torch.arange(n))


def loader(split: Split, batch: int, **kw) -> Loader:
    kw.setdefault("train", True)
    return Loader(split, batch, mean=CIFAR10_MEAN, std=CIFAR10_STD, **kw)


def test_crop_is_a_window_of_the_zero_padded_image():
    s = ident_split()
    x, y = next(loader(s, 64, crop=True).epoch(0))
    padded = norm(torch.nn.functional.pad(s.images, (4, 4, 4, 4)))
    offsets = set()
    for out, i in zip(x, y.tolist(), strict=True):
        windows = padded[i].unfold(1, 32, 1).unfold(2, 32, 1)  # (3, 9, 9, 32, 32)
        hits = (windows == out[:, None, None]).flatten(3).all(3).all(0).nonzero().tolist()
        assert len(hits) == 1  # exactly one window of the padded image, border zeros included
        offsets.add(tuple(hits[0]))
    assert len(offsets) > 10  # offsets are drawn per image
    # One image against a manual slice at the offset the loader drew for it.
    dy, dx = hits[0]
    assert torch.equal(x[-1], padded[y[-1], :, dy:dy + 32, dx:dx + 32])


def test_flip_is_an_exact_mirror():
    s = ident_split()
    x, y = next(loader(s, 64, flip=True).epoch(0))
    src = norm(s.images[y])
    same = (x == src).flatten(1).all(1)
    mirrored = (x == src.flip(-1)).flatten(1).all(1)
    assert bool((same ^ mirrored).all()) and 10 < int(mirrored.sum()) < 54


def test_cutout_zeroes_one_square_after_normalising():
    s = ident_split()
    x, y = next(loader(s, 64, cutout=8).epoch(0))
    src = norm(s.images[y])
    full = clipped = 0
    for out, ref in zip(x, src, strict=True):
        hole = (out == 0).all(0)  # zero in normalised space; no real pixel normalises to 0
        assert torch.equal(out[:, ~hole], ref[:, ~hole])
        rows, cols = hole.any(1).nonzero().flatten(), hole.any(0).nonzero().flatten()
        assert len(rows) and len(cols)
        box = hole[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
        assert bool(box.all()) and int(hole.sum()) == box.numel()  # a solid rectangle
        h, w = box.shape
        at_edge = rows[0] == 0 or cols[0] == 0 or rows[-1] == 31 or cols[-1] == 31
        assert (h, w) == (8, 8) or (at_edge and h <= 8 and w <= 8)
        full += (h, w) == (8, 8)
        clipped += (h, w) != (8, 8)
    assert full and clipped  # centres anywhere: some squares are clipped by the border


def test_eval_loader_is_fixed_and_unaugmented():
    s = ident_split(50)
    ev = loader(s, 16, train=False, crop=True, flip=True, cutout=8)
    assert len(ev) == 4  # 16, 16, 16, 2: eval keeps the last short batch
    a, b = list(ev.epoch(0)), list(ev.epoch(99))
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a, b, strict=True))
    assert torch.equal(torch.cat([x for x, _ in a]), norm(s.images))
    assert torch.cat([y for _, y in a]).tolist() == list(range(50))


def test_train_epoch_shuffles_drops_last_and_resumes_bit_identically():
    s = ident_split(100)
    tr = loader(s, 16, crop=True, flip=True, cutout=8)
    assert len(tr) == 6  # drop_last defaults to train
    full = list(tr.epoch(7))
    seen = torch.cat([y for _, y in full])
    assert len(set(seen.tolist())) == 96 and seen.tolist() != sorted(seen.tolist())
    for start in (1, 4, 6):
        resumed = list(tr.epoch(7, start=start))
        assert len(resumed) == 6 - start
        for (x0, y0), (x1, y1) in zip(full[start:], resumed, strict=True):
            assert torch.equal(x0, x1) and torch.equal(y0, y1)
    assert not torch.equal(full[0][1], next(tr.epoch(8))[1])
    with pytest.raises(ValueError):
        tr.epoch(7, start=7)
    assert len(loader(ident_split(5), 16)) == 1  # smaller than a batch: one short batch


@pytest.mark.parametrize("world", [2, 4])
def test_rank_shares_concatenate_to_the_global_batch(world):
    s = ident_split(100)
    kw = dict(crop=True, flip=True, cutout=8)
    single = list(loader(s, 32, **kw).epoch(3))
    ranks = [list(loader(s, 32, rank=r, world=world, **kw).epoch(3)) for r in range(world)]
    assert all(len(r) == len(single) for r in ranks)
    for step, (x, y) in enumerate(single):
        assert all(len(r[step][1]) == 32 // world for r in ranks)
        assert torch.equal(torch.cat([r[step][0] for r in ranks]), x)
        assert torch.equal(torch.cat([r[step][1] for r in ranks]), y)
    with pytest.raises(MgError, match="divisible"):
        loader(s, 30, world=4)


def test_eval_shards_cover_every_image_once():
    s = ident_split(64)
    seen = []
    for r in range(3):
        for x, y in loader(s, 10, train=False, rank=r, world=3).epoch(0):
            assert torch.equal(x, norm(s.images[y]))
            seen += y.tolist()
    assert sorted(seen) == list(range(64))


def test_empty_split_gives_no_batches():
    empty = Split(torch.zeros(0, 3, 32, 32, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64))
    assert list(loader(empty, 8, train=False).epoch(0)) == []
    assert len(loader(empty, 8)) == 0 and list(loader(empty, 8).epoch(0)) == []
