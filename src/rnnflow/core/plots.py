"""Matplotlib without a display: make a figure, save it as PNG atomically."""

from pathlib import Path

from rnnflow.core.atomic import atomic_path


def subplots(*args, **kwargs):
    """plt.subplots on the Agg backend (imported on first use: it costs ~1 s)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def save(fig, path: Path, dpi: int = 90) -> None:
    """Write `fig` to `path` as PNG (temp file, then rename) and free it."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)
