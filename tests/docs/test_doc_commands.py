"""Every shell block in README.md and docs/*.md runs here, as written, on small data (see
tests/docs/doc_blocks.py for the directive above each block). A block that cannot run here is
skipped with the reason its directive gives, so `pytest -ra` lists each one."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import GROCERY_DATASET
from tests.docs.doc_blocks import Block, blocks_of, pages, parse_directive, run_block, scratch_checkout

ALL_BLOCKS = [block for page in pages() for block in blocks_of(page)]


def _tests() -> list:
    """One test per skipped or lone block, one per session (its blocks in page order)."""
    sessions: dict[tuple[str, str], list[Block]] = {}
    for block in ALL_BLOCKS:
        if block.problem:
            continue
        key = (block.page, block.session or f"L{block.line}") if block.action == "run" \
            else (block.page, f"L{block.line}")
        sessions.setdefault(key, []).append(block)
    return [pytest.param(group, id=f"{page}:{name}",
                         marks=[pytest.mark.slow] if any(b.slow for b in group) else [])
            for (page, name), group in sessions.items()]


def test_every_shell_block_says_how_it_runs():
    problems = [f"{block.where}: {block.problem}" for block in ALL_BLOCKS if block.problem]
    assert problems == [], "\n".join(problems)
    mixed = {(b.page, b.session) for b in ALL_BLOCKS if b.session and b.action == "skip"}
    assert mixed == set(), f"a skipped block cannot join a session: {mixed}"


@pytest.mark.parametrize("group", _tests())
def test_documented_commands(group: list[Block], tmp_path: Path):
    if group[0].action == "skip":
        pytest.skip(f"{group[0].where}: {group[0].reason}")
    if any(b.needs == "grocery" for b in group) and not (Path(GROCERY_DATASET) / "classes.csv").exists():
        pytest.skip(f"{group[0].where}: needs the Grocery Store dataset, not found at {GROCERY_DATASET}")
    scratch_checkout(tmp_path)
    for block in group:
        run_block(block, tmp_path)


def test_a_block_that_breaks_its_promise_fails(tmp_path: Path):
    """The runner fails a wrong exit code and a missing line, and passes a kept promise."""
    page = tmp_path / "page.md"
    page.write_text('<!-- doc-test: run expect="hello" -->\n```bash\necho hello\n```\n\n'
                    '<!-- doc-test: run exit=3 -->\n'
                    '```console\n$ echo one \\\n  two; exit 3\none two\n```\n\n'
                    '<!-- doc-test: run expect="bye" -->\n```sh\necho hello\n```\n\n'
                    '<!-- doc-test: run -->\n```bash\nfalse\necho not reached\n```\n\n'
                    '```bash\necho no directive\n```\n')
    kept, console, wrong_line, wrong_exit, bare = blocks_of(page, root=tmp_path)
    for block in (kept, console):
        run_block(block, tmp_path)
    for block in (wrong_line, wrong_exit):
        with pytest.raises(AssertionError):
            run_block(block, tmp_path)
    assert "no <!-- doc-test" in bare.problem


@pytest.mark.parametrize("text, problem", [
    ("skip", "needs reason"), ("run skip", "one of run or skip"), ("run exit=x", "not a number"),
    ("run colour=red", "unknown word"), ("run needs=gpu", "only needs=grocery")])
def test_a_bad_directive_is_named(text: str, problem: str):
    block = Block("page.md", 1, "bash", "true\n")
    parse_directive(text, block)
    assert problem in block.problem
