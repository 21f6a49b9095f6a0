"""Data-parallel training through the table service on Ray Train.

`train_workers` runs K workers with `TorchTrainer` (gloo on CPU, NCCL on GPU). Each worker attaches
to the tables cluster by name and runs `trainer.train.train` as rank r of K: it draws the same
batch as the others and trains on its slice; dense gradients are all-reduced; its part of the table
gradients (scaled 1/K) goes to the shards, which sum the K parts of a step and apply the optimizer
once. So K workers with B/K sequences each take the steps one worker with B sequences would.
Rank 0 saves the run's checkpoints (`checkpoint_every`); a resumed run's tables are restored once,
by this driver, before the workers start.
"""
from __future__ import annotations

import tempfile
from dataclasses import replace

from memory_service.wire.security import ClientSecurity
from trainer.train import ServiceOptions, TrainConfig, TrainResult, train


def train_workers(cfg: TrainConfig, workers: int, cluster_name: str = "default",
                  service: ServiceOptions = ServiceOptions(), use_gpu: bool = False,
                  cpus_per_worker: float = 1.0, storage_path: str | None = None,
                  resource: str | None = None, security: ClientSecurity | None = None) -> TrainResult:
    """Trains with `workers` Ray Train workers against the tables cluster `cluster_name` of the
    Ray cluster this driver is connected to; returns rank 0's result. `resource`: a custom Ray
    resource each worker takes one unit of, to pin workers to trainer nodes. `security`: the
    workers' memory_service.wire.security.ClientSecurity for secured shards. `use_gpu`: each worker
    takes a GPU and trains on it (device "cuda", set on the worker: the driver may have none)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if workers < 1 or cfg.batch_size % workers:
        raise ValueError(f"batch_size {cfg.batch_size} must be a multiple of workers {workers} >= 1")
    if cfg.resume_from:
        cfg = replace(cfg, resume_from=str(_restore_tables(cfg, cluster_name, security)))
    trainer = TorchTrainer(
        _worker, train_loop_config={"cfg": cfg, "cluster": cluster_name, "service": service,
                                  "security": security, "use_gpu": use_gpu},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker,
                                                           **({resource: 1} if resource else {})}),
        run_config=RunConfig(name=f"engram-{service.prefix.replace('/', '-')}",
                             storage_path=storage_path or tempfile.mkdtemp(prefix="engram-train-")))
    return trainer.fit().return_value


def _restore_tables(cfg: TrainConfig, cluster_name: str, security: ClientSecurity | None):
    """Restores the tables of the checkpoint `cfg.resume_from` once, here, before the workers
    start (each then loads the dense part), as a client with the workers' `security` (a secured
    cluster refuses anyone else); returns the checkpoint's path, so that every worker reads the
    same one."""
    from memory_service.cluster import connect
    from trainer.run_state import Resume

    cluster = connect("auto", name=cluster_name)
    try:
        with cluster.client(security=security) as client:
            resume = Resume.open(cfg.resume_from, client)
            resume.restore_tables(client)
    finally:
        cluster.shutdown()  # detaches only
    return resume.path


def _worker(config: dict) -> TrainResult:
    """One Ray Train worker: attach to the shards, train as rank r of K."""
    import ray.train

    from memory_service.cluster import connect

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    cfg: TrainConfig = config["cfg"]
    if rank != 0:
        cfg = replace(cfg, checkpoint=None, progress=False)
    if config.get("use_gpu"):  # NCCL all-reduces CUDA tensors: the model must be on the worker's GPU
        cfg = replace(cfg, device="cuda")
    cluster = connect("auto", name=config["cluster"])
    with cluster.client(security=config.get("security")) as client:
        return train(cfg, client=client, service=config["service"], rank=rank, world=world)
