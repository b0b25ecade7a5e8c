"""The thread split of a CPU actor that decodes its own input, chosen from its own first batches.

Such an actor runs a batch in the model while it decodes the next one, so its cores are shared by
two thread pools. Which split is fastest depends on the model and the backend: an fp32 torch
model wants every core, an int8 graph leaves room for decoding (BENCHMARKS.md, "The thread
split"). So the actor tries each candidate on a few batches, after one batch of warm-up, and
keeps the one that finished rows fastest. `--inference-threads` fixes the split instead.
No Ray or torch imports.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from pipeline.inference.device import cpu_count

TRIAL_BATCHES = 3  # batches timed per candidate
WARMUP_BATCHES = 1  # the first batch pays for first-touch allocations and caches
# The first candidate (the split an actor starts with) is kept unless another is this much
# faster: trials of a few batches are noisy, and a tie is no reason to switch.
MARGIN = 0.03
METADATA_KEY = b"thread_split"  # where an output table carries the choice to the writer


@dataclass(frozen=True)
class Split:
    """Intra-op threads of the model and fetch/decode threads of the actor."""

    model: int
    decode: int

    @property
    def name(self) -> str:
        return f"{self.model} model + {self.decode} decode"


def candidates(cores: int) -> list[Split]:
    """Half the cores each, and all the cores for both (the model and the decoders then take
    turns on them, which suits a model that is slow next to its decoding)."""
    half = max(1, cores // 2)
    out = [Split(half, max(1, cores - half)), Split(cores, cores)]
    return list(dict.fromkeys(out))


@dataclass
class SplitTuner:
    """Times each candidate split on the batches that finish under it and settles on the
    fastest. `observe` is called once per finished batch, with the model idle (under the
    actor's model lock); it returns the split to apply from then on."""

    options: list[Split]
    how: str = "measured"  # or why it was not: '--inference-threads', 'one candidate'
    trial_batches: int = TRIAL_BATCHES
    rows_per_s: dict[str, float] = field(default_factory=dict)
    chosen: Split | None = None
    _index: int = 0
    _seen: int = 0
    _count: int = 0
    _rows: int = 0
    _since: float = 0.0

    def __post_init__(self) -> None:
        if len(self.options) == 1:
            self.chosen = self.options[0]
            if self.how == "measured":
                self.how = "one candidate (one core)"

    @classmethod
    def fixed(cls, split: Split, how: str) -> SplitTuner:
        return cls([split], how=how)

    def current(self) -> Split:
        return self.chosen or self.options[self._index]

    def observe(self, rows: int, now: float | None = None) -> Split:
        """A batch of `rows` finished at `now`; returns the split for the next batches."""
        if self.chosen is not None:
            return self.chosen
        now = time.perf_counter() if now is None else now
        self._seen += 1
        if self._seen <= WARMUP_BATCHES:  # a window starts when a batch has finished
            self._since = now
            return self.current()
        self._rows += rows
        self._count += 1
        if self._count < self.trial_batches:
            return self.current()
        self.rows_per_s[self.current().name] = round(self._rows / max(now - self._since, 1e-9), 1)
        self._since, self._rows, self._count = now, 0, 0
        if self._index + 1 < len(self.options):
            self._index += 1
        else:
            first, best = self.options[0], max(self.options, key=lambda s: self.rows_per_s[s.name])
            faster = self.rows_per_s[best.name] > self.rows_per_s[first.name] * (1 + MARGIN)
            self.chosen = best if faster else first
        return self.current()

    def record(self) -> dict:
        """What the summary says of this actor's split."""
        split = self.current()
        return {"model_threads": split.model, "decode_threads": split.decode, "how": self.how,
                "settled": self.chosen is not None,
                **({"rows_per_s": self.rows_per_s} if self.rows_per_s else {})}

    def metadata(self) -> bytes:
        return json.dumps(self.record(), sort_keys=True).encode()


def split_tuner(place: Any) -> SplitTuner:
    """How an actor that decodes its own input on the CPU splits its cores: measured on its
    first batches (`inference.threads`), unless --inference-threads fixes it."""
    model, decode = actor_threads(place)
    if place.inference_threads:
        return SplitTuner.fixed(Split(model, decode), "--inference-threads")
    return SplitTuner(candidates(max(1, cpu_count() // place.num_actors)))


def actor_threads(place: Any) -> tuple[int, int]:
    """(model threads, decode threads) in each inference actor.

    Ray pins OMP_NUM_THREADS to an actor's CPU reservation, which is too few for a CPU model.
    An actor that decodes its own input splits its cores: half run the model on one batch while
    the other half decode the next, because oversubscribed OpenMP threads wait on each other.
    """
    if place.device == "cuda":
        return place.inference_threads or max(1, int(place.cpus_per_actor)), 1
    cores = max(1, cpu_count() // place.num_actors)
    if not place.in_actor:
        return place.inference_threads or cores, 1
    model = place.inference_threads or max(1, cores // 2)
    return model, max(1, cores - model)


def summarize(records: list[dict]) -> dict:
    """The summary's `thread_split`: each distinct choice the actors reported, with how many
    batches carried it."""
    counts: dict[str, int] = {}
    for record in records:
        key = json.dumps({k: v for k, v in record.items() if k != "rows_per_s"}, sort_keys=True)
        counts[key] = counts.get(key, 0) + 1
    by_choice = [{**json.loads(k), "batches": n} for k, n in counts.items()]
    measured = [r["rows_per_s"] for r in records if r.get("rows_per_s")]
    return {"choices": by_choice, **({"trials": measured[-1]} if measured else {})}

