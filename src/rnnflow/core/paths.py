"""Where every stage reads and writes, relative to the repository root (dvc.yaml mirrors these)."""

from pathlib import Path

PARAMS = Path("params.yaml")
RAW = Path("data/raw")
PREPARED = Path("data/prepared")
TOKENIZER_DIR = Path("data/tokenizer")
PACKED = Path("data/packed")
DATA_REPORTS = Path("data/reports")
MODELS = Path("models")
METRICS = Path("metrics")
REPORTS = Path("reports")

SPLITS = ("train", "val", "test")


def split_file(split: str) -> Path:
    """The prepared table of one split (JSON lines of {"text", "label"})."""
    return PREPARED / f"{split}.jsonl"


def checkpoint(variant: str) -> Path:
    """The best checkpoint of one variant."""
    return MODELS / variant / "checkpoint.pt"


def bundle_dir(variant: str) -> Path:
    """The exported, self-contained ONNX bundle of one variant."""
    return MODELS / variant


def metrics_file(kind: str, variant: str) -> Path:
    """A DVC metrics file: kind is train, eval, validate or timing."""
    return METRICS / kind / f"{variant}.json"


def confusion_plot(variant: str) -> Path:
    """The test-split confusion matrix of one variant (evaluate writes it, export logs it)."""
    return REPORTS / "confusion" / f"{variant}.png"
