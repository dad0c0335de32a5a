"""Every option of every command the project documents, fed its edge values (0, negative,
empty, huge, the wrong type): each either works or stops with exactly one line on stderr,
naming the option and the value, and exit code 2 - never a traceback, never silence.

Commands: `rnnflow predict`, the stages (`python3 -m stages.X`), the `python -m rnnflow.*`
tools, and the Makefile variables the README and the manual show."""

import json
import os
import subprocess
import sys

import pytest

from rnnflow.analysis import longrange
from rnnflow.runtime import stageserver
from rnnflow.shipping import cli
from rnnflow.tools import bench, demo, gpucheck, loadtest, profile, scaling
from rnnflow.tracking import server

from .conftest import REPO

WHOLE = "expected a whole number >= 1"
PORT = "expected a port number 1-65535"
PREDICT = ["predict", "--model", "models/gru"]

# (entry point, argv, the one line it must print)
REFUSED = [
    (cli.main, [*PREDICT, "--batch-size", "0", "x"], f"--batch-size: {WHOLE}, got '0'"),
    (cli.main, [*PREDICT, "--batch-size", "-3", "x"], f"--batch-size: {WHOLE}, got '-3'"),
    (cli.main, [*PREDICT, "--batch-size", "", "x"], f"--batch-size: {WHOLE}, got ''"),
    (cli.main, [*PREDICT, "--batch-size", "1e3", "x"], f"--batch-size: {WHOLE}, got '1e3'"),
    (cli.main, [*PREDICT, "--top-k", "-1", "x"], "--top-k: expected a whole number >= 0"),
    (cli.main, [*PREDICT, "--top-k", "two", "x"], "--top-k: expected a whole number >= 0"),
    (cli.main, [*PREDICT, "--field", "", "x"], "--field: expected a non-empty value"),
    (cli.main, [*PREDICT, "--input", " "], "--input: expected a non-empty value"),
    (cli.main, ["predict", "--model", "", "x"], "--model: expected a non-empty value"),
    (cli.main, ["predict", "x"], "the following arguments are required: --model"),
    (cli.main, ["predcit"], "invalid choice: 'predcit'"),
    (bench.main, ["--out", ""], "--out: expected a non-empty value"),
    (bench.main, ["--sections", ""], "--sections: expected some of "),
    (bench.main, ["--sections", "speed"], "--sections: expected some of "),
    (bench.main, ["--sizes", "0", "--sections", "size"], "--sizes: expected texts per corpus"),
    (bench.main, ["--sizes", "ten", "--sections", "size"], "--sizes: expected texts per corpus"),
    (gpucheck.main, ["--budget", "0"], "--budget: expected seconds in (0, 86400], got 0"),
    (gpucheck.main, ["--budget", "-5"], "--budget: expected seconds in (0, 86400], got -5"),
    (gpucheck.main, ["--budget", "1e9"], "--budget: expected seconds in (0, 86400], got 1e+09"),
    (gpucheck.main, ["--budget", "nan"], "--budget: expected seconds in (0, 86400], got nan"),
    (gpucheck.main, ["--budget", "soon"], "argument --budget: invalid float value: 'soon'"),
    (gpucheck.main, ["--out", ""], "--out: expected a non-empty value"),
    (gpucheck.main, ["--skip", "device"], "--skip: expected step names from data,pipeline,"),
    (gpucheck.main, ["--skip", "bench,gpu"], "got 'bench,gpu'"),
    (gpucheck.main, ["--skip", ","], "--skip: expected step names from "),
    (gpucheck.main, ["--keep", "src"], f"--keep: {REPO / 'src'} already exists (give a new"),
    (loadtest.main, ["--seconds", "0"], "--seconds: expected a number > 0, got '0'"),
    (loadtest.main, ["--seconds", "-1"], "--seconds: expected a number > 0, got '-1'"),
    (loadtest.main, ["--seconds", "nan"], "--seconds: expected a number > 0, got 'nan'"),
    (loadtest.main, ["--seconds", "1e9"], "--seconds: expected at most 3600 seconds"),
    (loadtest.main, ["--clients", ""], "--clients: expected client counts 1-256"),
    (loadtest.main, ["--clients", "8,0"], "--clients: expected client counts 1-256"),
    (loadtest.main, ["--clients", "8,x"], "--clients: expected client counts 1-256"),
    (loadtest.main, ["--clients", "100000"], "--clients: expected client counts 1-256"),
    (loadtest.main, ["--model-uri", ""], "--model-uri: expected a non-empty value"),
    (loadtest.main, ["--out", ""], "--out: expected a non-empty value"),
    (profile.main, ["--modes", ""], "--modes: expected cold and/or warm, got ''"),
    (profile.main, ["--modes", "hot"], "--modes: expected cold and/or warm, got 'hot'"),
    (scaling.main, ["--processes", "0"], "--processes: expected a whole number 1-64, got '0'"),
    (scaling.main, ["--processes", "-2"], "--processes: expected a whole number 1-64"),
    (scaling.main, ["--processes", "999"], "--processes: expected a whole number 1-64"),
    (scaling.main, ["--processes", "two"], "--processes: expected a whole number 1-64"),
    (scaling.main, ["--steps", "0"], "--steps: expected a whole number 1-100000, got '0'"),
    (scaling.main, ["--rounds", "-1"], "--rounds: expected a whole number 1-1000, got '-1'"),
    (scaling.main, ["--batch-size", "0"], "--batch-size: expected a whole number 1-65536"),
    (scaling.main, ["--variants", "nosuch"], "model.variants has no variant 'nosuch'"),
    (server.main, [""], "argument action: invalid choice: ''"),
    (server.main, ["restart"], "argument action: invalid choice: 'restart'"),
    (server.main, ["status", "--port", "0"], f"--port: {PORT}, got '0'"),
    (server.main, ["status", "--port", "70000"], f"--port: {PORT}, got '70000'"),
    (server.main, ["status", "--pg-port", "x"], f"--pg-port: {PORT}, got 'x'"),
    (server.main, ["status", "--dir", ""], "--dir: expected a non-empty value"),
    (demo.main, ["--port", "-1"], "--port: expected a port number 0-65535"),
    (demo.main, ["--port", "65536"], "--port: expected a port number 0-65535"),
    (demo.main, ["--port", "http"], "--port: expected a port number 0-65535"),
    (demo.main, ["--bundle", "nowhere", "--build-only"], "nowhere: not a model bundle"),
    (longrange.main, ["--wait"], "unrecognized arguments: --wait"),
]


@pytest.mark.parametrize(
    ("main", "argv", "message"),
    REFUSED,
    ids=[f"{m.__module__.split('.')[-1]} {' '.join(a)!r}" for m, a, _ in REFUSED],
)
def test_a_bad_option_gives_one_line_and_exit_2(main, argv, message, capsys, monkeypatch):
    monkeypatch.chdir(REPO)  # params.yaml for the tools that read it
    monkeypatch.setattr(sys, "argv", ["prog", *argv])  # run_cli looks for --debug there
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    out, err = capsys.readouterr()
    assert stopped.value.code == 2
    assert out == "" and len(err.strip().splitlines()) == 1, err
    assert ": error: " in err and message in err, err


def test_the_team_server_refuses_a_bad_port_from_its_environment(capsys, monkeypatch):
    monkeypatch.setenv("RNNFLOW_SERVER_PORT", "five thousand")
    with pytest.raises(SystemExit) as stopped:
        server.main(["status"])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "python -m rnnflow.tracking.server: error: argument --port: "
        "expected a port number 1-65535, got 'five thousand'"
    )


def test_the_stage_server_command_refuses_anything_else(capsys):
    for argv in (["restart"], ["stop", "now"]):
        assert stageserver.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("python -m rnnflow.runtime.stageserver: error: expected status")
        assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["stages.prepare", "--fast"], "stages.prepare: error: unrecognized arguments: --fast"),
        (["stages.train"], "stages.train: error: the following arguments are required: variant"),
        (["stages.train", "gru", "lstm"], "stages.train: error: unrecognized arguments: lstm"),
        (
            ["stages.train", ""],
            "train: error: params.yaml: model.variants has no variant '' (listed: rnn, ",
        ),
    ],
)
def test_a_stage_takes_only_its_variant(argv, message, tmp_path):
    """A stage refuses what it does not read before it touches anything."""
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    env = os.environ | {"PYTHONPATH": str(REPO), "RNNFLOW_STAGE_SERVER": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", *argv], cwd=tmp_path, capture_output=True, text=True, env=env
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().startswith(message), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # nothing written


def make_dry_run(target: str, variable: str, value: str) -> subprocess.CompletedProcess:
    """`make -n TARGET VARIABLE=VALUE`: expands the recipe (where the check is), runs nothing."""
    return subprocess.run(
        ["make", "-n", target, f"{variable}={value}"], cwd=REPO, capture_output=True, text=True
    )


@pytest.mark.parametrize(
    ("target", "variable", "value", "what"),
    [
        ("serve", "SERVE_PORT", "0", "a port 1-65535"),
        ("serve", "SERVE_PORT", "http", "a port 1-65535"),
        ("serve", "SERVE_PORT", "99999", "a port 1-65535"),
        ("serve", "SERVE_PORT", "", "a port 1-65535"),
        ("demo", "DEMO_PORT", "-8000", "a port 1-65535"),
        ("demo", "DEMO_PORT", "80'80", "a port 1-65535"),
        ("loadtest", "LOADTEST_SECONDS", "0", "a number of seconds above 0 and up to 3600"),
        ("loadtest", "LOADTEST_SECONDS", "-9", "a number of seconds above 0 and up to 3600"),
        ("loadtest", "LOADTEST_SECONDS", "1e9", "a number of seconds above 0 and up to 3600"),
        ("loadtest", "LOADTEST_SECONDS", "a minute", "a number of seconds above 0 and up to 3600"),
        ("bench-ddp", "BENCH_PROCESSES", "0", "a whole number 1-64"),
        ("bench-ddp", "BENCH_PROCESSES", "1000", "a whole number 1-64"),
    ],
)
def test_a_bad_make_variable_stops_make_with_one_line(target, variable, value, what):
    proc = make_dry_run(target, variable, value)
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith(f"*** {variable}={value}: expected {what}.  Stop.")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.parametrize(
    ("target", "variable", "value", "passed"),
    [
        ("serve", "SERVE_PORT", "8001", "--port 8001"),
        ("demo", "DEMO_PORT", "8002", "--port 8002"),
        ("loadtest", "LOADTEST_SECONDS", "1.5", "--seconds 1.5"),
        ("bench-ddp", "BENCH_PROCESSES", "3", "--processes 3"),
    ],
)
def test_a_good_make_variable_reaches_its_program(target, variable, value, passed):
    proc = make_dry_run(target, variable, value)
    assert proc.returncode == 0, proc.stderr
    assert passed in proc.stdout


def test_predict_edge_values_that_work(tmp_path, workspace, shipped):  # noqa: F811
    """Huge batch sizes and top-k work (one batch, every class); top-k 0 means every class;
    an empty input file, texts given twice, or an empty text are refused in one line."""
    cmd = [sys.executable, "-m", "rnnflow.shipping.cli", "predict", "--model", "models/lstm"]

    def predict(*args, stdin=""):
        return subprocess.run([*cmd, *args], input=stdin, capture_output=True, text=True)

    classes = len(json.loads((workspace / "models/lstm/labels.json").read_text())["labels"])
    for args, shown in (
        (["--batch-size", str(10**12)], classes),
        (["--batch-size", "1"], classes),
        (["--top-k", "0"], classes),
        (["--top-k", str(10**9)], classes),
        (["--top-k", "1"], 1),
    ):
        out = predict(*args, "Tremblay", "Okafor")
        assert out.returncode == 0, out.stderr
        rows = [json.loads(line) for line in out.stdout.splitlines()]
        assert [r["text"] for r in rows] == ["Tremblay", "Okafor"]
        assert all(len(r["probabilities"]) == shown for r in rows)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    for args, stdin, message in (
        (["--input", str(tmp_path / "empty.jsonl")], "", f"{tmp_path}/empty.jsonl: no texts"),
        (["--input", "-"], "", "stdin: no texts to classify"),
        (["--input", "-", "Okafor"], "", "give texts as arguments or --input, not both"),
        ([""], "", "text #1 is empty; nothing to classify"),
    ):
        out = predict(*args, stdin=stdin)
        assert out.returncode == 2 and out.stdout == ""
        assert out.stderr.startswith("rnnflow: error: ") and message in out.stderr, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1


from .shipping.test_export import shipped  # noqa: E402, F401 - the fixture: two variants shipped
