"""The DVC stages' command lines (`python -m stages.NAME [VARIANT]`).

They run with the project's interpreter however `dvc` was invoked: when the `python` on PATH
is not the project's `.venv` (e.g. `.venv/bin/dvc repro` without activating the venv), the
stage re-executes itself with `.venv/bin/python`. They run the rnnflow of the checkout they
belong to (`src/` beside this folder), not whatever copy the interpreter has installed: a
queued or `--temp` DVC experiment runs in a temporary copy of the project, with the code it
was queued with, while the editable install points at the workspace. With neither the venv
nor the dependencies they stop with one line saying what to run. Then they hand themselves
to the warm stage server (rnnflow.stageserver), which has torch and MLflow imported already;
without one they run here, cold, and start it for the stages that follow.
"""

import importlib.util
import os
import sys
from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parents[1]
_SRC = str(_CHECKOUT / "src")


def _project_python() -> Path | None:
    """The project's venv interpreter: in this checkout, or in the DVC project that runs a
    temporary copy of it (a queued experiment's copy has no .venv; DVC_ROOT is the project)."""
    for root in (_CHECKOUT, Path(os.environ.get("DVC_ROOT") or _CHECKOUT)):
        python = root / ".venv" / "bin" / "python"
        if python.is_file() and os.access(python, os.X_OK):
            return python
    return None


def _in(python: Path) -> bool:
    return Path(sys.prefix).resolve() == python.parent.parent.resolve()


_python = _project_python()
if _python and not _in(_python) and not os.environ.get("RNNFLOW_STAGE_REEXEC"):
    os.environ["RNNFLOW_STAGE_REEXEC"] = "1"  # once: never loop between interpreters
    os.execv(_python, [str(_python), *sys.orig_argv[1:]])

if sys.path[:1] != [_SRC]:
    sys.path.insert(0, _SRC)

_missing = [m for m in ("torch", "mlflow", "dvc") if importlib.util.find_spec(m) is None]
if _missing:
    sys.exit(
        f"stages: {', '.join(_missing)} not importable by {sys.executable} and no project "
        f"venv at {_CHECKOUT / '.venv'}: run `make install` (it creates .venv), then rerun"
    )

if "-m" in sys.orig_argv[:-1]:  # `python -m stages.X`: run it in the warm stage server
    from rnnflow.runtime.stageserver import hand_over

    hand_over(sys.orig_argv[sys.orig_argv.index("-m") + 1])
