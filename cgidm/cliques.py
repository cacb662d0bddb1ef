"""FineXtract's clustering of samples (docs/extract.md, "Clustering"): a graph joining
samples at least ``tau`` similar, covered greedily by its largest cliques, ``tau`` rising
from the lower quartile of the similarities until there are ``N`` cliques; each clique's
representative is the sample nearest its mean."""
from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from cgidm.files import counted

log = logging.getLogger("cgidm.extract")


def unit_features(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """``[M, ...]`` -> ``[M, D]`` float64 rows of unit L2 norm (a zero row stays zero)."""
    a = np.asarray(x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
    a = a.reshape(a.shape[0], -1)
    norm = np.linalg.norm(a, axis=1, keepdims=True)
    return np.divide(a, norm, out=np.zeros_like(a), where=norm > 0)


class TooDense(Exception):
    """The clique search at a threshold took more steps than its budget."""


def _bits(mask: int):
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low


def _clique_score(mask: int, sims: np.ndarray) -> float:
    idx = list(_bits(mask))
    if len(idx) < 2:
        return -math.inf
    sub = sims[np.ix_(idx, idx)]
    return float((sub.sum() - np.trace(sub)) / (len(idx) * (len(idx) - 1)))


def maximum_clique(nbrs: Sequence[int], alive: int, sims: np.ndarray, budget: list[int]) -> int:
    """The largest clique among the ``alive`` nodes (bit masks; ``nbrs[i]``: node ``i``'s
    neighbours), ties broken by the higher mean similarity, then by the lower node
    numbers: Bron–Kerbosch with Tomita's pivot, pruned by size. ``budget[0]`` counts the
    search steps left, a step being a branch the size bound did not cut (a cut one costs a
    popcount); ``TooDense`` when it runs out."""
    best = {"size": 0, "score": -math.inf, "mask": 0}

    def expand(r: int, size: int, p: int, x: int) -> None:
        if p and size + p.bit_count() < best["size"]:
            return
        budget[0] -= 1
        if budget[0] < 0:
            raise TooDense
        if not p:
            if not x:
                if size > best["size"]:
                    best.update(size=size, score=_clique_score(r, sims), mask=r)
                elif size == best["size"]:
                    score = _clique_score(r, sims)
                    if score > best["score"]:
                        best.update(score=score, mask=r)
            return
        pivot = max(_bits(p | x), key=lambda u: (p & nbrs[u]).bit_count())
        for v in _bits(p & ~nbrs[pivot]):
            bit = 1 << v
            expand(r | bit, size + 1, p & nbrs[v], x & nbrs[v])
            p &= ~bit
            x |= bit

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, alive.bit_count() + 200))
    try:
        expand(0, 0, alive, 0)
    finally:
        sys.setrecursionlimit(limit)
    return best["mask"]


def clique_partition(adjacency: np.ndarray, sims: np.ndarray, budget: int) -> list[list[int]]:
    """The official code's greedy cover: take the largest clique out of the graph, again
    and again, until no node is left (a lone node is a clique of one). ``adjacency``
    ``[M, M]`` bool (no self-loops). ``TooDense`` past ``budget`` search steps.

    A node with no neighbour left is a clique of one whenever it is taken: such nodes are
    taken out without a search (the same cover, in another order), so a sparse graph of
    many samples, mostly alone, costs a search of the few joined ones only."""
    m = adjacency.shape[0]
    nbrs = [sum(1 << int(j) for j in np.flatnonzero(adjacency[i])) for i in range(m)]
    alive = (1 << m) - 1
    left = [budget]
    cliques = []
    while alive:
        lone = [i for i in _bits(alive) if not nbrs[i] & alive]
        if lone:
            cliques += [[i] for i in lone]
            alive &= ~sum(1 << i for i in lone)
            continue
        mask = maximum_clique(nbrs, alive, sims, left)
        cliques.append(list(_bits(mask)))
        alive &= ~mask
    return cliques


@dataclass(frozen=True)
class Cluster:
    """A clique of samples: ``members`` (sample indices), the ``representative`` (the
    member nearest the clique's mean feature), ``mean_similarity`` (over its pairs;
    ``None`` for a clique of one)."""

    members: tuple[int, ...]
    representative: int
    mean_similarity: Optional[float]

    @property
    def size(self) -> int:
        return len(self.members)


@dataclass
class Clustering:
    threshold: Optional[float]  # the similarity threshold of the edges (None: one sample)
    clusters: list[Cluster]  # densest first
    scanned: list[dict] = field(default_factory=list)  # {"threshold", "cliques" or "too_dense"}


def cluster(features: np.ndarray | torch.Tensor, n_clusters: int, start_quantile: float = 0.25, step: float = 0.01,
            budget: int = 200_000, progress: bool = False) -> Clustering:
    """FineXtract's clustering of ``features [M, ...]`` (cosine similarity).

    The threshold starts at the ``start_quantile`` of the pairwise similarities (rounded
    down to the ``step`` grid) and rises by ``step`` until the greedy clique cover of the
    graph "similarity >= threshold" has at least ``n_clusters`` cliques (a threshold whose
    graph is too dense for ``budget`` search steps is passed over, as the official code
    passes over one that takes longer than its timeout). Clusters come densest first:
    more samples, then a higher mean similarity, then the lower sample index. ``progress``:
    a bar over the thresholds scanned (a dense graph's search takes a while)."""
    f = unit_features(features)
    m = f.shape[0]
    if m == 1:
        return Clustering(None, [Cluster((0,), 0, None)])
    sims = np.clip(f @ f.T, -1.0, 1.0)
    off = sims[np.triu_indices(m, 1)]
    first = math.floor(float(np.quantile(off, start_quantile)) / step)
    # above the largest similarity the graph has no edge: m cliques of one
    last = math.floor(float(off.max()) / step) + 1
    scanned = []
    found = None
    from tqdm.auto import tqdm

    from cgidm.progress import bar_options

    bar = tqdm(total=last + 1 - first, unit="threshold", desc="clustering (until enough cliques)",
               disable=not progress, **bar_options())
    for i in range(first, last + 1):
        bar.update(1)  # the threshold being scanned
        tau = i * step
        adj = sims >= tau
        np.fill_diagonal(adj, False)
        if not adj.any():
            cliques = [[j] for j in range(m)]
        else:
            try:
                cliques = clique_partition(adj, sims, budget)
            except TooDense:
                scanned.append({"threshold": tau, "too_dense": True})
                continue
        scanned.append({"threshold": tau, "cliques": len(cliques)})
        found = (tau, cliques)
        if len(cliques) >= n_clusters:
            break
    bar.total = bar.n  # the scan stops once enough: it ends full
    bar.close()
    if found is None or len(found[1]) < n_clusters:
        # above every similarity the graph has no edge: every sample a clique of its own,
        # as many cliques as there can be
        tau = (last + 1) * step
        found = (tau, [[j] for j in range(m)])
        if not scanned or scanned[-1].get("threshold") != tau:
            scanned.append({"threshold": tau, "cliques": m})
    tau, cliques = found
    clusters = []
    for members in cliques:
        idx = np.array(sorted(members))
        centre = f[idx].mean(axis=0)
        rep = int(idx[np.argmin(np.linalg.norm(f[idx] - centre, axis=1))])
        score = _clique_score(sum(1 << int(j) for j in idx), sims)
        clusters.append(Cluster(tuple(int(j) for j in idx), rep, None if score == -math.inf else score))
    clusters.sort(key=lambda c: (-c.size, -(c.mean_similarity if c.mean_similarity is not None else -math.inf),
                                 c.members[0]))
    return Clustering(tau, clusters, scanned)


def said_of(clustering: Clustering, cfg, samples: int) -> list[str]:
    """Warnings a reader of ``cgidm extract``'s candidates needs (``cfg``: its
    ``ExtractConfig``; logged, and returned for its summary and report): no sample like
    another (their order then means nothing), or fewer clusters than the candidates asked
    for."""
    said: list[str] = []
    dense = [s["threshold"] for s in clustering.scanned or () if s.get("too_dense")]
    alone = samples > 1 and all(c.size == 1 for c in clustering.clusters)
    grouped = [s for s in clustering.scanned or () if 0 < s.get("cliques", samples) < cfg.clusters]
    if alone and grouped and samples > cfg.clusters:
        # the samples were alike (as a strongly memorised fine-tune's are), too alike to
        # split into --clusters groups: the scan went past them to a sample each
        best = max(grouped, key=lambda s: s["cliques"])
        said.append(f"the samples are too alike to split into {cfg.clusters} clusters (at most {best['cliques']}, at "
                    f"threshold {best['threshold']:.4g}), so every sample is a cluster of its own and the candidates "
                    f"are not ranked by anything: try --clusters {best['cliques']}")
    elif alone and dense:
        span = f"{dense[0]:.4g}" + (f" to {dense[-1]:.4g}" if len(dense) > 1 else "")
        said.append(f"every cluster is a single sample: the graph{'s' if len(dense) > 1 else ''} at similarity "
                    f"{span} joined too many samples for the clique search ({cfg.clique_budget} steps each), and "
                    "above them no two samples are alike, so the candidates are not ranked by anything (fewer "
                    "--samples, or more --steps for samples less like noise)")
    elif alone:
        said.append("every cluster is a single sample: no two samples are alike at the threshold the scan reached, "
                    "so the candidates are not ranked by anything (more --samples, or fewer --clusters, or other "
                    "--features)")
    if len(clustering.clusters) < cfg.n_candidates:  # asked for with --candidates, or --clusters by default
        said.append(f"{counted(len(clustering.clusters), 'cluster')}: "
                    f"{counted(len(clustering.clusters), 'candidate')} written, not the {cfg.n_candidates} "
                    + ("--candidates" if cfg.candidates is not None else "(--candidates, by default --clusters)")
                    + " asked for")
    for text in said:
        log.warning("%s", text)
    return said
