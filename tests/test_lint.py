"""Static checks of the files CI and AWS run: workflows (actionlint, yamllint), the SAM template (cfn-lint), and agreement between the template and the deploy module."""
import json
import subprocess

import pytest

from conftest import BIN, ROOT


def run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_workflows_pass_actionlint():
    proc = run(BIN/"actionlint", "-color=false", *sorted((ROOT/".github"/"workflows").glob("*.yml")))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_yaml_passes_yamllint():
    files = [*sorted((ROOT/".github"/"workflows").glob("*.yml")), ROOT/"dvc.yaml", ROOT/"params.yaml", ROOT/"infra"/"template.yaml",
             *sorted((ROOT/"mlops_basics"/"conf").rglob("*.yaml"))]
    proc = run(BIN/"yamllint", "--strict", "-c", ROOT/".yamllint.yaml", *files)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_sam_template_passes_cfn_lint():
    proc = run(BIN/"cfn-lint", "--format", "parseable", ROOT/"infra"/"template.yaml")
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def template() -> dict:
    from cfnlint.decode import decode
    parsed, errors = decode(str(ROOT/"infra"/"template.yaml"))
    assert not errors, errors
    return parsed


def test_template_and_deploy_module_agree(template):
    from mlops_basics.deploy import DEFAULTS, DeployConfig, lifecycle_policy
    params = template["Parameters"]
    for key, param in {"repository": "RepositoryName", "function_name": "FunctionName", "alias": "AliasName", "memory_mb": "MemorySize",
                       "timeout_s": "Timeout", "log_retention_days": "LogRetentionDays"}.items():
        assert params[param]["Default"] == DEFAULTS[key], (key, param)
    resources = template["Resources"]
    function = resources["Function"]["Properties"]
    assert function["ImageConfig"]["Command"] == ["lambda"]
    assert function["Environment"]["Variables"] == DeployConfig(region="eu-west-1").environment
    lifecycle = json.loads(resources["Repository"]["Properties"]["LifecyclePolicy"]["LifecyclePolicyText"])
    assert lifecycle == lifecycle_policy(DEFAULTS["keep_images"])
    assert resources["Repository"]["Properties"]["ImageTagMutability"] == "IMMUTABLE"


def test_entrypoint_and_log_subscription_match_the_app(template):
    "The template's `lambda` command is one the entrypoint knows; its log filter matches the app's prediction log lines."
    assert "lambda)" in (ROOT/"docker"/"entrypoint.sh").read_text()
    pattern = template["Resources"]["PredictionLogSubscription"]["Properties"]["FilterPattern"]
    assert pattern == '{ $.event = "predict" }'
    assert '"predict" if request.state.log' in (ROOT/"mlops_basics"/"app.py").read_text()
