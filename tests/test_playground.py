"""The playground page (serve/static/playground.html) in a real browser: Debian's chromium driven by
selenium through chromium-driver, against `gptlab serve`'s app run in-process by uvicorn on a free
127.0.0.1 port, over a tiny names model with two LoRA adapters.

The page must show, for each of two adapters run side by side, exactly the text the API returns for
the same request (greedy), with tokens/s and time to first token; and sample 20 names from the base.
CI installs the browser (.ci/run) and sets GPTLAB_REQUIRE_BROWSER=1, so there a missing browser
fails instead of skipping.
"""

import os
import re
import shutil
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

REQUIRED = os.environ.get("GPTLAB_REQUIRE_BROWSER") == "1"
CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
DRIVER = shutil.which("chromedriver")
PROMPT, MAX_TOKENS = "G{maria0=", 12


def _need(ok: bool, why: str) -> None:
    if ok:
        return
    if REQUIRED:
        pytest.fail(f"{why} (GPTLAB_REQUIRE_BROWSER=1: CI must run this test)")
    pytest.skip(why)


@pytest.fixture(scope="module")
def webdriver_mod():
    try:
        import selenium.webdriver as webdriver
    except ImportError:
        webdriver = None
    _need(webdriver is not None, "selenium is not installed: pip install -e '.[test]'")
    _need(CHROMIUM is not None and DRIVER is not None,
          "chromium and chromium-driver are not installed: apt-get install -y chromium chromium-driver")
    return webdriver


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """uvicorn serving a tiny names model + two LoRA adapters on a free port; yields the base URL.
    Random weights (made as benchmarks/bench_serve.py makes them: a char-tiny names checkpoint, LoRA
    method runs on it) stand in for trained ones: the page's job is to show what the API says, and
    pretraining would cost this test half a minute (the names corpus, the trainer)."""
    missing = None
    try:
        import fastapi  # noqa: F401
        import httpx  # noqa: F401
        import uvicorn
    except ImportError as e:
        missing = e.name
    _need(missing is None, f"the server's packages are not installed ({missing} is missing): "
          "pip install -e '.[serve,test]'")
    from bench_serve import random_lora_adapters, random_names_base

    from gptlab.serve import Engine, create_app

    root = tmp_path_factory.mktemp("playground")
    random_names_base(root / "base")
    a0, a1 = random_lora_adapters(str(root / "base"), root / "adapters", 2, rank=2, std=0.3)
    engine = Engine.open(str(root / "base"), {"g0": str(a0), "g1": str(a1)}, device="cpu")
    srv = uvicorn.Server(uvicorn.Config(create_app(engine), host="127.0.0.1", port=0, log_level="warning",
                                        lifespan="on"))  # port 0: a free one, no race with other tests
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    port = srv.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(15)


@pytest.fixture(scope="module")
def browser(webdriver_mod):
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,900"):
        opts.add_argument(arg)
    driver = webdriver_mod.Chrome(service=Service(DRIVER), options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def _wait(driver, until, timeout=30):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(until)


def _pick(driver, wanted: list[str]) -> None:
    """Check exactly the models in `wanted` (the page preselects two)."""
    from selenium.webdriver.common.by import By

    boxes = driver.find_elements(By.CSS_SELECTOR, "#models input[data-model]")
    for box in boxes:  # uncheck first: at most 4 may be checked at once
        if box.is_selected() and box.get_attribute("data-model") not in wanted:
            box.click()
    for box in boxes:
        if not box.is_selected() and box.get_attribute("data-model") in wanted:
            box.click()


def _set(driver, element_id: str, value: str) -> None:
    from selenium.webdriver.common.by import By

    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(value)


def _panes_done(driver):
    from selenium.webdriver.common.by import By

    panes = driver.find_elements(By.CSS_SELECTOR, "#panes .pane")
    return panes if panes and all(p.get_attribute("data-done") == "1" for p in panes) else False


def test_two_adapters_side_by_side_equal_the_api(browser, server, tmp_path):
    import httpx
    from selenium.webdriver.common.by import By

    models = httpx.get(server + "/v1/models").json()["data"]
    assert [m["id"] for m in models][1:] == ["g0", "g1"]
    browser.get(server + "/")
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, 'input[data-model="g1"]'))
    _pick(browser, ["g0", "g1"])
    _set(browser, "prompt", PROMPT)
    _set(browser, "temperature", "0")
    _set(browser, "max_tokens", str(MAX_TOKENS))
    browser.find_element(By.ID, "run").click()
    panes = _wait(browser, _panes_done)
    browser.save_screenshot(str(tmp_path / "playground.png"))
    assert (tmp_path / "playground.png").stat().st_size > 10_000

    assert [p.get_attribute("data-model") for p in panes] == ["g0", "g1"]
    texts = {}
    for p in panes:
        model = p.get_attribute("data-model")
        assert p.find_element(By.CSS_SELECTOR, ".error").get_attribute("textContent") == ""
        shown = p.find_element(By.CSS_SELECTOR, ".output").get_attribute("textContent")
        api = httpx.post(server + "/v1/completions", timeout=30, json={
            "model": model, "prompt": PROMPT, "temperature": 0, "top_p": 1, "max_tokens": MAX_TOKENS}).json()
        assert shown == api["choices"][0]["text"], model
        assert shown, f"{model} wrote nothing"
        texts[model] = shown
        info = p.find_element(By.CSS_SELECTOR, ".info").text
        meta = next(m for m in models if m["id"] == model)
        assert f"{meta['trainable']:,} trainable" in info and "lora" in info
        assert re.fullmatch(r"\d+(\.\d)?", p.find_element(By.CSS_SELECTOR, ".tps").text), "tokens/s not shown"
        assert re.fullmatch(r"\d+ ms", p.find_element(By.CSS_SELECTOR, ".ttft").text), "TTFT not shown"
        assert p.find_element(By.CSS_SELECTOR, ".tokens").text == str(api["usage"]["completion_tokens"])
    assert texts["g0"] != texts["g1"], "both panes show the same text: the adapters were not told apart"


def test_sample_20_names_from_the_names_base(browser, server, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(server + "/")
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#models input[data-model]"))
    base = browser.find_element(By.CSS_SELECTOR, "#models input[data-model]").get_attribute("data-model")
    _pick(browser, [base])
    button = browser.find_element(By.ID, "sample-names")
    assert button.is_displayed(), "a names base shows the sample-names button"
    _set(browser, "temperature", "1")
    _set(browser, "top_k", "10")
    _set(browser, "max_tokens", "8")
    button.click()
    panes = _wait(browser, _panes_done)
    browser.save_screenshot(str(tmp_path / "names.png"))
    assert len(panes) == 1
    assert panes[0].find_element(By.CSS_SELECTOR, ".error").get_attribute("textContent") == ""
    names = panes[0].find_elements(By.CSS_SELECTOR, ".names li")
    assert len(names) == 20
    assert all(n.text for n in names)


def test_errors_show_in_the_pane(browser, server):
    """A request the server refuses: its OpenAI error message in the pane, the stream marked done."""
    from selenium.webdriver.common.by import By

    browser.get(server + "/")
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, 'input[data-model="g0"]'))
    _pick(browser, ["g0"])
    _set(browser, "prompt", "G{maria0=")
    _set(browser, "max_tokens", "100000")  # over the server's --max-tokens-limit
    browser.find_element(By.ID, "run").click()
    (pane,) = _wait(browser, _panes_done)
    assert pane.get_attribute("data-error") == "1"
    assert "max_tokens" in pane.find_element(By.CSS_SELECTOR, ".error").text
