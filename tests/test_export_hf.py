"""`gptlab export`, checked by the tools users run: transformers opens every --to hf directory (logits
and greedy generation equal gptlab's), peft opens --to peft output; bad input is one line, exit 2,
nothing written.

One tiny run of each kind is built once: a GPT-2-style and a Llama-style character model, a LoRA
finetune, a LoRA DPO run, a head-route classifier, an NF4 quantized checkpoint, and adapter /
prompt / prefix methods saved on the base.
"""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from gptlab.cli import main  # noqa: E402
from gptlab.data.tokenizer import CharTokenizer  # noqa: E402
from gptlab.load import load  # noqa: E402
from gptlab.train.trainer import TrainConfig  # noqa: E402

quiet = lambda *a, **k: None  # noqa: E731
LETTERS = "abcdefghijklmnopqrstuvwxyz"
WORDS = ["{anna}", "{mark}", "{zoe}", "{quincy}", "{jo}"]  # for the logits batch (padded with id 0)


def cfg(steps):
    return TrainConfig(max_steps=steps, eval_every=steps, batch_size=16, lr=3e-3, warmup_steps=1, progress=False)


def made_up_names(n=300):
    """Pronounceable names over every letter (the names tasks use all 26), ~1 in 3 ending in a."""
    g = torch.Generator().manual_seed(0)
    cons, vow = "bcdfghjklmnpqrstvwxyz", "aeiou"
    pick = lambda s: s[int(torch.randint(len(s), (1,), generator=g))]  # noqa: E731
    names = set()
    while len(names) < n:
        names.add("".join(pick(cons) + pick(vow) for _ in range(int(torch.randint(2, 4, (1,), generator=g)))))
    return sorted(names)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from gptlab.methods import apply_method
    from gptlab.peft import save_peft
    from gptlab.recipes.dpo import dpo
    from gptlab.recipes.finetune import finetune
    from gptlab.train.pretrain import pretrain

    root = tmp_path_factory.mktemp("export")
    names = made_up_names()
    (root / "names.txt").write_text("\n".join(names) + "\n")
    data = dict(split_seed=1, test_size=20, device="cpu", log=quiet)
    # enough steps that greedy decoding writes names, not just `}`
    pretrain(str(root / "names.txt"), root / "gpt2", "char-tiny", cfg(60), **data)
    pretrain(str(root / "names.txt"), root / "llama", "char-llama", cfg(60), n_layer=2, n_embd=32, **data)
    finetune(root / "gpt2", "gender", "lora", root / "lora", train_cfg=cfg(3), device="cpu", limit=48,
             eval_limit=8, samples=4, log=quiet, rank=2)
    finetune(root / "gpt2", "gender", "head", root / "head", route="head", train_cfg=cfg(2), device="cpu", limit=32,
             eval_limit=8, samples=4, log=quiet)
    prefs = [{"prompt": "{" + n[0], "chosen": n[1:] + "a}", "rejected": n[1:] + "o}"} for n in names[::5]]
    (root / "prefs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prefs))
    dpo(root / "gpt2", root / "dpo", data=root / "prefs.jsonl", method="lora", train_cfg=cfg(3), device="cpu",
        eval_samples=4, kl_samples=4, max_new_tokens=4, log=quiet, rank=2)
    assert main(["quantize", str(root / "gpt2"), "--to", "nf4", "--out", str(root / "nf4")]) == 0
    for method, opts in (("adapter", {"adapter_size": 4}), ("prompt", {"virtual_tokens": 2}),
                         ("prefix", {"virtual_tokens": 2})):
        base = load(root / "gpt2")
        apply_method(base.model, method, base.tokenizer, 0, **opts)
        with torch.no_grad():  # a trained-looking method: nothing left at its zero init
            for n, p in base.model.named_parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))))
        save_peft(base.model, root / method)
    return root


def export(*argv):
    return main(["export", *map(str, argv)])


def batch(tok):
    ids = [tok.encode(w) for w in WORDS]
    width = max(map(len, ids))
    return torch.tensor([i + [0] * (width - len(i)) for i in ids])


def hf_logits(out, x):
    m = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        return m, m(x).logits


@pytest.mark.parametrize("name", ["gpt2", "llama", "lora", "dpo"])
def test_transformers_opens_the_export_with_our_logits(runs, tmp_path, name, capsys):
    out = tmp_path / "hf"
    assert export(runs / name, "--to", "hf", out) == 0
    line = capsys.readouterr().out.strip()
    assert len(line.splitlines()) == 1 and str(out) in line and ("MB" in line or "kB" in line)
    assert "pipeline('text-generation'" in line and f"gptlab sample {out}" in line
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "tokenizer.json",
                                               "tokenizer_config.json", "generation_config.json"}
    ours = load(runs / name)
    x = batch(ours.tokenizer)
    m, got = hf_logits(out, x)
    with torch.no_grad():
        want = ours.lm(x)[0]  # LoRA unmerged, as the run trained it
    assert got.shape == want.shape and (got - want).abs().max() <= 1e-4, (got - want).abs().max()
    assert m.config.model_type == ("llama" if name == "llama" else "gpt2")

    tok = transformers.AutoTokenizer.from_pretrained(out)
    char = ours.tokenizer
    for w in WORDS + ["{G" + "priya0=F}"]:
        assert tok(w)["input_ids"] == char.encode(w)
    assert (tok.bos_token, tok.eos_token, tok.pad_token_id) == ("{", "}", 0)
    assert tok.decode(char.encode("{anna}"), skip_special_tokens=True) == "anna"
    gen = json.loads((out / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (char.bos_id, char.eos_id, 0)

    back = load(out)  # and gptlab reads its own export back as a character model
    assert isinstance(back.tokenizer, CharTokenizer) and back.tokenizer.chars == char.chars
    with torch.no_grad():
        assert (back.lm(x)[0] - want).abs().max() <= 1e-4


@pytest.mark.parametrize("name", ["gpt2", "llama", "lora"])
def test_greedy_generate_equals_gptlab_sample(runs, tmp_path, name, capsys):
    out = tmp_path / "hf"
    assert export(runs / name, "--to", "hf", out) == 0
    m = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    block = load(runs / name).lm.config.block_size
    written = 0
    for prompt in ("", "a", "ma", "qu", "zo"):
        k = block - len(prompt) - 1  # the whole sequence, `{` included, within the context
        capsys.readouterr()
        assert main(["sample", str(runs / name), "--greedy", "-n", "1", "--prompt", prompt,
                     "--max-new-tokens", str(k), "--quiet"]) == 0
        ours = capsys.readouterr().out.rstrip("\n")
        ids = tok("{" + prompt, return_tensors="pt")
        with torch.no_grad():
            seq = m.generate(**ids, do_sample=False, max_new_tokens=k)[0].tolist()
        theirs = tok.decode(seq[1:], skip_special_tokens=False).replace("\x00", "").split("}")[0]
        assert theirs == ours, (prompt, theirs, ours)
        assert ours.startswith(prompt)
        written += len(ours) - len(prompt)
    assert written >= 5  # the models write names, so the comparison covers several steps


def test_peft_opens_the_adapter_export(runs, tmp_path, capsys):
    peft = pytest.importorskip("peft")
    assert export(runs / "gpt2", "--to", "hf", tmp_path / "base") == 0
    for name in ("lora", "prompt"):
        args = ("--base", runs / "gpt2") if name == "prompt" else ()
        assert export(runs / name, "--to", "peft", tmp_path / name, *args) == 0
        line = capsys.readouterr().out
        assert "PEFT adapter" in line and ("lora" in line or "prompt" in line)
        cfg = json.loads((tmp_path / name / "adapter_config.json").read_text())
        assert cfg["peft_type"] == {"lora": "LORA", "prompt": "PROMPT_TUNING"}[name]
        base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
        model = peft.PeftModel.from_pretrained(base, tmp_path / name).eval()
        ours = load(runs / name, base=runs / "gpt2" if name == "prompt" else None)
        x = batch(ours.tokenizer)
        with torch.no_grad():
            got = model(input_ids=x, attention_mask=torch.ones_like(x)).logits[:, -x.size(1):]
            want = ours.model(x)[0]
        assert (got - want).abs().max() <= 1e-4, (name, (got - want).abs().max())
    assert main(["sample", str(tmp_path / "lora"), "-n", "2", "--seed", "0", "--quiet"]) == 0  # base recorded


def test_a_quantized_source_is_dequantized_with_a_note(runs, tmp_path, capsys):
    assert export(runs / "nf4", "--to", "hf", tmp_path / "q") == 0
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "dequantized" in err and "nf4" in err
    ours = load(runs / "nf4")
    x = batch(ours.tokenizer)
    _, got = hf_logits(tmp_path / "q", x)
    with torch.no_grad():
        assert (got - ours.model(x)[0]).abs().max() <= 1e-4


def test_force_replaces_an_earlier_export_only(runs, tmp_path, capsys):
    out = tmp_path / "hf"
    assert export(runs / "gpt2", "--to", "hf", out) == 0
    assert export(runs / "gpt2", "--to", "hf", out) == 2  # no --force: refused, untouched
    assert "--force" in capsys.readouterr().err
    before = (out / "model.safetensors").stat().st_mtime_ns
    assert export(runs / "llama", "--to", "hf", out, "--force") == 0
    assert (out / "model.safetensors").stat().st_mtime_ns != before
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporaries left
    empty = tmp_path / "empty"
    empty.mkdir()
    assert export(runs / "gpt2", "--to", "hf", empty) == 0  # an empty directory needs no --force


def test_gguf_goes_to_the_gguf_writer(runs, tmp_path, capsys):
    pytest.importorskip("gguf")
    pytest.importorskip("gptlab.models.gguf_export")
    out = tmp_path / "names.gguf"
    assert export(runs / "llama", "--to", "gguf", out, "--type", "q8_0") == 0
    assert "GGUF file (q8_0)" in capsys.readouterr().out
    assert out.read_bytes()[:4] == b"GGUF"
    assert export(runs / "llama", "--to", "gguf", out, "--force") == 0  # its own earlier output: replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["names.gguf"]


BAD = [  # (argv after `export`, what the one line says)
    (["{gpt2}", "--to", "onnx", "{out}"], "argument --to: invalid choice"),
    (["{gpt2}", "--to", "gguf", "{out}.gguf", "--type", "q2_k"], "argument --type: invalid choice"),
    (["{gpt2}", "--to", "hf", "{out}", "--type", "f16"], "--to gguf only"),
    (["{gpt2}", "--to", "peft", "{out}"], "--to hf"),
    (["{gpt2}", "--to", "gguf", "{out}"], ".gguf"),
    (["{adapter}", "--base", "{gpt2}", "--to", "hf", "{out}"], "gptlab format"),
    (["{prefix}", "--base", "{gpt2}", "--to", "hf", "{out}"], "gptlab format"),
    (["{prompt}", "--base", "{gpt2}", "--to", "hf", "{out}"], "--to peft"),
    (["{adapter}", "--base", "{gpt2}", "--to", "peft", "{out}"], "gptlab format"),
    (["{head}", "--to", "hf", "{out}"], "classifier"),
    (["{head}", "--to", "peft", "{out}"], "gptlab format"),
    (["{gpt2}", "--to", "hf", "{earlier}"], "pass --force"),
    (["{gpt2}", "--to", "hf", "{foreign}", "--force"], "did not write (notes.txt)"),
    (["{gpt2}", "--to", "hf", "{hidden}", "--force"], "hidden files"),
    (["{gpt2}", "--to", "hf", "{gpt2}", "--force"], "is the source"),
    (["{gpt2}", "--to", "gguf", "{text}.gguf", "--force"], "not a GGUF file"),
    (["{gpt2}", "--to", "gguf", "{text}.gguf"], "pass --force"),
    (["{missing}", "--to", "hf", "{out}"], "does not exist"),
]


@pytest.mark.parametrize("argv, message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_and_writes_nothing(runs, tmp_path, capsys, argv, message):
    earlier = tmp_path / "earlier"
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    (tmp_path / "hidden").mkdir()
    (tmp_path / "hidden" / ".git").mkdir()
    (tmp_path / "hidden" / "config.json").write_text("{}")
    (tmp_path / "text.gguf").write_text("not a model")
    assert export(runs / "gpt2", "--to", "hf", earlier) == 0
    capsys.readouterr()
    fill = {n: str(runs / n) for n in ("gpt2", "adapter", "prefix", "prompt", "head")}
    fill.update(out=str(tmp_path / "out"), earlier=str(earlier), foreign=str(tmp_path / "foreign"),
                hidden=str(tmp_path / "hidden"), text=str(tmp_path / "text"), missing=str(tmp_path / "missing"))
    snapshot = lambda: {p: p.stat().st_mtime_ns for root in (tmp_path, runs) for p in root.rglob("*")}  # noqa: E731
    before = snapshot()
    try:
        code = export(*[a.format(**fill) for a in argv])
    except SystemExit as e:  # argparse
        code = e.code
    out, err = capsys.readouterr()
    assert code == 2, (argv, out, err)
    assert len(err.strip().splitlines()) == 1 and err.startswith("gptlab: error:"), err
    assert message in err and "Traceback" not in err, err
    assert snapshot() == before  # nothing written, nothing left behind, nothing replaced
