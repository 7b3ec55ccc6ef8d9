"""The scaling-out files (infra/slurm, infra/k8s, infra/prefect): linted and validated here; no cluster runs them in this suite."""

import subprocess

import pytest

from conftest import ROOT
from mlops_basics.devtools.test_utils import BIN
from mlops_basics.training.config import compose_config

SCRIPTS = [ROOT / "infra" / "slurm" / "train.sbatch", ROOT / "infra" / "slurm" / "sweep.sbatch", ROOT / "infra" / "prefect" / "work-pools.sh"]
MANIFESTS = sorted((ROOT / "infra" / "k8s").glob("*.yaml"))


def run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse_and_pass_shellcheck(script):
    assert run("bash", "-n", script).returncode == 0
    proc = run(BIN / "shellcheck", script)
    assert proc.returncode == 0, proc.stdout


def test_manifests_validate_against_kubernetes_schemas():
    assert len(MANIFESTS) == 2
    proc = run(BIN / "kubernetes-validate", "--strict", "-k", "1.31.0", *MANIFESTS)
    assert proc.returncode == 0 and proc.stdout.count("passed") == 3, proc.stdout + proc.stderr


def test_the_cluster_overrides_compose_into_a_valid_config():
    "The overrides the sbatch script and the Job pass are mlops-train settings that compose and pass validation (with a node's environment)."
    cfg = compose_config(["trainer=gpu_bf16", "trainer.strategy=ddp", "trainer.num_nodes=2", "trainer.devices=1", "paths.root=/artifacts"])
    assert (cfg.trainer.accelerator, cfg.trainer.num_nodes, cfg.trainer.precision) == ("gpu", 2, "bf16-mixed")
    from mlops_basics.training.multinode import multinode_problems

    assert multinode_problems(cfg, {"SLURM_NTASKS": "2"}) == []
    assert multinode_problems(cfg, {"MASTER_ADDR": "mlops-train-0.mlops-train", "MASTER_PORT": "29500", "NODE_RANK": "1"}) == []
