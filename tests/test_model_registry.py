"""The model registry (the registry page) on a real MLflow server and PostgreSQL: versions, aliases, fetch by alias, restarts, the UI; the model card (the model-card page)."""

import json
import re
import shutil
from pathlib import Path

import pytest

from mlops_basics.devtools.test_utils import free_port, local_postgres, run_cli, tiny_reports
from mlops_basics.ops.models.card import CardError, write_card
from mlops_basics.ops.models.registry import (
    CHAMPION,
    MODEL_NAME,
    RegistryError,
    alias_version,
    fetch_model,
    promote,
    register_serving,
    registry_client,
    registry_server,
    release_challenger,
    rollback,
    set_challenger,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def database():
    with local_postgres("mlflow") as url:
        yield url


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tmp_path_factory.mktemp("mlartifacts")


@pytest.fixture(scope="module")
def registry(database, store, mlflow_server_bin, tmp_path_factory):
    "An MLflow server on PostgreSQL; yields its URL."
    with registry_server(database, store, free_port(), tmp_path_factory.mktemp("mlflow") / "server.log", mlflow_server_bin) as url:
        yield url


@pytest.fixture(scope="module")
def versions(serving_dir, tmp_path_factory):
    "Two serving directories with their reports and cards: the tiny model in its default variant, and in the other one."
    work = tmp_path_factory.mktemp("versions")
    other = Path(shutil.copytree(serving_dir, work / "other" / "serving"))
    metadata = json.loads((other / "metadata.json").read_text())
    metadata["default_variant"] = "fp32" if metadata["default_variant"] == "int8" else "int8"
    (other / "metadata.json").write_text(json.dumps(metadata))
    pairs = []
    for name, serving in (("first", serving_dir), ("second", other)):
        reports = tiny_reports(serving, work / name / "reports")
        write_card(serving, reports, reports / "model_card.md")
        pairs.append((serving, reports))
    return pairs


def test_register_aliases_fetch_and_restart(registry, database, store, versions, mlflow_server_bin, tmp_path):
    (first, first_reports), (second, second_reports) = versions
    one = register_serving(first, first_reports, registry)
    test_again = register_serving(first, first_reports, registry)
    assert test_again.version == one.version  # the same model twice: the same version, no duplicate
    assert len(registry_client(registry).search_model_versions(f"name = '{MODEL_NAME}'")) == 1
    for key in ("model_version", "data_sha256", "backbone", "git_commit", "mcc", "mcc_in_domain", "mcc_out_of_domain", "files_sha256"):
        assert one.tags.get(key), key
    two = register_serving(second, second_reports, registry)
    assert (one.version, two.version) == ("1", "2") and one.tags["model_version"] != two.tags["model_version"]

    # the release sets challenger (by model version, as `mlops-deploy release --model-version` does); promotion, rollback
    proc = run_cli("mlops-registry", "--uri", registry, "challenger", "--model-version", one.tags["model_version"])
    assert proc.returncode == 0, proc.stderr
    assert promote(registry) == {"champion": "1", "previous": None}
    with pytest.raises(RegistryError, match="no earlier champion"):
        rollback(registry)
    # what `mlops-deploy release --serving-dir` does after its smoke test: the released directory's version becomes challenger
    assert release_challenger(second, second_reports, registry) == {"challenger": "2", "model_version": two.tags["model_version"], "previous": "1"}
    assert promote(registry) == {"champion": "2", "previous": "1"}
    proc = run_cli("mlops-registry", "--uri", registry, "rollback")
    assert proc.returncode == 0 and json.loads(proc.stdout) == {"champion": "1", "rolled_back_from": "2"}, proc.stderr

    # another server started on the same PostgreSQL and files (a restart) has every version and alias
    with registry_server(database, store, free_port(), mlflow=mlflow_server_bin) as again:
        client = registry_client(again)
        assert [alias_version(client, a) for a in ("champion", "challenger")] == ["1", "2"]
        assert sorted(v.version for v in client.search_model_versions(f"name = '{MODEL_NAME}'")) == ["1", "2"]
        assert (client.get_model_version(MODEL_NAME, "1").tags == one.tags) and "Intended use" in client.get_model_version(
            MODEL_NAME, "1"
        ).description

    # fetch by alias: the champion's files, checked, with its card
    proc = run_cli("mlops-model", "fetch", f"models:/{MODEL_NAME}@{CHAMPION}", "--out", tmp_path / "serving", env={"MLFLOW_TRACKING_URI": registry})
    assert proc.returncode == 0, proc.stderr
    fetched = tmp_path / "serving"
    assert (fetched / "README.md").read_text() == (first_reports / "model_card.md").read_text()
    assert (fetched / "metadata.json").read_bytes() == (first / "metadata.json").read_bytes()

    # a file changed in the artifact store: refused, and what was there is kept
    target = next(p for p in store.rglob("README.md") if p.read_text() == (first_reports / "model_card.md").read_text())
    target.write_text(target.read_text().replace("Intended use", "Intended abuse"))
    with pytest.raises(RegistryError, match="files_sha256"):
        fetch_model(f"models:/{MODEL_NAME}@{CHAMPION}", fetched, registry)
    assert (fetched / "README.md").read_text() == (first_reports / "model_card.md").read_text()
    proc = run_cli("mlops-model", "fetch", f"models:/{MODEL_NAME}@nobody", "--out", tmp_path / "x", env={"MLFLOW_TRACKING_URI": registry})
    assert proc.returncode != 0 and "no such version" in proc.stderr and not (tmp_path / "x").exists()


NUMBER = re.compile(r"(?<![\w.`-])[+-]?\d+(?:\.\d+)?%?(?![\w`-])")


def card_numbers(reports: Path, metadata: Path) -> list[float]:
    "Every number the run's reports and serving metadata hold, as the card may show them (rates as percentages, bytes in MB)."
    metrics, behaviour, metadata = (json.loads(p.read_text()) for p in (reports / "metrics.json", reports / "behaviour.json", metadata))
    values = [v for v in metrics.values() if isinstance(v, (int, float))]
    for c in behaviour["capabilities"].values():
        values += [c["cases"], c["passed"], c["pass_rate"] * 100, c["target"] * 100]
    for v in metadata["variants"].values():
        values += [v["metrics"]["mcc"], v["bytes"] / 1e6]
    if "int8" in metadata["variants"]:
        values.append(metadata["variants"]["int8"]["metrics"]["mcc"] - metadata["variants"]["fp32"]["metrics"]["mcc"])
    return values


def assert_card_matches(card: str, reports: Path, metadata: Path):
    "Every number in the card's text is one of the reports' (to the digits shown); there are more than twenty."
    body = card.split("\n---\n", 1)[1]
    values = card_numbers(reports, metadata)
    found = NUMBER.findall(body)
    assert len(found) > 20
    for token in found:
        decimals = len(token.rstrip("%").partition(".")[2])
        number = float(token.rstrip("%"))
        assert any(abs(number - v) <= 0.5 * 10**-decimals + 1e-9 for v in values), f"{token} is in no report"


def test_card_numbers_are_the_reports(versions):
    for serving, reports in versions:
        card = (reports / "model_card.md").read_text()
        assert_card_matches(card, reports, serving / "metadata.json")
        assert (reports / "serving_metadata.json").read_bytes() == (serving / "metadata.json").read_bytes()
        metrics = json.loads((reports / "metrics.json").read_text())
        assert f"| out of domain | {metrics['mcc_out_of_domain']:.4f} |" in card


def test_shipped_card_is_the_shipped_reports():
    "The committed card of the shipped model: every number in it is in reports/ and the shipped serving metadata."
    root = Path(__file__).resolve().parents[1]
    reports = root / "reports"
    assert (reports / "model_card.md").is_file() and (reports / "serving_metadata.json").is_file()
    assert_card_matches((reports / "model_card.md").read_text(), reports, reports / "serving_metadata.json")
    version = json.loads((reports / "metrics.json").read_text())["model_version"]
    assert version in (reports / "model_card.md").read_text()


def test_card_refuses_reports_of_another_model(versions, tmp_path):
    (first, _), (_, second_reports) = versions
    with pytest.raises(CardError, match="cannot make the card"):
        write_card(first, second_reports, tmp_path / "card.md")
    assert not (tmp_path / "card.md").exists()


def test_ui_shows_versions_and_aliases(registry, versions):
    "The registry's web UI, in headless Chromium, lists the registered versions and the champion alias."
    from mlops_basics.devtools.test_utils import browser_text

    for serving, reports in versions:
        register_serving(serving, reports, registry)
    set_challenger("2", registry)
    text = browser_text(f"{registry}/#/models/{MODEL_NAME}", ["Version 2", "champion"])
    assert "Version 1" in text and "Version 2" in text and "champion" in text and "challenger" in text


def test_lightning_mlflow_logger(registry, tmp_path):
    "`logger=mlflow`: a training run's parameters and per-epoch metrics land in an MLflow run on the registry's server."
    from mlops_basics.devtools.test_utils import TINY_TRAIN

    proc = run_cli(
        "mlops-train",
        *TINY_TRAIN,
        "logger=mlflow",
        "logger.project=tiny-runs",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        f"paths.root={tmp_path}",
        cwd=tmp_path,
        env={"MLFLOW_TRACKING_URI": registry},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = registry_client(registry)
    (run,) = client.search_runs([client.get_experiment_by_name("tiny-runs").experiment_id])
    assert run.info.status == "FINISHED"
    assert "val_mcc" in run.data.metrics and run.data.params["trainer/max_epochs"] == "1"


def test_no_registry_is_a_clear_error_at_once(tmp_path):
    "A registry that does not answer: one line and exit status 2 within seconds (MLflow's client alone retries for minutes), nothing written."
    url = f"http://127.0.0.1:{free_port()}"
    proc = run_cli("mlops-registry", "--uri", url, "promote", timeout=60)
    assert proc.returncode == 2 and f"no model registry answers at {url}" in proc.stderr
    proc = run_cli("mlops-model", "fetch", f"models:/{MODEL_NAME}@{CHAMPION}", "--out", tmp_path / "serving", "--uri", url, timeout=60)
    assert proc.returncode == 1 and "no model registry answers" in proc.stderr and not (tmp_path / "serving").exists()
