"""The browser demo, proven in headless Chromium: the page classifies a whole test split with
onnxruntime-web and its JavaScript tokenizer, and every token id, label and probability
equals onnxruntime in Python (char level on the builtin data, word level on a csv made here).
Needs `make web` (npm packages in .web/) and Debian's chromium; `make test` provides both."""

import asyncio
import base64
import json
import os
import shutil
import subprocess
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

from rnnflow.analysis.evaluate import evaluate_variant
from rnnflow.data.text import encode, load_tokenizer
from rnnflow.shipping.export import export_bundle
from rnnflow.shipping.predict import Predictor
from rnnflow.tools import demo
from rnnflow.training.train import train_variant

from ..conftest import (
    CHROMIUM_FLAGS,
    REPO,
    chromium_env,
    data_stages,
    small_params,
    write_params,
)

pytestmark = pytest.mark.slow
ORT_DIST = REPO / demo.ORT_DIST
# RNNFLOW_SCREENSHOT=docs/pages/images/demo.png keeps the page's picture for the docs
SCREENSHOT = os.environ.get("RNNFLOW_SCREENSHOT")


def ship(ws: Path, raw: dict, variant: str) -> Path:
    """Run the data stages, then train, evaluate and export `variant` in `ws`."""
    data_stages(ws, raw)
    cwd = os.getcwd()
    os.chdir(ws)
    try:
        params = write_params(ws, raw)
        train_variant(params, variant)
        evaluate_variant(params, variant)
        export_bundle(params, variant)
    finally:
        os.chdir(cwd)
    return ws / "models" / variant


@pytest.fixture(scope="module")
def char_bundle(tmp_path_factory) -> Path:
    """gru at the default size on the whole builtin data set (char level, lowercase)."""
    raw = small_params()
    raw["data"]["max_per_class"] = None
    raw["model"]["defaults"] |= {"embedding_dim": 64, "hidden_size": 128}
    raw["model"]["variants"] = {"gru": {}}
    raw["train"]["epochs"] = 3
    return ship(tmp_path_factory.mktemp("char"), raw, "gru")


@pytest.fixture(scope="module")
def word_bundle(tmp_path_factory) -> Path:
    """lstm on a word-level csv data set: case kept, short max_len (truncation), rare words
    below min_freq (unknown tokens), accents, digits and punctuation."""
    ws = tmp_path_factory.mktemp("word")
    topics = {
        "sport": "match goal team Coach score Árbitro penalty league 2:1 final!",
        "music": "song album Band guitar concert Café-tour chorus vinyl 45rpm encore?",
        "food": "recipe bake Oven spice naïve-dough flour €3 taste dinner, sauce",
    }
    lines = ["text,label"]
    for label, words in topics.items():
        vocab = words.split()
        for i in range(100):
            picked = [vocab[(i * 7 + k * 3) % len(vocab)] for k in range(4 + i % 9)]
            lines.append(f'"{" ".join(picked)} rare{i}word",{label}')
    (ws / "texts.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    raw = small_params(data={"source": "csv", "path": "texts.csv", "max_per_class": None})
    raw["tokenize"] |= {"level": "word", "lowercase": False, "min_freq": 2}
    raw["pack"]["max_len"] = 8
    raw["model"]["variants"] = {"lstm": {}}
    return ship(ws, raw, "lstm")


class Page:
    """A headless Chromium driven over the DevTools protocol (aiohttp's websocket client)."""

    def __init__(self, profile: Path):
        chromium = shutil.which("chromium")
        if chromium is None:
            pytest.fail("chromium missing: `make test` installs Debian's chromium")
        flags = [*CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0"]
        self.env = ExitStack()  # TMPDIR's folder, removed at close()
        self.proc = subprocess.Popen(
            [chromium, *flags, "about:blank"],
            stderr=subprocess.DEVNULL,
            env=self.env.enter_context(chromium_env()),
        )
        active = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not active.is_file() or not active.read_text().strip():
            assert time.monotonic() < deadline, "chromium did not open its DevTools port"
            time.sleep(0.1)
        self.port = int(active.read_text().splitlines()[0])

    def result(self, url: str, shot: Path | None = None, timeout: float = 240) -> dict:
        """Open `url`, wait for #result's data-state, return its data-json (and a PNG)."""
        return asyncio.run(self._result(url, shot, timeout))

    async def _result(self, url: str, shot: Path | None, timeout: float) -> dict:
        import aiohttp

        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{self.port}/json/list") as response:
                target = next(t for t in await response.json() if t["type"] == "page")
            ws = await http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0)
            calls = iter(range(1, 10**6))

            async def call(method: str, **params) -> dict:
                number = next(calls)
                await ws.send_json({"id": number, "method": method, "params": params})
                while True:
                    message = await ws.receive_json()
                    if message.get("id") == number:
                        assert "error" not in message, message
                        return message["result"]

            async def value(expression: str):
                answer = await call("Runtime.evaluate", expression=expression, returnByValue=True)
                return answer["result"].get("value")

            if shot is not None:  # a picture the size of a laptop's browser window
                await call(
                    "Emulation.setDeviceMetricsOverride",
                    width=900,
                    height=520,
                    deviceScaleFactor=1,
                    mobile=False,
                )
            await call("Page.navigate", url=url)
            deadline = time.monotonic() + timeout
            state = None
            while state not in ("done", "error"):
                assert time.monotonic() < deadline, f"{url}: no result in {timeout} s"
                await asyncio.sleep(0.1)
                state = await value(
                    f"location.href === {json.dumps(url)} && "
                    "document.getElementById('result')?.dataset.state"
                )
            payload = json.loads(await value("document.getElementById('result').dataset.json"))
            if shot is not None:
                png = await call("Page.captureScreenshot", format="png")
                shot.write_bytes(base64.b64decode(png["data"]))
            await ws.close()
            return payload

    def close(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.env.close()


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    browser = Page(tmp_path_factory.mktemp("chromium"))
    yield browser
    browser.close()


def served(bundle: Path, site: Path):
    """The demo site of `bundle`, built and served on a free loopback port."""
    demo.build_site(bundle, site, ORT_DIST)
    server = demo.serve(site, 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def check_split(page: Page, bundle: Path, texts: list[str], site: Path) -> dict:
    """Classify `texts` in the page and in Python; assert equality; return the speeds."""
    server = served(bundle, site)
    try:
        (site / "texts.json").write_text(json.dumps(texts), encoding="utf-8")
        host, port = server.server_address[:2]
        browser = page.result(f"http://{host}:{port}/?texts=texts.json")
    finally:
        server.shutdown()
        server.server_close()
    assert "error" not in browser, browser
    predictor = Predictor(bundle, threads=1)
    started = time.perf_counter()
    python = predictor.predict(texts, batch_size=browser["batch"])
    python_speed = len(texts) / (time.perf_counter() - started)
    max_len = json.loads((bundle / "bundle.json").read_text())["max_len"]
    ids = encode(load_tokenizer(bundle / "tokenizer.json"), texts, max_len)
    worst = 0.0
    assert len(browser["results"]) == len(texts)
    for i, (got, want) in enumerate(zip(browser["results"], python, strict=True)):
        assert got["text"] == texts[i]
        assert got["ids"] == ids[i], f"text #{i + 1} {texts[i]!r}: token ids differ"
        assert got["label"] == want["label"], f"text #{i + 1} {texts[i]!r}"
        want_p = list(want["probabilities"].values())
        worst = max(worst, *(abs(a - b) for a, b in zip(got["probabilities"], want_p, strict=True)))
    assert worst <= 1e-5
    print(
        f"\n{bundle.name}: {len(texts)} texts equal in the browser (max |p diff| {worst:.1e}); "
        f"browser {browser['texts_per_second']:.0f} texts/s, python {python_speed:.0f} texts/s "
        f"(batch {browser['batch']}, one thread each)"
    )
    return {"max_abs_diff": worst, "browser": browser["texts_per_second"], "python": python_speed}


def split_texts(bundle: Path) -> list[str]:
    lines = (bundle.parents[1] / "data/prepared/test.jsonl").read_text(encoding="utf-8")
    return [json.loads(line)["text"] for line in lines.splitlines()]


def test_the_page_equals_python_on_the_whole_builtin_test_split(page, char_bundle, tmp_path):
    texts = split_texts(char_bundle)
    assert len(texts) > 1000  # the whole builtin test split, not a sample
    speeds = check_split(page, char_bundle, texts, tmp_path / "site")
    assert speeds["browser"] > 0 and speeds["python"] > 0


def test_the_page_equals_python_on_a_word_level_bundle(page, word_bundle, tmp_path):
    texts = split_texts(word_bundle)
    # the split, and texts that hit truncation, unknown words and literal special tokens
    texts += [
        "match goal team Coach score penalty league final encore recipe bake",
        "never seen words here",
        "<unk> Band <pad> guitar",
        "CAFÉ-TOUR Café-tour café-tour",
    ]
    check_split(page, word_bundle, texts, tmp_path / "site")


def test_the_page_reads_text_from_its_url_and_shows_the_labels(page, char_bundle, tmp_path):
    server = served(char_bundle, tmp_path / "site")
    shot = Path(SCREENSHOT) if SCREENSHOT else tmp_path / "demo.png"
    try:
        host, port = server.server_address[:2]
        result = page.result(f"http://{host}:{port}/?text=Virtanen", shot=shot)
    finally:
        server.shutdown()
        server.server_close()
    want = Predictor(char_bundle).predict(["Virtanen"])[0]
    assert result["label"] == want["label"]
    assert sum(result["probabilities"]) == pytest.approx(1.0, abs=1e-6)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 5000


def test_the_demo_command_refuses_what_it_cannot_serve(tmp_path, char_bundle):
    from ..conftest import run

    cmd = "python -m rnnflow.tools.demo"
    out = run(f"{cmd} --build-only", tmp_path, check=False)  # no leaderboard here
    assert out.returncode == 2
    assert out.stderr.strip() == (
        "demo: error: reports/leaderboard.json: missing; `make run` writes it (or pass --bundle)"
    )
    out = run(f"{cmd} --bundle {char_bundle} --build-only", tmp_path, check=False)
    assert out.returncode == 2 and out.stderr.strip() == (
        "demo: error: .web/node_modules/onnxruntime-web/dist: onnxruntime-web is not installed "
        "(missing ort.wasm.min.mjs); `make demo` installs it with npm"
    )
    assert not (tmp_path / ".web/site").exists()
