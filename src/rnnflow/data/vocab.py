"""Stage tokenize: fit the vocabulary on the train split only; save tokenizer and labels."""

from pathlib import Path

from rnnflow.core.atomic import atomic_path, read_json, write_json
from rnnflow.core.config import Params
from rnnflow.core.errors import RnnflowError
from rnnflow.core.paths import TOKENIZER_DIR, split_file
from rnnflow.data.prepare import read_split
from rnnflow.data.text import UNK_ID, build_tokenizer

CHUNK = 10_000  # texts encoded at a time


def labels_path(tokenizer_dir: Path = TOKENIZER_DIR) -> Path:
    """labels.json: the class names in index order."""
    return tokenizer_dir / "labels.json"


def load_labels(path: Path) -> list[str]:
    """Class names by index, from labels.json."""
    labels = read_json(path).get("labels")
    if not isinstance(labels, list) or len(labels) < 2:
        raise RnnflowError(f"{path}: expected {{'labels': [at least 2 names]}}")
    return labels


def fit_vocabulary(params: Params, out_dir: Path = TOKENIZER_DIR, train_file: Path | None = None):
    """Build the tokenizer from the train split and write tokenizer.json and labels.json."""
    texts, labels = read_split(train_file or split_file("train"))
    tok = build_tokenizer(
        texts,
        level=params.token_level,
        lowercase=params.tokenize.lowercase,
        min_freq=params.tokenize.min_freq,
        max_vocab=params.tokenize.max_vocab,
        marks=params.token_marks,
    )
    with atomic_path(out_dir / "tokenizer.json") as tmp:
        tok.save(str(tmp))
    classes = sorted(set(labels))
    write_json(labels_path(out_dir), {"labels": classes})
    n_tokens = unknown = 0
    for start in range(0, len(texts), CHUNK):  # a chunk at a time: flat memory
        for encoding in tok.encode_batch(texts[start : start + CHUNK], add_special_tokens=False):
            n_tokens += len(encoding.ids)
            unknown += encoding.ids.count(UNK_ID)
    report = {
        "level": params.token_level,
        "marks": params.token_marks,
        "vocab_size": tok.get_vocab_size(),
        "classes": len(classes),
        "train_tokens": n_tokens,
        "train_unk_rate": unknown / max(1, n_tokens),
    }
    write_json(out_dir / "vocab.json", report)
    return tok, report
