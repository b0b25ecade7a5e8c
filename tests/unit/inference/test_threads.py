"""The CPU actor's thread split: candidates, the choice from timed batches, and what a night's
summary records of it (on a real local Ray, and in the job's own process)."""

from __future__ import annotations

import pytest

from pipeline.config import RecategorizeConfig
from pipeline.inference import engine
from pipeline.inference.device import cpu_count
from pipeline.inference.threads import (
    TRIAL_BATCHES,
    WARMUP_BATCHES,
    Split,
    SplitTuner,
    candidates,
    split_tuner,
    summarize,
)
from pipeline.nightly.recategorize import run


def test_candidates_are_half_and_half_then_all_for_both():
    assert candidates(8) == [Split(4, 4), Split(8, 8)]
    assert candidates(3) == [Split(1, 2), Split(3, 3)]
    assert candidates(1) == [Split(1, 1)]


def feed(tuner: SplitTuner, seconds_per_batch: dict[Split, float], rows: int = 10) -> list[Split]:
    """Batches finishing one after another, each taking its split's time; the splits used."""
    now, used = 0.0, []
    for _ in range(WARMUP_BATCHES + 2 * TRIAL_BATCHES + 3):
        split = tuner.current()
        used.append(split)
        now += seconds_per_batch[split]
        tuner.observe(rows, now)
    return used


@pytest.mark.parametrize("faster", [Split(2, 2), Split(1, 1)])
def test_tuner_tries_each_split_then_keeps_the_fastest(faster):
    tuner = SplitTuner(candidates(2))
    slower = next(s for s in candidates(2) if s != faster)
    used = feed(tuner, {faster: 0.1, slower: 0.3})
    assert tuner.chosen == faster and used[-3:] == [faster] * 3
    assert used[:WARMUP_BATCHES + TRIAL_BATCHES] == [Split(1, 1)] * (WARMUP_BATCHES + TRIAL_BATCHES)
    record = tuner.record()
    assert (record["model_threads"], record["decode_threads"]) == (faster.model, faster.decode)
    assert record["how"] == "measured" and record["settled"] is True
    assert record["rows_per_s"] == {faster.name: pytest.approx(100.0),
                                    slower.name: pytest.approx(33.3, abs=0.1)}


def test_a_fixed_split_is_never_changed():
    tuner = SplitTuner.fixed(Split(1, 1), "--inference-threads")
    assert set(feed(tuner, {Split(1, 1): 0.1})) == {Split(1, 1)}
    assert tuner.record() == {"model_threads": 1, "decode_threads": 1,
                              "how": "--inference-threads", "settled": True}


def test_inference_threads_fixes_the_split_of_a_decoding_actor():
    cfg = RecategorizeConfig(device="cpu", inference_threads=1)
    place = engine.Placement.from_config(cfg, "cpu")
    assert place.in_actor
    tuner = split_tuner(place)
    assert tuner.chosen == tuner.current() and tuner.record()["how"] == "--inference-threads"
    assert tuner.current().model == 1
    measured = split_tuner(engine.Placement.from_config(RecategorizeConfig(device="cpu"), "cpu"))
    assert measured.chosen is None or measured.record()["how"].startswith("one candidate")


def test_summary_counts_each_choice():
    a = {"model_threads": 2, "decode_threads": 2, "how": "measured", "settled": True,
         "rows_per_s": {"1 model + 1 decode": 50.0, "2 model + 2 decode": 60.0}}
    b = {"model_threads": 1, "decode_threads": 1, "how": "measured", "settled": False}
    summary = summarize([b, a, a])
    assert {c["batches"] for c in summary["choices"]} == {1, 2}
    assert summary["trials"] == a["rows_per_s"]


@pytest.mark.slow
def test_a_ray_night_records_the_measured_split(ray_local, small_catalog, tmp_path, tiny_model):
    manifest, _, _ = small_catalog
    options = candidates(cpu_count())  # one actor: all of this machine's cores
    if len(options) < 2:
        pytest.skip("one core: there is no split to measure")
    summary = run(RecategorizeConfig(manifest=str(manifest), model=tiny_model,
                                     output=str(tmp_path / "ray"), batch_size=2, executor="ray",
                                     device="cpu"))
    choices = summary["thread_split"]["choices"]
    assert choices and all(c["how"] == "measured" for c in choices)
    # Each batch after the trials carries the settled choice, one of the candidates.
    settled = [c for c in choices if c["settled"]]
    assert settled and {(c["model_threads"], c["decode_threads"]) for c in settled} <= {
        (s.model, s.decode) for s in options}
    assert len(summary["thread_split"]["trials"]) == len(options)

    local = run(RecategorizeConfig(manifest=str(manifest), model=tiny_model,
                                   output=str(tmp_path / "local"), executor="local"))
    assert local["thread_split"]["choices"][0]["how"].startswith("in process")
