"""report.html in a real browser: headless Chromium (Debian's `chromium`, installed by .ci/run) loads the demo's
report; every image must decode, no console message of level error and no uncaught error may appear, and a
screenshot is taken. Skips with the reason where Chromium is absent.

The checks run inside the page: a copy of the report gets a first <script> that records uncaught errors, failed
resource loads and console.error calls, and after the load event writes them and every image's state into the
DOM, which `chromium --headless --dump-dom` prints. Chromium's own console log (--enable-logging=stderr) is read
too. To regenerate the docs' screenshot of a real report: `python tests/test_report_browser.py REPORT.html
docs/img/report.png`.
"""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from neurosdm.pareto import write_tables
from neurosdm.report import run_demo

PROBE = """<script>
window.__problems = [];
window.addEventListener('error', e => window.__problems.push('error: ' + (e.message || (e.target && (e.target.src
  || e.target.href)) || 'resource')), true);
const __err = console.error;
console.error = (...a) => { window.__problems.push('console.error: ' + a.join(' ')); __err(...a); };
window.addEventListener('load', () => {
  const imgs = Array.from(document.images).map(i => ({ok: i.complete && i.naturalWidth > 0, w: i.naturalWidth}));
  const out = document.createElement('pre');
  out.id = '__probe';
  out.textContent = JSON.stringify({images: imgs, problems: window.__problems});
  document.body.appendChild(out);
});
</script>"""


def chromium() -> str | None:
    return next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)


def open_in_browser(report: Path, screenshot: Path, width: int = 1200, height: int = 3000) -> dict:
    """Load ``report`` (a probed copy of it) in headless Chromium; returns ``{"images": [...], "problems": [...],
    "console_errors": [...]}`` and writes ``screenshot`` (PNG) of the unprobed report."""
    exe = chromium()
    probed = report.with_name(f".probed-{report.name}")
    text = report.read_text()
    probed.write_text(text.replace("<meta charset='utf-8'>", "<meta charset='utf-8'>" + PROBE, 1)
                      if "<meta charset='utf-8'>" in text else PROBE + text)
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
             "--virtual-time-budget=5000", "--enable-logging=stderr", "--v=0"]
    try:
        r = subprocess.run([exe, *flags, "--dump-dom", probed.as_uri()], capture_output=True, text=True, timeout=120)
    finally:
        probed.unlink(missing_ok=True)
    m = re.search(r'<pre id="__probe">(.*?)</pre>', r.stdout, re.S)
    assert m, f"the probe did not run (chromium exit {r.returncode}): {r.stderr[-800:]}"
    result = json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<")
                        .replace("&gt;", ">"))
    result["console_errors"] = [line for line in r.stderr.splitlines()
                                if "CONSOLE" in line and ("ERROR" in line or "Uncaught" in line)]
    subprocess.run([exe, *flags, f"--window-size={width},{height}", f"--screenshot={screenshot}", report.as_uri()],
                   capture_output=True, text=True, timeout=120)
    return result


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    if chromium() is None:
        pytest.skip("Chromium is not installed (apt-get install chromium; .ci/run does it as root)")
    from conftest import tiny_checkpoint

    d = tmp_path_factory.mktemp("report")
    ckpt = tiny_checkpoint(d / "m.pt", head="sdm")
    (d / "demo" / "pareto").mkdir(parents=True)  # a sweep's folder (two made-up rows: this tests the rendering)
    rows = [{"name": n, "fid": f, "firing_rate": 0.3, "num_images": 4, "mean_spiking_steps": 2.0, "network_calls": 2,
             "energy_mj_per_image": {"loihi2": e}, "ann_mj_per_image": {"cmos45-fp32": 1.0, "cmos45-int8": 0.1}}
            for n, f, e in (("a", 10.0, 2.0), ("b", 20.0, 1.0))]
    write_tables(rows, d / "demo" / "pareto", ["loihi2"], {"num_images": 4, "energy_images": 1})
    return run_demo(ckpt, d / "demo", num_images=1, steps=2, log=lambda line: None, calibration="builtin",
                    calibration_images=8)


def test_report_in_headless_chromium(report, tmp_path):
    shot = tmp_path / "report.png"
    res = open_in_browser(report, shot)
    html = report.read_text()
    assert len(res["images"]) == html.count("<img") >= 5  # every image of the report was found
    assert "Energy against quality" in html and html.count("data:image/png") == html.count("<img")
    assert all(i["ok"] and i["w"] > 0 for i in res["images"]), res["images"]
    assert res["problems"] == [] and res["console_errors"] == [], res
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000


def test_the_probe_sees_a_broken_image_and_a_script_error(report, tmp_path):
    """The checks can fail: a report with an undecodable image and a throwing script is caught."""
    bad = tmp_path / "bad.html"
    bad.write_text(report.read_text().replace("</style>", "</style><img src='data:image/png;base64,AAAA'>"
                                              "<script>undefinedFunction()</script>", 1))
    res = open_in_browser(bad, tmp_path / "bad.png")
    assert not all(i["ok"] for i in res["images"])
    assert any("undefinedFunction" in p for p in res["problems"] + res["console_errors"])


if __name__ == "__main__":  # the docs' screenshot of a real report
    src, dst = Path(sys.argv[1]), Path(sys.argv[2])
    print(json.dumps(open_in_browser(src, dst), indent=1)[:2000])
