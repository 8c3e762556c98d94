"""`gptlab quantize / precision / estimate`, and sample/eval on quantized checkpoints."""

import json

import pytest
import torch

from gptlab.cli import main
from gptlab.train.pretrain import pretrain
from gptlab.train.trainer import TrainConfig


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("qcli")
    g = torch.Generator().manual_seed(0)
    cons, vow = "bcdfghjklmnprstvz", "aeiou"
    names = {"".join(cons[int(torch.randint(17, (1,), generator=g))] + vow[int(torch.randint(5, (1,), generator=g))]
                     for _ in range(int(torch.randint(2, 5, (1,), generator=g)))) for _ in range(400)}
    (root / "names.txt").write_text("\n".join(sorted(names)) + "\n")
    cfg = TrainConfig(max_steps=30, eval_every=10, batch_size=32, lr=3e-3, warmup_steps=2, progress=False)
    pretrain(str(root / "names.txt"), root / "run", "char-tiny", cfg, split_seed=1, test_size=20, device="cpu",
             log=lambda *a, **k: None)
    return root / "run"


def test_quantized_checkpoint_samples_and_evaluates(trained, tmp_path, capsys):
    q = tmp_path / "nf4"
    code, out, err = run(capsys, "quantize", trained, "--to", "nf4", "--out", q)
    assert code == 0 and "smaller than fp32" in out, err
    assert (q / "quantization_config.json").exists()
    float_size = (trained / "checkpoint" / "model.safetensors").stat().st_size
    assert (q / "model.safetensors").stat().st_size < 0.35 * float_size
    code, out, err = run(capsys, "sample", q, "-n", 5, "--prompt", "ba", "--seed", 1)
    assert code == 0 and len(out.splitlines()) == 5 and all(s.startswith("ba") for s in out.splitlines()), err
    nll = {}
    for name, path in (("fp32", trained), ("nf4", q)):
        code, out, err = run(capsys, "eval", path, "--json")
        assert code == 0, err
        nll[name] = json.loads(out)["nll_per_char"]
    assert abs(nll["nf4"] - nll["fp32"]) < 0.05
    # a float cast is a plain (smaller) checkpoint that loads the same way
    code, _, err = run(capsys, "quantize", trained, "--to", "bf16", "--out", tmp_path / "bf16")
    assert code == 0 and not (tmp_path / "bf16" / "quantization_config.json").exists(), err
    assert (tmp_path / "bf16" / "model.safetensors").stat().st_size < 0.55 * float_size
    code, out, _ = run(capsys, "eval", tmp_path / "bf16", "--json")
    assert code == 0 and abs(json.loads(out)["nll_per_char"] - nll["fp32"]) < 0.01


def test_compare_table_plot_and_report(trained, tmp_path, capsys):
    code, out, err = run(capsys, "quantize", trained, "--compare", "--formats", "fp32,bf16,int8,nf4", "--repeats",
                         1, "--out", tmp_path / "cmp")
    assert code == 0, err
    assert "| nf4 |" in out and "NLL delta" in out and "speed vs fp32" in out
    for f in ("report.md", "quant_compare.png", "results.json"):
        assert (tmp_path / "cmp" / f).stat().st_size > 0
    rows = {r["format"]: r for r in json.loads((tmp_path / "cmp" / "results.json").read_text())["rows"]}
    assert list(rows) == ["fp32", "bf16", "int8", "nf4"]
    assert rows["nf4"]["disk_bytes"] < rows["int8"]["disk_bytes"] < rows["bf16"]["disk_bytes"] < rows["fp32"]["disk_bytes"]
    assert rows["fp32"]["nll_delta"] == 0 and rows["nf4"]["max_error"] > rows["int8"]["max_error"] > 0
    assert "the run's test split (20 items" in (tmp_path / "cmp" / "report.md").read_text()


def test_precision_and_estimate(trained, capsys):
    code, out, _ = run(capsys, "precision")
    assert code == 0 and "| bf16 | 16 | 1 | 8 | 7 |" in out and "Round trip" not in out
    code, out, _ = run(capsys, "precision", trained)
    assert code == 0 and "Round trip of the model's" in out and "| fp16 |" in out
    code, out, _ = run(capsys, "estimate", "--params", "175e9", "--tokens", "300e9")
    assert code == 0 and "# 175B parameters" in out and "3.15e+23" in out
    code, out, _ = run(capsys, "estimate", "--preset", "smollm2-135m")
    assert code == 0 and out.startswith("# smollm2-135m: 135M parameters") and "KV cache" in out
    code, out, _ = run(capsys, "estimate", trained)
    assert code == 0 and out.startswith(f"# {trained}:") and "activations" in out


def test_bad_quantize_inputs_are_one_line_errors(trained, tmp_path, capsys):
    q = tmp_path / "q"
    assert run(capsys, "quantize", trained, "--to", "int8", "--out", q)[0] == 0
    cases = [
        (["quantize", trained], "either --to FORMAT"),
        (["quantize", trained, "--to", "nf4", "--compare"], "either --to FORMAT"),
        (["quantize", trained, "--to", "nf4"], "--to needs --out"),
        (["quantize", q, "--to", "nf4", "--out", tmp_path / "qq"], "already quantized (int8)"),
        (["quantize", trained, "--to", "nf4", "--block-size", 7, "--out", tmp_path / "b"], "must be even"),
        (["quantize", trained, "--compare", "--formats", "fp8"], "unknown format 'fp8'"),
        (["quantize", tmp_path / "missing", "--compare"], "does not exist"),
        (["estimate"], "exactly one model"),
        (["estimate", "--params", "7B", "--preset", "char-small"], "exactly one model"),
        (["estimate", "--params", "lots"], "neither a count"),
    ]
    for argv, message in cases:
        code, out, err = run(capsys, *argv)
        assert code == 2, (argv, out, err)
        assert message in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert not (tmp_path / "qq").exists() and not (tmp_path / "b").exists()


def _tiny_text_model(tmp_path):
    """A tiny random Llama with a tiny byte-level BPE, saved as an HF directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from gptlab.data.tokenizer import wrap_tokenizer
    from gptlab.models.config import GPTConfig
    from gptlab.models.gpt import GPT
    from gptlab.models.hf import save_hf_dir

    corpus = ["A dog leaps to catch a thrown frisbee.", "The boy throws the frisbee to the dog."] * 5
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    info = {"eos_token": "<|endoftext|>"}
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=bpe.get_vocab_size(), block_size=64, n_layer=2, n_head=4, n_kv_head=2,
                          n_embd=32, intermediate_size=64, bias=False, norm="rmsnorm", mlp="swiglu", pos="rope",
                          fused_qkv=False, tie_embeddings=False)).eval()
    model.config.extra.update(info)
    data = tmp_path / "commongen"
    data.mkdir()
    (data / "commongen.dev.src_alpha.txt").write_text("dog frisbee catch\ndog frisbee catch\nboy throw\n")
    (data / "commongen.dev.tgt.txt").write_text("A dog catches a frisbee.\nThe dog leaps.\nA boy throws.\n")
    return save_hf_dir(model, wrap_tokenizer(bpe, info), tmp_path / "tiny-hf"), data


def test_pretrained_text_model_quantized_and_compared(tmp_path, capsys):
    hf, data = _tiny_text_model(tmp_path)
    q = tmp_path / "q"
    code, out, err = run(capsys, "quantize", hf, "--to", "int8", "--out", q)
    assert code == 0 and "--task commongen --model" in out, err
    # a text checkpoint is sampled as text, with or without --model
    argv = ["--prompt", "A dog", "--no-chat", "--greedy", "--max-new-tokens", 4]
    code, plain, err = run(capsys, "sample", q, *argv)
    assert code == 0 and plain.startswith("A dog"), err
    assert run(capsys, "sample", "--model", q, *argv)[1] == plain
    code, out, err = run(capsys, "quantize", hf, "--compare", "--formats", "fp32,nf4", "--repeats", 1, "--data",
                         data, "--out", tmp_path / "cmp")
    assert code == 0 and "| nf4 |" in out, err
    assert "first 3 CommonGen dev reference sentences" in (tmp_path / "cmp" / "report.md").read_text()
    code, _, err = run(capsys, "quantize", hf, "--compare")
    assert code == 2 and "give --out DIR" in err
