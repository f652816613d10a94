"""Every code block of README.md runs as written.

Python and bash blocks run in order, in one empty folder (later blocks use the files earlier ones wrote), with
`graphcert` on PATH running this checkout's cli.py and the shipped models reachable as `models/`. Blocks that
install packages are marked `<!-- readme-test: install ... -->`: CI runs exactly those commands in `.ci/run`, so
the test checks that `.ci/run` holds every one of their lines instead of installing again. ```text blocks are
synopses, not scripts.
"""
from __future__ import annotations

import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
FENCE = re.compile(r"(<!-- readme-test: (?P<mark>\w+)[^>]*-->\n)?```(?P<lang>\w*)\n(?P<code>.*?)```", re.S)


def blocks() -> list[tuple[str, str, str]]:
    """(language, code, mark) of every fenced block, in README order."""
    text = (REPO / "README.md").read_text()
    return [(m["lang"], m["code"], m["mark"] or "") for m in FENCE.finditer(text)]


def test_readme_blocks_are_tagged():
    langs = {lang for lang, _, _ in blocks()}
    assert langs <= {"bash", "python", "text"}, f"untagged or unknown code block language in README: {langs}"


def test_install_blocks_are_what_ci_runs():
    ci = (REPO / ".ci" / "run").read_text().replace("\\\n", " ")  # join continued lines
    ci_words = [shlex.split(line) for line in ci.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    installs = [code for lang, code, mark in blocks() if mark == "install"]
    assert installs, "the set-up block lost its readme-test mark"
    for code in installs:
        for command in re.split(r"&&|\n", code):
            words = shlex.split(command)
            if not words or words[0].endswith("graphcert"):
                continue  # running the tool, not installing it: the runnable blocks cover that
            # CI may spell the interpreter or venv path differently; the package arguments must match.
            packages = [w for w in words if not w.startswith("-") and w not in ("pip", "install", "python", "-m")
                        and "venv" not in w.lower() and not w.endswith(("/pip", "/python"))]
            assert any(all(p in line for p in packages) for line in ci_words), \
                f".ci/run does not run the README's `{command.strip()}`"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("readme")
    (folder / "models").symlink_to(REPO / "models")
    bin_dir = folder / ".bin"
    bin_dir.mkdir()
    shim = bin_dir / "graphcert"
    shim.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(str(REPO / 'cli.py'))} \"$@\"\n")
    shim.chmod(0o755)
    return folder


def test_every_runnable_block_runs(workdir):
    env = dict(os.environ, PATH=f"{workdir / '.bin'}{os.pathsep}{os.environ['PATH']}",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    ran = 0
    for lang, code, mark in blocks():
        if lang == "text" or mark == "install":
            continue
        command = [sys.executable, "-c", code] if lang == "python" else ["bash", "-e", "-o", "pipefail", "-c", code]
        proc = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"README {lang} block failed:\n{code}\n--- stderr:\n{proc.stderr[-3000:]}"
        ran += 1
    assert ran >= 8, f"only {ran} README blocks ran"
