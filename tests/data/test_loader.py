"""BatchLoader / CachedCXRDataset: right pixels and targets, deterministic order, resume, DDP shards."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cxrvit.data.cache import CXRCache, prepare_cache
from cxrvit.data.loader import BatchLoader, CachedCXRDataset

TARGETS = ["Atelectasis", "Effusion", "Mass/Nodule"]


@pytest.fixture
def cache(nih_dir: Path, tmp_path: Path) -> CXRCache:
    return prepare_cache(nih_dir, tmp_path / "c", 32, workers=1, progress=False, log=lambda *_: None)


def _rows(loader) -> list[list[int]]:
    return [b.rows.tolist() for b in loader]


@pytest.mark.parametrize("prefetch", [0, 2])
def test_batches_hold_the_right_pixels_and_targets(cache: CXRCache, prefetch: int):
    rows = np.arange(1, 12)
    loader = BatchLoader(cache, rows, TARGETS, batch_size=4, seed=3, prefetch=prefetch, pin_memory=False)
    labels = cache.labels(TARGETS)
    batches = list(loader)
    assert len(batches) == len(loader) == 2  # 11 rows, drop_last
    for b in batches:
        assert b.images.dtype == torch.uint8 and b.images.shape == (4, 1, 32, 32)
        assert b.targets.dtype == torch.float32 and b.targets.shape == (4, 3)
        r = b.rows.numpy()
        assert np.array_equal(b.images[:, 0].numpy(), cache.pixels[r])
        assert np.array_equal(b.targets.numpy(), labels[r])
    seen = np.concatenate([b.rows.numpy() for b in batches])
    assert len(set(seen)) == 8 and set(seen) <= set(rows)


def test_order_is_a_function_of_seed_and_epoch_and_resumes(cache: CXRCache):
    make = lambda seed: BatchLoader(cache, np.arange(12), TARGETS, batch_size=3, seed=seed)  # noqa: E731
    a, b = make(0), make(0)
    a.set_epoch(2)
    b.set_epoch(2)
    assert _rows(a) == _rows(b)
    epoch2 = _rows(a)
    a.set_epoch(3)
    assert _rows(a) != epoch2
    assert _rows(make(1)) != _rows(make(0))
    b.set_epoch(2)
    assert [x.rows.tolist() for x in b.iter_from(2)] == epoch2[2:]


def test_no_shuffle_no_drop_last_covers_everything(cache: CXRCache):
    loader = BatchLoader(cache, np.arange(12), None, batch_size=5, shuffle=False, drop_last=False)
    batches = list(loader)
    assert len(loader) == 3 and [len(b.rows) for b in batches] == [5, 5, 2]
    assert torch.cat([b.rows for b in batches]).tolist() == list(range(12)) and batches[0].targets is None


@pytest.mark.parametrize("drop_last", [True, False])
def test_ranks_get_disjoint_equal_shares(cache: CXRCache, drop_last: bool):
    world = 3
    rows = np.arange(11)
    loaders = [BatchLoader(cache, rows, TARGETS, batch_size=2, seed=5, drop_last=drop_last, rank=r, world_size=world)
               for r in range(world)]
    for lo in loaders:
        lo.set_epoch(1)
    shares = [lo.epoch_rows() for lo in loaders]
    assert len({len(s) for s in shares}) == 1 and len({len(lo) for lo in loaders}) == 1
    if drop_last:
        assert len(set(np.concatenate(shares))) == 9  # 11 truncated to 9, each row once
    else:
        assert set(np.concatenate(shares)) == set(rows)  # padded by wrapping: every row at least once
    with pytest.raises(ValueError, match="rank 3"):
        BatchLoader(cache, rows, TARGETS, rank=3, world_size=3)


def test_targets_as_array_and_bad_input(cache: CXRCache):
    matrix = np.random.default_rng(0).random((len(cache), 2)).astype(np.float32)
    b = next(iter(BatchLoader(cache, np.arange(12), matrix, batch_size=4)))
    assert np.array_equal(b.targets.numpy(), matrix[b.rows.numpy()])
    with pytest.raises(ValueError, match="N_cache"):
        BatchLoader(cache, np.arange(12), matrix[:5])
    with pytest.raises(ValueError, match="unknown label"):
        BatchLoader(cache, np.arange(12), ["Atelectasis", "Effusions"])
    with pytest.raises(ValueError, match="rows must lie"):
        BatchLoader(cache, np.arange(20), None)


def test_dataset_items(cache: CXRCache):
    ds = CachedCXRDataset(cache, rows=[3, 7], targets=TARGETS)
    image, target, meta = ds[0]
    assert len(ds) == 2 and image.shape == (1, 32, 32) and image.dtype == torch.uint8
    assert np.array_equal(image[0].numpy(), cache.pixels[3])
    assert meta["image"] == "00000100_000.png" and meta["patient_id"] == "100" and meta["row"] == 3
    assert target.tolist() == [1.0, 1.0, 0.0]  # Atelectasis, Effusion, not Mass/Nodule
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert batch[0].shape == (2, 1, 32, 32) and batch[2]["image"] == ["00000100_000.png", cache.names[7]]


def test_early_exit_does_not_leak_threads(cache: CXRCache):
    import threading

    before = threading.active_count()
    for _ in range(5):
        for _batch in BatchLoader(cache, np.arange(12), TARGETS, batch_size=1, prefetch=1):
            break
    assert threading.active_count() <= before + 1


def test_cache_pickles_without_its_pixels(cache: CXRCache):
    import pickle

    blob = pickle.dumps(cache)
    assert np.asarray(cache.pixels[5]).tobytes() not in blob  # the index travels, the pixels are re-mapped
    clone = pickle.loads(blob)
    assert isinstance(clone.pixels, np.memmap) and np.array_equal(clone.pixels, cache.pixels)
    assert clone.index.equals(cache.index)


def test_ranks_deal_the_single_process_global_batch(cache: CXRCache):
    """Rank r's batch k holds positions r, r + W, r + 2W, ... of the one-process batch k of size B*W
    (the training engine relies on this to draw augmentation for the global batch)."""
    world, per_rank = 2, 3
    single = BatchLoader(cache, np.arange(12), None, batch_size=per_rank * world, seed=9)
    ranks = [BatchLoader(cache, np.arange(12), None, batch_size=per_rank, seed=9, rank=r, world_size=world)
             for r in range(world)]
    for lo in [single, *ranks]:
        lo.set_epoch(4)
    for k, global_batch in enumerate(single):
        for r, lo in enumerate(ranks):
            assert list(lo.iter_from(k))[0].rows.tolist() == global_batch.rows.tolist()[r::world]
