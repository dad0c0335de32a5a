"""The page's JavaScript tokenizer (src/rnnflow/shipping/web/tokenizer.mjs), run by Node.js,
gives the ids of Python's `tokenizers` for every configuration rnnflow writes: char and word
level, lowercase on and off, start and end marks on and off, truncation at max_len, unknown
tokens and literal special tokens,
on a seeded sweep over every code point assigned in Python's Unicode tables."""

import itertools
import json
import random
import shutil
import subprocess
import unicodedata

import pytest

from rnnflow.data.text import END_ID, START_ID, build_tokenizer, encode, own_ids

from ..conftest import REPO

READER = REPO / "src/rnnflow/shipping/web/tokenizer.mjs"
DRIVER = """
import { BundleTokenizer } from %s;
import fs from "fs";
const job = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
const out = {};
for (const [name, path] of Object.entries(job.tokenizers)) {
  const tok = new BundleTokenizer(JSON.parse(fs.readFileSync(path, "utf8")), job.max_len, path);
  out[name] = job.texts.map((t) => {
    const ids = tok.encode(t);
    return [ids, tok.ownIds(ids)];
  });
}
process.stdout.write(JSON.stringify(out));
"""


def sweep_texts(count: int = 2000, seed: int = 0) -> list[str]:
    """Random strings over every assigned code point up to U+2FFFF (combining marks,
    scripts without spaces, letter numbers, joiners, emoji, odd whitespace), and the cases
    that matter by name."""
    rng = random.Random(seed)
    points = [
        c
        for c in range(0x09, 0x30000)
        if not 0xD800 <= c < 0xE000 and unicodedata.category(chr(c)) != "Cn"
    ]
    texts = [
        "".join(chr(rng.choice(points)) for _ in range(rng.randint(1, 40))) for _ in range(count)
    ]
    return texts + [
        "Hello world, it's 3.5 o'clock!",
        "Ünïcödé ŒΣ straße İstanbul ΣΑΣ",
        "tabs\tand\nnewlines\n\nhere\r\n",
        "café cafe\u0301",  # NFC composes the second
        "<unk> and <pad> literal <un<unk>k>",
        "<s> marks </s> inside <s</s>>",
        "日本語のテキスト",
        "  spaced   out  ",
        "emoji 😀👍🏽 here",
        "ﬁ ligature Ⅻ ²³ ½ a\u200db",
        "a" * 500,  # truncated by characters, then by tokens
        "word " * 300,
    ]


def run_node(tokenizers: dict, texts: list[str], max_len: int, tmp_path):
    """The reader over `texts` for each named tokenizer file, in Node.js."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("node missing: `make test` installs Debian's nodejs (make web)")
    driver = tmp_path / "driver.mjs"
    driver.write_text(DRIVER % json.dumps(READER.as_uri()))
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"tokenizers": tokenizers, "texts": texts, "max_len": max_len}))
    return subprocess.run([node, driver, job], capture_output=True, text=True, timeout=120)


def test_the_javascript_tokenizer_equals_python_for_every_configuration(tmp_path):
    texts = sweep_texts()
    files, python = {}, {}
    for level, lowercase, marks in itertools.product(
        ("char", "word"), (True, False), (True, False)
    ):
        name = f"{level}-{'lower' if lowercase else 'cased'}{'-marks' * marks}"
        tok = build_tokenizer(texts[:1000], level, lowercase, 2, 3000, marks)
        files[name] = str(tmp_path / f"{name}.json")
        tok.save(files[name])
        python[name] = [[ids, own_ids(tok, ids)] for ids in encode(tok, texts, max_len=50)]
        assert any(1 in ids for ids, _ in python[name])  # unknown tokens are exercised
    out = run_node(files, texts, 50, tmp_path)
    assert out.returncode == 0, out.stderr
    javascript = json.loads(out.stdout)
    for name, want in python.items():
        wrong = [i for i, ids in enumerate(want) if javascript[name][i] != ids]
        assert not wrong, f"{name}: {len(wrong)} texts differ, first {texts[wrong[0]]!r}"
    assert max(len(ids) for ids, _ in python["char-lower"]) == 50  # truncation is exercised
    marked, plain = python["word-lower-marks"], python["word-lower"]
    assert all(ids[0] == START_ID for ids, _ in marked)
    assert sum(ids[-1] == END_ID for ids, _ in marked) == len(texts) - 1  # one cut: "word " * 300
    same = [i for i, t in enumerate(texts[:-1]) if "<s>" not in t and "</s>" not in t]
    assert [len(marked[i][1]) for i in same] == [len(plain[i][1]) for i in same]


def test_the_javascript_tokenizer_refuses_other_configurations(tmp_path):
    tok = build_tokenizer(["some words here"], "word", True, min_freq=1, max_vocab=100)
    raw = json.loads(tok.to_str())
    raw["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False}
    path = tmp_path / "bytelevel.json"
    path.write_text(json.dumps(raw))
    out = run_node({"x": str(path)}, ["a"], 8, tmp_path)
    assert out.returncode != 0
    assert f"{path}: not a tokenizer rnnflow writes (pre_tokenizer ByteLevel)" in out.stderr


def test_the_javascript_tokenizer_refuses_a_post_processor_it_does_not_know(tmp_path):
    tok = build_tokenizer(["some words here"], "char", True, 1, 100, marks=True)
    raw = json.loads(tok.to_str())
    raw["post_processor"] = {"type": "BertProcessing", "sep": ["</s>", 3], "cls": ["<s>", 2]}
    path = tmp_path / "bert.json"
    path.write_text(json.dumps(raw))
    out = run_node({"x": str(path)}, ["a"], 8, tmp_path)
    assert out.returncode != 0
    assert f"{path}: not a tokenizer rnnflow writes (post_processor BertProcessing" in out.stderr
