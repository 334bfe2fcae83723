"""Whole-set neighbour searches of the dataset builder: union-find, and nearest-neighbour (faiss) versions of the
near-duplicate and identity-link rules of ``dataset.py`` that give the same answers without all-pairs work.

- ``near_duplicates_nn``: pHash neighbours within ``max_bits`` by a binary faiss index, exact at every size:
  ``IndexBinaryFlat`` up to ``EXACT_MAX`` hashes, then multi-index hashing (``IndexBinaryMultiHash`` with
  ``max_bits + 1`` sub-hashes: by the pigeonhole principle two hashes within ``max_bits`` agree exactly on one of
  them, so no pair is missed). The greedy "best image first" pass is then the same as ``dataset.near_duplicates``.
- ``group_identities_nn``: face-embedding neighbours by inner-product range search, ``IndexFlatIP`` (exact) up to
  ``EXACT_MAX`` faces, then ``IndexIVFFlat`` (approximate: a pair whose faces fall in lists that are not probed
  is missed; ``nprobe`` trades speed for recall). Candidates are re-scored with numpy and kept at exactly the
  threshold of ``dataset.group_identities``, so below ``EXACT_MAX`` both give the same links.
faiss is imported lazily (the ``scale`` extra).
"""

from __future__ import annotations

import numpy as np

from ..errors import MissingDependencyError

EXACT_MAX = 200_000   # exact (flat) indexes up to this many vectors; documented in docs/training.md


class UnionFind:
    def __init__(self, n):
        self.p = list(range(n))

    def find(self, a):
        while self.p[a] != a:
            self.p[a] = self.p[self.p[a]]
            a = self.p[a]
        return a

    def union(self, a, b):
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.p[max(ra, rb)] = min(ra, rb)


def _popcount(x: np.ndarray) -> np.ndarray:
    return np.bitwise_count(x) if hasattr(np, "bitwise_count") else np.unpackbits(x.view(np.uint8), axis=-1).sum(-1)


def near_duplicates(hashes: list[str], order: list[int], max_bits: int) -> dict[int, int]:
    """{dropped index: kept index}; images are visited in ``order`` (best first) and the first one wins."""
    h = np.array([int(x, 16) for x in hashes], dtype=np.uint64)
    dropped: dict[int, int] = {}
    kept_h, kept_i, n = np.zeros(len(h), np.uint64), np.zeros(len(h), np.int64), 0
    for i in order:
        if n:
            d = _popcount(np.bitwise_xor(kept_h[:n], h[i]))
            j = int(np.argmin(d))
            if d[j] <= max_bits:
                dropped[i] = int(kept_i[j])
                continue
        kept_h[n], kept_i[n], n = h[i], i, n + 1
    return dropped


def group_identities(face_img: np.ndarray, emb: np.ndarray, thr: float, chunk: int = 4096,
                     identity_kind: str = "arcface"):
    """Cross-image face links (identity similarity >= thr on the common scale of ``faces.identity``), face
    identity ids (connected components) and the link list."""
    from ..faces.identity import to_common

    n = len(face_img)
    uf, links = UnionFind(n), []
    for a in range(0, n, chunk):
        sim = to_common(emb[a:a + chunk] @ emb.T, identity_kind)
        for i, j in zip(*np.nonzero(sim >= thr)):
            i = int(i) + a
            if j > i and face_img[i] != face_img[j]:
                uf.union(i, int(j))
                links.append((i, int(j), float(sim[i - a, j])))
    return [uf.find(i) for i in range(n)], links


def _faiss():
    try:
        import faiss
    except ImportError as e:
        raise MissingDependencyError('Nearest-neighbour search needs faiss; run `pip install "comfyui-headsup[scale]"` '
                                     "(or `pip install faiss-cpu`).") from e
    return faiss


def _hamming_neighbours(h: np.ndarray, max_bits: int, exact_max: int):
    """For each hash (uint64), the indices and distances of all hashes within ``max_bits`` (itself excluded)."""
    faiss = _faiss()
    codes = np.ascontiguousarray(h.astype(">u8").view(np.uint8).reshape(-1, 8))
    if len(h) <= exact_max:
        index = faiss.IndexBinaryFlat(64)
    else:
        nhash = max_bits + 1
        index = faiss.IndexBinaryMultiHash(64, nhash, 64 // nhash)
    index.add(codes)
    lims, dist, idx = index.range_search(codes, max_bits + 1)  # faiss keeps distances < radius
    return [(idx[lims[i]:lims[i + 1]], dist[lims[i]:lims[i + 1]]) for i in range(len(h))]


def near_duplicates_nn(hashes: list[str], order: list[int], max_bits: int,
                       exact_max: int = EXACT_MAX) -> dict[int, int]:
    """Same contract and answer as ``dataset.near_duplicates``: {dropped index: kept index}."""
    if not hashes:
        return {}
    h = np.array([int(x, 16) for x in hashes], dtype=np.uint64)
    nbrs = _hamming_neighbours(h, max_bits, exact_max)
    kept_pos: dict[int, int] = {}
    dropped: dict[int, int] = {}
    for i in order:
        best = None
        for j, d in zip(*nbrs[i]):
            j = int(j)
            if j in kept_pos and (best is None or (int(d), kept_pos[j]) < best[0]):
                best = ((int(d), kept_pos[j]), j)
        if best is not None:
            dropped[i] = best[1]
        else:
            kept_pos[i] = len(kept_pos)
    # identical hashes at distance 0 include an image equal to itself only if listed twice; never the case here
    return dropped


def _ip_candidates(emb: np.ndarray, radius: float, exact_max: int, nprobe: int = 16):
    faiss = _faiss()
    emb = np.ascontiguousarray(emb, np.float32)
    n, d = emb.shape
    if n <= exact_max:
        index = faiss.IndexFlatIP(d)
    else:
        nlist = int(4 * np.sqrt(n))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(emb[np.random.default_rng(0).choice(n, min(n, 256 * nlist), replace=False)])
        index.nprobe = nprobe
    index.add(emb)
    return index.range_search(emb, radius)


def group_identities_nn(face_img: np.ndarray, emb: np.ndarray, thr: float, identity_kind: str = "arcface",
                        exact_max: int = EXACT_MAX, margin: float = 1e-3):
    """Same contract as ``dataset.group_identities``: (face identity ids, [(i, j, similarity)] with i < j)."""
    from ..faces.identity import native_threshold, to_common

    n = len(face_img)
    uf, links = UnionFind(n), []
    if n == 0:
        return [], []
    lims, _, idx = _ip_candidates(emb, native_threshold(thr, identity_kind) - margin, exact_max)
    for i in range(n):
        js = np.sort(idx[lims[i]:lims[i + 1]])
        js = js[(js > i) & (face_img[js] != face_img[i])]
        if not len(js):
            continue
        sim = to_common(emb[i:i + 1] @ emb[js].T, identity_kind)[0]  # re-scored as dataset.group_identities
        for j, s in zip(js, sim):
            if s >= thr:
                uf.union(i, int(j))
                links.append((i, int(j), float(s)))
    return [uf.find(i) for i in range(n)], links
