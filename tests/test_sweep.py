"""`mlops-sweep`: search spaces, storage errors, and workers that share one Optuna study in a real PostgreSQL."""

import os
import signal
import subprocess
import time

import pytest

from mlops_basics.core.artifacts import read_metadata
from mlops_basics.devtools.test_utils import BIN, TINY_TRAIN, local_postgres, run_cli
from mlops_basics.training.sweep import ParamSpace, ParamType, SweepError, best_overrides, load_space, open_study, trials_table

TINY = [*TINY_TRAIN, "trainer.max_epochs=1", "trainer.limit_train_batches=2", "data.synthetic_negatives=0"]


@pytest.fixture(scope="module")
def postgres():
    "A PostgreSQL server of its own for this module (Debian's postgresql package; .ci/system-packages installs it)."
    with local_postgres() as url:
        yield url


def test_packaged_space_samples_known_settings():
    space = load_space("lr_warmup")
    assert space.n_trials == 12 and space.params["training.learning_rate"] == ParamSpace(ParamType.float, 1e-5, 2e-4, log=True)


def test_the_default_space_covers_the_fine_tuning_settings():
    "One config group: learning rate, layer decay, epochs and negatives ratio, pruned by the median of earlier trials."
    space = load_space("finetune")
    assert set(space.params) == {"training.learning_rate", "training.layer_decay", "trainer.max_epochs", "data.synthetic_negatives"}
    assert space.pruner["type"] == "MedianPruner" and space.grace_period > space.heartbeat_interval


@pytest.mark.parametrize(
    "yaml, message",
    [
        ("params:\n  training.lr: {type: float, low: 1.0e-5, high: 1.0e-4}\n", "training.lr: not a setting of mlops-train"),
        (
            "params:\n  training.seed: {type: integer, low: 1, high: 5}\n",
            "params.training.seed.type: Invalid value 'integer', expected one of [float, int, categorical]",
        ),
        ("params:\n  training.seed: {type: int, low: 5, high: 5}\n", "needs low < high, got 5.0, 5.0"),
        ("params:\n  training.seed: {type: int, low: 1.5, high: 5}\n", "int needs whole numbers, got 1.5, 5.0"),
        (
            "params:\n  training.seed: {low: 1, high: 5}\n",
            "params.training.seed.type: Structured config of type `ParamSpace` has missing mandatory value",
        ),
        (
            "n_trials: lots\nparams:\n  training.seed: {type: int, low: 1, high: 5}\n",
            "n_trials: Value 'lots' of type 'str' could not be converted to Integer",
        ),
        ("n_trials: -1\nparams:\n  training.seed: {type: int, low: 1, high: 5}\n", "n_trials must be a positive integer, got -1"),
        ("n_trials: 3\n", "params: the space samples nothing"),
        ("pruner: {type: Median}\nparams:\n  training.seed: {type: int, low: 1, high: 5}\n", "pruner type must be one of ["),
        ("pruner: {type: MedianPruner, startup: 1}\nparams:\n  training.seed: {type: int, low: 1, high: 5}\n", "pruner MedianPruner: "),
        (
            "heartbeat_interval: 10\ngrace_period: 5\nparams:\n  training.seed: {type: int, low: 1, high: 5}\n",
            "grace_period must be longer than heartbeat_interval",
        ),
        ("prune: {}\nparams:\n  training.seed: {type: int, low: 1, high: 5}\n", "prune: Key 'prune' not in 'SearchSpace'"),
    ],
)
def test_bad_space_is_a_clear_error(tmp_path, yaml, message):
    (tmp_path / "space.yaml").write_text(yaml)
    with pytest.raises(SweepError, match="invalid search space space.yaml") as e:
        load_space(tmp_path / "space.yaml")
    assert message in str(e.value)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--study", "s"], "give --storage (or set MLOPS_SWEEP_STORAGE)"),
        (
            ["--study", "s", "--storage", "postgresql+psycopg://mlops:hunter2@127.0.0.1:1/optuna"],
            "cannot open the study 's' in postgresql+psycopg://mlops:***@127.0.0.1:1/optuna: (psycopg.OperationalError) connection failed",
        ),
        (["--study", "s", "--storage", "not a url"], "not a database URL: 'not a url'"),
        (
            ["--study", "s", "--storage", "sqlite://", "--space", "grid"],
            "no search space 'grid': give a YAML file or one of ['finetune', 'lr_warmup']",
        ),
        (["--study", "s", "--storage", "sqlite://", "--trials", "0"], "--trials must be at least 1, got 0"),
    ],
)
def test_cli_errors_are_clear(tmp_path, args, message):
    proc = run_cli("mlops-sweep", *args, cwd=tmp_path, env={"MLOPS_SWEEP_STORAGE": ""})
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert "hunter2" not in proc.stderr and "Traceback" not in proc.stderr


def test_workers_open_one_study(postgres):
    "The first open creates the study, the next ones load it: a trial told through one handle is seen through the other."
    first, second = open_study(postgres, "shared"), open_study(postgres, "shared")
    trial = first.ask()
    first.tell(trial, 0.25)
    assert [t.value for t in second.trials] == [0.25] and second.best_value == 0.25


def sweep_worker(storage, study, trials, seed, root, space="lr_warmup", train=TINY) -> subprocess.Popen:
    "`mlops-sweep` as one worker of `study`, on the tiny model, in a process group of its own (a machine: the worker and its trial)."
    return subprocess.Popen(
        [
            str(BIN / "mlops-sweep"),
            "--storage",
            storage,
            "--study",
            study,
            "--trials",
            str(trials),
            "--seed",
            str(seed),
            "--space",
            str(space),
            "--root",
            str(root),
            "--",
            *train,
        ],
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


@pytest.mark.slow
def test_workers_share_the_study_and_its_budget(postgres, tmp_path):
    "Two workers started together fill a budget of 4 (one past it at most), each trial trained with the values the study recorded,\n    and a worker that joins later runs only what the budget has left."
    workers = [sweep_worker(postgres, "tiny", 4, seed, tmp_path) for seed in (1, 2)]
    outputs = [w.communicate(timeout=1200)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    study = open_study(postgres, "tiny")
    rows = trials_table(study)
    ran = [[int(l.split()[1][:-1]) for l in out.splitlines() if l.startswith("trial ")] for out in outputs]
    assert sorted(ran[0] + ran[1]) == [r["trial"] for r in rows]  # every trial ran once, on one worker
    assert 4 <= len(rows) <= 5 and {r["state"] for r in rows} == {"COMPLETE"}  # both may ask for the last trial at the same moment
    for r in rows:
        meta = read_metadata(tmp_path / "tiny" / f"trial-{r['trial']:04d}" / "model")
        assert meta["metrics"]["mcc"] == r["mcc"]
        assert meta["config"]["training"]["learning_rate"] == r["training.learning_rate"]
        assert meta["config"]["data"]["batch_size"] == r["data.batch_size"] and meta["config"]["model"]["backbone"] == "tiny-random-bert"
    late = sweep_worker(postgres, "tiny", len(rows) + 1, 3, tmp_path)
    out = late.communicate(timeout=600)[0]
    assert late.returncode == 0, out
    assert [l for l in out.splitlines() if l.startswith("trial ")] == [l for l in out.splitlines() if l.startswith(f"trial {len(rows)}:")] != []
    assert f"best of {len(rows) + 1} trials: MCC {study.best_value:.4f} with {' '.join(best_overrides(study))}" in out


@pytest.mark.slow
def test_failed_trials_are_recorded_and_the_sweep_says_so(postgres, tmp_path):
    "A trial whose mlops-train fails is marked failed with its error; with no complete trial the command exits 1."
    (tmp_path / "space.yaml").write_text("n_trials: 2\nparams:\n  training.patience: {type: categorical, choices: [0]}\n")
    proc = run_cli(
        "mlops-sweep",
        "--storage",
        postgres,
        "--study",
        "broken",
        "--space",
        tmp_path / "space.yaml",
        "--root",
        tmp_path,
        "--",
        *TINY,
        cwd=tmp_path,
        timeout=600,
    )
    assert proc.returncode == 1 and "no trial of 'broken' completed" in proc.stderr, proc.stderr[-2000:]
    study = open_study(postgres, "broken")
    assert [t.state.name for t in study.trials] == ["FAIL", "FAIL"]
    assert all("training.patience must be at least 1, got 0" in t.user_attrs["error"] for t in study.trials)
    with pytest.raises(SweepError, match="has no complete trial yet"):
        best_overrides(study)


@pytest.mark.slow
def test_pruned_trials_are_recorded_as_pruned(postgres, tmp_path):
    "mlops-train reports val_mcc to the study after every epoch; a trial the pruner stops exits early and is recorded as pruned."
    (tmp_path / "space.yaml").write_text(
        "n_trials: 2\npruner: {type: ThresholdPruner, lower: 0.9}\n"  # the tiny model never reaches 0.9
        "params:\n  training.learning_rate: {type: float, low: 1.0e-5, high: 1.0e-4, log: true}\n"
    )
    proc = run_cli(
        "mlops-sweep",
        "--storage",
        postgres,
        "--study",
        "pruned",
        "--space",
        tmp_path / "space.yaml",
        "--root",
        tmp_path,
        "--",
        *TINY,
        "trainer.max_epochs=3",
        cwd=tmp_path,
        timeout=600,
    )
    assert proc.returncode == 1 and "no trial of 'pruned' completed (2 pruned)" in proc.stderr, proc.stderr[-2000:]
    study = open_study(postgres, "pruned")
    assert [t.state.name for t in study.trials] == ["PRUNED", "PRUNED"]
    assert all(list(t.intermediate_values) == [0] for t in study.trials)  # stopped after the first of three epochs
    assert not any((tmp_path / f"trial-{n:04d}" / "model").exists() for n in (0, 1))


@pytest.mark.slow
def test_a_killed_workers_trial_is_marked_failed_not_lost(postgres, tmp_path):
    "A worker killed (with its trial's mlops-train) mid-trial stops its heartbeat; the next worker marks that trial failed and never reruns it."
    (tmp_path / "space.yaml").write_text(
        "n_trials: 1\nheartbeat_interval: 1\ngrace_period: 3\n"
        "params:\n  training.learning_rate: {type: float, low: 1.0e-5, high: 1.0e-4, log: true}\n"
    )
    long = [*TINY, "trainer.max_epochs=200", "trainer.limit_train_batches=1", "trainer.limit_val_batches=1"]
    worker = sweep_worker(postgres, "killed", 1, 1, tmp_path, tmp_path / "space.yaml", long)
    study = open_study(postgres, "killed")
    while not any(t.intermediate_values for t in study.get_trials()):
        time.sleep(0.5)  # mid-trial: epochs are being reported
    os.killpg(worker.pid, signal.SIGKILL)
    worker.communicate(timeout=60)
    (trial,) = study.get_trials()
    assert trial.state.name == "RUNNING"  # a dead worker cannot say so itself
    time.sleep(4 + 1)  # past the grace period: no heartbeat can come any more
    late = sweep_worker(postgres, "killed", 2, 2, tmp_path, tmp_path / "space.yaml")
    out = late.communicate(timeout=600)[0]
    assert late.returncode == 0, out
    assert f"trial 0: FAIL, its worker {trial.user_attrs['worker']} stopped sending heartbeats" in out
    rows = trials_table(study)
    assert [(r["trial"], r["state"]) for r in rows] == [(0, "FAIL"), (1, "COMPLETE")]  # the failed trial is not retried
    assert rows[0]["training.learning_rate"] != rows[1]["training.learning_rate"]
    assert best_overrides(study) == [f"training.learning_rate={rows[1]['training.learning_rate']}"]
