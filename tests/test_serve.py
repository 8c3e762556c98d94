"""`gptlab serve` end to end, through the official `openai` client against real uvicorn servers on free
loopback ports: a names run with two LoRA task adapters (behind an API key) and a tiny Llama HF
directory with a chat template and two LoRA adapters.

The runs are built in seconds: a character GPT trained briefly on a few names, a tiny random Llama,
and LoRA runs made by the shared run skeleton (`recipes.tuning.tune`) with a minimal recipe."""

import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
import httpx  # noqa: E402  (comes with openai)
import uvicorn  # noqa: E402

from gptlab.cli import main  # noqa: E402
from gptlab.data.lm import LMDataset  # noqa: E402
from gptlab.data.tokenizer import CharTokenizer  # noqa: E402
from gptlab.serve import Engine, create_app  # noqa: E402

KEY = "sk-test-key"
# (name, gender, origin): a few labelled names, enough for a char GPT to learn the formats
NAMES = [("anna", "F", "O"), ("maria", "F", "O"), ("priya", "F", "I"), ("sita", "F", "I"), ("lakshmi", "F", "I"),
         ("john", "M", "O"), ("peter", "M", "O"), ("ravi", "M", "I"), ("arjun", "M", "I"), ("david", "M", "O"),
         ("emma", "F", "O"), ("rahul", "M", "I"), ("kavya", "F", "I"), ("oliver", "M", "O"), ("meera", "F", "I"),
         ("james", "M", "O"), ("sophia", "F", "O"), ("vikram", "M", "I"), ("lucas", "M", "O"), ("divya", "F", "I")]
quiet = lambda *a, **k: None  # noqa: E731


class _Pairs:
    """The smallest recipe `tune` takes: fixed (prompt, completion) pairs, no evaluation."""
    kind = "finetune"
    world_methods = ("lora", "prompt", "prefix")

    def __init__(self, pairs):
        self.pairs = pairs

    def prepare(self, model, tok, info):
        from gptlab.recipes.tuning import Plan

        return Plan(target=model, train=LMDataset(self.pairs, tok, model.config.block_size), describe="pairs")

    def evaluate(self, tuned, result):
        return {}


def method_run(base, out, pairs, method="lora", steps=20, **opts):
    from gptlab.recipes.tuning import tune
    from gptlab.train.trainer import TrainConfig

    cfg = TrainConfig(max_steps=steps, eval_every=steps, batch_size=20, lr=3e-2, warmup_steps=1, schedule="constant",
                      weight_decay=0.0, progress=False)
    tune(_Pairs(pairs), base, method, out, train_cfg=cfg, device="cpu", log=quiet, **(opts or {"rank": 4}))
    return out


def names_base(path):
    """A char-tiny GPT trained briefly on `{name}` and on half the names' task strings (so the label
    characters mean something to it): it writes names, and the adapters have the rest to learn."""
    from gptlab.models.config import preset
    from gptlab.models.gpt import GPT
    from gptlab.models.io import save_checkpoint

    tok = CharTokenizer.from_texts([n for n, _, _ in NAMES])
    torch.manual_seed(0)
    model = GPT(preset("char-tiny", vocab_size=tok.vocab_size))
    pairs = [("{", n + "}") for n, _, _ in NAMES] + [(f"G{{{n}0=", f"{g}}}") for n, g, _ in NAMES[::2]] + \
        [(f"C{{{n}0=", f"{o}}}") for n, _, o in NAMES[::2]]
    data = LMDataset(pairs, tok, model.config.block_size)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2)
    for _ in range(40):
        b = data.batch(range(len(data)))
        loss = model(b["x"], b["y"])[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return save_checkpoint(path, model.eval(), tok, {"kind": "pretrain"})


class Server:
    """uvicorn in a background thread on a free loopback port."""

    def __init__(self, engine, api_key=None):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.engine = engine
        self.server = uvicorn.Server(uvicorn.Config(create_app(engine, api_key=api_key), log_level="error"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key=api_key or "none", max_retries=0)
        self.http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {api_key}"} if api_key else {},
                                 timeout=30)

    def close(self):
        self.server.should_exit = True
        self.thread.join(10)
        self.http.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from test_sample_pretrained import INFO, tiny_bpe, tiny_llama

    from gptlab.data.tokenizer import wrap_tokenizer
    from gptlab.models.hf import save_hf_dir

    root = tmp_path_factory.mktemp("serve")
    out = {"names": names_base(root / "names")}
    out["gender"] = method_run(out["names"], root / "gender", [("G{" + n + "0=", g + "}") for n, g, _ in NAMES])
    out["origin"] = method_run(out["names"], root / "origin", [("C{" + n + "0=", o + "}") for n, _, o in NAMES])
    out["prompt"] = method_run(out["names"], root / "prompt", [("{", n + "}") for n, _, _ in NAMES if n.endswith("a")],
                               "prompt", virtual_tokens=2)
    out["prefix"] = method_run(out["names"], root / "prefix", [("{", "anna}")], "prefix", steps=1, virtual_tokens=2)
    tok = wrap_tokenizer(tiny_bpe(), INFO)
    model = tiny_llama(tok.vocab_size, seed=3, block_size=96)
    model.config.extra.update(INFO)
    out["llama"] = save_hf_dir(model, tok, root / "hf")
    chat = lambda q: f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"  # noqa: E731
    out["dogs"] = method_run(out["llama"], root / "dogs", [(chat(q), "A dog catches the frisbee.<|im_end|>")
                                                         for q in ("dog", "frisbee", "catch", "throw")])
    out["field"] = method_run(out["llama"], root / "field", [(chat(q), "I stood and looked across the field.<|im_end|>")
                                                           for q in ("dog", "field", "look", "stand")])
    return out


@pytest.fixture(scope="module")
def names(runs):
    engine = Engine.open(runs["names"], {"g": runs["gender"], "o": runs["origin"], "p": runs["prompt"]}, max_batch=8,
                         max_queue=8,
                         max_tokens_limit=64)
    s = Server(engine, api_key=KEY)
    yield s
    s.close()


@pytest.fixture(scope="module")
def llama(runs):
    engine = Engine.open(runs["llama"], {"dogs": runs["dogs"], "field": runs["field"]}, max_batch=8)
    s = Server(engine)
    yield s
    s.close()


def complete(server, model, prompt, **kw):
    kw = {"temperature": 0, "max_tokens": 20, **kw}
    return server.client.completions.create(model=model, prompt=prompt, **kw)


def chat(server, model, text, **kw):
    kw = {"temperature": 0, "max_tokens": 16, **kw}
    return server.client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}], **kw)


def streamed(server, kind, model, text, **kw):
    """The concatenated text of a streamed request, and its finish reason."""
    fn = complete if kind == "completion" else chat
    pieces, finish = [], None
    for c in fn(server, model, text, stream=True, **kw):
        if not c.choices:
            continue
        ch = c.choices[0]
        pieces.append(ch.text if kind == "completion" else (ch.delta.content or ""))
        finish = ch.finish_reason or finish
    return "".join(pieces), finish


def wait_for(cond, timeout=10.0):
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


def together(server, fns):
    """Run the calls at the same time: held in the queue while the scheduler pauses, admitted in one step."""
    results = [None] * len(fns)

    def run(i):
        results[i] = fns[i]()

    with server.engine.paused():
        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
        for t in threads:
            t.start()
        wait_for(lambda: server.engine.stats()["queue_length"] == len(fns))
    for t in threads:
        t.join(30)
    return results


# ---- what is served -------------------------------------------------------------------------------

def test_models_list_the_base_and_its_adapters(names, llama, runs):
    data = names.client.models.list().data
    assert [m.id for m in data] == [str(runs["names"]), "g", "o", "p"]
    for m in (names.http.get("/v1/models").json()["data"] + llama.http.get("/v1/models").json()["data"]):
        assert {"id", "object", "owned_by", "kind", "method", "trainable", "size_bytes", "world", "chat"} <= set(m)
        assert m["object"] == "model" and m["owned_by"] == "gptlab" and m["trainable"] > 0 and m["size_bytes"] > 0
    base, g, _, p = names.http.get("/v1/models").json()["data"]
    assert (base["kind"], base["method"], base["world"], base["chat"]) == ("base", None, "names", False)
    assert (g["kind"], g["method"], g["world"]) == ("adapter", "lora", "names")
    assert g["trainable"] < base["trainable"] and g["size_bytes"] < base["size_bytes"]
    assert (p["method"], p["context_length"], base["context_length"]) == ("prompt", 38, 40)  # 2 virtual tokens
    assert all(m["world"] == "text" and m["chat"] for m in llama.http.get("/v1/models").json()["data"])
    assert names.http.get("/health").json()["status"] == "ok"


def test_names_world_labels_and_samples(names):
    assert complete(names, "g", "G{priyadarsini0=").choices[0].text in ("F", "M")
    r = complete(names, "o", "C{ravi0=")
    assert r.choices[0].text in ("I", "O") and r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens == len("C{ravi0=") and r.usage.completion_tokens == 1
    name = complete(names, "base", "").choices[0]  # an empty prompt starts at `{`: a name, ended by `}`
    assert re.fullmatch("[a-z]+", name.text) and name.finish_reason == "stop"
    twenty = complete(names, "base", "", temperature=1.0, n=20, seed=7)  # n > max_batch (8): rows as they free up
    again = complete(names, "base", "", temperature=1.0, n=20, seed=7)
    assert [c.text for c in twenty.choices] == [c.text for c in again.choices]  # seeded
    assert [c.index for c in twenty.choices] == list(range(20))
    assert len({c.text for c in twenty.choices}) > 5 and all("}" not in c.text for c in twenty.choices)
    assert twenty.usage.completion_tokens == sum(len(c.text) for c in twenty.choices)
    assert complete(names, "base", "", temperature=1.0, extra_body={"top_k": 1}).choices[0].text == name.text  # top_k (extension)


# ---- text world: chat, completion, streaming ------------------------------------------------------

@pytest.mark.parametrize("model", ["base", "dogs"])
def test_streamed_text_equals_plain_text(llama, model):
    plain = chat(llama, model, "dog, frisbee")
    assert plain.object == "chat.completion" and plain.choices[0].message.role == "assistant"
    text, finish = streamed(llama, "chat", model, "dog, frisbee")
    assert (text, finish) == (plain.choices[0].message.content, plain.choices[0].finish_reason) and text
    assert plain.usage.completion_tokens > 0
    plain = complete(llama, model, "A dog", max_tokens=12)
    assert streamed(llama, "completion", model, "A dog", max_tokens=12) == (plain.choices[0].text,
                                                                            plain.choices[0].finish_reason)
    chunks = list(llama.client.completions.create(model=model, prompt="A dog", max_tokens=3, temperature=0,
                                                  stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 3


def test_a_trained_adapter_answers_its_task(llama):
    assert chat(llama, "dogs", "dog", max_tokens=20).choices[0].message.content.startswith("A dog")
    assert chat(llama, "field", "field", max_tokens=20).choices[0].message.content.startswith("I stood")
    r = chat(llama, "field", "field", stop=["looked"], max_tokens=20).choices[0]
    assert r.message.content == "I stood and " and r.finish_reason == "stop"  # a stop string ends it, unsaid


# ---- mixed batches equal serving alone ------------------------------------------------------------

def test_names_mixed_batch_equals_each_adapter_alone(names):
    calls = [("g", "G{meera0="), ("o", "C{john0="), ("base", ""), ("g", "G{oliver0="), ("o", "C{kavya0="),
             ("base", "ma")]
    alone = [complete(names, m, p).choices[0].text for m, p in calls]
    before = names.engine.stats()["batch_size"]["histogram"]
    mixed = together(names, [lambda m=m, p=p: complete(names, m, p).choices[0].text for m, p in calls])
    assert mixed == alone
    after = names.engine.stats()["batch_size"]["histogram"]
    assert any(after[k] > before.get(k, 0) for k in after if int(k) >= 4)  # they were decoded together


def test_prompt_tuning_rows_mix_with_lora_rows(names):
    """A soft prompt goes in at its row's prefill and then lives in that row's cache."""
    calls = [("p", ""), ("g", "G{anna0="), ("base", ""), ("p", "ma"), ("o", "C{ravi0=")]
    alone = [complete(names, m, p).choices[0].text for m, p in calls]
    starts = ("", "m", "s", "d")  # the soft prompt changes what the base writes
    assert any(complete(names, "p", x).choices[0].text != complete(names, "base", x).choices[0].text for x in starts)
    assert together(names, [lambda m=m, p=p: complete(names, m, p).choices[0].text for m, p in calls]) == alone


def test_llama_mixed_batch_and_streams_in_flight_at_once(llama):
    calls = [("dogs", "chat", "dog"), ("field", "chat", "field"), ("base", "chat", "dog"),
             ("dogs", "completion", "The boy"), ("base", "completion", "I stood")]
    alone = [streamed(llama, kind, m, text) for m, kind, text in calls]
    mixed = together(llama, [lambda c=c: streamed(llama, c[1], c[0], c[2]) for c in calls])
    assert mixed == alone
    assert len({t for t, _ in alone[:3]}) == 3  # two adapters and the base: three different answers
    call = lambda c: (chat if c[1] == "chat" else complete)(llama, c[0], c[2])  # noqa: E731
    single = [call(c) for c in calls]
    plain = together(llama, [lambda c=c: call(c) for c in calls])
    text = lambda c, r: r.choices[0].message.content if c[1] == "chat" else r.choices[0].text  # noqa: E731
    assert [text(c, r) for c, r in zip(calls, plain)] == [t for t, _ in alone]
    assert [r.usage.completion_tokens for r in plain] == [r.usage.completion_tokens for r in single]


# ---- faults ---------------------------------------------------------------------------------------

def _error(r, status):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "code"} and err["message"]
    return err


@pytest.mark.parametrize("body, status, code", [
    ("{not json", 400, "invalid_json"),
    ('["a list"]', 400, "invalid_json"),
    ({"model": "nope", "prompt": "G{"}, 404, "model_not_found"),
    ({"model": "g", "prompt": "G{", "max_tokens": 65}, 400, "invalid_value"),
    ({"model": "g", "prompt": "G{" + "a" * 60}, 400, "context_length_exceeded"),
    ({"model": "g", "prompt": "G{", "temperature": -0.5}, 400, "invalid_value"),
    ({"model": "g", "prompt": "G{", "top_p": 0}, 400, "invalid_value"),
    ({"model": "g", "prompt": "G{", "top_p": 1.5}, 400, "invalid_value"),
    ({"model": "g", "prompt": "G{", "n": 500}, 400, "invalid_value"),
    ({"model": "g", "prompt": "G{", "stop": 3}, 400, "invalid_value"),
    ({"model": "g", "prompt": "G{é"}, 400, "invalid_value"),  # a character the tokenizer lacks
    ({"model": "g", "messages": [{"role": "user", "content": "hi"}]}, 400, "no_chat_template"),
])
def test_bad_requests_get_openai_errors_and_the_server_goes_on(names, body, status, code):
    path = "/v1/chat/completions" if isinstance(body, dict) and "messages" in body else "/v1/completions"
    data = body if isinstance(body, str) else json.dumps(body)
    err = _error(names.http.post(path, content=data, headers={"Content-Type": "application/json"}), status)
    assert err["code"] == code
    assert complete(names, "o", "C{ravi0=").choices[0].text in ("I", "O")


def test_openai_client_sees_the_errors(names, llama):
    with pytest.raises(openai.NotFoundError) as e:
        complete(names, "nope", "x")
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        complete(names, "g", "G{", max_tokens=1000)
    with pytest.raises(openai.BadRequestError, match="context"):
        chat(llama, "dogs", "dog " * 200)


def test_api_key_is_required_everywhere(names):
    for method, path in (("GET", "/v1/models"), ("GET", "/health"), ("GET", "/stats"), ("POST", "/v1/completions")):
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            _error(httpx.request(method, names.url + path, headers=headers, json={}), 401)
    bad = openai.OpenAI(base_url=names.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert names.http.get("/health").status_code == 200


def test_a_full_queue_says_429(names):
    engine = names.engine
    old, engine.max_queue = engine.max_queue, 1
    try:
        with engine.paused():
            first = threading.Thread(target=lambda: complete(names, "g", "G{anna0="))
            first.start()
            wait_for(lambda: engine.stats()["queue_length"] == 1)
            with pytest.raises(openai.RateLimitError) as e:
                complete(names, "g", "G{anna0=")
            assert e.value.body["code"] == "queue_full"
        first.join(10)
    finally:
        engine.max_queue = old
    assert engine.stats()["rejected"] >= 1 and complete(names, "g", "G{anna0=").choices[0].text in ("F", "M")


def test_an_exception_fails_only_its_request(names, monkeypatch):
    model = names.engine.model
    real = model.new_cache

    def failing(batch_size, max_len=None, **kw):
        if max_len == 7:  # the faulty request's prompt length
            raise RuntimeError("boom")
        return real(batch_size, max_len, **kw)

    monkeypatch.setattr(model, "new_cache", failing)
    good = threading.Thread(target=lambda: out.append(streamed(names, "completion", "base", "", max_tokens=30)))
    out = []
    with names.engine.paused():
        good.start()
        wait_for(lambda: names.engine.stats()["queue_length"] == 1)
        bad = threading.Thread(target=lambda: out.append(names.http.post("/v1/completions", json={
            "model": "g", "prompt": "G{ravi0"})))
        bad.start()
        wait_for(lambda: names.engine.stats()["queue_length"] == 2)
    good.join(10)
    bad.join(10)
    resp = next(o for o in out if isinstance(o, httpx.Response))
    assert _error(resp, 500)["type"] == "server_error" and "boom" in resp.json()["error"]["message"]
    text, finish = next(o for o in out if isinstance(o, tuple))
    assert finish == "stop" and re.fullmatch("[a-z]+", text)
    monkeypatch.undo()
    assert complete(names, "g", "G{ravi0=").choices[0].text in ("F", "M")


def test_a_client_that_leaves_frees_its_row(llama, monkeypatch):
    engine = llama.engine
    step = engine._step

    def slow_step():  # ~60 tokens take > 1 s: time to see the row, leave, and see it gone
        time.sleep(0.02)
        step()

    monkeypatch.setattr(engine, "_step", slow_step)
    before = engine.stats()
    body = {"model": "dogs", "prompt": "A dog", "max_tokens": 80, "temperature": 0, "stream": True}
    with httpx.stream("POST", llama.url + "/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert engine.stats()["active_rows"] == 1
    wait_for(lambda: engine.stats()["active_rows"] == 0, timeout=5.0)
    after = engine.stats()
    assert after["cancelled"] == before["cancelled"] + 1
    assert after["tokens_generated"] - before["tokens_generated"] < 60  # stopped long before its 80 tokens
    monkeypatch.undo()
    assert complete(llama, "dogs", "A dog", max_tokens=2).choices[0].finish_reason == "length"


# ---- the command ----------------------------------------------------------------------------------

def test_serve_refuses_an_adapter_of_another_base(runs, capsys):
    assert main(["serve", str(runs["llama"]), "--adapter", f"g={runs['gender']}", "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "another base model" in err and len(err.splitlines()) == 1
    assert main(["serve", str(runs["names"]), "--adapter", "base=" + str(runs["gender"])]) == 2
    assert "taken by the base" in capsys.readouterr().err


def test_serve_refuses_methods_that_cannot_share_a_batch(runs, capsys):
    assert main(["serve", str(runs["names"]), "--adapter", f"x={runs['prefix']}", "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "prefix" in err and "share a batch" in err and len(err.splitlines()) == 1


def test_a_peft_adapter_directory_serves_like_its_run(runs, llama, tmp_path):
    from gptlab.load import load
    from gptlab.peft import save_peft

    save_peft(load(runs["dogs"]).model, tmp_path / "peft")
    engine = Engine.open(runs["llama"], {"x": tmp_path / "peft"}).start()
    try:
        job = engine.run(engine.prepare("x", messages=[{"role": "user", "content": "dog"}], temperature=0,
                                        max_tokens=16))
    finally:
        engine.stop()
    assert job.texts[0] == chat(llama, "dogs", "dog").choices[0].message.content


def test_sigterm_finishes_in_flight_requests_and_exits_0(runs):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen([sys.executable, "-m", "gptlab", "serve", str(runs["names"]), "--adapter",
                             f"g={runs['gender']}", "--port", str(port), "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: _up(url) or proc.poll() is not None, timeout=60)
        assert proc.poll() is None, proc.stderr.read()
        body = {"model": "base", "prompt": "", "max_tokens": 30, "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"  # the stream in flight was finished
        assert proc.wait(30) == 0
        assert not _up(url)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _up(url) -> bool:
    try:
        return httpx.get(url + "/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
