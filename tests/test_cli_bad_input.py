"""Bad command-line input: one line on stderr, exit status 2, no traceback, nothing written."""

import pytest
import torch

from gptlab.cli import main
from gptlab.train.pretrain import pretrain
from gptlab.train.trainer import TrainConfig


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("badcli")
    g = torch.Generator().manual_seed(0)
    cons, vow = "bcdfghjklmnprstvz", "aeiou"
    names = {"".join(cons[int(torch.randint(17, (1,), generator=g))] + vow[int(torch.randint(5, (1,), generator=g))]
                     for _ in range(int(torch.randint(2, 5, (1,), generator=g)))) for _ in range(200)}
    (root / "names.txt").write_text("\n".join(sorted(names)) + "\n")
    cfg = TrainConfig(max_steps=5, eval_every=5, batch_size=16, warmup_steps=1, progress=False)
    pretrain(str(root / "names.txt"), root / "run", "char-tiny", cfg, split_seed=1, test_size=20, device="cpu",
             log=lambda *a, **k: None)
    return root


PRETRAIN = ["pretrain", "--data", "{data}", "--preset", "char-tiny", "--max-steps", "2", "--out", "{out}"]
FINETUNE = ["finetune", "{run}", "--task", "gender", "--method", "lora", "--out", "{out}"]
DPO = ["dpo", "{run}", "--names-rule", "endswith:a", "--out", "{out}"]
CASES = [  # (argv, what the one line says)
    (PRETRAIN + ["--lr", "-1"], "argument --lr: must be a number > 0"),
    (PRETRAIN + ["--lr", "nan"], "argument --lr: must be a number > 0"),
    (PRETRAIN + ["--lr", "inf"], "argument --lr"),
    (PRETRAIN + ["--lr", "0"], "argument --lr"),
    (PRETRAIN + ["--lr", "fast"], "argument --lr"),
    (PRETRAIN + ["--eval-every", "0"], "argument --eval-every: must be a whole number > 0"),
    (PRETRAIN + ["--log-every", "0"], "argument --log-every"),
    (PRETRAIN + ["--n-head", "0"], "argument --n-head"),
    (PRETRAIN + ["--dropout", "1.5"], "argument --dropout: must be a number in [0, 1)"),
    (PRETRAIN + ["--dropout", "nan"], "argument --dropout"),
    (PRETRAIN + ["--grad-clip", "-1"], "argument --grad-clip: must be a number >= 0"),
    (PRETRAIN + ["--patience", "0"], "argument --patience"),
    (PRETRAIN + ["--patience", "-1"], "argument --patience"),
    (PRETRAIN + ["--max-time", "-1"], "argument --max-time"),
    (PRETRAIN + ["--weight-decay", "-5"], "argument --weight-decay"),
    (PRETRAIN + ["--max-steps", "0"], "argument --max-steps"),
    (PRETRAIN + ["--batch-size", "0"], "argument --batch-size"),
    (PRETRAIN + ["--warmup-steps", "-1"], "argument --warmup-steps"),
    (PRETRAIN + ["--save-every", "0"], "argument --save-every"),
    (PRETRAIN + ["--block-size", "0"], "argument --block-size"),
    (PRETRAIN + ["--test-size", "10"], "add --split-seed"),
    (PRETRAIN + ["--dtype", "fp16", "--device", "cpu"], "--dtype fp16 autocasts on a CUDA GPU only"),
    (PRETRAIN + ["--schedule", "linear"], "argument --schedule: invalid choice"),
    (["pretrain", "--data", "{data}"], "required: --out"),
    (FINETUNE + ["--lr", "nan"], "argument --lr"),
    (FINETUNE + ["--eval-limit", "0"], "argument --eval-limit"),
    (FINETUNE + ["--limit", "-2"], "argument --limit"),
    (FINETUNE + ["--rank", "0"], "argument --rank"),
    (FINETUNE + ["--lora-dropout", "1"], "argument --lora-dropout"),
    (FINETUNE + ["--virtual-tokens", "0"], "argument --virtual-tokens"),
    (FINETUNE + ["--method", "magic"], "argument --method: invalid choice"),
    (FINETUNE + ["--data", "{data}"], "--data is for --task commongen"),
    (["finetune", "{run}", "--method", "lora", "--out", "{out}"], "required: --task"),
    (["compare", "{run}", "--task", "gender", "--methods", "lora,magic", "--out", "{out}"], "unknown magic"),
    (DPO + ["--beta", "nan"], "argument --beta"),
    (DPO + ["--kl-samples", "0"], "argument --kl-samples"),
    (DPO + ["--method", "head"], "argument --method: invalid choice"),
    (["dpo", "{run}", "--out", "{out}"], "exactly one of --data / --names-rule"),
    (["sample", "{run}", "-n", "0"], "argument -n: must be a whole number > 0"),
    (["sample", "{run}", "-n", "-3"], "argument -n"),
    (["sample", "{run}", "--max-new-tokens", "0"], "argument --max-new-tokens"),
    (["sample", "{run}", "--max-new-tokens", "-1"], "argument --max-new-tokens"),
    (["sample", "{run}", "--temperature", "nan"], "argument --temperature"),
    (["sample", "{run}", "--temperature", "-1"], "argument --temperature"),
    (["sample", "{run}", "--top-p", "0"], "argument --top-p"),
    (["sample", "{run}", "--top-k", "0"], "argument --top-k"),
    (["sample", "{run}", "--model", "{data}"], "two models given"),
    (["eval", "{run}", "--limit", "0"], "argument --limit"),
    (["eval", "{run}", "--batch-size", "0"], "argument --batch-size"),
    (["embeddings", "{run}", "-k", "0"], "argument -k"),
    (["quantize", "{run}", "--to", "int8", "--out", "{out}", "--block-size", "0"], "argument --block-size"),
    (["quantize", "{run}", "--to", "int8", "--out", "{out}", "--skip", "bogus"], "--skip bogus: no layer"),
    (["quantize", "{run}", "--compare", "--out", "{out}", "--repeats", "0"], "argument --repeats"),
    (["estimate", "--params", "7B", "--utilization", "0"], "argument --utilization"),
    (["estimate", "--params", "7B", "--batch-size", "0"], "argument --batch-size"),
    (["bogus-verb"], "invalid choice"),
    ([], "required: VERB"),
    (["finetune", "{run}", "--task", "preference", "--method", "lora", "--out", "{out}"], "is a comparison"),
    (["compare", "{run}", "--task", "gender", "--quick", "--out", "{out}"], "are for --task preference"),
    (["compare", "{run}", "--task", "preference", "--names-rule", "bogus", "--out", "{out}"], "bogus"),
]


@pytest.mark.parametrize("argv, message", CASES, ids=[" ".join(a[:1] + a[-2:]) for a, _ in CASES])
def test_bad_input_is_one_line(trained, tmp_path, capsys, argv, message):
    fill = {"data": str(trained / "names.txt"), "run": str(trained / "run"), "out": str(tmp_path / "out")}
    before = set(tmp_path.rglob("*")), set(trained.rglob("*"))
    try:
        code = main([a.format(**fill) for a in argv])
    except SystemExit as e:  # argparse
        code = e.code
    out, err = capsys.readouterr()
    assert code == 2, (argv, out, err)
    assert len(err.strip().splitlines()) == 1 and err.startswith("gptlab: error:"), err
    assert message in err and "Traceback" not in err, err
    assert (set(tmp_path.rglob("*")), set(trained.rglob("*"))) == before  # nothing written, nothing left behind
