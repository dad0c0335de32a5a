"""Tokenization and vocabulary with Hugging Face `tokenizers` (torch-free: predict uses it too).

Levels: `char` and `word` (a WordLevel vocabulary of characters or whitespace/punctuation
words), and the subword levels `bpe` and `wordpiece` (trained by `tokenizers` on the train
split: words split into frequent pieces, so a rare or unseen word still gets known pieces
instead of `<unk>`). `<pad>` is id 0 and `<unk>` id 1 at every level. With `marks`, every
text is wrapped in `<s>` (id 2) and `</s>` (id 3) by the tokenizer's own post-processor
(saved in tokenizer.json, so every reader of the bundle adds them too): a model that pools
over the steps then sees where a text starts and ends."""

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

from rnnflow.core.errors import RnnflowError

PAD, UNK, START, END = "<pad>", "<unk>", "<s>", "</s>"
PAD_ID, UNK_ID, START_ID, END_ID = 0, 1, 2, 3
Level = Literal["char", "word", "bpe", "wordpiece"]
# Before tokenizing, a text is cut to this many characters per allowed token, so a 10 MB line
# costs no more than a normal one. Word and subword levels keep a wide margin for long words.
CHARS_PER_TOKEN = {"char": 2, "word": 64, "bpe": 64, "wordpiece": 64}
WORDPIECE_PREFIX = "##"


def build_tokenizer(
    texts: Iterable[str],
    level: Level,
    lowercase: bool,
    min_freq: int,
    max_vocab: int,
    marks: bool = False,
) -> Tokenizer:
    """Fit a vocabulary on `texts`: `<pad>` is id 0, `<unk>` id 1, with `marks` `<s>` id 2
    and `</s>` id 3, then tokens (or, for the subword levels, merges / pieces) by frequency,
    at most max_vocab in all."""
    steps = [normalizers.NFC()] + ([normalizers.Lowercase()] if lowercase else [])
    options = {"vocab_size": max_vocab, "min_frequency": min_freq, "show_progress": False}
    options["special_tokens"] = [PAD, UNK] + ([START, END] if marks else [])
    if level == "bpe":
        tok = Tokenizer(models.BPE(unk_token=UNK))
        trainer = trainers.BpeTrainer(**options)
    elif level == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token=UNK, continuing_subword_prefix=WORDPIECE_PREFIX))
        trainer = trainers.WordPieceTrainer(**options, continuing_subword_prefix=WORDPIECE_PREFIX)
    else:
        tok = Tokenizer(models.WordLevel(unk_token=UNK))
        trainer = trainers.WordLevelTrainer(**options)
    tok.normalizer = normalizers.Sequence(steps)
    if level == "char":
        tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    else:
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainer=trainer)
    assert tok.token_to_id(PAD) == PAD_ID and tok.token_to_id(UNK) == UNK_ID
    if marks:
        assert tok.token_to_id(START) == START_ID and tok.token_to_id(END) == END_ID
        tok.post_processor = processors.TemplateProcessing(
            single=f"{START} $A {END}", special_tokens=[(START, START_ID), (END, END_ID)]
        )
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a saved tokenizer.json, with an error that names the file."""
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises plain Exception subclasses
        raise RnnflowError(f"{path}: cannot load tokenizer ({err})") from err


def level_of(tok: Tokenizer) -> Level:
    """Which of the levels a tokenizer built here splits at."""
    if isinstance(tok.model, models.BPE):
        return "bpe"
    if isinstance(tok.model, models.WordPiece):
        return "wordpiece"
    return "char" if isinstance(tok.pre_tokenizer, pre_tokenizers.Split) else "word"


def encode(tok: Tokenizer, texts: Sequence[str], max_len: int) -> list[list[int]]:
    """Token ids of each text (with the start and end marks if the tokenizer has them),
    truncated to max_len: a text cut short loses its end mark, as it lost its end."""
    limit = max_len * CHARS_PER_TOKEN[level_of(tok)]
    encodings = tok.encode_batch([t[:limit] for t in texts], add_special_tokens=True)
    return [e.ids[:max_len] for e in encodings]


def own_ids(tok: Tokenizer, ids: list[int]) -> list[int]:
    """A text's own token ids: `ids` from `encode` without the start and end marks."""
    if tok.post_processor is None:
        return ids
    return ids[1:-1] if ids[-1:] == [END_ID] else ids[1:]  # a cut text has lost its end mark


def pad_batch(ids: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad id lists with PAD_ID to the longest; return (tokens [B, T], lengths [B])."""
    lengths = np.array([len(x) for x in ids], dtype=np.int64)
    tokens = np.full((len(ids), max(1, int(lengths.max(initial=0)))), PAD_ID, dtype=np.int64)
    for row, seq in enumerate(ids):
        tokens[row, : len(seq)] = seq
    return tokens, lengths


def file_hash(path: str | Path) -> str:
    """Short sha256 of a file: identifies a vocabulary or a dataset version."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
