"""Retrieval DB: authors' file format, region order by sorted key, top-1 cosine, ties, scale."""

from __future__ import annotations

import time
from collections import OrderedDict

import numpy as np
import pytest
import torch

from inference.demo_apm import demo_raw_region_names, write_demo_retrieval_db
from inference.result import REGION_NAMES
from inference.retrieval import RetrievalDB, RetrievalDBError


def random_db(rng: np.random.Generator, sizes: list[int], dim: int = 16) -> OrderedDict:
    names = [f"region {i:02d}" for i in range(36)]
    order = rng.permutation(36)  # insertion order differs from sorted order
    db = OrderedDict()
    for i in order:
        db[names[i]] = OrderedDict((f"{names[i]} sentence {j}", torch.from_numpy(rng.standard_normal((1, dim)).astype(np.float32))) for j in range(sizes[i]))
    return db


def brute_force(db: OrderedDict, tokens: np.ndarray) -> list[list[str]]:
    """Per image, per region: cosine in float64 over every sentence, first maximum wins."""
    results = []
    for image in tokens.astype(np.float64):
        row = []
        for region_index, name in enumerate(sorted(db)):
            token = image[region_index]
            best, best_score = None, -np.inf
            for sentence, vector in db[name].items():
                v = vector.numpy().astype(np.float64).reshape(-1)
                score = float(token @ v / (np.linalg.norm(token) * np.linalg.norm(v)))
                if score > best_score:
                    best, best_score = sentence, score
            row.append(best)
        results.append(row)
    return results


def test_top1_cosine_matches_brute_force(tmp_path):
    rng = np.random.default_rng(0)
    db = random_db(rng, sizes=list(rng.integers(1, 60, 36)))
    path = tmp_path / "emb_db.pt"
    torch.save(db, path)
    loaded = RetrievalDB.load(path)
    tokens = rng.standard_normal((4, 36, 16)).astype(np.float32) * 3.0
    assert loaded.lookup(tokens) == brute_force(db, tokens)
    assert loaded.lookup(torch.from_numpy(tokens)) == brute_force(db, tokens)
    assert loaded.lookup(tokens[0]) == brute_force(db, tokens[:1])  # [36, 16] accepted as one image


def test_region_i_is_sorted_key_i():
    rng = np.random.default_rng(1)
    db = random_db(rng, sizes=[5] * 36)
    retrieval = RetrievalDB.from_mapping(db)
    assert retrieval.raw_region_names == sorted(db)
    # token i equal to the 3rd vector of sorted region i -> that sentence, whatever the insertion order
    tokens = torch.stack([list(db[name].values())[3].reshape(-1) for name in sorted(db)])[None]
    expected = [f"{name} sentence 3" for name in sorted(db)]
    assert retrieval.lookup(tokens)[0] == expected


def test_ties_go_to_the_first_index():
    db = OrderedDict()
    for i in range(36):
        base = torch.zeros(1, 16)
        base[0, i % 16] = 1.0
        # same direction three times (different lengths): equal cosine, the first must win
        db[f"r{i:02d}"] = OrderedDict([("a first", base * 2.0), ("b second", base.clone()), ("c third", base * 5.0), ("d other", torch.ones(1, 16))])
    retrieval = RetrievalDB.from_mapping(db)
    tokens = torch.stack([db[name]["b second"].reshape(-1) * 0.5 for name in sorted(db)])[None]
    assert retrieval.lookup(tokens)[0] == ["a first"] * 36


def test_demo_db_format_and_region_order(tmp_path):
    path = tmp_path / "emb_db.pt"
    write_demo_retrieval_db(path, seed=3, sentences_per_region=8)
    raw = torch.load(path, weights_only=True)
    assert len(raw) == 36
    assert sorted(raw) == demo_raw_region_names()
    for index, name in enumerate(sorted(raw)):
        assert name.lower() == REGION_NAMES[index].lower()
        sentences = list(raw[name])
        assert sentences == sorted(set(sentences)) and len(sentences) == 8
        assert all(tuple(v.shape) == (1, 16) and v.dtype == torch.float32 for v in raw[name].values())
        assert any(s.endswith(" is healthy.") for s in sentences)
        assert any(" shows " in s and " and " in s for s in sentences)
    db = RetrievalDB.load(path)
    assert len(db.sha256) == 64
    # deterministic from the seed, byte for byte (torch.save names the archive after the file stem)
    write_demo_retrieval_db(tmp_path / "again" / "emb_db.pt", seed=3, sentences_per_region=8)
    assert RetrievalDB.load(tmp_path / "again" / "emb_db.pt").sha256 == db.sha256


def test_bad_files_are_refused(tmp_path):
    rng = np.random.default_rng(2)
    db = random_db(rng, sizes=[2] * 36)
    db.pop(next(iter(db)))
    with pytest.raises(RetrievalDBError, match="exactly 36 regions"):
        RetrievalDB.from_mapping(db)
    db = random_db(rng, sizes=[2] * 36)
    first = next(iter(db))
    db[first]["bad"] = torch.zeros(2, 16)
    with pytest.raises(RetrievalDBError, match="expected \\[1, D\\]"):
        RetrievalDB.from_mapping(db)
    with pytest.raises(RetrievalDBError, match="not found"):
        RetrievalDB.load(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="tokens must be"):
        RetrievalDB.from_mapping(random_db(rng, sizes=[2] * 36)).lookup(torch.zeros(1, 35, 16))


def test_sixty_thousand_sentences_in_a_region():
    rng = np.random.default_rng(4)
    sizes = [50] * 36
    sizes[11] = 60_000
    db = random_db(rng, sizes=sizes)
    start = time.perf_counter()
    retrieval = RetrievalDB.from_mapping(db)
    build_s = time.perf_counter() - start
    tokens = rng.standard_normal((8, 36, 16)).astype(np.float32)
    start = time.perf_counter()
    result = retrieval.lookup(tokens)
    lookup_s = time.perf_counter() - start
    print(f"\nretrieval: build {build_s * 1e3:.0f} ms, lookup of 8 images with 60k sentences in one region {lookup_s * 1e3:.1f} ms")
    # correctness on the big region against a vectorised float64 reference
    name = sorted(db)[11]
    matrix = np.stack([v.numpy().reshape(-1) for v in db[name].values()]).astype(np.float64)
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    sentences = list(db[name])
    expected = [sentences[int(np.argmax(matrix @ (t / np.linalg.norm(t))))] for t in tokens[:, 11].astype(np.float64)]
    assert [row[11] for row in result] == expected
