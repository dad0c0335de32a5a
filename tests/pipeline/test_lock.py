"""The committed dvc.lock tells the truth: on a fresh clone, `dvc status` reports only
outputs that are not there yet, never a dependency, parameter or command that changed since
the lock was written. Change a stage's code, dvc.yaml or params.yaml without refreshing the
lock (`make run`, then commit dvc.lock) and this fails."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

from ..conftest import REPO, run

# What a fresh clone lacks until the pipeline (or `dvc pull`) runs: the stages' outputs, and
# therefore the dependencies that are earlier stages' outputs.
MISSING = {"deleted", "not in cache"}


def fresh_clone(dest: Path) -> Path:
    """The project's tracked files as they are in the working tree, dvc.lock included."""
    files = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    run("git init -q && git add -A && git -c user.name=t -c user.email=t@t commit -qm x", dest)
    return dest


def test_a_fresh_clone_has_nothing_stale_in_its_lock(tmp_path):
    clone = fresh_clone(tmp_path / "clone")
    dvc = Path(sys.executable).parent / "dvc"
    status = json.loads(run(f"{dvc} status --json", clone).stdout)
    stale = {}
    for stage, changes in status.items():
        for change in changes:
            if isinstance(change, str):  # "changed command", "always changed"
                stale.setdefault(stage, []).append(change)
                continue
            for kind, entries in change.items():
                if kind == "changed deps" or kind == "changed outs":
                    bad = {p: s for p, s in entries.items() if str(s) not in MISSING}
                else:  # changed params, or anything else
                    bad = entries
                if bad:
                    stale.setdefault(stage, []).append({kind: bad})
    assert stale == {}, "dvc.lock is older than the pipeline: run `make run`, commit dvc.lock"
    stages = run(f"{dvc} stage list --name-only", clone).stdout.split()
    assert sorted(status) == sorted(stages)  # each stage: its outputs are not here yet
