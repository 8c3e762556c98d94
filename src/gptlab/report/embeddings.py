"""What did the model learn? Character embeddings and name representations of a character GPT.

Three views, after the course's embeddings notebook:
- a 2-D PCA map of the character embeddings (`wte` rows, pad left out), coloured by kind,
  to see whether vowels, consonants and task symbols fall into separate regions;
- each character's nearest characters by cosine similarity of those rows;
- each query name's nearest training names by the cosine similarity of the model's hidden states.

Names are pooled as the *mean* final hidden state over the name's characters, fed as `{name`.
The last position alone is what a classification head uses, but in a pretrained LM it is mostly
about "does the name end here, and what follows": nearest names then share endings and length
rather than overall make-up. The mean sees every prefix of the name, so it is steadier and
matches names with similar spelling throughout. `{` is left out of the mean (its state is the
same for every name, so it would only pull all vectors together) and `}` is not fed (pretraining
never feeds it as an input). `pool="last"` gives the other view. Before the cosine, vectors are
centred on the mean of the searched names: hidden states share a large common direction that puts
every cosine near 0.98; centring barely changes the ranking but spreads the scores so they inform.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from gptlab import GptlabError
from gptlab.data.tokenizer import PAD, TASK_SYMBOLS, CharTokenizer
from gptlab.models.gpt import KVCache
from gptlab.tables import markdown_table

VOWELS = "aeiou"
KINDS = ("vowel", "consonant", "task symbol", "other")
COLOURS = {"vowel": "tab:red", "consonant": "tab:blue", "task symbol": "tab:green", "other": "tab:gray"}
DEFAULT_QUERIES = ("anna", "rahul", "john", "priya")


def char_kind(c: str) -> str:
    if c in VOWELS:
        return "vowel"
    if "a" <= c <= "z":
        return "consonant"
    if c in TASK_SYMBOLS:
        return "task symbol"
    return "other"


def pca(x: torch.Tensor, n: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """(coords (N, n), explained variance ratio (n,)) of the rows of x, in float64.

    SVD of the centred data: the right singular vectors are the principal axes and S**2/(N-1)
    the variances along them. Each axis's sign is fixed so its largest loading is positive,
    which keeps the picture the same from run to run."""
    x = x.detach().to("cpu", torch.float64)
    if x.dim() != 2 or x.size(0) < 2:
        raise GptlabError(f"PCA needs a (rows, features) matrix with at least 2 rows, got shape {tuple(x.shape)}")
    xc = x - x.mean(0, keepdim=True)
    _, s, vh = torch.linalg.svd(xc, full_matrices=False)
    axes = vh[:n]
    flip = torch.sign(axes.gather(1, axes.abs().argmax(1, keepdim=True)))
    axes = axes * torch.where(flip == 0, 1.0, flip)
    var = s.pow(2)
    total = var.sum()
    ratio = var[:n] / total if total > 0 else torch.zeros(min(n, var.numel()), dtype=torch.float64)
    return xc @ axes.T, ratio


def char_neighbours(emb: torch.Tensor, chars: list[str], k: int = 5) -> dict[str, list[tuple[str, float]]]:
    """Each character's k most cosine-similar other characters, best first."""
    e = F.normalize(emb.detach().float().cpu(), dim=1)
    sim = e @ e.T
    sim.fill_diagonal_(-float("inf"))
    vals, idx = sim.topk(min(k, len(chars) - 1), dim=1)
    return {c: [(chars[j], float(v)) for v, j in zip(vals[i].tolist(), idx[i].tolist())]
            for i, c in enumerate(chars)}


def _check_names(names, tokenizer: CharTokenizer, block_size: int, what: str) -> None:
    for name in names:
        if not name:
            raise GptlabError(f"empty {what}: give at least one character")
        bad = next((c for c in name if c not in tokenizer.stoi or c == PAD), None)
        if bad is not None:
            allowed = "".join(sorted(c for c in tokenizer.chars if c != PAD))
            raise GptlabError(f"unknown character {bad!r} in {what} {name!r}: the model knows only {allowed!r}")
        if len(name) + 1 > block_size:
            raise GptlabError(f"{what} {name!r} is longer than the model's context ({block_size - 1} characters)")


def _check_seen(queries, names) -> None:
    """A query character the names never use (`A` of a task symbol, say) has an untrained embedding."""
    seen = set("".join(names))
    for q in queries:
        bad = next((c for c in q if c not in seen), None)
        if bad is not None:
            hint = f": try {q.lower()!r}" if set(q.lower()) <= seen else ""
            raise GptlabError(f"character {bad!r} of query name {q!r} never occurs in the names searched{hint}")


@torch.no_grad()
def name_vectors(model, tokenizer: CharTokenizer, names: list[str], pool: str = "mean",
                 chunk: int = 4096) -> torch.Tensor:
    """(N, C) representations of names: the pooled final hidden states of `{name`.

    A causal model's state at a position depends only on the tokens up to it, so names that share
    a prefix share those states. The names are walked as a prefix tree, one prefix length at a
    time, each distinct prefix computed once on top of its parent's KV cache: for the 40k training
    names that is ~90k positions instead of ~280k. Sorted names go `chunk` at a time, which bounds
    the caches' memory (~90 MB for char-small) and keeps most of the sharing.

    On CPU the walk runs on one thread: it is thousands of small ops, and handing each to a thread
    pool gains little (40k names, char-small: 3.4 s on one thread, 2.9 s on two) but can cost a
    lot on a busy machine (47 s on two threads of a loaded 2-core box). One full forward per name
    instead takes 12.5 s on one thread."""
    if pool not in ("mean", "last"):
        raise GptlabError(f"unknown pooling {pool!r}: use 'mean' or 'last'")
    _check_names(names, tokenizer, model.config.block_size, "name")
    out = torch.zeros(len(names), model.config.n_embd)
    order = sorted(range(len(names)), key=names.__getitem__)
    was_training, threads = model.training, torch.get_num_threads()
    model.eval()
    if next(model.parameters()).device.type == "cpu":
        torch.set_num_threads(1)
    try:
        for start in range(0, len(order), chunk):
            rows = order[start:start + chunk]
            out[rows] = _prefix_tree_states(model, tokenizer, [names[i] for i in rows], pool)
    finally:
        model.train(was_training)
        torch.set_num_threads(threads)
    return out


def _prefix_tree_states(model, tokenizer: CharTokenizer, names: list[str], pool: str) -> torch.Tensor:
    device = next(model.parameters()).device
    cache = model.new_cache(1, 1)
    model.hidden_states(torch.tensor([[tokenizer.bos_id]], device=device), cache=cache)
    index, sums = {"": 0}, torch.zeros(1, model.config.n_embd)  # prefix -> its row at this level
    out = torch.zeros(len(names), model.config.n_embd)
    alive = list(range(len(names)))
    for d in range(1, max(map(len, names)) + 1):
        alive = [i for i in alive if len(names[i]) >= d]
        level = sorted({names[i][:d] for i in alive})
        parent = [index[p[:-1]] for p in level]
        cache = _grow(model.config, cache, torch.tensor(parent, device=device))
        ids = torch.tensor([[tokenizer.stoi[p[-1]]] for p in level], device=device)
        h = model.hidden_states(ids, cache=cache)[:, 0].float().cpu()
        sums = sums[parent] + h  # sum of the states along each prefix's path (for the mean)
        index = {p: j for j, p in enumerate(level)}
        done = [i for i in alive if len(names[i]) == d]
        at = [index[names[i]] for i in done]
        out[done] = h[at] if pool == "last" else sums[at] / d
    return out


def _grow(config, cache: KVCache, parent: torch.Tensor) -> KVCache:
    """A cache whose row j is `cache`'s row parent[j], with room for one more position."""
    new = KVCache(config, len(parent), cache.pos + 1, device=parent.device, dtype=cache.k[0].dtype)
    for old, grown in ((cache.k, new.k), (cache.v, new.v)):
        for layer, t in enumerate(old):
            grown[layer][:, :, :cache.pos] = t[parent, :, :cache.pos]
    new.pos = cache.pos
    return new


def nearest_names(model, tokenizer: CharTokenizer, queries, names: list[str], k: int = 5, pool: str = "mean",
                  name_vecs: torch.Tensor | None = None) -> dict[str, list[tuple[str, float]]]:
    """Each query's k most similar names (a query in `names` finds itself first, similarity 1).

    `name_vecs`: `name_vectors(model, tokenizer, names, pool)` when already computed."""
    if not names:
        raise GptlabError("no names to search: pass the run's training names")
    vecs = name_vectors(model, tokenizer, names, pool) if name_vecs is None else name_vecs
    q = name_vectors(model, tokenizer, list(queries), pool)
    if len(names) > 1:
        centre = vecs.mean(0)
        vecs, q = vecs - centre, q - centre
    vecs, q = F.normalize(vecs, dim=1), F.normalize(q, dim=1)
    vals, idx = (q @ vecs.T).topk(min(k, len(names)), dim=1)
    return {name: [(names[j], float(v)) for v, j in zip(vals[i].tolist(), idx[i].tolist())]
            for i, name in enumerate(queries)}


def plot_char_map(chars: list[str], coords, ratio, path: str | Path, title: str = "character embeddings") -> Path:
    from gptlab.report.plots import plt

    kinds = [char_kind(c) for c in chars]
    fig, ax = plt.subplots(figsize=(7, 6))
    for kind in KINDS:
        pts = [xy for xy, kd in zip(coords, kinds) if kd == kind]
        if pts:
            ax.scatter(*zip(*pts), s=14, c=COLOURS[kind], alpha=0.35, label=kind)
    for c, (x, y), kind in zip(chars, coords, kinds):
        ax.annotate(_label(c), (x, y), xytext=(3, 3), textcoords="offset points", fontsize=11,
                    color=COLOURS[kind], fontweight="bold", parse_math=False)
    ax.set_xlabel(f"PC1 ({100 * ratio[0]:.1f}% of variance)")
    ax.set_ylabel(f"PC2 ({100 * ratio[1]:.1f}% of variance)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def _label(c: str) -> str:
    if c == " ":
        return "sp"
    return c if c.isprintable() and not c.isspace() else repr(c)[1:-1]


def data_chars(names) -> str | None:
    """The characters a run's training names hold, in order: what `gptlab embeddings` maps by default
    (a pretrained names model's vocabulary also has task symbols it never trained on)."""
    seen = "".join(sorted({c for n in names or () for c in n}))
    return seen if len(seen) >= 3 else None


def embedding_report(model, tokenizer, out_dir: str | Path, names: list[str] | None = None,
                     query_names=DEFAULT_QUERIES, k: int = 5, pool: str = "mean", chars: str | None = None) -> dict:
    """Write `embeddings.png` into out_dir; return the PCA map, character neighbours and nearest names.

    `names` are the names to search (the run's training split); without them, no nearest names.
    `chars` limits the map and the neighbours to some characters (default: all but the pad); e.g.
    `data_chars(names)`, since task symbols a pretraining never saw crowd one corner."""
    if not isinstance(tokenizer, CharTokenizer):
        raise GptlabError("the embeddings report is for character-level runs; this model has a subword tokenizer")
    if k < 1:
        raise GptlabError(f"k must be at least 1, got {k}")
    if pool not in ("mean", "last"):
        raise GptlabError(f"unknown pooling {pool!r}: use 'mean' or 'last'")
    query_names = list(query_names or [])
    _check_names(query_names, tokenizer, model.config.block_size, "query name")
    if chars is None:
        chars = tokenizer.chars[1:]  # everything but the pad
    else:
        chars = list(dict.fromkeys(chars))
        bad = [c for c in chars if c not in tokenizer.stoi or c == PAD]
        if bad:
            raise GptlabError(f"chars {''.join(bad)!r} are not in the model's vocabulary")
        if len(chars) < 3:
            raise GptlabError(f"chars {''.join(chars)!r}: a map needs at least 3 distinct characters")
    emb = model.transformer.wte.weight.detach()[[tokenizer.stoi[c] for c in chars]].float().cpu()
    coords, ratio = pca(emb)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = plot_char_map(chars, coords.tolist(), ratio.tolist(), out_dir / "embeddings.png")
    result = {
        "chars": chars,
        "kinds": [char_kind(c) for c in chars],
        "pca": coords.tolist(),
        "explained_variance_ratio": ratio.tolist(),
        "neighbours": char_neighbours(emb, chars, k),
        "pool": pool,
        "num_names": 0,
        "nearest_names": {},
        "png": str(png),
    }
    if names is not None and query_names:
        _check_seen(query_names, names)
        result["nearest_names"] = nearest_names(model, tokenizer, query_names, list(names), k, pool)
        result["num_names"] = len(names)
    return result


def run_embedding_report(run: str | Path, out_dir: str | Path | None = None, query_names=DEFAULT_QUERIES,
                         k: int = 5, pool: str = "mean", chars: str | None = None, device: str = "cpu") -> dict:
    """`embedding_report` for a run directory, searching its own training names (from meta.json)."""
    from gptlab.load import load
    from gptlab.train.pretrain import corpus_from_spec

    loaded = load(run, device=device)
    model, tok, meta = loaded.lm, loaded.tokenizer, loaded.meta
    names = corpus_from_spec(meta["data_spec"])["train"] if "data_spec" in meta else None
    return embedding_report(model, tok, Path(run) if out_dir is None else out_dir, names, query_names, k, pool,
                            chars or data_chars(names))


def _md(s: str) -> str:
    """A character or name as a Markdown table cell (code span; `|` escaped, odd characters shown)."""
    s = _label(s) if len(s) == 1 else s
    return "`` ` ``" if s == "`" else f"`{s}`".replace("|", "\\|")


def format_embedding_report(result: dict, image: str | None = None) -> str:
    """Markdown: the map (linked when `image` is given), neighbour and nearest-name tables."""
    r1, r2 = result["explained_variance_ratio"][:2]
    lines = ["### Character embeddings", ""]
    if image:
        lines += [f"![PCA map of the character embeddings]({image})", ""]
    lines += [(f"PCA of the {len(result['chars'])} character embeddings: PC1 explains {100 * r1:.1f}% and "
               f"PC2 {100 * r2:.1f}% of the variance."), ""]
    k = max((len(v) for v in result["neighbours"].values()), default=0)
    order = sorted(range(len(result["chars"])), key=lambda i: (KINDS.index(result["kinds"][i]), result["chars"][i]))
    rows = []
    for i in order:
        c = result["chars"][i]
        rows.append([_md(c), result["kinds"][i]] + [f"{_md(n)} {s:.2f}" for n, s in result["neighbours"][c]])
    lines += ["Nearest characters by cosine similarity of their embeddings:", "",
              markdown_table(["char", "kind"] + [str(i) for i in range(1, k + 1)], rows)]
    if result["nearest_names"]:
        k = max(len(v) for v in result["nearest_names"].values())
        rows = [[_md(q)] + [f"{_md(n)} {s:.2f}" for n, s in hits] for q, hits in result["nearest_names"].items()]
        lines += ["", (f"Nearest of {result['num_names']:,} training names by the cosine similarity of the "
                       f"model's {result['pool']}-pooled hidden states (a name in the list finds itself first):"), "",
                  markdown_table(["name"] + [str(i) for i in range(1, k + 1)], rows)]
    return "\n".join(lines) + "\n"
