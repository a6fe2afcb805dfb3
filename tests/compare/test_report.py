import os
import re
import shutil
import subprocess

import pytest

from kvlab.compare.diff import diff_snapshots
from kvlab.compare.plots import short_token
from kvlab.compare.report import render_report, write_report
from kvlab.compare.study import Study
from kvlab.study import snapshot_decoder
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
    return Study(golden, [diff_snapshots(golden, broken), diff_snapshots(golden, shifted)],
                 decode=snapshot_decoder(golden))


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
    assert "position 20</span> &#x27;␣&#x27; (prompt token 20), layer 1, KV head 0, values, NaN/Inf" in page
    assert "position 33</span> &#x27;]&#x27; (generated token 1), layer 3, KV head 1, keys, rel-L2 0.3" in page
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


# Reads what the page shows once laid out: the visible text, the title of what lies under the
# centre of chosen heatmap cells (as a pointer resting there would), and the heatmap's size.
PROBE_SCRIPT = """<script>
window.addEventListener('load', () => {
  const probe = {text: document.body.innerText, hover: []};
  for (const img of document.querySelectorAll('img[usemap]')) {
    const map = document.querySelector(`map[name="${img.useMap.slice(1)}"]`);
    for (const area of map.querySelectorAll('area')) {
      if (!/layer 3, position 33 |layer 1, position 20 /.test(area.title)) continue;
      img.scrollIntoView();
      const r = img.getBoundingClientRect();
      const [x0, y0, x1, y1] = area.coords.split(',').map(Number);
      const x = r.left + (x0 + x1) / 2, y = r.top + (y0 + y1) / 2;
      const hit = document.elementFromPoint(x, y);
      probe.hover.push(hit && hit.tagName === 'AREA' ? hit.title : String(hit && hit.tagName));
    }
  }
  const out = document.createElement('pre');
  out.id = 'kvlab-probe';
  out.textContent = JSON.stringify(probe);
  document.body.appendChild(out);
});
</script>"""


def test_report_shows_the_tokens_and_cell_values_in_headless_chromium(study, tmp_path):
    import html as html_module
    import json

    report = write_report(study, tmp_path / "report.html")
    probed = tmp_path / "probe.html"
    probed.write_text(report.read_text().replace("</body>", PROBE_SCRIPT + "</body>"))
    dom = run_chromium(tmp_path, "--window-size=1400,3000", "--virtual-time-budget=10000", "--dump-dom",
                       probed.as_uri())
    found = re.search(r'<pre id="kvlab-probe">(.*?)</pre>', dom, re.S)
    assert found, dom[-500:]
    probe = json.loads(html_module.unescape(found.group(1)))
    text, tokens = probe["text"], study.tokens()
    # the first divergence names its token, and the golden text (prompt included) is shown
    assert "First divergence: position 33 ']' (generated token 1), layer 3, KV head 1, keys" in text
    assert "The cache holds keys and values." in text
    # the token strip: every position's token with its position number, in order
    strip = "".join(f"{short_token(t, 24)}{p}" for p, t in enumerate(tokens[:32]))
    assert strip in text.replace(" ", "").replace("\n", "")
    # pointing at a cell gives its layer, position, token, KV head and error
    hover = probe["hover"]
    assert len(hover) == 8 and all(h.startswith(("keys: layer", "values: layer")) for h in hover), hover
    assert "keys: layer 3, position 33 ']' (generated token 1), KV head 1, rel-L2 0.3" in hover, hover
    assert "values: layer 1, position 20 '␣' (prompt token 20), KV head 0, NaN/Inf" in hover, hover


def test_heatmap_axis_names_the_tokens_where_they_fit_and_titles_keep_long_specs(study):
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401

    from kvlab.compare.plots import heatmaps, wrapped_title

    figure = heatmaps(study.results[1], study.tokens())
    assert figure.position_labels[:4] == ["0 T", "1 h", "2 e", "3 ␣"]
    assert len(figure.cells) == 2 * (4 * 39 + 4 * 2)  # every (layer, position) and (layer, head) cell, K and V
    bare = heatmaps(study.results[1], None)
    assert "T" not in "".join(bare.position_labels)

    spec = "dtype=bfloat16,attn=sdpa," + ",".join(f"cache=mixed:bits=4,hot={n},group=32" for n in range(8))
    title = wrapped_title(f"test {spec}", "vs golden dtype=float32")
    assert all(len(line) <= 110 for line in title.splitlines())
    assert title.replace("\n", "").replace("    ", "") == f"test {spec}vs golden dtype=float32"


def test_heatmap_title_of_a_long_spec_fits_the_figure(study):
    from dataclasses import replace

    from matplotlib.figure import Figure

    from kvlab.compare import plots

    long_run = "dtype=bfloat16,attn=sdpa,cache=mixed:bits=4,hot=128,scheme=kivi,group=32,split=4096," * 3
    result = replace(study.results[1], test_run=long_run.rstrip(","))
    drawn = {}
    original = plots._png

    def keep(fig):
        drawn["fig"] = fig
        return original(fig)

    plots._png = keep
    try:
        plots.heatmaps(result, study.tokens())
    finally:
        plots._png = original
    fig: Figure = drawn["fig"]
    renderer = fig.canvas.get_renderer()
    box = fig._suptitle.get_window_extent(renderer)
    assert box.x0 >= 0 and box.x1 <= fig.bbox.width and box.y1 <= fig.bbox.height
