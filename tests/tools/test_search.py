"""The Optuna search: trials train with the pipeline's loop, report every epoch, are pruned,
are MLflow runs nested under the study's run, and the study is reproducible and resumable.
(Two processes on one PostgreSQL study: tests/pipeline/test_experiments.py.)"""

import json

import mlflow
import optuna
import pytest

from rnnflow.core.config import load_params
from rnnflow.core.errors import RnnflowError
from rnnflow.tools import search

from ..conftest import small_params, write_params


@pytest.fixture
def searchable(workspace):
    raw = small_params()
    raw["model"]["defaults"] |= {"embedding_dim": 16}
    write_params(workspace, raw)
    return workspace


def nested_runs(parent_id: str) -> list:
    return mlflow.search_runs(
        experiment_names=["rnnflow"],
        filter_string=f"tags.mlflow.parentRunId = '{parent_id}'",
        output_format="list",
    )


def test_a_study_records_every_trial_and_the_best(searchable, monkeypatch):
    monkeypatch.setattr(
        search, "SPACE", search.SPACE | {"model.defaults.hidden_size": ("categorical", [8, 16])}
    )
    storage = f"sqlite:///{searchable}/optuna.db"
    report = search.search("rnn", trials=5, timeout=300, epochs=2, storage=storage, study_name="s")
    assert len(report["trials"]) == 5 and sum(report["counts"].values()) == 5
    complete = [r for r in report["trials"] if r["state"] == "COMPLETE"]
    best = min(complete, key=lambda r: r["val_loss"])
    assert report["best"]["number"] == best["number"]
    assert report["best"]["options"] == best["options"]
    assert set(best["options"]) == set(search.SPACE)
    assert json.loads((searchable / "reports/search.json").read_text()) == report
    assert f"Best: trial {best['number']}" in (searchable / "reports/search.md").read_text()

    client = mlflow.MlflowClient()
    parent = client.get_run(report["mlflow_run_id"])
    assert parent.data.tags["rnnflow.kind"] == "search"
    assert parent.data.metrics["best_val_loss"] == pytest.approx(best["val_loss"])
    trials = {int(r.data.tags["optuna.trial"]): r for r in nested_runs(parent.info.run_id)}
    assert sorted(trials) == [r["number"] for r in report["trials"]]
    for row in report["trials"]:
        run = trials[row["number"]]
        assert run.data.tags["optuna.state"] == row["state"]
        assert run.data.params["model.defaults.pool"] == row["options"]["model.defaults.pool"]
        curve = client.get_metric_history(run.info.run_id, "val_loss")
        assert [m.step for m in curve] == list(range(1, len(curve) + 1))  # one per epoch
        assert curve[-1].value == pytest.approx(row["val_loss"]) or row["state"] == "COMPLETE"
        if row["state"] == "COMPLETE":
            assert min(m.value for m in curve) == pytest.approx(row["val_loss"])

    # the same study name continues the study; the same seed samples the same options
    again = search.search("rnn", trials=1, timeout=300, epochs=2, storage=storage, study_name="s")
    assert len(again["trials"]) == 6
    fresh = search.search("rnn", trials=1, timeout=300, epochs=2, storage=storage, study_name="t")
    assert fresh["trials"][0]["options"] == report["trials"][0]["options"]
    assert fresh["trials"][0]["val_loss"] == report["trials"][0]["val_loss"]  # reproducible

    command = search.experiment_command(report)
    assert command[:6] == ["dvc", "exp", "run", "--temp", "--name", "search-s"]
    assert command.count("-S") == len(search.SPACE)
    bidirectional = report["best"]["options"]["model.defaults.bidirectional"]
    assert f"model.defaults.bidirectional={str(bidirectional).lower()}" in command  # YAML


def test_a_pruned_trial_stops_early_and_says_so(searchable):
    class Always(optuna.pruners.BasePruner):
        def prune(self, study, trial) -> bool:
            return True

    base = json.loads(load_params().model_dump_json())
    study = optuna.create_study(direction="minimize", pruner=Always())
    with mlflow.start_run(run_name="parent") as parent:
        study.optimize(search.objective(base, "rnn", epochs=3), n_trials=1)
    (trial,) = study.trials
    assert trial.state == optuna.trial.TrialState.PRUNED and list(trial.intermediate_values) == [1]
    (run,) = nested_runs(parent.info.run_id)
    assert run.data.tags["optuna.state"] == "PRUNED"
    assert len(mlflow.MlflowClient().get_metric_history(run.info.run_id, "val_loss")) == 1


def test_the_search_refuses_what_it_cannot_run(searchable, capsys):
    with pytest.raises(SystemExit) as stopped:
        search.main(["--variant", "nosuch", "--no-experiment"])
    assert stopped.value.code == 2
    assert "model.variants has no variant 'nosuch'" in capsys.readouterr().err
    (searchable / "data/packed/train.npz").unlink()
    with pytest.raises(SystemExit):
        search.main(["--no-experiment"])
    assert capsys.readouterr().err.strip() == (
        "search: error: data/packed/train.npz: missing; `dvc repro pack` writes it"
    )


def test_a_study_from_another_search_space_is_refused_before_training(searchable, monkeypatch):
    """Continuing a study whose trials sampled an option from other choices would fail in
    Optuna mid-run; the search refuses it first, naming the study, the option and both."""
    storage = f"sqlite:///{searchable}/optuna.db"
    old = {"model.defaults.pool": ("categorical", ["last", "mean", "max"])}
    monkeypatch.setattr(search, "SPACE", old)
    study = optuna.create_study(study_name="s", storage=storage)
    study.add_trial(
        optuna.trial.create_trial(
            params={"model.defaults.pool": "max"},
            distributions={"model.defaults.pool": search.distribution("model.defaults.pool")},
            value=1.0,
        )
    )
    monkeypatch.setattr(search, "SPACE", old | {"train.lr": ("log", 5e-4, 1e-2)})
    search.check_space(study, "sqlite")  # an added option is fine
    monkeypatch.setattr(search, "SPACE", {"model.defaults.pool": ("categorical", ["last", "max"])})
    with pytest.raises(RnnflowError) as err:
        search.search("rnn", trials=1, timeout=60, epochs=1, storage=storage, study_name="s")
    assert str(err.value).startswith(
        "study 's' (--storage): its trial 0 sampled model.defaults.pool from "
        "CategoricalDistribution(choices=('last', 'mean', 'max')), the search space now gives "
        "CategoricalDistribution(choices=('last', 'max')); start a new study (--study NAME)"
    )
    assert not (searchable / "reports/search.json").exists()


@pytest.mark.parametrize(("epochs", "first_pruned_epoch"), [(2, 2), (6, 2), (15, 5), (30, 10)])
def test_the_pruner_waits_a_third_of_the_epochs(epochs, first_pruned_epoch):
    """A trial far worse than three finished ones is pruned from max(2, epochs // 3) on."""
    study = optuna.create_study(direction="minimize", pruner=search.median_pruner(epochs))
    for _ in range(3):
        done = study.ask()
        for epoch in range(1, epochs + 1):
            done.report(1.0, epoch)
        study.tell(done, 1.0)
    trial = study.ask()
    pruned_at = None
    for epoch in range(1, epochs + 1):
        trial.report(9.0, epoch)
        if trial.should_prune():
            pruned_at = epoch
            break
    assert pruned_at == first_pruned_epoch
