"""Checkpoints of a Ray Train run: model and optimizer tensors in safetensors, everything else
in JSON (no pickle); where a run's checkpoints live, resuming one, and picking its best epoch."""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline import storage
from pipeline.config import TrainConfig
from pipeline.errors import ConfigError
from pipeline.models.registry import CoarseHeadModel
from pipeline.training.recipe import monitor_mode

RUN_NAME = "run"
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train's record of a run's checkpoints


def checkpoint_root(cfg: TrainConfig, output: str) -> str:
    """--checkpoint-path, else `<output>/checkpoints`."""
    return storage.normalize(cfg.checkpoint_path) if cfg.checkpoint_path else storage.join(
        output, "checkpoints")


def check_resume(cfg: TrainConfig, root: str) -> None:
    """Ray Train restores a run whose RunConfig(name, storage_path) already holds a checkpoint
    snapshot. Make that explicit: resume only when asked, and only what exists."""
    snapshot = storage.join(root, RUN_NAME, SNAPSHOT_FILE)
    found = storage.exists(snapshot)
    if found and not cfg.resume:
        raise ConfigError(
            f"checkpoint path {root!r} already holds a training run ({snapshot} exists); pass "
            "--resume to continue it, or choose another --output or --checkpoint-path")
    if cfg.resume and not found:
        raise ConfigError(f"--resume: no run to resume in {root!r} (no {SNAPSHOT_FILE})")


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain classifier inside DDP and the coarse-head wrapper."""
    model = model.module if hasattr(model, "module") else model
    return model.model if isinstance(model, CoarseHeadModel) else model


def _coarse_head(model: nn.Module) -> nn.Module | None:
    model = model.module if hasattr(model, "module") else model
    return model.coarse_head if isinstance(model, CoarseHeadModel) else None


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def save_checkpoint(folder: str, model, optimizer, scheduler, epoch: int, metrics: dict,
                    early_stopping: dict | None = None) -> None:
    """Model and optimizer tensors in safetensors, everything else in JSON: no pickle.

    model.safetensors holds the plain classifier (loadable by create_model); a coarse head, when
    trained, goes to coarse_head.safetensors."""
    save_file(_tensors(_unwrap(model)), os.path.join(folder, "model.safetensors"))
    coarse = _coarse_head(model)
    if coarse is not None:
        save_file(_tensors(coarse), os.path.join(folder, "coarse_head.safetensors"))
    opt = optimizer.state_dict()
    tensors = {f"{pid}.{name}": (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().contiguous()
               for pid, state in opt["state"].items() for name, v in state.items()}
    save_file(tensors, os.path.join(folder, "optimizer.safetensors"))
    with open(os.path.join(folder, "state.json"), "w") as f:
        json.dump({"epoch": epoch, "metrics": metrics, "param_groups": opt["param_groups"],
                   "scheduler": scheduler.state_dict(), "early_stopping": early_stopping or {}},
                  f, default=float)


def load_checkpoint(folder: str, model, optimizer, scheduler) -> tuple[int, dict]:
    """Restore model, optimizer and schedule; returns the next epoch to run and the early
    stopping state."""
    _unwrap(model).load_state_dict(load_file(os.path.join(folder, "model.safetensors")))
    coarse = _coarse_head(model)
    if coarse is not None:
        coarse.load_state_dict(load_file(os.path.join(folder, "coarse_head.safetensors")))
    with open(os.path.join(folder, "state.json")) as f:
        state = json.load(f)
    tensors = load_file(os.path.join(folder, "optimizer.safetensors"))
    opt_state: dict[int, dict] = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        opt_state.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    scheduler.load_state_dict(state["scheduler"])
    return int(state["epoch"]) + 1, state.get("early_stopping", {})


def pick_best(result, monitor: str):
    """(checkpoint, metrics) of the best reported epoch by `monitor`."""
    sign = -1.0 if monitor_mode(monitor) == "min" else 1.0
    return max(result.best_checkpoints, key=lambda cm: sign * cm[1][monitor])
