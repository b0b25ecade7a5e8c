"""Training speed per freezing policy and input size: images/s of one optimizer step on the
device, side by side in one run. Model-level (no Ray): it sizes what a time budget can hold
(how many epochs of which route at which resolution) before a long run is started."""

from __future__ import annotations

import time

import torch
from torch.nn import functional as F

from pipeline.inference.predict import resolve_device
from pipeline.models.registry import create_model, freeze_backbone, freeze_batchnorm_stats

FULL = "full"  # the policy name for "everything trains"
NUM_CLASSES = 81  # the Grocery Store head; the head's size barely matters to the step time


def step_speed(name: str, train_stages: int | None, size: int, batch_size: int, steps: int,
               device: torch.device) -> float:
    """Best images/s over `steps` timed optimizer steps (one warm-up step first)."""
    model = create_model(name, NUM_CLASSES).to(device, memory_format=torch.channels_last)
    freeze_backbone(model, name, train_stages)
    model.train()
    freeze_batchnorm_stats(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    x = torch.randn(batch_size, 3, size, size, device=device).contiguous(
        memory_format=torch.channels_last)
    y = torch.randint(0, NUM_CLASSES, (batch_size,), device=device)
    best = float("inf")
    for i in range(steps + 1):
        start = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:  # the first step pays for allocation and kernel selection
            best = min(best, time.perf_counter() - start)
    return batch_size / best


def run_train_benchmark(name: str, policies: list[str], sizes: list[int], batch_size: int,
                        steps: int, device: str = "auto") -> str:
    """Markdown table: one row per policy, one column per input size."""
    dev = resolve_device(device)
    lines = [f"model: {name}, batch {batch_size}, device {dev.type} "
             f"({torch.get_num_threads()} threads); images/s per optimizer step", "",
             "| trainable | " + " | ".join(f"{s} px" for s in sizes) + " |",
             "|---|" + "---|" * len(sizes)]
    for policy in policies:
        stages = None if policy == FULL else int(policy)
        speeds = [step_speed(name, stages, s, batch_size, steps, dev) for s in sizes]
        label = "everything" if stages is None else f"last {stages} stages + head"
        lines.append(f"| {label} | " + " | ".join(f"{v:.1f}" for v in speeds) + " |")
    return "\n".join(lines)
