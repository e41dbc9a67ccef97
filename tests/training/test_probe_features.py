"""The linear probe's feature pass resumes in chunks: a killed pass continues, bit-identical to one run through."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cxrvit.data.preprocess import Preprocessing
from cxrvit.model.vit import build_model
from cxrvit.training import probe_features as pf
from cxrvit.training.augment import BatchAugment
from cxrvit.training.config import load_recipe
from cxrvit.training.engine import train

#: Three views, so the augmentation generator runs across chunks and views.
PROBE = ["model.arch=vit_tiny", "model.img_size=32", "model.pos_embed=random", "probe.c_grid=[0.1,1.0]",
         "probe.cv_folds=3", "probe.views=3"]


def _rows(cache):
    from cxrvit.training.commands import choose_rows

    return choose_rows(cache, 0.15, 0)[:2]
HEAD_FEATURES = pf.head_features


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 2 batches of 16: with ~80 rows, 3 chunks per view, the last one short."""
    monkeypatch.setattr(pf, "BATCH_SIZE", 16)
    monkeypatch.setattr(pf, "CHUNK_IMAGES", 32)


def _counting(monkeypatch, kill_after=None):
    """Count the chunks computed (one ``head_features`` call each); raise KeyboardInterrupt on chunk ``kill_after + 1``."""
    calls, real = [], HEAD_FEATURES

    def counted(model, cache, rows, *a, **k):
        if kill_after is not None and len(calls) == kill_after:
            raise KeyboardInterrupt
        calls.append(np.asarray(rows).copy())
        return real(model, cache, rows, *a, **k)

    monkeypatch.setattr(pf, "head_features", counted)
    return calls


def test_chunked_pass_equals_one_uninterrupted_pass(tiny_cache, tmp_path, one_thread, small_chunks):
    """The chunks' features are the single pass's (the code before chunking): view 0 over all rows, then one
    generator drawing views 1.. in the same batches."""
    cfg = load_recipe("probe-random", PROBE)
    rows = np.sort(np.concatenate(_rows(tiny_cache)))
    torch.manual_seed(cfg.engine.seed)
    model = build_model("vit_tiny", num_classes=len(cfg.data.labels))
    prep = Preprocessing(size=32)
    feats = pf.extract_features(model, tiny_cache, rows, cfg, prep, "cpu", tmp_path / "partial", "key", False)
    augment = BatchAugment(cfg.augment, 32, seed=cfg.engine.seed + 1)
    single = [pf.head_features(model, tiny_cache, rows, 32, prep, batch_size=16)]
    single += [pf.head_features(model, tiny_cache, rows, 32, prep, augment, batch_size=16) for _ in range(2)]
    assert np.array_equal(feats, np.concatenate(single))
    assert not np.array_equal(single[1], single[2])       # the views do differ


def test_killed_feature_pass_resumes_from_its_chunks(tiny_cache, tmp_path, one_thread, small_chunks, monkeypatch,
                                                     capsys):
    cfg = load_recipe("probe-random", PROBE)
    tr, va = _rows(tiny_cache)
    rows = np.sort(np.concatenate([tr, va]))
    n_chunks = 3 * -(-len(rows) // 32)
    assert n_chunks == 9                                    # 3 per view: the 4th is view 1's first

    calls = _counting(monkeypatch)
    ref = train(cfg, tiny_cache, tr, va, tmp_path / "ref", progress=False)
    assert len(calls) == n_chunks and not (ref / pf.PARTIAL).exists()

    # Killed in view 1 (mid-way through the augmented draws), after 4 chunks.
    run = tmp_path / "run"
    calls = _counting(monkeypatch, kill_after=4)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tiny_cache, tr, va, run, progress=False)
    assert not (run / pf.FEATURES).exists() and len(list((run / pf.PARTIAL).glob("chunk-*.npz"))) == 4
    with pytest.raises(FileExistsError, match="resume"):     # without --resume the chunks are never overwritten
        train(cfg, tiny_cache, tr, va, run, progress=False)

    calls = _counting(monkeypatch)
    train(cfg, tiny_cache, tr, va, run, resume=True, progress=False)
    assert f"resuming the feature pass from {run / pf.PARTIAL}: {len(rows) + 32} of {3 * len(rows)}" in \
        capsys.readouterr().err
    # (a) only the missing chunks were computed: the rest of view 1 and all of view 2
    done = [rows[s:s + 32] for s in range(0, len(rows), 32)]
    assert len(calls) == n_chunks - 4 and all(np.array_equal(c, d) for c, d in zip(calls, (done * 3)[4:]))
    # (b) the features are the uninterrupted run's, bit for bit, and the chunk folder is gone
    with np.load(ref / pf.FEATURES) as a, np.load(run / pf.FEATURES) as b:
        assert all(np.array_equal(a[k], b[k]) for k in ("rows", "feats", "views", "fingerprint"))
    assert not (run / pf.PARTIAL).exists()
    # (c) so is the head (and every other weight)
    w_ref, w_run = load_file(str(ref / "model.safetensors")), load_file(str(run / "model.safetensors"))
    assert w_ref.keys() == w_run.keys() and all(torch.equal(w_ref[k], w_run[k]) for k in w_ref)


def test_chunks_of_other_features_are_discarded_naming_the_folder(tiny_cache, tmp_path, one_thread, small_chunks,
                                                                    monkeypatch, capsys):
    cfg = load_recipe("probe-random", PROBE)
    tr, va = _rows(tiny_cache)
    run = tmp_path / "run"
    _counting(monkeypatch, kill_after=2)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tiny_cache, tr, va, run, progress=False)
    calls = _counting(monkeypatch)
    other = load_recipe("probe-random", PROBE + ["model.img_size=48"])
    train(other, tiny_cache, tr, va, run, resume=True, progress=False)
    err = capsys.readouterr().err
    assert f"discarding {run / pf.PARTIAL}: its chunks are of other features (fingerprint, img_size)" in err
    assert "resuming" not in err and len(calls) == 3 * -(-len(np.concatenate([tr, va])) // 32)
