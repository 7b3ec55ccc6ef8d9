"""Multi-node training: the node environment is checked first, and two nodes (two processes on this host) train one model."""

import math
import os
import subprocess

import pytest

from mlops_basics.core.artifacts import read_metadata
from mlops_basics.devtools.test_utils import BIN, TINY_TRAIN, free_port, run_cli
from mlops_basics.training.multinode import NODE_VARIABLES, start_node


@pytest.mark.parametrize(
    "env, message",
    [
        ({}, "trainer.num_nodes=2 needs MASTER_ADDR, MASTER_PORT, NODE_RANK in the environment"),
        ({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "NODE_RANK": "2"}, "NODE_RANK must be 0 to 1, got '2'"),
        ({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "port", "NODE_RANK": "0"}, "MASTER_PORT must be a port number, got 'port'"),
    ],
)
def test_a_node_without_its_environment_stops_at_once(tmp_path, env, message):
    "A node that would wait for peers that never come fails before loading anything, with the reason."
    clean = {k: v for k, v in os.environ.items() if k not in NODE_VARIABLES}
    proc = subprocess.run(
        [str(BIN / "mlops-train"), *TINY_TRAIN, "trainer=ddp_multinode_cpu", f"paths.root={tmp_path}"],
        cwd=tmp_path,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "model").exists()


def test_a_node_needs_a_ddp_strategy(tmp_path):
    proc = run_cli(
        "mlops-train",
        *TINY_TRAIN,
        "trainer=ddp_multinode_cpu",
        "trainer.strategy=auto",
        f"paths.root={tmp_path}",
        cwd=tmp_path,
        env={"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "NODE_RANK": "0"},
        timeout=300,
    )
    assert proc.returncode == 2 and "trainer.num_nodes=2 needs a ddp strategy, got trainer.strategy='auto'" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
def test_two_nodes_train_one_model(tmp_path):
    "Node 0 and node 1, each with a directory of its own: they split every epoch, and only global rank 0 writes the model."
    port = free_port()
    nodes = [
        start_node(
            rank,
            port,
            [
                *TINY_TRAIN,
                "trainer=ddp_multinode_cpu",
                "trainer.max_epochs=1",
                "trainer.limit_train_batches=0.05",
                f"paths.root={tmp_path / f'node{rank}'}",
            ],
            cwd=tmp_path,
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=900)[0] for node in nodes]
    assert [n.returncode for n in nodes] == [0, 0], [o[-3000:] for o in outputs]
    assert "Initializing distributed: GLOBAL_RANK: 0, MEMBER: 1/2" in outputs[0]
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in outputs[1]
    assert "validation MCC" in outputs[0] and "validation MCC" not in outputs[1]
    assert not (tmp_path / "node1" / "model").exists() and list((tmp_path / "node1").rglob("*.ckpt")) == []  # written once, by global rank 0
    meta = read_metadata(tmp_path / "node0" / "model")
    assert (meta["config"]["trainer"]["num_nodes"], meta["config"]["trainer"]["devices"]) == (2, 1)
    from mlops_basics.training.negatives import negatives_for

    n, batch_size = 8551 + negatives_for(8551, meta["config"]["data"]["synthetic_negatives"]), meta["config"]["data"]["batch_size"]
    one_process, per_rank = math.ceil(n / batch_size), math.ceil(math.ceil(n / 2) / batch_size)
    assert int(0.05 * one_process) != int(0.05 * per_rank)
    assert meta["history"][0]["step"] == int(0.05 * per_rank)  # each node stepped through its half of the batches
    # One process with the same global batch (2 x batch_size) takes the same steps and lands close: the gradients are averaged the
    # same way, only the order of the sentences differs (Lightning's DistributedSampler shuffles them its own way).
    proc = run_cli(
        "mlops-train",
        *TINY_TRAIN,
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=0.05",
        f"data.batch_size={2 * batch_size}",
        f"paths.root={tmp_path / 'single'}",
        cwd=tmp_path,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = read_metadata(tmp_path / "single" / "model")["history"][0]
    assert single["step"] == meta["history"][0]["step"]
    assert single["val_loss"] == pytest.approx(meta["history"][0]["val_loss"], abs=0.02)


def test_lightning_gives_the_nodes_disjoint_shares_of_every_epoch():
    "The sampler Lightning puts in each node's training loader (its own `_get_distributed_sampler`, with the run's rank, world size and seed)\n    splits the shuffled training set between the two ranks: no sentence on both, none left out (but the padding to equal shares)."
    from pytorch_lightning.trainer.connectors.data_connector import _get_distributed_sampler

    from mlops_basics.training.backbones import load_backbone
    from mlops_basics.training.config import compose_config
    from mlops_basics.training.train import _datamodule

    cfg = compose_config([*TINY_TRAIN, "trainer=ddp_multinode_cpu"])
    datamodule = _datamodule(cfg, load_backbone(cfg.model.backbone, seed=cfg.training.seed)[1])
    datamodule.setup("fit")
    loader, n = datamodule.train_dataloader(), len(datamodule.train_features)
    shares = [
        list(_get_distributed_sampler(loader, shuffle=True, overfit_batches=0, num_replicas=2, rank=rank, seed=cfg.training.seed)) for rank in (0, 1)
    ]
    assert len(shares[0]) == len(shares[1]) == math.ceil(n / 2)
    assert set(shares[0]) | set(shares[1]) == set(range(n))
    assert len(set(shares[0]) & set(shares[1])) == 2 * math.ceil(n / 2) - n  # 0 or 1: the one sentence that evens the shares
