"""The HTML report: its content, and how a real browser (headless Chromium) renders it."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from graphcert.data import load_dataset
from graphcert.report import build_report, write_report

REPO = Path(__file__).resolve().parents[1]
MLP = str(REPO / "models" / "mnist_mlp.onnx")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]
# Injected into a copy of the report: records script errors, then, once the page has loaded, what was rendered.
PROBE = """<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push(String(e.message || e.type)), true);
const consoleError = console.error;
console.error = (...a) => { window.__errors.push(a.join(' ')); consoleError(...a); };
window.addEventListener('load', () => {
  const images = [...document.images].map(i => [i.complete, i.naturalWidth, i.naturalHeight]);
  const tables = [...document.querySelectorAll('table')].map(t => t.rows.length);
  const headings = [...document.querySelectorAll('h2')].map(h => h.textContent);
  const probe = document.createElement('pre');
  probe.id = 'probe';
  probe.textContent = JSON.stringify({images, tables, headings, errors: window.__errors});
  document.body.appendChild(probe);
});
</script>"""


def chromium() -> str:
    """The Chromium binary; CI must have it (.ci/run installs it), elsewhere its absence skips the test."""
    found = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is not installed, but CI must run the browser test (.ci/run installs it)")
        pytest.skip("chromium not installed (apt-get install chromium); CI runs this test")
    return found


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    data = load_dataset("mnist-test")
    page, result = build_report(MLP, data, [0.0, 0.01, 0.02], ["ibp", "crown-ibp"], limit=40, tolerance=1e-3)
    path = tmp_path_factory.mktemp("report") / "report.html"
    write_report(page, path)
    return path, page, result


def test_report_content(report):
    path, page, result = report
    for heading in ("Model", "Certified accuracy against the radius", "Time per method", "Certified accuracy per class",
                    "Certified radius per sample", "Least robust samples"):
        assert f"<h2>{heading}</h2>" in page
    assert "<script" not in page and "http://" not in page and "https://" not in page   # self-contained
    assert page.count("data:image/png;base64,") >= 2 + 12    # two plots, twelve least robust samples
    clean = f"{result.clean / result.n:.1%}"
    assert f"Clean accuracy {clean}" in page
    certified = int(result.certified["ibp"][:, 1].sum())
    assert f"({certified}/{result.n})" in page
    # the least robust samples are the correctly classified ones with the smallest best radius
    best = np.maximum(result.radii["ibp"], result.radii["crown-ibp"])
    correct = np.flatnonzero(result.predictions == result.labels)
    first = correct[np.argmin(best[correct])]
    assert f'alt="sample {first}"' in page


def test_report_renders_in_chromium(report, tmp_path):
    browser = chromium()
    path, page, _ = report
    probed = tmp_path / "probed.html"
    probed.write_text(page.replace("<head>", "<head>" + PROBE, 1))
    profile = tmp_path / "profile"
    command = [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=10000"]
    dom = subprocess.run(command + ["--dump-dom", probed.as_uri()], capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom.stdout, re.S)
    assert found, dom.stderr[-2000:]
    import html
    state = json.loads(html.unescape(found.group(1)))
    assert state["errors"] == []
    assert len(state["images"]) >= 14
    assert all(done and width > 0 and height > 0 for done, width, height in state["images"]), state["images"]
    assert len(state["tables"]) >= 6 and min(state["tables"]) >= 2
    assert "Least robust samples" in state["headings"]
    shot = tmp_path / "shot.png"
    subprocess.run(command + ["--window-size=1000,1400", f"--screenshot={shot}", path.as_uri()],
                   capture_output=True, timeout=120, cwd=tmp_path)
    import matplotlib.image
    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[0] >= 1000 and pixels[..., :3].std() > 0.05    # something was drawn, not a blank page


def test_report_cli(tmp_path):
    out = tmp_path / "r.html"
    proc = subprocess.run([sys.executable, str(REPO / "cli.py"), "report", "mnist_mlp", "--limit", "10", "--eps",
                           "0,0.01", "--method", "ibp", "-o", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert out.read_text().startswith("<!DOCTYPE html>") and "wrote" in proc.stdout
    proc = subprocess.run([sys.executable, str(REPO / "cli.py"), "report", "mnist_mlp", "-o", str(tmp_path / "r.pdf")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and ".html" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
