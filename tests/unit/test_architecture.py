"""The package's module graph: no import cycles, lazy (function-level) imports included."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "pipeline"


def module_names() -> dict[str, Path]:
    """Every module of the package by its dotted name under `pipeline` ('inference.engine');
    a package's __init__ is the package's name."""
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts) or "__init__"] = path
    return names


def import_graph(module_level: bool = False) -> dict[str, set[str]]:
    """Module -> the pipeline modules it imports anywhere in its source, or with
    `module_level` only at import time (what importing it loads). A package that is imported
    stands for its __init__."""
    modules = module_names()
    graph = {}
    for name, path in modules.items():
        deps = set()
        tree = ast.parse(path.read_text())
        for node in (tree.body if module_level else ast.walk(tree)):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and \
                    (node.module or "").split(".")[0] == "pipeline":
                base = node.module.removeprefix("pipeline").lstrip(".")
                for a in node.names:
                    full = f"{base}.{a.name}" if base else a.name
                    targets.append(full if full in modules else base)
            elif isinstance(node, ast.Import):
                targets = [a.name.removeprefix("pipeline.") for a in node.names
                           if a.name.startswith("pipeline.")]
            deps |= {t for t in targets if t in modules}
        # a package's __init__ is not a dependency of its own modules
        graph[name] = {d for d in deps if d != name and not name.startswith(d + ".")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state, path = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                found.append([*path[path.index(dep):], dep])
            elif dep not in state:
                visit(dep)
        path.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_pipeline_modules_import_no_cycle():
    graph = import_graph()
    assert {"config", "analysis.evaluate", "training.train", "models.registry",
            "sinks.parquet"} <= set(graph)
    assert cycles(graph) == []


# The library module behind each job that reads images: each must build its plan with the
# scoring engine (docs/architecture.md), so every job shares the URI policy and the limits.
IMAGE_JOBS = {"recategorize": "nightly.recategorize", "evaluate": "analysis.evaluate",
              "embed": "training.embeddings", "audit": "analysis.audit",
              "calibrate": "training.recalibrate", "export": "inference.export",
              "train": "training.data"}
# Image reading below the engine: only the engine (its plan and its change-signal probe) and the
# images package itself use it. The throughput benchmark is the one exception: it times plain
# decode loops beside the engine.
IMAGE_READING = {"images.fetch", "images.preprocess", "images.decode"}
ENGINE = {"inference.engine", "inference.probe"}
PLAIN_LOOP_BENCHMARK = "analysis.benchmark"


def reaches(graph: dict[str, set[str]], start: str, target: str) -> bool:
    todo, seen = [start], set()
    while todo:
        node = todo.pop()
        if node == target:
            return True
        if node not in seen:
            seen.add(node)
            todo += graph.get(node, ())
    return False


def test_every_job_that_reads_images_scores_through_the_engine():
    graph = import_graph()
    assert set(IMAGE_JOBS.values()) <= set(graph)
    assert {m for m in IMAGE_JOBS.values() if not reaches(graph, m, "inference.engine")} == set()
    around = {m for m, deps in graph.items() if deps & IMAGE_READING and
              not m.startswith("images.") and m not in ENGINE | {PLAIN_LOOP_BENCHMARK}}
    assert around == set()


# The layer order, lowest first: a module imports only its own layer or lower ones. Model-level
# code (images, models) never reaches inference, nightly, training or analysis.
LAYERS = [
    {"__init__", "errors", "logs", "storage", "catalog", "importers", "config", "pages"},
    {"images"},
    {"models"},
    {"sinks"},
    {"inference"},
    {"nightly"},
    {"training", "analysis", "review"},
]


def layer(module: str) -> int:
    head = module.split(".")[0]
    return next(i for i, names in enumerate(LAYERS) if head in names)


def test_every_module_has_a_layer():
    assert [m for m in import_graph() if not any(m.split(".")[0] in s for s in LAYERS)] == []


def test_no_module_imports_a_higher_layer():
    graph = import_graph()
    upward = sorted(f"{m} -> {d}" for m, deps in graph.items() for d in deps
                    if layer(d) > layer(m))
    assert upward == []


def test_layer_check_sees_an_upward_import():
    assert layer("models.decide") < layer("inference.engine") < layer("nightly.drift")


def private_imports(path: Path) -> list[str]:
    """`from pipeline.x import _name`: another module's private name."""
    return [f"{node.module}.{a.name}" for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline")
            for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]


def test_no_module_imports_another_modules_private_names():
    roots = [PACKAGE, PACKAGE.parent / "jobs"]
    found = {str(p.relative_to(PACKAGE.parent)): private_imports(p)
             for root in roots for p in root.rglob("*.py")}
    assert {k: v for k, v in found.items() if v} == {}


def test_model_level_code_imports_no_ray():
    """images/ and models/ never import Ray, not even inside a function: they run and are
    benchmarked on a machine without a cluster."""
    offenders = []
    for path in sorted([*(PACKAGE / "images").rglob("*.py"), *(PACKAGE / "models").rglob("*.py")]):
        imported, _ = _modules_and_calls(path)
        offenders += [f"{path.name}: {m}" for m in imported if m == "ray" or m.startswith("ray.")]
    assert offenders == []


def test_engine_and_config_load_neither_ray_nor_torch():
    code = ("import sys, pipeline.inference.engine, pipeline.config; "
            "print(sorted(m for m in ('ray', 'torch') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=True)
    assert proc.stdout.strip() == "[]"


def test_every_job_that_reads_images_takes_the_uri_policy_options():
    from pipeline import config

    configs = {"recategorize": config.RecategorizeConfig, "evaluate": config.EvaluateConfig,
               "embed": config.EmbedConfig, "audit": config.AuditConfig,
               "calibrate": config.CalibrateConfig, "train": config.TrainConfig}
    # export reads only local training images under --calibration-source, a fixed policy
    assert set(configs) == set(IMAGE_JOBS) - {"export"}
    policy = set(config.ImageAccessOptions.model_fields)
    assert {job for job, cls in configs.items() if not policy <= set(cls.model_fields)} == set()


# Network and storage clients: only the storage layer (our own files: manifests, artifacts,
# outputs), the guarded fetch path (image bytes) and the lease (its conditional S3 writes) hold them.
CLIENT_MODULES = ("aiohttp", "requests", "urllib.request", "http.client", "fsspec", "s3fs", "gcsfs")
CLIENT_HOLDERS = {"fetch", "storage", "lease"}
# Modules that read whole files by URI with storage.read_bytes: each reads this project's own
# files (artifacts, configs, the audit's tables, pinned weights), never a manifest's image.
OWN_FILE_READERS = {"artifact", "cli", "config", "export", "findings", "registry", "pretrained", "storage"}


def _modules_and_calls(path: Path) -> tuple[set[str], set[str]]:
    imported, calls = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                isinstance(node.func.value, ast.Name):
            calls.add(f"{node.func.value.id}.{node.func.attr}")
    return imported, calls


def test_every_byte_read_from_a_uri_goes_through_the_fetch_path():
    """Image bytes reach the pipeline only through pipeline.images.fetch (engine.ImageSettings.fetch,
    the preprocessor): no other module holds a network or storage client, and whole-file reads
    by URI stay in the modules that read the project's own files."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        imported, calls = _modules_and_calls(path)
        clients = {m for m in imported for c in CLIENT_MODULES if m == c or m.startswith(c + ".")}
        if clients and path.stem not in CLIENT_HOLDERS:
            offenders.append(f"{path.name} imports {sorted(clients)}")
        if "storage.read_bytes" in calls and path.stem not in OWN_FILE_READERS:
            offenders.append(f"{path.name} reads whole files with storage.read_bytes")
    assert offenders == []


# Sizes a reader can hold in their head: a module a sitting, a function a screen.
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def test_no_module_or_function_outgrows_a_reading():
    too_long = []
    for name, path in module_names().items():
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and \
                    node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:
                too_long.append(f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert too_long == []
