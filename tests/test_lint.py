"""Static checks of the files CI and AWS run: workflows (actionlint, yamllint), the SAM template (cfn-lint), and agreement between the template and the deploy module;
the KServe manifest against the Dockerfile and the app (no Kubernetes cluster runs here)."""

import json
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, run_workflow_step, workflow_job, workflow_step
from mlops_basics.devtools.test_utils import BIN


def run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_workflows_pass_actionlint():
    proc = run(BIN / "actionlint", "-color=false", *sorted((ROOT / ".github" / "workflows").glob("*.yml")))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_yaml_passes_yamllint():
    files = [
        *sorted((ROOT / ".github" / "workflows").glob("*.yml")),
        ROOT / "dvc.yaml",
        ROOT / "params.yaml",
        ROOT / "infra" / "template.yaml",
        ROOT / "compose.yaml",
        ROOT / "infra" / "kserve" / "inferenceservice.yaml",
        *sorted((ROOT / "mlops_basics" / "conf").rglob("*.yaml")),
    ]
    proc = run(BIN / "yamllint", "--strict", "-c", ROOT / ".yamllint.yaml", *files)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_sam_template_passes_cfn_lint():
    proc = run(BIN / "cfn-lint", "--format", "parseable", ROOT / "infra" / "template.yaml")
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def template() -> dict:
    from cfnlint.decode import decode

    parsed, errors = decode(str(ROOT / "infra" / "template.yaml"))
    assert not errors, errors
    return parsed


def test_template_and_deploy_module_agree(template):
    from mlops_basics.ops.release.ecr import DEFAULTS, DeployConfig

    params = template["Parameters"]
    for key, param in {
        "repository": "RepositoryName",
        "function_name": "FunctionName",
        "alias": "AliasName",
        "memory_mb": "MemorySize",
        "timeout_s": "Timeout",
        "log_retention_days": "LogRetentionDays",
    }.items():
        assert params[param]["Default"] == DEFAULTS[key], (key, param)
    resources = template["Resources"]
    function = resources["Function"]["Properties"]
    assert function["ImageConfig"]["Command"] == ["lambda"]
    variables = dict(function["Environment"]["Variables"])
    assert variables.pop("MLOPS_FEEDBACK_KEY_SECRET") == {"Fn::If": ["HasFeedbackKey", {"Ref": "FeedbackKeySecretArn"}, {"Ref": "AWS::NoValue"}]}
    assert variables == DeployConfig(region="eu-west-1").environment
    released = DeployConfig.from_env({"AWS_REGION": "eu-west-1", "MLOPS_FEEDBACK_KEY_SECRET": "arn:aws:secretsmanager:eu-west-1:1:secret:k"})
    assert released.environment == {**variables, "MLOPS_FEEDBACK_KEY_SECRET": "arn:aws:secretsmanager:eu-west-1:1:secret:k"}  # a release keeps it
    api, stage = resources["ApiThrottling"]["Properties"], resources["ApiThrottling"]["Properties"]["Stage"]["DefaultRouteSettings"]
    assert api["ApiId"] == {"Ref": "HttpApi"} and stage == {
        "ThrottlingRateLimit": {"Ref": "ThrottlingRateLimit"},
        "ThrottlingBurstLimit": {"Ref": "ThrottlingBurstLimit"},
    }
    assert function["ReservedConcurrentExecutions"] == {"Ref": "ReservedConcurrency"}
    caps = {name: params[name]["Default"] for name in ("ThrottlingRateLimit", "ThrottlingBurstLimit", "ReservedConcurrency")}
    assert 1 <= caps["ThrottlingRateLimit"] <= caps["ThrottlingBurstLimit"] <= 100 and 1 <= caps["ReservedConcurrency"] <= 50, caps  # safe defaults
    # mlops-deploy owns the repository and moves the alias. A repository in the stack would collide with the one the
    # first push creates (the function needs an image before the stack can exist), and SAM's AutoPublishAlias would
    # move `live` back to the template's image on every `sam deploy`.
    assert [r["Type"] for r in resources.values() if r["Type"] == "AWS::ECR::Repository"] == []
    assert "AutoPublishAlias" not in function
    assert resources["LiveAlias"]["Properties"]["Name"] == {"Ref": "AliasName"}
    assert resources["HttpApi"]["Properties"]["Target"] == {"Ref": "LiveAlias"}
    assert resources["ApiInvokesAlias"]["Properties"]["FunctionName"] == {"Ref": "LiveAlias"}
    assert {"FunctionRoleArn", "DeployerPolicyArn", "ApiUrl"} <= set(template["Outputs"])


def test_deployer_policy_allows_every_call_mlops_deploy_makes(template):
    "Every boto3 call in mlops_basics/ops/release/ecr.py and ops/release/lambda_function.py, and the registry calls of a push, are allowed by DeployerPolicy."
    statements = template["Resources"]["DeployerPolicy"]["Properties"]["PolicyDocument"]["Statement"]
    allowed = {a for s in statements for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])}
    service = {"ecr": "ecr", "lam": "lambda", "logs": "logs", 'aws["ecr"]': "ecr", 'aws["lambda"]': "lambda", 'aws["logs"]': "logs"}
    source = "".join((ROOT / "mlops_basics" / "ops" / "release" / f"{m}.py").read_text() for m in ("ecr", "lambda_function"))
    calls = {
        f"{service[client]}:{''.join(w.capitalize() for w in (paginated or method).split('_'))}"
        for client, paginated, method in re.findall(r'(\becr|\blam|\blogs|aws\["\w+"\])\.(?:get_paginator\("(\w+)"\)|(\w+)\()', source)
    }
    calls = {"lambda:GetFunction" if c == "lambda:GetWaiter" else c for c in calls}  # function_active_v2/function_updated_v2 poll GetFunction
    assert {"ecr:DescribeImages", "lambda:ListVersionsByFunction", "lambda:DeleteAlias", "logs:PutRetentionPolicy"} <= calls  # the scan works
    push = {"ecr:BatchCheckLayerAvailability", "ecr:InitiateLayerUpload", "ecr:UploadLayerPart", "ecr:CompleteLayerUpload", "ecr:PutImage"}
    assert calls | push <= allowed, sorted((calls | push) - allowed)
    assert "iam:PassRole" in allowed  # creating the function passes its execution role


def cloudwatch_json_filter(pattern: str, line: str) -> bool:
    "CloudWatch Logs' JSON filter syntax, the part the template uses: `{ ... }` of `$.field = / != \"value\"` terms, `&&`, `||` and parentheses."
    # moto's filter_log_events takes any JSON pattern as a match-all (moto/logs/utils.py), so it cannot tell a pattern that drops lines.
    body = re.fullmatch(r"\{(.*)\}", pattern.strip(), re.S)[1]
    record = json.loads(line)

    def term(m: re.Match) -> str:
        value = record
        for key in m[1].split("."):
            value = value.get(key) if isinstance(value, dict) else None
        return str((value == m[3]) == (m[2] == "="))

    expr = re.sub(r"\$\.([\w.]+)\s*(!?=)\s*\"([^\"]*)\"", term, body)
    assert re.fullmatch(r"[\s()]*(?:(?:True|False)[\s()]*(?:(?:&&|\|\|)[\s()]*)?)+", expr), f"not in the supported syntax: {pattern}"
    return eval(expr.replace("&&", " and ").replace("||", " or "))  # only True, False, and, or, parentheses are left


def test_log_subscription_carries_predictions_and_feedback(template, serving_dir):
    "The subscription filter lets through the app's real `predict` and `feedback` lines and nothing else (the shipper needs both)."
    import io

    from fastapi.testclient import TestClient

    from mlops_basics.serving.app import create_app
    from mlops_basics.serving.observability import configure_request_logging
    from mlops_basics.serving.settings import ServeSettings

    assert "lambda)" in (ROOT / "docker" / "entrypoint.sh").read_text()
    pattern = template["Resources"]["PredictionLogSubscription"]["Properties"]["FilterPattern"]
    out = io.StringIO()
    configure_request_logging(out)
    try:
        client = TestClient(create_app(ServeSettings(serving_dir=str(serving_dir))))
        predicted = client.post("/predict", json={"sentences": ["She sang."]}).json()
        client.post("/feedback", json={"request_id": predicted["request_id"], "index": 0, "label": "acceptable"})
        client.get("/health")
    finally:
        configure_request_logging(sys.stdout)
    lines = [l for l in out.getvalue().splitlines() if l.startswith("{")]
    events = {json.loads(l).get("event"): l for l in lines}
    assert {"predict", "feedback", "request"} <= set(events), events
    carried = {event for event, line in events.items() if cloudwatch_json_filter(pattern, line)}
    assert carried == {"predict", "feedback"}, carried
    assert not cloudwatch_json_filter('{ $.event = "predict" }', events["feedback"])  # the evaluator can tell a pattern that drops them


def test_deploy_workflow_refuses_an_unset_smoke_url():
    "An unset SMOKE_URL variable arrives as an empty string; the workflow stops before building anything, instead of releasing unchecked."
    steps = workflow_job("deploy.yml", "deploy")["steps"]
    names = [s.get("name", s.get("uses")) for s in steps]
    check = steps[names.index("Check the settings")]
    release = next(s for s in steps if "mlops-deploy release" in s.get("run", ""))
    assert names.index("Check the settings") == 0 and '--smoke-url "$SMOKE_URL"' in release["run"]
    for smoke_url, code in (("", 1), ("https://abc.execute-api.eu-west-1.amazonaws.com", 0)):
        env = {"AWS_REGION": "eu-west-1", "SMOKE_URL": smoke_url, "MLFLOW_TRACKING_URI": "https://registry.example"}
        proc = run_workflow_step(check["run"], ROOT, env, timeout=30)
        assert proc.returncode == code, proc.stdout + proc.stderr
        assert ("variable SMOKE_URL is empty" in proc.stdout) == (code == 1)


def test_kserve_manifest_runs_the_image_as_the_dockerfile_and_the_app_expect():
    "What can be checked of infra/kserve/inferenceservice.yaml without a cluster: its fields, and that they agree with the Dockerfile and the app."
    import yaml

    from mlops_basics.ops.release.ecr import DEFAULTS
    from mlops_basics.serving.protocol import protocol_router
    from mlops_basics.serving.settings import ServeSettings

    service = yaml.safe_load((ROOT / "infra" / "kserve" / "inferenceservice.yaml").read_text())
    assert (service["apiVersion"], service["kind"], service["metadata"]["name"]) == ("serving.kserve.io/v1beta1", "InferenceService", "mlops-basics")
    assert service["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] in ("RawDeployment", "Serverless")
    predictor = service["spec"]["predictor"]
    assert set(predictor) <= {"minReplicas", "maxReplicas", "automountServiceAccountToken", "securityContext", "containers", "volumes"}
    assert 1 <= predictor["minReplicas"] <= predictor["maxReplicas"] and service["metadata"]["namespace"] == "mlops-basics"
    [container] = predictor["containers"]
    assert container["name"] == "kserve-container"  # KServe's predictor container; another name would be a sidecar
    assert re.fullmatch(rf"[0-9]{{12}}\.dkr\.ecr\.[a-z0-9-]+\.amazonaws\.com/{DEFAULTS['repository']}@sha256:[0-9a-f]{{64}}", container["image"])
    dockerfile = (ROOT / "Dockerfile").read_text()
    env = {e["name"]: e["value"] for e in container["env"]}
    image_env = dict(re.findall(r"\b(PORT|WORKERS|MLOPS_SERVING_DIR)=(\S+)", dockerfile))
    port = int(re.search(r"^EXPOSE (\d+)$", dockerfile, re.M)[1])
    assert container["ports"] == [{"name": "http1", "containerPort": port, "protocol": "TCP"}] and env["PORT"] == image_env["PORT"] == str(port)
    assert env["MLOPS_SERVING_DIR"] == image_env["MLOPS_SERVING_DIR"]
    assert container["args"] == ["serve"] and "serve)" in (ROOT / "docker" / "entrypoint.sh").read_text()
    known = set(ServeSettings.variables().values()) | {"PORT", "WORKERS", "HOST"}
    assert set(env) <= known, set(env) - known  # every variable is one the entrypoint or the app reads
    ServeSettings.from_env(env)  # and the app accepts their values
    routes = {r.path for r in protocol_router().routes}
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] == port and container[probe]["httpGet"]["path"] in routes
    user = re.search(r"^USER (\d+):(\d+)$", dockerfile, re.M)
    security = container["securityContext"]
    assert (security["runAsUser"], security["runAsGroup"]) == (int(user[1]), int(user[2])) and security["runAsNonRoot"] is True
    assert security["readOnlyRootFilesystem"] is True and {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    assert {"name": "tmp", "emptyDir": {}} in predictor["volumes"]
    assert security["allowPrivilegeEscalation"] is False and security["capabilities"] == {"drop": ["ALL"]}
    assert predictor["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"} and predictor["automountServiceAccountToken"] is False


def test_the_release_pins_the_kserve_manifest_to_the_image_it_pushed(tmp_path):
    "deploy.yml writes infra/kserve/inferenceservice.yaml with the digest just pushed, and refuses an image given by tag."
    import yaml

    step = workflow_step("deploy.yml", "deploy", "Pin the KServe manifest to the pushed image")
    shutil.copytree(ROOT / "infra", tmp_path / "infra")
    uri = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/mlops-basics@sha256:" + "ab" * 32
    proc = run_workflow_step(step, tmp_path, {"IMAGE_URI": uri}, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    pinned = yaml.safe_load((tmp_path / "manifests" / "inferenceservice.yaml").read_text())
    source = yaml.safe_load((ROOT / "infra" / "kserve" / "inferenceservice.yaml").read_text())
    assert pinned["spec"]["predictor"]["containers"][0]["image"] == uri
    source["spec"]["predictor"]["containers"][0]["image"] = uri
    assert pinned == source  # nothing else changed
    proc = run_workflow_step(step, tmp_path, {"IMAGE_URI": "123456789012.dkr.ecr.eu-west-1.amazonaws.com/mlops-basics:latest"}, timeout=30)
    assert proc.returncode == 1 and "not an image by digest" in proc.stdout
