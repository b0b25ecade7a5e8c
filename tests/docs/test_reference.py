"""docs/reference.md cannot drift from the code: its generated parts (exit codes, output schema,
every job's --help) are regenerated and compared, and its hand-written column meanings list
exactly the output schema's columns."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

from pipeline.sinks.rows import OUTPUT_SCHEMA

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "reference.md"
GENERATOR = ROOT / "tools" / "docs_reference.py"


def test_generated_parts_match_the_code():
    proc = subprocess.run([sys.executable, str(GENERATOR), "--check"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, (proc.stderr or proc.stdout) + \
        "\n(regenerate with: python tools/docs_reference.py, then commit docs/reference.md)"


def test_the_check_sees_a_generated_part_edited_by_hand():
    """A hand edit inside the markers is what the check reports (on a copy of the text)."""
    spec = importlib.util.spec_from_file_location("docs_reference", GENERATOR)
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    page = PAGE.read_text()
    edited = page.replace("| 7 | `ERROR_BUDGET` |", "| 7 | `BUDGET` |")
    assert edited != page
    assert generator.render(edited) != edited


def test_column_meanings_list_the_output_schema():
    text = PAGE.read_text()
    table = text[text.index("| column | meaning |"):]
    table = table[:table.index("\n\n")]
    columns = re.findall(r"^\| `(\w+)` \|", table, flags=re.M)
    assert columns == OUTPUT_SCHEMA.names
