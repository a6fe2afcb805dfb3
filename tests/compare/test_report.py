import os
import re
import shutil
import subprocess

import pytest

from kvlab.compare.diff import diff_snapshots
from kvlab.compare.report import render_report, write_report
from kvlab.compare.study import Study
from tests.compare.helpers import edited_copy, golden_run

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]

# Counts each image once it is decoded, after the load event; the report itself has no scripts.
CHECK_SCRIPT = """<script>
window.addEventListener('load', () => {
  const imgs = [...document.images];
  const decoded = imgs.filter(i => i.complete && i.naturalWidth > 300 && i.naturalHeight > 200).length;
  const out = document.createElement('div');
  out.id = 'kvlab-check';
  out.textContent = `images=${imgs.length} decoded=${decoded}`;
  document.body.appendChild(out);
});
</script>"""


@pytest.fixture(scope="module")
def study():
    golden = golden_run()
    nan_row = golden.values(1)[0, 0, 20].clone()
    nan_row[0] = float("nan")
    broken = edited_copy(golden, [(1, "values", (0, 0, 20), nan_row)])
    shifted = edited_copy(golden, [(3, "keys", (0, 1, 33), golden.keys(3)[0, 1, 33] * 1.3)])
    return Study(golden, [diff_snapshots(golden, broken), diff_snapshots(golden, shifted)])


def chromium() -> str:
    path = os.environ.get("KVLAB_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("chromium is missing: `make test` installs it (apt-get install -y chromium)")
    return path


def run_chromium(tmp_path, *args: str) -> str:
    cmd = [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_report_is_self_contained(study):
    page = render_report(study)
    assert page.count("<img ") == 3  # the logits plot and one heatmap figure per test
    assert len(re.findall(r'src="data:image/png;base64,', page)) == 3
    assert not re.search(r"(src|href)=\"(?!data:)", page) and "<script" not in page and "<link" not in page
    assert "position 20</span> (prompt token 20), layer 1, KV head 0, values, NaN/Inf" in page
    assert "position 33</span> (generated token 1), layer 3, KV head 1, keys, rel-L2 0.3" in page
    assert "NaN / Inf: 1 rows" in page


def test_report_renders_in_headless_chromium(study, tmp_path):
    report = write_report(study, tmp_path / "report.html")
    checked = tmp_path / "check.html"
    checked.write_text(report.read_text().replace("</body>", CHECK_SCRIPT + "</body>"))
    dom = run_chromium(tmp_path, "--virtual-time-budget=10000", "--dump-dom", checked.as_uri())
    assert re.search(r'<div id="kvlab-check">images=3 decoded=3</div>', dom), dom[-500:]
    assert "<h1>kvlab diff</h1>" in dom

    shot = tmp_path / "shot.png"
    run_chromium(tmp_path, "--window-size=1280,2600", "--hide-scrollbars", f"--screenshot={shot}", report.as_uri())
    from matplotlib.image import imread

    pixels = imread(shot)[..., :3]
    r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    colourful = (pixels.max(axis=-1) - pixels.min(axis=-1)) > 0.25  # plots, not text on white
    magenta = (r > 0.9) & (g < 0.1) & (b > 0.9)  # the NaN row drawn in the heatmap
    assert colourful.mean() > 0.05
    assert magenta.sum() > 50
