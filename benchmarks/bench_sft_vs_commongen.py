"""`gptlab finetune --task sft` on a JSONL of CommonGen pairs vs the CommonGen recipe (the baseline).

The CommonGen recipe's own training pairs (`recipes.commongen.pairs_for` on its hash-split training
concept sets, the first --pairs in its order) are written as a prompt/completion JSONL without their
EOS (SFT appends it), and its validation pairs as the --val-data file. Both datasets are then built
the way each recipe builds them and compared tensor by tensor (the line `token-identical: yes`).
Then, through the CLI, with the same method (LoRA), seed, steps, batch and learning rate:

    gptlab finetune BASE --task commongen --limit N --method lora ...
    gptlab finetune BASE --task sft --data train.jsonl --val-data val.jsonl --no-chat --method lora ...

(--no-chat: the CommonGen recipe trains on the raw `Concepts: ...\\nSentence:` prompt.) The table is
each logged step's training loss for both, |difference| and sft / commongen; identical tokens and
batch order should give curves equal up to float noise. --out gets report.md and loss_curves.png.

    python benchmarks/bench_sft_vs_commongen.py --steps 20 --batch 8 --out /tmp/bench-sft
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from gptlab.cli import main as gptlab
from gptlab.data.commongen import load_commongen
from gptlab.data.lm import LMDataset
from gptlab.data.sft import SFTDataset, encode_rows, read_sft
from gptlab.evaluate.commongen import default_data_dir
from gptlab.load import load
from gptlab.recipes.commongen import pairs_for, split_train
from gptlab.tables import markdown_table


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="smollm2-135m-instruct", help="the model both runs tune")
    ap.add_argument("--data", default=None,
                    help="CommonGen directory (default $GPTLAB_COMMONGEN or ../shared/data/commongen)")
    ap.add_argument("--pairs", type=int, default=1000, help="training pairs (CommonGen --limit)")
    ap.add_argument("--val-pairs", type=int, default=256, help="validation pairs (the CommonGen recipe's default)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3, help="LoRA's 'pretrained' default")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--dev-sets", type=int, default=4, help="CommonGen dev concept sets scored at the end (cost only)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="work directory (default: a new temporary one)")
    return ap.parse_args(argv)


def write_pairs(path: Path, pairs: list[tuple[str, str]], eos: str) -> None:
    """The pairs as prompt/completion rows, their completions without the EOS that SFT appends."""
    rows = [{"prompt": p, "completion": c[:-len(eos)] if c.endswith(eos) else c} for p, c in pairs]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def token_identical(tok, pairs, jsonl: Path, block: int) -> bool:
    """The CommonGen recipe's LMDataset and the SFT recipe's dataset (raw prompts), batch for batch."""
    f = read_sft(jsonl)
    sft = SFTDataset(encode_rows(f.rows, tok, block=block, render=None, bad=f.bad), tok.pad_id)
    ref = LMDataset(pairs, tok, block)
    if len(sft) != len(ref) or f.bad.total:
        return False
    every = list(range(len(ref)))
    a, b = sft.batch(every), ref.batch(every)
    return torch.equal(a["x"], b["x"]) and torch.equal(a["y"], b["y"])


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def train(args, work: Path, task: list[str], name: str) -> tuple[dict[int, float], float]:
    t = time.perf_counter()
    code = gptlab(["finetune", args.base, *task, "--method", "lora", "--out", str(work / name),
                   "--max-steps", str(args.steps), "--batch-size", str(args.batch), "--lr", str(args.lr),
                   "--seed", str(args.seed), "--log-every", "1", "--device", args.device, "--no-progress"])
    if code != 0:
        sys.exit(f"the {name} run failed (exit {code})")
    return losses(work / name), time.perf_counter() - t


def plot(curves: dict[str, dict[int, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for (label, c), style in zip(curves.items(), ("-", "--")):
        ax.plot(list(c), list(c.values()), style, label=label, lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats / token)")
    ax.set_title("SFT JSONL vs CommonGen recipe, same pairs")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench-sft-"))
    work.mkdir(parents=True, exist_ok=True)
    loaded = load(args.base)
    tok, block = loaded.tokenizer, loaded.model.config.block_size
    train_sets, val_sets = split_train(load_commongen(Path(args.data) if args.data else default_data_dir(), "train"))
    train_pairs, val_pairs = pairs_for(train_sets, tok, args.pairs), pairs_for(val_sets, tok, args.val_pairs, salt="val")
    write_pairs(work / "train.jsonl", train_pairs, tok.eos_token)
    write_pairs(work / "val.jsonl", val_pairs, tok.eos_token)
    same = token_identical(tok, train_pairs, work / "train.jsonl", block) and \
        token_identical(tok, val_pairs, work / "val.jsonl", block)
    print(f"{len(train_pairs)} train / {len(val_pairs)} val pairs in {work}; token-identical: {'yes' if same else 'NO'}")
    del loaded
    data = ["--data", args.data] if args.data else []
    cg, cg_s = train(args, work, ["--task", "commongen", *data, "--limit", str(args.pairs),
                                  "--eval-limit", str(args.dev_sets)], "commongen")
    sft, sft_s = train(args, work, ["--task", "sft", "--data", str(work / "train.jsonl"), "--val-data",
                                    str(work / "val.jsonl"), "--no-chat", "--eval-limit", str(args.val_pairs)], "sft")
    steps = sorted(set(cg) & set(sft))
    diffs = [abs(sft[s] - cg[s]) for s in steps]
    rows = [[s, f"{cg[s]:.5f}", f"{sft[s]:.5f}", f"{d:.2e}", f"{sft[s] / cg[s]:.5f}"] for s, d in zip(steps, diffs)]
    table = markdown_table(["step", "commongen loss (baseline)", "sft loss", "|difference|", "sft / commongen"], rows,
                           "rrrrr")
    summary = (f"max |difference| over {len(steps)} steps: {max(diffs):.2e} nats/token; token-identical: "
               f"{'yes' if same else 'NO'}; wall time commongen {cg_s:.0f}s, sft {sft_s:.0f}s "
               f"(ratio {sft_s / cg_s:.2f}, evaluation included)")
    print(table)
    print(summary)
    plot({"--task commongen": cg, "--task sft (JSONL)": sft}, work / "loss_curves.png")
    cmd = " ".join(["python benchmarks/bench_sft_vs_commongen.py", *(argv if argv is not None else sys.argv[1:])])
    (work / "report.md").write_text(
        f"# SFT JSONL vs the CommonGen recipe\n\n`{cmd}`\n\n{args.base}, LoRA, {args.pairs} pairs, {args.steps} steps "
        f"x batch {args.batch}, lr {args.lr}, seed {args.seed}, {args.device}.\n\n{table}\n\n{summary}\n\n"
        "![loss curves](loss_curves.png)\n")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
