"""Exit codes come from one table (`pipeline.errors.ExitCode`): every error class takes its code
from it, every job's --help lists it, and the table in docs/reference.md cannot drift from it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import errors
from pipeline.errors import EXIT_MEANINGS, ExitCode, PipelineError

ROOT = Path(__file__).resolve().parents[2]
JOBS = sorted(p.stem for p in (ROOT / "jobs").glob("*.py") if not p.stem.startswith("_"))


def error_classes() -> list[type[PipelineError]]:
    found, todo = [], [PipelineError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return [c for c in found if c.__module__ == errors.__name__]


def test_every_error_class_takes_its_code_from_the_table():
    codes = {cls.__name__: cls.exit_code for cls in error_classes()}
    assert all(isinstance(code, ExitCode) for code in codes.values()), codes
    # Each failure code but 'anything else' belongs to one error (and its subclasses).
    owners = {code: sorted(n for n, c in codes.items() if c == code and
                           getattr(errors, n).__base__.exit_code != code)
              for code in ExitCode if code not in (ExitCode.SUCCESS, ExitCode.OTHER)}
    assert all(len(names) == 1 for names in owners.values()), owners
    assert set(EXIT_MEANINGS) == set(ExitCode)


def test_the_reference_table_lists_exactly_the_codes():
    page = (ROOT / "docs" / "reference.md").read_text()
    table = page[page.index("| exit code | name | meaning |"):]
    table = table[:table.index("\n<!--")]
    rows = re.findall(r"^\| (\d+) \| `(\w+)` \| (.+) \|$", table, flags=re.M)
    assert [(int(code), name, meaning) for code, name, meaning in rows] == \
        [(int(c), c.name, EXIT_MEANINGS[c]) for c in sorted(ExitCode)]


@pytest.mark.parametrize("job", JOBS)
def test_every_jobs_help_ends_with_the_exit_codes(job):
    proc = subprocess.run([sys.executable, "-m", f"jobs.{job}", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    epilog = " ".join(proc.stdout[proc.stdout.index("exit codes:"):].split())
    for code, meaning in EXIT_MEANINGS.items():
        assert f"{int(code)} {meaning}" in epilog
