"""The evaluation report opens in a real browser: headless Chromium decodes every plot and shows the table."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

# Appended to a copy of the report: once the page has loaded, write what the page sees into the DOM,
# which --dump-dom then prints.
PROBE = """
<script>
window.addEventListener("load", function () {
  // the load event waits for every image to load or fail: naturalWidth is 0 for one that did not decode
  var imgs = Array.prototype.slice.call(document.images);
  var table = document.querySelector("table#estimates");
  var result = {
    images: imgs.length,
    decoded: imgs.filter(function (img) { return img.complete && img.naturalWidth > 0; }).length,
    widths: imgs.map(function (img) { return img.naturalWidth; }),
    table: !!table,
    rows: table ? table.querySelectorAll("tbody tr").length : 0,
    headers: table ? Array.prototype.map.call(table.querySelectorAll("th"), function (th) { return th.textContent; }) : []
  };
  var pre = document.createElement("pre");
  pre.id = "probe-result";
  pre.textContent = JSON.stringify(result);
  document.body.appendChild(pre);
});
</script>
"""


def _summary(tmp: Path) -> dict[str, Any]:
    """Return a real evaluation summary: a small model trained on one simulated world, evaluated on another."""
    from models.registry import Registry
    from training.evaluate import EvaluationConfig, Inputs, evaluate
    from training.simulate import simulate
    from training.train import train_frames, write_result

    registry = Registry(tmp / "registry")
    train = simulate(6000, seed=5)
    result = train_frames(train.decisions, train.outcomes, train.profiles, train.catalog, model="logreg")
    version, _ = write_result(result, registry, promote=True)
    world = simulate(6000, seed=6)
    inputs = Inputs(world.decisions, world.outcomes, world.catalog, world.profiles)
    config = EvaluationConfig(n_resamples=100, segment_resamples=30)
    return evaluate(inputs, registry, [version], config, ground_truth=world.ground_truth).summary


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium; scripts/test.sh does)")
def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    from training.report import render

    summary = _summary(tmp_path)
    page = render(summary)
    assert "<script" not in page  # the report itself runs nothing
    probe = tmp_path / "report_probe.html"
    probe.write_text(page.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    cmd = [
        str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-extensions", f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--virtual-time-budget=10000", "--dump-dom", probe.as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    found = re.search(r'<pre id="probe-result">(.*?)</pre>', proc.stdout, re.S)
    assert found, f"chromium exited {proc.returncode} without the probe's result; stderr: {proc.stderr[-2000:]}"
    result = json.loads(html.unescape(found.group(1)))
    assert result["images"] >= 5  # estimates, ESS, calibration, message share, segments
    assert result["decoded"] == result["images"]
    assert all(w > 0 for w in result["widths"]), result["widths"]
    assert result["table"]
    # one row per estimator of the version, plus the logging policy's observed mean
    assert result["rows"] == 1 + len(summary["policies"][1]["estimates"])
    assert "estimate" in result["headers"] and "unsupported mass" in result["headers"]
