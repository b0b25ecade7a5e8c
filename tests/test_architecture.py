"""The package's module graph: no import cycles, lazy (function-level) imports included."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"


def import_graph() -> dict[str, set[str]]:
    """Module -> the pipeline modules it imports anywhere in its source."""
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    graph = {}
    for name in modules:
        deps = set()
        for node in ast.walk(ast.parse((PACKAGE / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "pipeline":
                deps |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline."):
                deps.add(node.module.split(".")[1])
        graph[name] = deps - {name}
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
    assert {"config", "evaluate", "train", "models"} <= set(graph)
    assert cycles(graph) == []


# The library module behind each job that reads images: each must build its plan with the
# scoring engine (README, "Architecture"), so every job shares the URI policy and the limits.
IMAGE_JOBS = {"recategorize": "recategorize", "evaluate": "evaluate", "embed": "embeddings",
              "audit": "audit"}


def test_every_job_that_reads_images_scores_through_the_engine():
    graph = import_graph()
    assert {module for module in IMAGE_JOBS.values() if "engine" not in graph[module]} == set()


def test_every_job_that_reads_images_takes_the_uri_policy_options():
    from pipeline import config

    configs = {"recategorize": config.RecategorizeConfig, "evaluate": config.EvaluateConfig,
               "embed": config.EmbedConfig, "audit": config.AuditConfig}
    assert set(configs) == set(IMAGE_JOBS)
    policy = set(config.ImageAccessOptions.model_fields)
    assert {job for job, cls in configs.items() if not policy <= set(cls.model_fields)} == set()


# Network and storage clients: only the storage layer (our own files: manifests, artifacts,
# outputs), the guarded fetch path (image bytes) and the lease (its conditional S3 writes) hold them.
CLIENT_MODULES = ("aiohttp", "requests", "urllib.request", "http.client", "fsspec", "s3fs", "gcsfs")
CLIENT_HOLDERS = {"fetch", "storage", "lease"}
# Modules that read whole files by URI with storage.read_bytes: each reads this project's own
# files (artifacts, configs, the audit's tables, pinned weights), never a manifest's image.
OWN_FILE_READERS = {"artifact", "config", "export", "findings", "models", "pretrained", "storage"}


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
    """Image bytes reach the pipeline only through pipeline.fetch (engine.ImageSettings.fetch,
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
