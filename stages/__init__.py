"""The DVC stages' command lines (`python -m stages.NAME [VARIANT]`).

They run the rnnflow of the checkout they belong to (`src/` beside this folder), not whatever
copy the interpreter has installed: a queued or `--temp` DVC experiment runs in a temporary
copy of the project, with the code it was queued with, while the editable install points at
the workspace. Outside the project's environment they stop with one line saying what to run.
"""

import importlib.util
import sys
from pathlib import Path

_SRC = str(Path(__file__).resolve().parents[1] / "src")
if sys.path[:1] != [_SRC]:
    sys.path.insert(0, _SRC)

_missing = [m for m in ("torch", "mlflow", "dvc") if importlib.util.find_spec(m) is None]
if _missing:
    sys.exit(
        f"stages: {', '.join(_missing)} not importable by {sys.executable}: run `make install`, "
        "then `source .venv/bin/activate` (or call .venv/bin/dvc) before dvc repro"
    )
