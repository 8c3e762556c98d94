"""The verbs that take a model out of gptlab: export (HF directory, PEFT adapter, GGUF file)."""

from __future__ import annotations

import sys

from gptlab import GptlabError
from gptlab.cli.args import add_verb

SOURCE_HELP = ("a run of any kind (pretrain, finetune, dpo, quantize) or its checkpoint/, a preset "
               "(smollm2-135m-instruct), a .gguf file, an HF model directory or a PEFT adapter directory")


# ---- export ----------------------------------------------------------------------------------------------

def add_export(sub) -> None:
    from gptlab.recipes.export import GGUF_TYPES, TARGETS

    s = add_verb(sub, "export", "write a model for other tools: an HF directory (transformers), the adapter alone "
                 "(peft) or a GGUF file (llama.cpp); LoRA is merged, nothing is deleted", cmd_export)
    s.add_argument("source", help=SOURCE_HELP)
    s.add_argument("--to", required=True, choices=TARGETS,
                   help="hf: a merged model directory for transformers; peft: the adapter alone in PEFT's format; "
                        "gguf: one file for llama.cpp (Llama-style models)")
    s.add_argument("out", help="the directory to write (a .gguf file for --to gguf); new or empty unless --force")
    s.add_argument("--type", choices=GGUF_TYPES, default=None,
                   help="--to gguf: tensor type (q8_0/q4_0: gptlab's blockwise absmax, blocks of 32; default f32)")
    s.add_argument("--force", action="store_true",
                   help="replace an earlier export at OUT (only the files an export writes; anything else refuses)")
    s.add_argument("--base", default=None, help="the base model, for an adapter directory or a run whose base moved")
    s.set_defaults(check=_check_export)


def _check_export(a) -> None:
    from gptlab.recipes.export import check_options

    check_options(a.to, a.type)


def cmd_export(a) -> int:
    from gptlab.recipes.export import export, format_size

    r = export(a.source, a.to, a.out, force=a.force, base=a.base, gguf_type=a.type,
               log=lambda m: print(m, file=sys.stderr))
    what = {"hf": "HF model directory", "peft": f"PEFT adapter ({' + '.join(r.get('methods', []))})",
            "gguf": f"GGUF file ({r.get('type')})"}[a.to]
    if r["bytes"] <= 0:
        raise GptlabError(f"{a.out} was not written")
    print(f"export: {what} {a.out} ({format_size(r['bytes'])}); use it with {r['usage']}")
    return 0
