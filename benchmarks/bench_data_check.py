"""`gptlab data check names:5000` (181k names) by stage, against datasketch's per-item API.

Our MinHash hashes each distinct shingle once and permutes all items of one shingle count at once
with numpy; our LSH buckets each band with one numpy sort. The baselines, measured in the same
run on a sample and extrapolated linearly to every item (both are per-item loops):
- MinHash: datasketch's `MinHash.update` per shingle (the loop its docs show), and
  `MinHash.bulk` (one `update_batch` per item);
- LSH: datasketch's `MinHashLSH` with the same bands and rows: `insert` every item, then `query`
  every item for its candidates.
The sample's signatures and candidate pairs are checked equal to datasketch's before timing counts.
Aim (issue #17): the whole check under 60 s on one core.

    python benchmarks/bench_data_check.py [--data names:5000] [--sample 10000]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from gptlab.data.checks import load_source, run_checks
from gptlab.data.near_dups import (DEFAULT_NUM_PERM, DEFAULT_THRESHOLD, choose_shingles, lsh_bands, lsh_candidates,
                                   minhash_signatures, normalise, shingle_set)
from gptlab.tables import markdown_table


def seconds(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def datasketch_update_loop(sets):
    from datasketch import MinHash

    out = []
    for s in sets:
        m = MinHash(num_perm=DEFAULT_NUM_PERM)
        for x in s:
            m.update(x.encode("utf-8"))
        out.append(m.hashvalues)
    return np.array(out)


def datasketch_bulk(sets):
    from datasketch import MinHash

    return np.array([m.hashvalues for m in MinHash.bulk([[x.encode("utf-8") for x in s] for s in sets],
                                                        num_perm=DEFAULT_NUM_PERM)])


def datasketch_lsh(sig, bands, rows):
    from datasketch import LeanMinHash, MinHashLSH

    lsh = MinHashLSH(num_perm=sig.shape[1], params=(bands, rows))
    keyed = [LeanMinHash(seed=1, hashvalues=row, scheme="affine32") for row in sig]
    with lsh.insertion_session() as session:
        for i, m in enumerate(keyed):
            session.insert(i, m, check_duplication=False)
    return {(min(i, j), max(i, j)) for i, m in enumerate(keyed) for j in lsh.query(m) if i != j}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="names:5000")
    ap.add_argument("--sample", type=int, default=10000, help="items the per-item baselines run on")
    args = ap.parse_args()

    load_s, source = seconds(lambda: load_source(args.data))
    run_s, r = seconds(lambda: run_checks(source))
    n = r["near"]["texts"]
    print(f"{args.data}: {sum(r['splits'].values()):,} items, {n:,} distinct texts; shingles {r['near']['shingles']}; "
          f"LSH {r['near']['bands']} x {r['near']['rows']}; total {load_s + run_s:.1f} s (aim: under 60 s)\n")
    s = r["seconds"]
    stages = [["load", load_s], ["exact duplicates", s["exact"]], ["shingles", s["near_shingles"]],
              ["minhash", s["near_minhash"]], ["lsh", s["near_lsh"]],
              ["exact Jaccard of candidates", s["near_jaccard"]], ["contamination", s["contamination"]],
              ["pii", s["pii"]], ["total", load_s + run_s]]
    print(markdown_table(["stage", "seconds"], [[k, f"{v:.2f}"] for k, v in stages], "lr") + "\n")

    texts = list(dict.fromkeys(normalise(i) for i in source.all_items()))
    sh, _ = choose_shingles(texts)
    rng = np.random.default_rng(0)
    sample = [texts[i] for i in rng.choice(len(texts), size=min(args.sample, len(texts)), replace=False)]
    sets = [shingle_set(t, sh) for t in sample]
    ours_s, sig = seconds(lambda: minhash_signatures(sets))
    loop_s, ref = seconds(lambda: datasketch_update_loop(sets))
    bulk_s, ref_bulk = seconds(lambda: datasketch_bulk(sets))
    assert np.array_equal(sig, ref) and np.array_equal(sig, ref_bulk), "signatures differ from datasketch's"
    bands, rows = lsh_bands(DEFAULT_THRESHOLD)
    lsh_s, cands = seconds(lambda: lsh_candidates(sig, bands, rows))
    ref_lsh_s, ref_cands = seconds(lambda: datasketch_lsh(sig, bands, rows))
    assert {tuple(p) for p in cands.tolist()} == ref_cands, "candidates differ from datasketch's MinHashLSH"

    scale = n / len(sample)
    rows_out = [
        ["minhash", "datasketch MinHash.update per shingle", f"{loop_s * scale:.1f}", f"{s['near_minhash']:.2f}",
         f"{loop_s * scale / s['near_minhash']:.0f}x"],
        ["minhash", "datasketch MinHash.bulk (update_batch per item)", f"{bulk_s * scale:.1f}",
         f"{s['near_minhash']:.2f}", f"{bulk_s * scale / s['near_minhash']:.0f}x"],
        ["lsh", "datasketch MinHashLSH insert + query per item", f"{ref_lsh_s * scale:.1f}", f"{s['near_lsh']:.2f}",
         f"{ref_lsh_s * scale / s['near_lsh']:.0f}x"],
    ]
    print(f"baselines on {len(sample):,} sampled texts (signatures and candidates equal to ours), extrapolated "
          f"x{scale:.1f} to {n:,}; on the sample itself: ours minhash {ours_s:.2f} s vs update {loop_s:.2f} s / bulk "
          f"{bulk_s:.2f} s, ours lsh {lsh_s:.2f} s vs MinHashLSH {ref_lsh_s:.2f} s\n")
    print(markdown_table(["stage", "baseline", "baseline s (extrapolated)", "ours s (full run)", "ratio"],
                         rows_out, "llrrr"))


if __name__ == "__main__":
    main()
