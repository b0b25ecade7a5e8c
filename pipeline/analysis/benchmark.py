"""Side-by-side throughput benchmark: one run, same data, same cores, one table.

Five ways to do (parts of) the nightly job, each timed on the same catalog (with several model
artifacts, e.g. a torch model and its ONNX exports, the model stages run once per artifact, side
by side):
- ceiling: the model alone on already-decoded uint8 tensors on the device;
- decode: fetch + decode + resize/crop alone, one process, per core;
- ours: `pipeline.nightly.recategorize.run`, manifest to committed Parquet;
- baseline: the same job written the way Ray Data's documentation writes batch inference
  (PIL decode and torchvision transforms per row with `Dataset.map`, float32 model, defaults);
- torch loop: a plain PyTorch DataLoader (workers = cores) + the same model, no Ray.

Each stage is timed with its peak memory by `pipeline.analysis.measure`.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from pipeline import storage
from pipeline.analysis.measure import Measurement, measure
from pipeline.images.decode import decode_image
from pipeline.inference.device import cpu_count
from pipeline.inference.predict import Classifier
from pipeline.models.artifact import TORCH_BACKEND, load_metadata

# ---------------------------------------------------------------- catalog


def build_catalog(folder: Path, sources: list[Path], rows: int, upload_px: int | None) -> Path:
    """A manifest of `rows` products over a pool of real photos; with `upload_px`, the pool is
    re-encoded so its shorter side is that many pixels (JPEG quality 90), as uploads usually are."""
    pool_dir = folder / f"images-{upload_px or 'original'}"
    pool_dir.mkdir(parents=True, exist_ok=True)
    pool = []
    for src in sources:
        target = pool_dir / src.name
        if not target.exists():
            if upload_px:
                im = Image.open(src).convert("RGB")
                scale = upload_px / min(im.size)
                im = im.resize((round(im.width * scale), round(im.height * scale)),
                               Image.Resampling.BICUBIC)
                im.save(target, "JPEG", quality=90)
            else:
                target.write_bytes(src.read_bytes())
        pool.append(str(target.resolve()))
    table = pa.table({
        "product_id": [f"bench-{i:08d}" for i in range(rows)],
        "image_uri": [pool[i % len(pool)] for i in range(rows)],
        "current_category": pa.nulls(rows, pa.string()),
    })
    manifest = folder / f"manifest-{upload_px or 'original'}-{rows}.parquet"
    pq.write_table(table, manifest)
    return manifest


# ---------------------------------------------------------------- stages


def model_ceiling(model_uri: str, device: str, batch_size: int, seconds: float = 5.0,
                  tta: str = "none") -> int:
    """The model alone: uint8 batches already decoded and already on the device."""
    clf = Classifier(model_uri, device=device, num_threads=None, tta=tta)
    size = clf.meta.input_size
    images = np.random.default_rng(0).integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8)
    clf.probabilities(images)  # warm-up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        clf.probabilities(images)
        done += batch_size
    if clf.device.type == "cuda":
        torch.cuda.synchronize()
    return done


def decode_only(manifest: Path, size: int, limit: int) -> int:
    """Read + decode + resize/crop in this process, one core."""
    uris = pq.read_table(manifest, columns=["image_uri"]).column("image_uri").to_pylist()[:limit]
    for uri in uris:
        with open(uri, "rb") as f:
            decode_image(f.read(), size)
    return len(uris)


def ours(manifest: Path, model_uri: str, output: Path, **options) -> int:
    from pipeline.config import RecategorizeConfig
    from pipeline.nightly.recategorize import run

    # Every row scored (none carried from an earlier run), by the artifact named, as the other
    # stages run it: a torch artifact's int8 export is a row of its own (--compare-with it).
    backend = "torch" if load_metadata(model_uri).backend == TORCH_BACKEND else "auto"
    summary = run(RecategorizeConfig(manifest=str(manifest), model=model_uri, output=str(output),
                                     overwrite=True, full=True, backend=backend, **options))
    if summary["errors"]:  # a benchmark of error rows measures nothing
        raise RuntimeError(f"benchmark run had error rows: {summary['errors_by_type']}")
    return summary["rows"]


def ray_docs_baseline(manifest: Path, model_uri: str, output: Path) -> int:
    """Batch inference as Ray Data's documentation writes it: per-row PIL decode and torchvision
    transforms in `Dataset.map`, a float32 model in an actor pool, default settings."""
    import ray.data
    from torchvision import transforms

    meta = load_metadata(model_uri)
    transform = transforms.Compose([
        transforms.Resize(meta.input_size), transforms.CenterCrop(meta.input_size),
        transforms.ToTensor(), transforms.Normalize(meta.mean, meta.std)])

    def preprocess(row: dict) -> dict:
        with open(row["image_uri"], "rb") as f:
            image = Image.open(io.BytesIO(f.read())).convert("RGB")
        row["image"] = transform(image).numpy()
        return row

    class Predictor:
        def __init__(self):
            from pipeline.models.artifact import load_artifact

            self.model, _ = load_artifact(model_uri)

        def __call__(self, batch: dict) -> dict:
            with torch.inference_mode():
                probs = torch.softmax(self.model(torch.as_tensor(batch["image"])), dim=1)
            conf, pred = probs.max(dim=1)
            return {"product_id": batch["product_id"], "predicted": pred.numpy(),
                    "confidence": conf.numpy()}

    ds = ray.data.read_parquet(str(manifest)).map(preprocess)
    ds = ds.map_batches(Predictor, compute=ray.data.ActorPoolStrategy(size=1))
    ds.write_parquet(str(output))
    return pq.ParquetDataset(str(output)).read(columns=["product_id"]).num_rows


class _ManifestImages(torch.utils.data.Dataset):
    def __init__(self, uris: list[str], size: int):
        self.uris, self.size = uris, size

    def __len__(self) -> int:
        return len(self.uris)

    def __getitem__(self, i: int) -> torch.Tensor:
        with open(self.uris[i], "rb") as f:
            return torch.from_numpy(decode_image(f.read(), self.size))


def torch_loop(manifest: Path, model_uri: str, output: Path, workers: int, batch_size: int) -> int:
    """No Ray: a DataLoader with `workers` decode processes feeding the model in this process,
    predictions written to one Parquet file."""
    table = pq.read_table(manifest, columns=["product_id", "image_uri"])
    clf = Classifier(model_uri, device="auto", num_threads=None)
    loader = torch.utils.data.DataLoader(
        _ManifestImages(table.column("image_uri").to_pylist(), clf.meta.input_size),
        batch_size=batch_size, num_workers=workers, pin_memory=clf.device.type == "cuda")
    predicted, confidence = [], []
    for images in loader:
        conf, idx = clf.probabilities(images.numpy()).max(dim=1)
        predicted.extend(clf.classes[idx.cpu().numpy()])
        confidence.append(conf.cpu().numpy())
    output.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"product_id": table.column("product_id"),
                             "predicted_category": pa.array(predicted, pa.string()),
                             "confidence": np.concatenate(confidence)}), output / "part-0.parquet")
    return table.num_rows


# ---------------------------------------------------------------- report


def format_table(rows: list[tuple[str, Measurement]], ceiling: dict[str, float],
                 baseline: dict[str, float], unit: str) -> str:
    """Markdown table; ratios are to the same model's model-only ceiling and to the same
    catalog's baseline."""
    lines = [f"| catalog | stage | images | seconds | images/s | images/s per {unit} | peak memory "
             "| vs ceiling | vs baseline |", "|---|---|---|---|---|---|---|---|---|"]
    for catalog, m in rows:
        base = baseline.get(catalog)
        lines.append(
            f"| {catalog} | {m.name} | {m.images} | {m.seconds:.1f} | {m.images_per_s:.0f} | "
            f"{m.per_unit:.0f} | {m.peak_memory_bytes / 2**20:.0f} MiB | "
            f"{m.images_per_s / ceiling[m.model]:.0%} | "
            + (f"{m.images_per_s / base:.2f}x |" if base else "- |"))
    return "\n".join(lines)


STAGES = ("ceiling", "ceiling_tta", "decode", "ours", "baseline", "torch_loop")


def artifact_bytes(uri: str) -> int:
    """Size on disk of a local model artifact folder (every file in it)."""
    return sum(p.stat().st_size for p in Path(uri).rglob("*") if p.is_file())


def model_labels(models: list[str]) -> dict[str, str]:
    """Artifact -> its row label: its format (with its version where two share a format); no
    label for a single artifact, whose rows keep their plain names."""
    if len(models) == 1:
        return {models[0]: ""}
    metas = {m: load_metadata(m) for m in models}
    formats = [meta.format for meta in metas.values()]
    return {m: meta.format if formats.count(meta.format) == 1
            else f"{meta.format} {meta.model_version[:8]}" for m, meta in metas.items()}


def parse_stages(cfg) -> list[str]:
    """--stages as a list, each one of STAGES."""
    from pipeline.errors import ConfigError

    stages = [s.strip() for s in cfg.stages.split(",") if s.strip()]
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ConfigError(f"unknown stage(s) {sorted(unknown)}; valid: {', '.join(STAGES)}")
    return stages


def parse_variants(cfg) -> list[int | None]:
    """--upload-sizes as pixel sizes, None for the original photos."""
    from pipeline.errors import ConfigError

    variants = []
    for v in (s.strip() for s in cfg.upload_sizes.split(",") if s.strip()):
        if v != "original" and not v.isdigit():
            raise ConfigError(f"--upload-sizes: {v!r} is neither 'original' nor a pixel size")
        variants.append(None if v == "original" else int(v))
    return variants


def compared_models(cfg, stages: list[str]) -> tuple[list[str], dict, list[str]]:
    """(--model then --compare-with, their metadata, the torch ones among them), checked: one
    input size for all, and a torch model when the baseline runs."""
    from pipeline.errors import ConfigError

    models = [cfg.model] + [m.strip() for m in cfg.compare_with.split(",") if m.strip()]
    metas = {m: load_metadata(m) for m in models}
    if len({meta.input_size for meta in metas.values()}) > 1:
        raise ConfigError("--compare-with: the artifacts compared side by side must share "
                          "--model's input size")
    torch_models = [m for m in models if metas[m].backend == TORCH_BACKEND]
    if "baseline" in stages and not torch_models:
        raise ConfigError("--stages baseline runs the Ray Data recipe on a torch model: give a "
                          "torch artifact as --model or in --compare-with, or drop baseline from "
                          "--stages")
    return models, metas, torch_models


@dataclass
class Bench:
    """What every stage of one benchmark run shares."""

    cfg: Any
    stages: list[str]
    models: list[str]
    torch_models: list[str]
    labels: dict[str, str]
    input_size: int
    units: int
    cores: int
    root: Path

    @property
    def out(self) -> Path:
        return self.root / "out"


def measure_catalog(b: Bench, upload_px: int | None, sources: list[Path],
                    rows: list[tuple[str, Measurement]], baseline: dict[str, float]) -> None:
    """The catalog-level stages on one catalog variant, appended to `rows` (the baseline's
    throughput also to `baseline`)."""
    import shutil

    cfg, out = b.cfg, b.out
    options = {"batch_size": cfg.batch_size, "device": cfg.device}
    catalog = f"{upload_px or 348} px"
    manifest = build_catalog(b.root, sources, cfg.rows, upload_px)
    decode_only(manifest, b.input_size, len(sources))  # warm the page cache
    if "decode" in b.stages:
        rows.append((catalog, measure("decode + preprocess, 1 process", 1, lambda m=manifest:
                                      decode_only(m, b.input_size, min(cfg.rows, 1000)))))
    if "baseline" in b.stages:
        shutil.rmtree(out, ignore_errors=True)
        m = measure("baseline (Ray Data docs recipe)", b.units, lambda m=manifest: ray_docs_baseline(
            m, b.torch_models[0], out / "baseline"), b.labels[b.torch_models[0]])
        baseline[catalog] = m.images_per_s
        rows.append((catalog, m))
    for model in b.models:
        if "torch_loop" in b.stages:
            rows.append((catalog, measure(
                f"plain PyTorch loop ({b.cores} workers)", b.units, lambda m=manifest, model=model:
                torch_loop(m, model, out / "loop", b.cores, cfg.batch_size), b.labels[model])))
        if "ours" in b.stages:
            rows.append((catalog, measure(
                "ours (manifest -> committed Parquet)", b.units, lambda m=manifest, model=model:
                ours(m, model, out / "ours", **options), b.labels[model])))


def benchmark_header(cfg, device: torch.device, cores: int, models: list[str], metas: dict) -> str:
    """The device, model and artifacts the table was measured with."""
    meta = metas[models[0]]
    hardware = torch.cuda.get_device_name() if device.type == "cuda" else f"{cores} cores"
    described = "; ".join(
        f"{metas[m].format} {metas[m].model_version} ({artifact_bytes(m) / 1e6:.1f} MB)"
        if storage.is_local(m) else f"{metas[m].format} {metas[m].model_version}" for m in models)
    return (f"device: {device.type} ({hardware}), "
            f"model: {meta.architecture} @ {meta.input_size}px, rows per catalog: {cfg.rows}, "
            f"batch size: {cfg.batch_size}\nartifacts: {described}")


def run_benchmark(cfg) -> str:
    """Run the selected stages on each catalog variant (the model stages once per artifact,
    --model then --compare-with); return the Markdown table."""
    from pipeline.config import EXAMPLES_DIR
    from pipeline.inference.cluster import init_ray
    from pipeline.inference.predict import resolve_device

    stages = parse_stages(cfg)
    variants = parse_variants(cfg)
    models, metas, torch_models = compared_models(cfg, stages)
    labels = model_labels(models)
    device = resolve_device(cfg.device)
    cores = cpu_count()
    units = 1 if device.type == "cuda" else cores
    unit = "GPU" if device.type == "cuda" else "core"
    sources = sorted((EXAMPLES_DIR / "sample-catalog" / "images").rglob("*.jpg"))
    init_ray(cfg.ray_address, cfg.num_cpus)
    bench = Bench(cfg, stages, models, torch_models, labels, metas[models[0]].input_size, units,
                  cores, Path(cfg.output))

    ceilings = {m: measure("ceiling (model only)", units,
                           lambda m=m: model_ceiling(m, device.type, cfg.batch_size), labels[m])
                for m in models}
    rows: list[tuple[str, Measurement]] = []
    baseline: dict[str, float] = {}
    for upload_px in variants:
        measure_catalog(bench, upload_px, sources, rows, baseline)
    if "ceiling_tta" in stages:
        rows[:0] = [("-", measure("ceiling, --tta flip (model only)", units, lambda m=m: model_ceiling(
            m, device.type, cfg.batch_size, tta="flip"), labels[m])) for m in models]
    if "ceiling" in stages:
        rows[:0] = [("-", ceilings[m]) for m in models]
    return (benchmark_header(cfg, device, cores, models, metas) + "\n\n"
            + format_table(rows, {c.model: c.images_per_s for c in ceilings.values()},
                           baseline, unit))
