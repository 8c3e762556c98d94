"""What `gptlab data check` prints and writes: a short summary, report.md, and two PNG plots
(the LSH candidates' exact Jaccard against the threshold; the contamination rates per split).
Every PII-like example arrives masked (gptlab.data.checks.mask); texts are shown cut to a line."""

from __future__ import annotations

from pathlib import Path

from gptlab.tables import markdown_table

CELL_CHARS = 90


def cell(text, limit: int = CELL_CHARS) -> str:
    """One table cell: on one line, pipes escaped, long text cut with an ellipsis."""
    s = " ".join(str(text).split()).replace("|", "\\|")
    return s if len(s) <= limit else s[:limit - 1] + "…"


def pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.2f}%" if whole else "-"


def near_line(n: dict) -> str:
    indexed = f" (among {n['indexed']:,} texts with the test side's)" if n["indexed"] != n["texts"] else ""
    return (f"near duplicates ({n['shingles']} shingles, Jaccard >= {n['threshold']:g}, {n['num_perm']} permutations; "
            f"LSH {n['bands']} bands x {n['rows']} rows finds a pair at the threshold with p = "
            f"{n['found_at_threshold']:.2f}): {n['pairs']:,} pairs among {n['texts']:,} distinct texts; "
            f"{n['candidates']:,} LSH candidates{indexed}, {n['false_positives']:,} below the threshold dropped "
            "(LSH false positives)")


def contamination_line(c: dict) -> str:
    t = c["test_items"]
    parts = [f"{c['identical']:,}/{t:,} identical ({pct(c['identical'], t)})",
             f"{c['ngram']['dirty']:,} dirty by {c['ngram']['n']}-gram ({pct(c['ngram']['dirty'], t)})",
             f"{c['near_duplicates']['near']:,} with a near duplicate ({pct(c['near_duplicates']['near'], t)})"]
    if "concepts" in c:
        k = c["concepts"]
        parts.append(f"{k['identical_sets']:,}/{k['test_sets']:,} concept sets identical "
                     f"({pct(k['identical_sets'], k['test_sets'])})")
    return f"  {c['test']} vs {c['train']}: " + ", ".join(parts)


def summary_text(r: dict) -> str:
    """The terminal summary: one line per check."""
    e, p = r["exact"], r["pii"]
    splits = ", ".join(f"{s} {n:,}" for s, n in r["splits"].items())
    lines = [f"data check: {r['source']}: {e['items']:,} items ({splits})",
             f"exact duplicates: {e['repeats']:,} repeated lines ({e['repeated_items']:,} items appear more than "
             f"once); {e['normalised_extra']:,} more once case and whitespace are ignored",
             near_line(r["near"])]
    if r["contamination"]:
        lines.append("contamination (identical items; GPT-3 n-gram overlap; near duplicates in train):")
        lines += [contamination_line(c) for c in r["contamination"]]
    else:
        lines.append("contamination: no splits to compare (give --against FILE2, or --split-seed N)")
    lines.append("PII-like strings: " + ", ".join(f"{k} {v['matches']:,} in {v['items']:,} items"
                                                  for k, v in p.items()))
    lines.append("seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in r["seconds"].items()))
    return "\n".join(lines)


def _contamination_md(c: dict) -> list[str]:
    t = c["test_items"]
    out = [f"### {cell(c['test'])} vs {cell(c['train'])}", "",
           markdown_table(["check", "test items hit", "share"], [
               ["identical item (lowercased, whitespace collapsed)", f"{c['identical']:,}", pct(c["identical"], t)],
               [f"shares a {c['ngram']['n']}-gram of words (GPT-3)", f"{c['ngram']['dirty']:,}",
                pct(c["ngram"]["dirty"], t)],
               ["has a near duplicate in train", f"{c['near_duplicates']['near']:,}",
                pct(c["near_duplicates"]["near"], t)],
           ] + ([["concept set identical to a training set", f"{c['concepts']['identical_sets']:,} of "
                  f"{c['concepts']['test_sets']:,} sets", pct(c["concepts"]["identical_sets"],
                                                               c["concepts"]["test_sets"])]]
                if "concepts" in c else []), "lrr"),
           "", f"{t:,} test items, {c['train_items']:,} training items."]
    if c["examples"]:
        out += ["", "Identical items: " + ", ".join(f"`{cell(x, 40)}`" for x in c["examples"])]
    if c["ngram"]["examples"]:
        out += ["", markdown_table(["test item", "shared words", "training item"],
                                   [[cell(x["test"]), cell(x["ngram"]), cell(x["train"])]
                                    for x in c["ngram"]["examples"]])]
    if c["near_duplicates"]["examples"]:
        out += ["", markdown_table(["test item", "near duplicate in train", "Jaccard"],
                                   [[cell(x["test"]), cell(x["train"]), f"{x['jaccard']:.3f}"]
                                    for x in c["near_duplicates"]["examples"]], "llr")]
    if c.get("concepts", {}).get("examples"):
        out += ["", "Identical concept sets: " + ", ".join(f"`{' '.join(x)}`" for x in c["concepts"]["examples"])]
    return out + [""]


def report_markdown(r: dict, images: dict[str, str] | None = None) -> str:
    """report.md: what was read, then each check with counts, examples and the rules it used."""
    e, n, images = r["exact"], r["near"], images or {}
    against = f" against `{r['against']}`" if r["against"] else ""
    out = [f"# data check: `{r['source']}`{against}", "",
           "Items per split: " + ", ".join(f"{s} {k:,}" for s, k in r["splits"].items())
           + ("; against: " + ", ".join(f"{s} {k:,}" for s, k in r["against_splits"].items())
              if r["against_splits"] else "") + ".", ""]
    out += [f"- {x}" for x in r["notes"]] + ["", "## Exact duplicates", "",
            f"{e['items']:,} items, {e['distinct']:,} distinct: {e['repeats']:,} repeated lines, "
            f"{e['repeated_items']:,} items appear more than once. Ignoring case and whitespace runs, "
            f"{e['distinct_normalised']:,} distinct ({e['normalised_extra']:,} more duplicates).", ""]
    if e["most_repeated"]:
        out += [markdown_table(["item", "copies"], [[cell(i), c] for i, c in e["most_repeated"]], "lr"), ""]
    if e["variant_examples"]:
        out += ["Same item in other case or spacing: " + "; ".join(" / ".join(f"`{cell(v, 40)}`" for v in g)
                                                                  for g in e["variant_examples"]), ""]
    out += ["## Near duplicates", "", near_line(n) + ".", "",
            f"Shingles: {n['shingles']} ({n['why']}); texts lowercased, whitespace collapsed; character shingles "
            "of the text with a space at each end. Signatures are datasketch's MinHash (scheme affine32, seed 1); "
            "LSH bands and rows are what datasketch's MinHashLSH picks with misses weighted 19x false positives; "
            "every candidate's exact Jaccard is recomputed from the shingle sets.", ""]
    if n["examples"]:
        out += [markdown_table(["text", "near duplicate", "Jaccard"],
                               [[cell(a), cell(b), f"{j:.3f}"] for a, b, j in n["examples"]], "llr"), ""]
    if "jaccard" in images:
        out += [f"![exact Jaccard of the LSH candidates]({images['jaccard']})", ""]
    out += ["## Contamination", "",
            "GPT-3's rule (Brown et al. 2020, appendix C): a test item is dirty when it shares a 13-gram of words "
            "with the training items, words lowercased and punctuation ignored; an item shorter than 13 words is "
            "dirty when its whole word sequence appears in a training item (for one-word items such as names: an "
            "identical item). Near duplicates use the threshold and shingles above.", ""]
    if not r["contamination"]:
        out += ["No splits to compare: give `--against FILE2`, or `--split-seed N` to split FILE.", ""]
    for c in r["contamination"]:
        out += _contamination_md(c)
    if "contamination" in images:
        out += [f"![contamination per split]({images['contamination']})", ""]
    out += ["## PII-like strings", "",
            "Regular expressions (e-mail, URL with a scheme or www., phone numbers of 9-15 digits with separators "
            "or a leading +, IPv4 dotted quads); examples are masked: first and last two characters kept.", "",
            markdown_table(["kind", "matches", "items", "examples (masked)"],
                           [[k, f"{v['matches']:,}", f"{v['items']:,}", ", ".join(f"`{x}`" for x in v["examples"])]
                            for k, v in r["pii"].items()], "lrrl"), "",
            "## Time", "", markdown_table(["stage", "seconds"], [[k, f"{v:.2f}"] for k, v in r["seconds"].items()],
                                         "lr"), ""]
    return "\n".join(out)


def write_plots(r: dict, out: Path) -> dict[str, str]:
    """jaccard.png (candidates' exact Jaccard, the threshold) and contamination.png; {name: file name}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gptlab.report.plots import grouped_bar_chart

    images = {}
    hist, n = r["near"]["candidate_histogram"], r["near"]
    if sum(hist):
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        width = 1 / len(hist)
        ax.bar([i * width for i in range(len(hist))], hist, width=width, align="edge", color="tab:blue")
        ax.axvline(n["threshold"], ls="--", color="tab:red", label=f"threshold {n['threshold']:g}")
        ax.set_xlabel(f"exact Jaccard ({n['shingles']} shingles)")
        ax.set_ylabel("LSH candidate pairs")
        ax.set_title(f"{n['candidates']:,} candidates: {n['false_positives']:,} below the threshold dropped")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "jaccard.png", dpi=120)
        plt.close(fig)
        images["jaccard"] = "jaccard.png"
    if r["contamination"]:
        rows = r["contamination"]
        share = lambda c, k: 100 * k / c["test_items"] if c["test_items"] else 0.0  # noqa: E731
        series = {"identical %": [share(c, c["identical"]) for c in rows],
                  "n-gram dirty %": [share(c, c["ngram"]["dirty"]) for c in rows],
                  "near duplicate %": [share(c, c["near_duplicates"]["near"]) for c in rows]}
        grouped_bar_chart([c["test"] for c in rows], series, out / "contamination.png",
                          "test items found in train (%)")
        images["contamination"] = "contamination.png"
    return images
