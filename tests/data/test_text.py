"""Tokenizer and vocabulary (Hugging Face tokenizers), fitted on the train split only."""

import json

from rnnflow.data.text import (
    END_ID,
    PAD,
    PAD_ID,
    START_ID,
    UNK_ID,
    build_tokenizer,
    encode,
    level_of,
    pad_batch,
)
from rnnflow.data.vocab import fit_vocabulary

from ..conftest import small_params, write_params


def test_specials_and_char_round_trip():
    tok = build_tokenizer(["Müller", "O'Brien"], "char", lowercase=True, min_freq=1, max_vocab=99)
    assert tok.token_to_id(PAD) == PAD_ID == 0 and tok.token_to_id("<unk>") == UNK_ID
    ids = encode(tok, ["O'Brien"], max_len=50)[0]
    assert [tok.id_to_token(i) for i in ids] == list("o'brien")
    assert encode(tok, ["Zz"], 50)[0] == [UNK_ID, UNK_ID]


def test_word_level_min_freq_and_max_vocab():
    texts = ["the cat sat", "the dog sat", "the end"]
    tok = build_tokenizer(texts, "word", lowercase=True, min_freq=2, max_vocab=100)
    assert set(tok.get_vocab()) == {"<pad>", "<unk>", "the", "sat"}
    assert encode(tok, ["The cat SAT!"], 10)[0] == [
        tok.token_to_id("the"),
        UNK_ID,
        tok.token_to_id("sat"),
        UNK_ID,
    ]
    small = build_tokenizer(texts, "word", lowercase=True, min_freq=1, max_vocab=4)
    assert small.get_vocab_size() == 4  # the two specials and the two most frequent words


def test_marks_wrap_every_text_and_leave_the_other_ids_as_they_were():
    texts = ["the cat sat", "the dog sat", "a cat"]
    for level in ("char", "word", "bpe", "wordpiece"):
        plain = build_tokenizer(texts, level, lowercase=True, min_freq=1, max_vocab=60)
        marked = build_tokenizer(texts, level, lowercase=True, min_freq=1, max_vocab=62, marks=True)
        assert marked.id_to_token(START_ID) == "<s>" and marked.id_to_token(END_ID) == "</s>"
        assert plain.token_to_id("<s>") is None  # off: no marks in the vocabulary at all
        for text in ["the cat", "dog", "", "zebra <s>"]:
            ids = [marked.id_to_token(i) for i in encode(marked, [text], 50)[0]]
            inner = [plain.id_to_token(i) for i in encode(plain, [text], 50)[0]]
            assert ids[0] == "<s>" and ids[-1] == "</s>", (level, text)
            if "<s>" not in text:
                assert ids[1:-1] == inner, (level, text)  # the same tokens between the marks
    cut = encode(build_tokenizer(["abc"], "char", True, 1, 10, marks=True), ["abcabc"], 4)[0]
    assert cut[0] == START_ID and END_ID not in cut and len(cut) == 4  # cut: no end mark


def test_truncation_and_huge_line():
    tok = build_tokenizer(["abc"], "char", True, 1, 10)
    assert [len(x) for x in encode(tok, ["a" * 10_000_000, "ab"], max_len=32)] == [32, 2]
    wtok = build_tokenizer(["a b"], "word", True, 1, 10)
    assert len(encode(wtok, ["a " * 5_000_000], max_len=64)[0]) == 64


def test_pad_batch():
    tokens, lengths = pad_batch([[5, 6, 7], [8]])
    assert tokens.tolist() == [[5, 6, 7], [8, 0, 0]] and lengths.tolist() == [3, 1]


def test_vocabulary_is_fitted_on_train_only(workspace):
    prepared = workspace / "data/prepared"
    rows = {
        "train": [("abba", "x"), ("cab", "y")],
        "val": [("zzz", "x")],
        "test": [("qqq", "y"), ("abq", "x")],
    }
    for split, items in rows.items():
        lines = [json.dumps({"text": t, "label": lab}) for t, lab in items]
        (prepared / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    tok, _ = fit_vocabulary(write_params(workspace, small_params()))
    assert set(tok.get_vocab()) == {"<pad>", "<unk>", "<s>", "</s>", "a", "b", "c"}
    assert encode(tok, ["abq"], 10)[0][-2:] == [UNK_ID, END_ID]


def test_fit_vocabulary_writes_labels(workspace):
    params = write_params(workspace, small_params(tokenize={"min_freq": 5}))
    tok, report = fit_vocabulary(params)
    labels = json.loads((workspace / "data/tokenizer/labels.json").read_text())["labels"]
    assert labels == sorted(labels) and len(labels) == 15 == report["classes"]
    assert report["vocab_size"] == tok.get_vocab_size() < 80


def test_subword_levels_split_unseen_words_into_known_pieces():
    texts = ["the unbelievable story", "believable stories told", "an unusual story"] * 5
    for level, prefix in (("bpe", ""), ("wordpiece", "##")):
        tok = build_tokenizer(texts, level, lowercase=True, min_freq=1, max_vocab=200)
        assert tok.token_to_id(PAD) == PAD_ID and tok.token_to_id("<unk>") == UNK_ID
        assert level_of(tok) == level
        ids = encode(tok, ["Unbelievably told"], max_len=50)[0]  # a word never seen
        pieces = [tok.id_to_token(i) for i in ids]
        assert UNK_ID not in ids and len(pieces) >= 2  # pieces, not one unknown word
        assert "".join(p.removeprefix(prefix) for p in pieces) == "unbelievablytold"
        word = build_tokenizer(texts, "word", lowercase=True, min_freq=1, max_vocab=200)
        assert encode(word, ["Unbelievably told"], 50)[0] == [UNK_ID, word.token_to_id("told")]
        assert len(encode(tok, ["story " * 1000], max_len=16)[0]) == 16  # truncation


def test_numericalize_is_as_wide_as_the_longest_kept_text_across_chunks(monkeypatch):
    """Chunks of 2 texts: rows keep their order and ids; truncation and drops are counted;
    the array is as wide as the longest kept text, not max_len, and a longer dropped text
    (unknown label) does not widen it."""
    import rnnflow.data.pack as pack

    monkeypatch.setattr(pack, "CHUNK", 2)
    texts = ["a b", "a b c d e f g", "", "b", "a " * 40, "c a", "b b b b b b b b b b b b"]
    labels = ["x", "y", "x", "y", "zzz", "x", "y"]
    tok = build_tokenizer(texts, "word", lowercase=True, min_freq=1, max_vocab=100)
    arrays, stats = pack.numericalize(texts, labels, tok, ["x", "y"], max_len=10)
    kept = [0, 1, 3, 5, 6]  # "" gives no token; "zzz" is no class
    expected = [encode(tok, [texts[i]], 10)[0] for i in kept]
    assert arrays["tokens"].shape == (5, 10) and arrays["tokens"].dtype.name == "int32"
    assert arrays["lengths"].tolist() == [2, 7, 1, 2, 10]
    assert arrays["labels"].tolist() == [0, 1, 1, 0, 1]
    for row, ids in zip(arrays["tokens"], expected, strict=True):
        assert row[: len(ids)].tolist() == ids and (row[len(ids) :] == PAD_ID).all()
    assert (stats["dropped_empty"], stats["dropped_unknown_label"], stats["truncated"]) == (1, 1, 1)
    assert stats["tokens"] == 22 and stats["max_length"] == 10

    wide, wide_stats = pack.numericalize(texts[:5], labels[:5], tok, ["x", "y"], max_len=1000)
    assert wide["tokens"].shape == (3, 7) and wide_stats["truncated"] == 0  # not 40 wide
