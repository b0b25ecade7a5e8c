"""The shell blocks of README.md and docs/*.md, and how each one runs as a test.

Every ```bash, ```sh, ```shell or ```console block is preceded by a directive, an HTML comment
that GitHub does not show:

    <!-- doc-test: run exit=7 expect="--allowed-uri-prefixes" session=own timeout=120 -->
    <!-- doc-test: skip reason="needs an AWS account; tests/integration/test_s3.py runs it on moto" -->

`run` blocks run with `bash -euo pipefail` in a scratch folder that looks like the checkout;
`exit` (default 0) is the exit code the block must end with, each `expect` a text its output
(stdout and stderr together) must hold. Blocks of one page with the same `session` run in order
in one scratch folder, as one test. `needs=grocery` skips the block without the Grocery Store
dataset. `slow` marks the test slow. A `console` block runs its `$ ` lines (and their `\\`
continuations); the other lines are shown output.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}
DIRECTIVE = re.compile(r"^<!--\s*doc-test:\s*(.*?)\s*-->$")
FENCE = re.compile(r"^(\s*)(`{3,})\s*([\w+-]*)")
KEYS = {"exit", "expect", "session", "timeout", "reason", "needs"}
FLAGS = {"run", "skip", "slow"}
# What the scratch folder links to in the checkout (read-only inputs); manifests/ is copied, as
# jobs.make_manifest writes there.
LINKED = ("jobs", "pipeline", "examples", "benchmarks", "deploy", "tools", "Makefile", "pyproject.toml",
          "constraints.txt", "cluster.yaml")
COPIED = ("manifests",)
# Prepended to every block. `make demo` must not reinstall into the running venv while the suite
# runs (the scratch .venv is that venv): -o marks the install stamp as up to date.
PREAMBLE = 'make() { command make -o .venv/.installed "$@"; }\n'


@dataclass
class Block:
    """One shell block and its directive."""

    page: str
    line: int
    language: str
    code: str
    action: str = ""
    reason: str = ""
    exit: int = 0
    expect: list[str] = field(default_factory=list)
    session: str = ""
    timeout: float = 300.0
    needs: str = ""
    slow: bool = False
    problem: str = ""

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"

    def script(self) -> str:
        """The commands to run: a console block's `$ ` lines, any other block whole."""
        if self.language != "console":
            return self.code
        lines, continued = [], False
        for line in self.code.splitlines():
            if continued or line.startswith("$ "):
                lines.append(line if continued else line[2:])
                continued = line.rstrip().endswith("\\")
        return "\n".join(lines) + "\n"


def parse_directive(text: str, block: Block) -> None:
    """Fill `block` from a directive's words; a problem is recorded, not raised."""
    try:
        words = shlex.split(text)
    except ValueError as exc:
        block.problem = f"unreadable directive ({exc})"
        return
    for word in words:
        key, eq, value = word.partition("=")
        if not eq and key in FLAGS:
            if key == "slow":
                block.slow = True
            elif block.action:
                block.problem = "give one of run or skip"
            else:
                block.action = key
        elif eq and key in KEYS:
            if key == "expect":
                block.expect.append(value)
            elif key in ("exit", "timeout"):
                try:
                    setattr(block, key, int(value) if key == "exit" else float(value))
                except ValueError:
                    block.problem = f"{key}={value!r} is not a number"
            else:
                setattr(block, key, value)
        else:
            block.problem = f"unknown word {word!r} (flags: {sorted(FLAGS)}; keys: {sorted(KEYS)})"
    if not block.problem and not block.action:
        block.problem = "say run or skip"
    elif block.action == "skip" and not block.reason:
        block.problem = 'a skip needs reason="why it cannot run here"'
    elif block.needs not in ("", "grocery"):
        block.problem = f"needs={block.needs!r}: only needs=grocery is known"


def blocks_of(page: Path, root: Path = ROOT) -> list[Block]:
    """Every shell block of one Markdown page, with its directive (or the problem with it)."""
    lines = page.read_text().splitlines()
    found, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, fence, language = match.groups()
        end = next((j for j in range(i + 1, len(lines))
                    if lines[j].strip().startswith(fence) and not lines[j].strip().strip("`")), len(lines))
        if language in SHELL_LANGUAGES:
            code = "\n".join(line[len(indent):] if line.startswith(indent) else line.lstrip()
                             for line in lines[i + 1:end]) + "\n"
            block = Block(str(page.relative_to(root)), i + 1, language, code)
            before = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            if directive := DIRECTIVE.match(before):
                parse_directive(directive.group(1), block)
            else:
                block.problem = "no <!-- doc-test: run ... --> or <!-- doc-test: skip reason=... --> above it"
            found.append(block)
        i = end + 1
    return found


def pages(root: Path = ROOT) -> list[Path]:
    """README.md and every page under docs/."""
    return [root / "README.md", *sorted((root / "docs").glob("**/*.md"))]


def scratch_checkout(where: Path, root: Path = ROOT) -> None:
    """A folder that looks like the checkout: its inputs linked, manifests/ copied, `.venv`
    the running interpreter's environment. Whatever a block writes stays in `where`."""
    import shutil

    for name in LINKED:
        if (root / name).exists():
            (where / name).symlink_to(root / name)
    for name in COPIED:
        if (root / name).is_dir():
            shutil.copytree(root / name, where / name)
    (where / ".venv").symlink_to(Path(sys.executable).parents[1])


def run_block(block: Block, where: Path) -> subprocess.CompletedProcess:
    """Run one block in `where`; raise AssertionError when its exit code or output differ."""
    script = where / f".doc-block-{block.line}.sh"
    script.write_text(PREAMBLE + block.script())
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "COLUMNS")}
    env["PATH"] = f"{where / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["PWD"] = str(where)
    proc = subprocess.Popen(["bash", "-euo", "pipefail", str(script)], cwd=where, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=block.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"{block.where}: still running after {block.timeout:.0f} s; "
                             f"its output:\n{out[-3000:]}") from None
    missing = [text for text in block.expect if text not in out]
    if proc.returncode != block.exit or missing:
        raise AssertionError(
            f"{block.where}: exit code {proc.returncode} (the page says {block.exit})"
            + (f"; not in its output: {missing}" if missing else "") + f"\n{block.code}"
            f"--- output (last 4000 characters) ---\n{out[-4000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out)
