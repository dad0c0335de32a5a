"""Tokenization and vocabulary with Hugging Face `tokenizers` (torch-free: predict uses it too)."""

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

from rnnflow.core.errors import RnnflowError

PAD, UNK = "<pad>", "<unk>"
PAD_ID, UNK_ID = 0, 1
# Before tokenizing, a text is cut to this many characters per allowed token, so a 10 MB line
# costs no more than a normal one. Word level keeps a wide margin for long words.
CHARS_PER_TOKEN = {"char": 2, "word": 64}


def build_tokenizer(
    texts: Iterable[str],
    level: Literal["char", "word"],
    lowercase: bool,
    min_freq: int,
    max_vocab: int,
) -> Tokenizer:
    """Fit a vocabulary on `texts`: `<pad>` is id 0, `<unk>` id 1, then tokens by frequency."""
    steps = [normalizers.NFC()] + ([normalizers.Lowercase()] if lowercase else [])
    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.normalizer = normalizers.Sequence(steps)
    if level == "char":
        tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    else:
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(
        vocab_size=max_vocab, min_frequency=min_freq, special_tokens=[PAD, UNK], show_progress=False
    )
    tok.train_from_iterator(texts, trainer=trainer)
    assert tok.token_to_id(PAD) == PAD_ID and tok.token_to_id(UNK) == UNK_ID
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a saved tokenizer.json, with an error that names the file."""
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises plain Exception subclasses
        raise RnnflowError(f"{path}: cannot load tokenizer ({err})") from err


def level_of(tok: Tokenizer) -> Literal["char", "word"]:
    """Whether a tokenizer built here splits into characters or words."""
    return "char" if isinstance(tok.pre_tokenizer, pre_tokenizers.Split) else "word"


def encode(tok: Tokenizer, texts: Sequence[str], max_len: int) -> list[list[int]]:
    """Token ids of each text, truncated to max_len."""
    limit = max_len * CHARS_PER_TOKEN[level_of(tok)]
    encodings = tok.encode_batch([t[:limit] for t in texts], add_special_tokens=False)
    return [e.ids[:max_len] for e in encodings]


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
