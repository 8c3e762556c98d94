"""Near duplicates: shingle sets, MinHash signatures, MinHash LSH candidates, exact Jaccard.

Two items are near duplicates when the Jaccard similarity of their shingle sets is at least a
threshold. Comparing every pair is quadratic (181k names: 16 billion pairs), so MinHash LSH
proposes candidate pairs (those whose signatures agree on a whole band; datasketch's `MinHashLSH`
chooses the bands and rows for the threshold) and each candidate's Jaccard is then recomputed
exactly from the sets: LSH false positives (candidates below the threshold) are dropped and
counted, never reported as duplicates.

Signatures are datasketch's own (2.0, scheme "affine32": SHA-1 of the shingle, the MurmurHash3
finalizer, then `a * h + b mod 2**32` per permutation, the minimum over the set), computed for all
items at once with numpy instead of one `MinHash` object per item: bit for bit the values
`MinHash(num_perm, seed).update_batch(shingles)` gives (tested); on names ~50x faster than its
per-shingle `update` loop and ~10x faster than `MinHash.bulk` (benchmarks/bench_data_check.py).
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass, field

import numpy as np

from gptlab import GptlabError

DEFAULT_THRESHOLD = 0.8  # the usual near-duplicate cut for MinHash deduplication (e.g. Lee et al. 2022)
DEFAULT_NUM_PERM = 128
SEED = 1  # datasketch's default seed: its permutations
LSH_WEIGHTS = (0.05, 0.95)  # (false positive, false negative) weights for the bands: a false positive
# costs one exact Jaccard, a miss loses a duplicate, so misses weigh 19x (at 0.8: 16 bands of 8 rows,
# P(found | J = 0.8) = 0.95; datasketch's equal weights give 9 x 13 and 0.40)
SHORT_ITEM_CHARS = 20  # mean length below which items are names or words: character shingles
SENTENCE_WORDS = 30  # mean words below which items are sentences: character 5-grams; above, word 3-grams
WORD_RE = re.compile(r"\w+")


@dataclass(frozen=True)
class Shingling:
    kind: str  # "char" or "word"
    n: int

    def __str__(self) -> str:
        return f"{self.kind}:{self.n}"


def parse_shingles(text: str) -> Shingling:
    """`char:N` or `word:N` (N >= 1), as --shingles takes it."""
    kind, _, n = str(text).partition(":")
    if kind not in ("char", "word") or not n.isdigit() or int(n) < 1:
        raise GptlabError(f"--shingles {text}: give char:N (character N-grams) or word:N (word N-grams), "
                          "N >= 1, e.g. char:3 for names or word:3 for documents")
    return Shingling(kind, int(n))


def choose_shingles(items: list[str]) -> tuple[Shingling, str]:
    """The default shingling for these items and why: character 3-grams for names and words (a
    7-letter name has five), character 5-grams for sentences (a one-word change keeps most of them,
    where word 3-grams of a 10-word sentence lose three of eight), word 3-grams for longer texts."""
    chars = sum(len(i) for i in items) / max(len(items), 1)
    words = sum(len(WORD_RE.findall(i)) for i in items) / max(len(items), 1)
    if chars < SHORT_ITEM_CHARS:
        return Shingling("char", 3), f"mean item length {chars:.1f} characters (< {SHORT_ITEM_CHARS}): names or words"
    if words < SENTENCE_WORDS:
        return Shingling("char", 5), f"mean item length {words:.1f} words (< {SENTENCE_WORDS}): sentences"
    return Shingling("word", 3), f"mean item length {words:.1f} words (>= {SENTENCE_WORDS}): documents"


def normalise(text: str) -> str:
    """Lowercased, whitespace runs collapsed to one space: the form every check compares."""
    return " ".join(text.lower().split())


def shingle_set(text: str, sh: Shingling) -> frozenset[str]:
    """The set of character N-grams of the normalised text padded with a space at each end (so
    `ahah` and `haha` differ), or of word N-grams of its lowercased words; an item shorter than N
    is one shingle, itself (so it can still equal another short item)."""
    if sh.kind == "char":
        s = f" {normalise(text)} "  # the spaces mark the start and end, as they mark words inside
        return frozenset(s[i:i + sh.n] for i in range(len(s) - sh.n + 1)) or frozenset([s])
    words = WORD_RE.findall(text.lower())
    grams = frozenset(" ".join(words[i:i + sh.n]) for i in range(len(words) - sh.n + 1))
    return grams or frozenset([" ".join(words)])


def jaccard(a: frozenset, b: frozenset) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer (datasketch's pre-mix), on a uint32 array; products wrap."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def datasketch():
    """The datasketch module, 2.0 or newer (its affine32 scheme is what the signatures reproduce)."""
    try:
        import datasketch as ds
    except ImportError:
        raise GptlabError("`gptlab data check` needs the datasketch package: pip install 'gptlab[eval]'") from None
    if int(ds.__version__.split(".")[0]) < 2:
        raise GptlabError(f"`gptlab data check` needs datasketch 2.0 or newer, found {ds.__version__}: "
                          "pip install -U datasketch")
    return ds


def permutations(num_perm: int = DEFAULT_NUM_PERM, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """datasketch's affine32 permutation parameters (a odd, b), each (P,) uint32."""
    a, b = datasketch().MinHash(num_perm=num_perm, seed=seed, scheme="affine32").permutations
    return a.astype(np.uint32), b.astype(np.uint32)


def minhash_signatures(sets: list[frozenset], num_perm: int = DEFAULT_NUM_PERM, seed: int = SEED,
                       chunk: int = 4096) -> np.ndarray:
    """(N, P) uint32 MinHash signatures of N non-empty shingle sets, datasketch-identical.

    Each distinct shingle is SHA-1 hashed once (names: 12k distinct 3-grams for 1.2M occurrences).
    Items with the same number of shingles L are done together, `chunk` at a time: L passes of
    permute-and-minimum over a (chunk, P) array that stays in cache."""
    vocab: dict[str, int] = {}
    ids = [[vocab.setdefault(s, len(vocab)) for s in st] for st in sets]
    sizes = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))  # (N,)
    if len(sets) and sizes.min() == 0:
        raise ValueError("every shingle set must be non-empty")
    hv = np.fromiter((int.from_bytes(hashlib.sha1(s.encode("utf-8")).digest()[:4], "little") for s in vocab),
                     dtype=np.uint32, count=len(vocab))  # (S,) datasketch's sha1_hash32
    hv = _fmix32(hv)
    a, b = permutations(num_perm, seed)  # (P,), (P,)
    out = np.empty((len(sets), num_perm), dtype=np.uint32)  # (N, P)
    for size in np.unique(sizes):
        rows = np.flatnonzero(sizes == size)
        for c in range(0, len(rows), chunk):
            part = rows[c:c + chunk]
            h = hv[np.array([ids[i] for i in part], dtype=np.int64)]  # (c, L) hashes of each item's shingles
            acc = h[:, :1] * a + b  # (c, P), products wrap mod 2**32 as datasketch's do
            for k in range(1, int(size)):
                np.minimum(acc, h[:, k:k + 1] * a + b, out=acc)
            out[part] = acc
    return out


def lsh_bands(threshold: float, num_perm: int = DEFAULT_NUM_PERM) -> tuple[int, int]:
    """(bands, rows) that datasketch's MinHashLSH picks for this threshold: it minimises the
    weighted false positive + false negative probability mass (LSH_WEIGHTS)."""
    if num_perm < 2:
        raise GptlabError(f"MinHash LSH needs at least 2 permutations, got {num_perm} (default {DEFAULT_NUM_PERM})")
    try:
        lsh = datasketch().MinHashLSH(threshold=threshold, num_perm=num_perm, weights=LSH_WEIGHTS)
    except ValueError:  # the optimum is one band (threshold ~1), which datasketch refuses: take two
        return 2, num_perm // 2
    return lsh.b, lsh.r


def found_probability(jaccard_value: float, bands: int, rows: int) -> float:
    """The chance that LSH proposes a pair of this Jaccard: some band agrees on all its rows."""
    return 1.0 - (1.0 - jaccard_value ** rows) ** bands


def _band_keys(block: np.ndarray) -> np.ndarray:
    """(N,) uint64 keys of (N, r) band rows: a random linear hash mod 2**64 (equal rows, equal keys;
    unequal rows collide with probability ~2**-64, and `lsh_candidates` checks the rows anyway)."""
    odd = np.random.default_rng(0).integers(1, 1 << 63, size=block.shape[1], dtype=np.uint64)
    mult = odd * np.uint64(2) + np.uint64(1)  # (r,) odd multipliers
    return (block.astype(np.uint64) * mult).sum(axis=1, dtype=np.uint64)


def lsh_candidates(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(C, 2) int64 pairs (i < j) whose signatures agree on all `rows` values of at least one of
    `bands` bands: the candidates MinHashLSH(params=(bands, rows)) returns (tested), bucketed with
    numpy sorts instead of MinHashLSH's per-item inserts (60 us each: 11 s for 181k names)."""
    n = len(signatures)
    found = []
    for k in range(bands):
        block = np.ascontiguousarray(signatures[:, k * rows:(k + 1) * rows])  # (N, r)
        keys = _band_keys(block)
        order = np.argsort(keys, kind="stable")
        same = keys[order][1:] == keys[order][:-1]  # (N-1,) neighbours in sorted order share a key
        if not same.any():
            continue
        edges = np.flatnonzero(np.diff(np.concatenate([[False], same, [False]]).astype(np.int8)))
        starts, stops = edges[::2], edges[1::2] + 1  # runs of equal keys
        two = stops - starts == 2  # most buckets hold a pair: done at once
        i, j = order[starts[two]], order[starts[two] + 1]
        equal = (block[i] == block[j]).all(axis=1)
        found.append(np.minimum(i, j)[equal] * n + np.maximum(i, j)[equal])
        for start, stop in zip(starts[~two], stops[~two]):
            members = np.sort(order[start:stop])
            buckets: dict[bytes, list] = {}  # by the exact rows (one bucket unless two keys collided)
            for m in members.tolist():
                buckets.setdefault(block[m].tobytes(), []).append(m)
            for same_rows in map(np.array, buckets.values()):
                x, y = np.triu_indices(len(same_rows), k=1)
                found.append(same_rows[x] * n + same_rows[y])
    if not found:
        return np.empty((0, 2), dtype=np.int64)
    codes = np.unique(np.concatenate(found))  # a pair found in several bands counts once
    return np.stack([codes // n, codes % n], axis=1)


@dataclass
class NearDuplicates:
    shingling: str
    threshold: float
    num_perm: int
    bands: int
    rows: int
    items: int
    candidates: int  # pairs LSH proposed
    false_positives: int  # of those, exact Jaccard below the threshold
    found_at_threshold: float  # P(LSH proposes a pair whose Jaccard is exactly the threshold)
    pairs: list[tuple[int, int, float]] = field(default_factory=list)  # (i, j, exact Jaccard), most similar first
    candidate_jaccards: list[float] = field(default_factory=list)  # every candidate's exact Jaccard
    seconds: dict[str, float] = field(default_factory=dict)


def near_duplicates(items: list[str], sh: Shingling, threshold: float = DEFAULT_THRESHOLD,
                    num_perm: int = DEFAULT_NUM_PERM) -> NearDuplicates:
    """Pairs of `items` (distinct strings) whose shingle sets have Jaccard >= threshold, as far as
    LSH finds them (a pair of Jaccard J with probability `found_probability(J, bands, rows)`)."""
    if not 0.0 < threshold <= 1.0:
        raise GptlabError(f"--threshold {threshold}: a Jaccard similarity threshold must be in (0, 1]")
    t0 = time.perf_counter()
    sets = [shingle_set(i, sh) for i in items]
    t1 = time.perf_counter()
    sig = minhash_signatures(sets, num_perm)
    t2 = time.perf_counter()
    bands, rows = lsh_bands(threshold, num_perm)
    cands = lsh_candidates(sig, bands, rows)
    t3 = time.perf_counter()
    scored = [(i, j, jaccard(sets[i], sets[j])) for i, j in cands.tolist()]
    pairs = sorted((p for p in scored if p[2] >= threshold), key=lambda p: (-p[2], items[p[0]], items[p[1]]))
    t4 = time.perf_counter()
    return NearDuplicates(str(sh), threshold, num_perm, bands, rows, len(items), len(cands),
                          len(cands) - len(pairs), found_probability(threshold, bands, rows), pairs,
                          [p[2] for p in scored],
                          {"shingles": t1 - t0, "minhash": t2 - t1, "lsh": t3 - t2, "jaccard": t4 - t3})
