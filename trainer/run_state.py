"""RunState: what a training run saves beside its tables, so that a resumed run continues exactly
as the uninterrupted one would have.

A run's checkpoint (memory_service/durability/checkpoint.py) holds the tables in the service at the step
(rows, optimizer state, step log), and in its dense part the backbone and its AdamW state plus
this RunState: the steps done, the losses so far, the position in the batch order (the data
generator's state before drawing the next step's batch: the prefetcher has already drawn it when
the checkpoint is taken) and torch's RNG. The learning rate schedule is a function of the step, so
the step is all it needs. `train` (trainer/train.py) saves one every `checkpoint_every` steps
into `checkpoint_dir/step-NNNNNNNN` and resumes from `resume_from`.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from memory_service.durability.checkpoint import (apply_dense, checkpoint_path, dense_state, latest_checkpoint,
                                       restore_checkpoint, save_checkpoint)
from memory_service.durability.manifest import Manifest


@dataclass
class RunState:
    """A run after `step` training steps (0-based steps 0 .. step-1 done)."""

    step: int
    data: dict  # Batches.state_dict() before drawing step `step`'s batch
    train_losses: list[float] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    torch_rng: torch.Tensor = field(default_factory=torch.get_rng_state)
    config: dict = field(default_factory=dict)  # dataclasses.asdict(TrainConfig) of the saving run
    service: dict | None = None  # dataclasses.asdict(ServiceOptions) when the tables live in the service

    def to_dict(self) -> dict:
        """Plain data (what torch.load(weights_only=True) reads back)."""
        return {"step": self.step, "data": self.data, "train_losses": list(self.train_losses),
                "val_losses": [list(v) for v in self.val_losses], "torch_rng": self.torch_rng,
                "config": self.config, "service": self.service}

    @classmethod
    def from_dict(cls, d: dict) -> "RunState":
        return cls(step=d["step"], data=d["data"], train_losses=list(d["train_losses"]),
                   val_losses=[(int(s), float(v)) for s, v in d["val_losses"]], torch_rng=d["torch_rng"],
                   config=d["config"], service=d["service"])


def save_run(directory: str | Path, client, model: torch.nn.Module, optimizers: list, state: RunState,
             tables: Sequence[str] = ()) -> Path:
    """Checkpoints the run (its `tables` through `client`, None for in-process tables) into
    `directory`/step-NNNNNNNN; returns that path. A checkpoint of that step already there (of a
    run this one resumed before it got here) is replaced. Only this run's tables: other runs'
    tables on the same tables cluster are at other steps."""
    path = checkpoint_path(directory, state.step)
    save_checkpoint(path, client, state.step, model=model, optimizers=optimizers, extra=state.to_dict(),
                    tables=tables, overwrite=True)
    return path


@dataclass
class Resume:
    """A checkpoint a run continues from, read and checked once: its manifest, its dense part
    (model and optimizer states) and the run's state."""

    path: Path
    manifest: Manifest
    dense: dict
    state: RunState

    @classmethod
    def open(cls, path: str | Path, client) -> "Resume":
        """The checkpoint `path`, or the latest complete one in a run's checkpoint_dir `path`.
        ValueError when it holds no run, or its tables live elsewhere than this run's (the
        service with `client`, in-process without)."""
        path = _resolve(Path(path))
        manifest = Manifest.read(path)
        if manifest.tables and client is None:
            raise ValueError(f"checkpoint {str(path)!r} holds tables of the table service: resume through a "
                             f"tables cluster (engram train --address)")
        if client is not None and not manifest.tables:
            raise ValueError(f"checkpoint {str(path)!r} holds no service tables (in-process tables were "
                             f"trained): resume with train-local")
        dense = dense_state(path, manifest)
        if not isinstance(dense.get("extra"), dict) or "data" not in dense["extra"]:
            raise ValueError(f"checkpoint {str(path)!r} holds no training run")
        return cls(path, manifest, dense, RunState.from_dict(dense["extra"]))

    def restore_tables(self, client) -> None:
        """Puts the run's tables onto `client`'s cluster (before the model attaches to them),
        replacing those of the same names: a job rerun on the tables cluster it trained on finds
        its tables there, past the checkpoint's step."""
        if client is not None:
            restore_checkpoint(self.path, client, replace=True)

    def load(self, model: torch.nn.Module, optimizers: list) -> RunState:
        """Loads the dense model's and optimizers' states; returns the run's state."""
        apply_dense(self.dense, model, optimizers)
        return self.state


def _resolve(path: Path) -> Path:
    """A checkpoint, or a run's checkpoint_dir: its latest complete checkpoint."""
    if (path / "manifest.json").is_file() or not path.is_dir():
        return path  # not a directory: Manifest.read says why
    latest = latest_checkpoint(path)
    return latest if latest is not None else path
