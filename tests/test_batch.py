"""`mlops-score` (nbs/15_batch_scoring.ipynb, nbs/15a_corpus.ipynb) on 10,000 rows and the tiny model: in process, resumed after a kill, with bad rows,
an unreadable input, a filter and S3 (moto); on a real two-node Ray cluster on 127.0.0.1, also with its worker node's raylet killed."""

import json
import signal
import subprocess
import time
from pathlib import Path

import boto3
import pyarrow.parquet as pq
import pytest

from mlops_basics.devtools.ray_cluster import local_ray_cluster
from mlops_basics.devtools.test_utils import BIN, http, run_cli
from mlops_basics.ops.batch.corpus import ScoringError, open_corpus
from mlops_basics.serving.predictor import ONNXPredictor

ROWS = 10_000
BAD = {11: "empty", 21: "not UTF-8", 31: "longer than 2000 characters (3000)"}  # line -> reason


@pytest.fixture(scope="module")
def corpus(cola_raw, tmp_path_factory) -> Path:
    "10,000 lines: CoLA's training sentences over again, with an empty line, one not in UTF-8 and one too long."
    sentences = [line.split("\t")[3].rstrip("\n") for line in (cola_raw / "in_domain_train.tsv").read_text().splitlines()]
    lines = [sentences[i % len(sentences)].encode() for i in range(ROWS)]
    lines[10], lines[20], lines[30] = b"", "café".encode("latin-1"), b"x" * 3000
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def score(*args, **kwargs) -> tuple[subprocess.CompletedProcess, dict | None]:
    proc = run_cli("mlops-score", *args, "--no-progress", **kwargs)
    lines = proc.stdout.strip().splitlines()
    return proc, json.loads(lines[-1]) if lines else None


def rows_of(output: Path) -> list[dict]:
    return pq.read_table(output).to_pylist() if list(output.glob("part-*.parquet")) else []


def assert_every_row_once(output: Path) -> list[dict]:
    "Every good line of the corpus exactly once, in no particular order; the bad ones in _errors.jsonl."
    rows = rows_of(output)
    lines = [r["line"] for r in rows]
    assert len(lines) == len(set(lines)) and set(lines) == set(range(1, ROWS + 1)) - set(BAD)
    errors = [json.loads(line) for line in (output / "_errors.jsonl").read_text().splitlines()]
    assert {e["line"]: e["reason"] for e in errors} == BAD and {e["file"] for e in errors} == {"corpus.txt"}
    return rows


@pytest.fixture(scope="module")
def in_process(corpus, serving_dir, tmp_path_factory) -> tuple[Path, dict]:
    output = tmp_path_factory.mktemp("scored") / "out"
    proc, summary = score(corpus, output, "--serving-dir", serving_dir, "--shard-rows", 2000)
    assert proc.returncode == 3, proc.stderr[-3000:]  # 3: finished, with bad rows
    return output, summary


def test_in_process_scores_every_good_row_once_and_reports_the_bad_ones(in_process, serving_dir, server):
    output, summary = in_process
    assert {k: summary[k] for k in ("rows", "scored", "kept", "bad", "shards", "resumed_shards", "mode")} == {
        "rows": ROWS,
        "scored": ROWS - 3,
        "kept": ROWS - 3,
        "bad": 3,
        "shards": 5,
        "resumed_shards": 0,
        "mode": "in-process",
    }
    rows = sorted(assert_every_row_once(output), key=lambda r: r["line"])
    assert rows[0]["id"] == "corpus.txt:1" and {r["model"] for r in rows} == {ONNXPredictor(serving_dir).version}
    assert sum(summary["p_acceptable_histogram"]) == ROWS - 3 and sum(summary["labels"].values()) == ROWS - 3
    sample = rows[::700]  # 15 rows: the test server takes at most 16 a request
    status, _, body = http(
        "POST", f"{server[0]}/predict", json.dumps({"sentences": [r["sentence"] for r in sample]}).encode(), {"Content-Type": "application/json"}
    )
    assert status == 200, body
    served = json.loads(body)["predictions"]
    assert [p["label"] for p in served] == [r["label"] for r in sample]
    assert [round(p["probabilities"]["acceptable"], 4) for p in served] == [round(r["p_acceptable"], 4) for r in sample]


def test_the_filter_writes_only_the_rows_kept(in_process, corpus, serving_dir, tmp_path):
    all_rows, _ = in_process
    threshold = sorted(r["p_acceptable"] for r in rows_of(all_rows))[ROWS // 2]  # the tiny model's median: about half are kept
    proc, summary = score(corpus, tmp_path / "kept", "--serving-dir", serving_dir, "--filter", "acceptable", "--threshold", threshold)
    kept = rows_of(tmp_path / "kept")
    expected = {r["line"] for r in rows_of(all_rows) if r["p_acceptable"] >= threshold}
    assert proc.returncode == 3 and summary["kept"] == len(kept) == len(expected) and summary["scored"] == ROWS - 3
    assert {r["line"] for r in kept} == expected and 0 < len(kept) < ROWS


def test_an_interrupted_run_resumes_without_losing_or_doubling_a_row(corpus, serving_dir, tmp_path):
    output = tmp_path / "out"
    command = [BIN / "mlops-score", corpus, output, "--serving-dir", serving_dir, "--shard-rows", 500, "--threads", 1, "--no-progress"]
    with subprocess.Popen([str(c) for c in command], stdout=subprocess.PIPE, stderr=subprocess.PIPE) as run:
        while len(list(output.glob("part-*.parquet"))) < 3 and run.poll() is None:
            time.sleep(0.05)
        run.send_signal(signal.SIGKILL)
    finished = len(list(output.glob("part-*.parquet")))
    assert 3 <= finished < 20, "the run was not stopped mid-way"
    proc, summary = score(corpus, output, "--serving-dir", serving_dir, "--shard-rows", 500)
    assert proc.returncode == 3 and summary["resumed_shards"] == finished and summary["rows"] == ROWS
    assert_every_row_once(output)
    assert not list(output.glob("_tmp/*"))  # the killed run's half-written shard is gone, never taken for a finished one
    proc, _ = score(corpus, output, "--serving-dir", serving_dir, "--shard-rows", 1000)
    assert proc.returncode == 1 and "other settings (shard_rows: 500 -> 1000)" in proc.stderr  # a resume scores the rest the same way


def test_an_unreadable_input_is_a_clear_error_before_any_work(corpus, serving_dir, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.txt").write_bytes(corpus.read_bytes())
    (folder / "b.parquet").write_text("not a parquet file")
    proc, summary = score(folder, tmp_path / "out", "--serving-dir", serving_dir)
    assert proc.returncode == 1 and summary is None and "b.parquet cannot be read" in proc.stderr
    assert not (tmp_path / "out").exists()
    (folder / "b.parquet").unlink()
    (folder / "c.csv").write_text("id,sentence\n1,The cat sat.\n")
    with pytest.raises(ScoringError, match="c.csv has no column 'text' in its header; it has id, sentence"):
        open_corpus(str(folder))
    with pytest.raises(ScoringError, match="no such file or folder"):
        open_corpus(str(tmp_path / "missing.txt"))


def test_jsonl_csv_and_parquet_on_s3(moto_server, serving_dir, tmp_path, monkeypatch):
    "A folder of JSONL, CSV and Parquet files in an S3 bucket (moto): missing fields and nulls are bad rows with their lines."
    import pyarrow as pa

    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    s3 = boto3.client("s3", endpoint_url=moto_server)
    s3.create_bucket(Bucket="corpus", CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    s3.put_object(Bucket="corpus", Key="new/a.jsonl", Body=b'{"sentence": "The cat sat."}\n{"other": 1}\nnot json\n')
    s3.put_object(Bucket="corpus", Key="new/b.csv", Body=b'sentence,n\n"He left, then came.",1\n,2\n')
    pq.write_table(pa.table({"sentence": ["Birds fly.", None]}), tmp_path / "c.parquet")
    s3.put_object(Bucket="corpus", Key="new/sub/c.parquet", Body=(tmp_path / "c.parquet").read_bytes())
    proc, summary = score(
        "s3://corpus/new", tmp_path / "out", "--serving-dir", serving_dir, "--field", "sentence", env={"AWS_ENDPOINT_URL": moto_server}
    )
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert sorted(r["id"] for r in rows_of(tmp_path / "out")) == ["a.jsonl:1", "b.csv:2", "sub/c.parquet:1"]
    errors = [json.loads(line) for line in (tmp_path / "out" / "_errors.jsonl").read_text().splitlines()]
    assert errors == [
        {"file": "a.jsonl", "line": 2, "reason": "no field 'sentence'"},
        {"file": "a.jsonl", "line": 3, "reason": "not JSON"},
        {"file": "b.csv", "line": 3, "reason": "empty"},
        {"file": "sub/c.parquet", "line": 2, "reason": "empty"},
    ]
    assert summary["files"] == 3 and summary["bad"] == 4


@pytest.fixture(scope="module")
def cluster():
    "A Ray head (2 CPUs) and a worker node (1 CPU) on 127.0.0.1: two raylets."
    with local_ray_cluster(workers=1) as c:
        yield c


def test_two_ray_nodes_give_the_in_process_answers(cluster, in_process, corpus, serving_dir, tmp_path):
    proc, summary = score(corpus, tmp_path / "out", "--serving-dir", serving_dir, "--shard-rows", 1000, "--ray", cluster.address, "--actors", 2)
    assert proc.returncode == 3, proc.stderr[-5000:]
    assert summary["mode"] == "ray" and summary["bad"] == 3
    on_ray = {r["line"]: r for r in assert_every_row_once(tmp_path / "out")}
    for r in rows_of(in_process[0]):
        assert on_ray[r["line"]]["label"] == r["label"] and on_ray[r["line"]]["p_acceptable"] == pytest.approx(r["p_acceptable"], abs=1e-5)


def test_a_killed_worker_node_loses_no_row_and_doubles_none(cluster, corpus, serving_dir, tmp_path):
    "kill -9 of the worker node's raylet mid-run: Ray retries its shards on the head; each row is written once."
    output = tmp_path / "out"
    command = [
        BIN / "mlops-score",
        corpus,
        output,
        "--serving-dir",
        serving_dir,
        "--shard-rows",
        250,
        "--ray",
        cluster.address,
        "--actors",
        2,
        "--no-progress",
    ]
    with subprocess.Popen([str(c) for c in command], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as run:
        while len(list(output.glob("part-*.parquet"))) < 4 and run.poll() is None:
            time.sleep(0.05)
        cluster.kill_node(1)
        stdout, stderr = run.communicate(timeout=600)
    assert run.returncode == 3, stderr[-5000:]
    assert json.loads(stdout.strip().splitlines()[-1])["shards"] == 40 and len(list(output.glob("part-*.parquet"))) == 40
    assert_every_row_once(output)


RAYJOB = Path(__file__).resolve().parents[1] / "infra" / "kuberay" / "score-rayjob.yaml"
RAYJOB_FIELDS = {  # KubeRay's ray.io/v1 RayJob spec and its RayCluster spec, the fields this manifest may use
    "spec": {
        "entrypoint",
        "rayClusterSpec",
        "shutdownAfterJobFinishes",
        "ttlSecondsAfterFinished",
        "activeDeadlineSeconds",
        "backoffLimit",
        "submissionMode",
        "runtimeEnvYAML",
        "entrypointNumCpus",
        "suspend",
        "jobId",
        "metadata",
        "clusterSelector",
    },
    "rayClusterSpec": {
        "headGroupSpec",
        "workerGroupSpecs",
        "rayVersion",
        "enableInTreeAutoscaling",
        "autoscalerOptions",
        "headServiceAnnotations",
        "suspend",
    },
    "headGroupSpec": {"rayStartParams", "template", "serviceType", "headService", "enableIngress"},
    "workerGroupSpecs": {
        "groupName",
        "replicas",
        "minReplicas",
        "maxReplicas",
        "rayStartParams",
        "template",
        "numOfHosts",
        "suspend",
        "idleTimeoutSeconds",
    },
}


def test_the_kuberay_rayjob_validates_and_is_hardened(tmp_path):
    "Its Namespace and each pod template validate against Kubernetes' schemas (kubernetes-validate knows no CRD); its RayJob fields are KubeRay's."
    import yaml

    namespace, job = yaml.safe_load_all(RAYJOB.read_text())
    assert (namespace["kind"], job["apiVersion"], job["kind"]) == ("Namespace", "ray.io/v1", "RayJob")
    assert job["metadata"]["namespace"] == namespace["metadata"]["name"] and "mlops-score" in job["spec"]["entrypoint"]
    cluster = job["spec"]["rayClusterSpec"]
    groups = [("headGroupSpec", cluster["headGroupSpec"])] + [("workerGroupSpecs", g) for g in cluster["workerGroupSpecs"]]
    for key, spec in [("spec", job["spec"]), ("rayClusterSpec", cluster), *groups]:
        assert set(spec) <= RAYJOB_FIELDS[key], f"{key}: unknown fields {set(spec) - RAYJOB_FIELDS[key]}"
    documents = [namespace] + [
        {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"group-{i}", "namespace": "mlops-batch"}, "template": g["template"]}
        for i, (_, g) in enumerate(groups)
    ]
    (tmp_path / "pods.yaml").write_text(yaml.safe_dump_all(documents))
    proc = subprocess.run(
        [str(BIN / "kubernetes-validate"), "--strict", "-k", "1.31.0", tmp_path / "pods.yaml"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and proc.stdout.count("passed") == 3, proc.stdout + proc.stderr
    for _, group in groups:
        pod = group["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False and pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in pod["containers"]:
            assert "@sha256:" in container["image"]
            assert container["securityContext"]["allowPrivilegeEscalation"] is False and container["securityContext"]["capabilities"]["drop"] == [
                "ALL"
            ]
            assert set(container["resources"]["requests"]) == set(container["resources"]["limits"]) == {"cpu", "memory"}


def test_batch_scoring_imports_no_torch():
    "mlops-score runs on the ONNX predictor: neither torch nor the training layer is imported."
    probe = (
        "import sys, mlops_basics.ops.batch.scoring; print(sorted(m for m in ('torch', 'transformers', 'mlops_basics.training') if m in sys.modules))"
    )
    proc = subprocess.run([str(BIN / "python"), "-c", probe], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_the_benchmark_merges_only_runs_of_the_same_model(monkeypatch):
    "--merge keeps the recorded runs this one did not repeat, with their dates, replaces those it did, and refuses another model's."
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))
    from batch_benchmark import merged_runs

    def run(mode, sentences, rate, date=None):
        return {"mode": mode, "sentences": sentences, "sentences_per_s": rate} | ({"date": date} if date else {})

    recorded = {
        "model": "abc-int8",
        "date": "2026-12-07",
        "runs": [run("in process", 10, 1.0), run("Ray, 1 node", 10, 2.0), run("in process", 100, 3.0)],
    }
    new = [run("in process", 100, 4.0, "2026-12-08"), run("in process", 1000, 5.0, "2026-12-08")]
    assert merged_runs(recorded, new, "abc-int8") == [
        run("in process", 10, 1.0, "2026-12-07"),
        run("Ray, 1 node", 10, 2.0, "2026-12-07"),
        run("in process", 100, 4.0, "2026-12-08"),
        run("in process", 1000, 5.0, "2026-12-08"),
    ]
    with pytest.raises(SystemExit, match="abc-int8 was recorded, this is def-int8"):
        merged_runs(recorded, new, "def-int8")
