"""Where labelled text comes from: the builtin surnames, a user's file, or a public benchmark."""

import csv
import importlib
import io
import json
import math
import random
import tarfile
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from rnnflow.core.config import DataParams
from rnnflow.core.errors import RnnflowError
from rnnflow.data.download import RemoteFile, fetch


@dataclass
class RawTable:
    """Labelled texts read from a source, with counts of the rows dropped while reading."""

    texts: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)
    origin: str = ""

    def add(self, text: object, label: object) -> None:
        """Keep a row if it is usable, else count why it was dropped."""
        if not isinstance(text, str):
            self.dropped["missing_text"] += 1
        elif _has_bad_bytes(text) or (isinstance(label, str) and _has_bad_bytes(label)):
            self.dropped["bad_encoding"] += 1
        elif not text.strip():
            self.dropped["empty_text"] += 1
        elif _missing(label):
            self.dropped["missing_label"] += 1
        else:
            self.texts.append(unicodedata.normalize("NFC", text.strip()))
            self.labels.append(unicodedata.normalize("NFC", str(label).strip()))


def _missing(label: object) -> bool:
    if label is None or (isinstance(label, float) and math.isnan(label)):
        return True
    return isinstance(label, str) and label.strip().lower() in ("", "nan", "none", "null")


def _has_bad_bytes(text: str) -> bool:
    # Files are decoded with surrogateescape: undecodable bytes become lone surrogates.
    return any("\udc80" <= ch <= "\udcff" for ch in text)


# --- builtin: surname -> language of origin, from the per-locale lists that faker ships ----------

SURNAME_LANGUAGES: dict[str, tuple[str, ...]] = {
    "English": ("en", "en_US", "en_GB", "en_NZ"),
    "Irish": ("ga_IE", "en_IE"),
    "German": ("de_DE", "de_AT", "de_CH", "de_LI", "de_LU"),
    "French": ("fr_FR", "fr_BE", "fr_CA", "fr_CH", "fr_QC"),
    "Spanish": ("es_ES", "es_CA", "es_MX", "es_AR", "es_CL", "es_CO"),
    "Italian": ("it_IT",),
    "Dutch": ("nl_NL", "nl_BE"),
    "Czech": ("cs_CZ",),
    "Slovak": ("sk_SK",),
    "Croatian": ("hr_HR",),
    "Finnish": ("fi_FI",),
    "Estonian": ("et_EE",),
    "Scandinavian": ("sv_SE", "no_NO", "da_DK"),
    "Portuguese": ("pt_BR", "pt_PT"),
    "Zulu": ("zu_ZA",),
}


def _locale_surnames(locale: str) -> list[str]:
    provider = importlib.import_module(f"faker.providers.person.{locale}").Provider
    names = provider.last_names
    return list(names.keys() if isinstance(names, dict) else names)


def load_builtin() -> RawTable:
    """Surnames labelled with a language; a name listed under several languages keeps the one
    whose locales list it most often (ties are dropped later as conflicting labels)."""
    import faker

    table = RawTable(origin=f"faker {faker.VERSION} person.last_names")
    for language, locales in SURNAME_LANGUAGES.items():
        for locale in locales:
            for name in _locale_surnames(locale):
                table.add(name, language)
    return table


# --- a user's file ------------------------------------------------------------------------------


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError as err:
        raise RnnflowError(f"{path}: file not found (set data.path in params.yaml)") from err
    except IsADirectoryError as err:
        raise RnnflowError(f"{path}: is a directory, expected a file") from err
    except PermissionError as err:
        raise RnnflowError(f"{path}: permission denied") from err
    if not raw.strip():
        raise RnnflowError(f"{path}: file is empty")
    return raw.decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")


def _csv_rows(path: Path, reader) -> Iterable:
    """Rows of a csv reader; a malformed file is an error naming the line."""
    csv.field_size_limit(2**31 - 1)  # long texts are truncated later, not refused here
    try:
        yield from reader
    except csv.Error as err:
        raise RnnflowError(f"{path}: line {reader.line_num}: malformed ({err})") from err


def read_delimited(path: Path, delimiter: str, text_col: str, label_col: str) -> RawTable:
    """Read a CSV/TSV file with a header row naming the text and label columns."""
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""), delimiter=delimiter)
    header = reader.fieldnames or []
    missing = [c for c in (text_col, label_col) if c not in header]
    if missing:
        hint = ""
        if len(header) == 1 and any(d in header[0] for d in ",\t;|"):
            hint = f"; the header is one field - is the delimiter {delimiter!r} right?"
        raise RnnflowError(
            f"{path}: missing column(s) {', '.join(map(repr, missing))} (header has {header}){hint}"
        )
    table = RawTable(origin=str(path))
    for row in _csv_rows(path, reader):
        table.add(row.get(text_col), row.get(label_col))
    if not table.texts and not table.dropped:
        raise RnnflowError(f"{path}: has a header but no data rows")
    return table


def read_jsonl(path: Path, text_col: str, label_col: str) -> RawTable:
    """Read JSON lines, one object per line with the text and label fields."""
    table = RawTable(origin=str(path))
    for line in _read_text(path).splitlines():
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            table.dropped["invalid_json"] += 1
            continue
        if not isinstance(obj, dict):
            table.dropped["invalid_json"] += 1
            continue
        table.add(obj.get(text_col), obj.get(label_col))
    if table.texts == [] and set(table.dropped) == {"missing_text"}:
        raise RnnflowError(f"{path}: no line has the text field '{text_col}'")
    return table


# --- public benchmarks --------------------------------------------------------------------------

AG_NEWS_CLASSES = {"1": "World", "2": "Sports", "3": "Business", "4": "Sci/Tech"}
AG_NEWS_BASE = "https://raw.githubusercontent.com/mhjabreel/CharCnn_Keras/master/data/ag_news_csv"


@dataclass(frozen=True)
class Benchmark:
    """A public dataset: its files and how to turn them into a table."""

    files: tuple[RemoteFile, ...]
    parse: Callable[[list[Path]], RawTable]


def _parse_ag_news(paths: list[Path]) -> RawTable:
    table = RawTable(origin="AG News (Zhang et al. 2015)")
    for path in paths:
        for row in _csv_rows(path, csv.reader(io.StringIO(_read_text(path), newline=""))):
            if len(row) != 3:
                table.dropped["malformed_row"] += 1
                continue
            label, title, body = row
            text = f"{title}. {body}".replace("\\n", " ").replace("\\", " ")
            table.add(text, AG_NEWS_CLASSES.get(label.strip()))
    return table


def _parse_imdb(paths: list[Path]) -> RawTable:
    table = RawTable(origin="IMDB large movie review dataset (Maas et al. 2011)")
    with tarfile.open(paths[0], "r:gz") as tar:
        for member in tar:
            parts = member.name.split("/")
            if not member.isfile() or len(parts) != 4 or parts[2] not in ("pos", "neg"):
                continue
            if parts[1] not in ("train", "test") or not parts[3].endswith(".txt"):
                continue
            raw = tar.extractfile(member).read().decode("utf-8", errors="surrogateescape")
            table.add(raw.replace("<br />", " "), parts[2])
    return table


BENCHMARKS: dict[str, Benchmark] = {
    "ag_news": Benchmark(
        files=(
            RemoteFile(
                f"{AG_NEWS_BASE}/train.csv",
                "76a0a2d2f92b286371fe4d4044640910a04a803fdd2538e0f3f29a5c6f6b672e",
                "ag_news_train.csv",
            ),
            RemoteFile(
                f"{AG_NEWS_BASE}/test.csv",
                "521465c2428ed7f02f8d6db6ffdd4b5447c1c701962353eb2c40d548c3c85699",
                "ag_news_test.csv",
            ),
        ),
        parse=_parse_ag_news,
    ),
    "imdb": Benchmark(
        files=(
            RemoteFile(
                "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz",
                "c40f74a18d3b61f90feba1e17730e0d38e8b97c05fde7008942e91923d1658fe",
                "aclImdb_v1.tar.gz",
            ),
        ),
        parse=_parse_imdb,
    ),
}


def load_benchmark(name: str, cache_dir: Path, benchmarks: dict[str, Benchmark] = BENCHMARKS):
    """Download (once, verified) and parse a public benchmark."""
    bench = benchmarks[name]
    return bench.parse([fetch(remote, cache_dir) for remote in bench.files])


# --- longrange: a synthetic memory test ---------------------------------------------------------

LONGRANGE_SIGNALS = "abcd"  # the first character: it alone decides the class
LONGRANGE_NOISE = "efghijklmnopqrstuvwxyz"  # every later character: uniform, independent of it


def load_longrange(length: int, size: int, seed: int) -> RawTable:
    """`size` texts of exactly `length` characters, classes balanced. The first character is
    the class (`class_a` .. `class_d`); the other length-1 are noise drawn independently of
    it, so a model reading left to right must carry the first character across length-1
    steps, and chance is 1/4."""
    rng = random.Random(f"longrange:{seed}:{length}:{size}")
    table = RawTable(origin=f"longrange (length {length}, size {size}, seed {seed})")
    for i in range(size):
        signal = LONGRANGE_SIGNALS[i % len(LONGRANGE_SIGNALS)]
        noise = "".join(rng.choices(LONGRANGE_NOISE, k=length - 1))
        table.add(signal + noise, f"class_{signal}")
    return table


def load_source(data: DataParams, raw_dir: Path, seed: int = 42) -> RawTable:
    """Read the labelled text that params.yaml's `data` section points at."""
    if data.source == "builtin":
        return load_builtin()
    if data.source == "longrange":
        return load_longrange(data.length, data.size, seed)
    if data.source in BENCHMARKS:
        return load_benchmark(data.source, raw_dir)
    path = Path(data.path)
    if data.source == "jsonl":
        return read_jsonl(path, data.text_column, data.label_column)
    delimiter = "," if data.source == "csv" else "\t"
    return read_delimited(path, delimiter, data.text_column, data.label_column)


def iter_rows(table: RawTable) -> Iterable[tuple[str, str]]:
    """(text, label) pairs of a table."""
    return zip(table.texts, table.labels, strict=True)
