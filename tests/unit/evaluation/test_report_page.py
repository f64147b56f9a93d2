"""The plan report as a physicist reads it: isodose planes through the isocentre, the global
maximum and each organ, a goal trend plot, the hot spots; opened in a real headless Chromium
(Debian's ``chromium``), where every image must load."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from radpilot.case import Case
from radpilot.evaluation.images import ISODOSE_PCT
from radpilot.loop.inprocess import plan_loop
from radpilot.protocol import load_protocol
from radpilot.report import PlanReport
from tests.paths import REPO_ROOT

# after the page's load event: how many images, and which did not decode
PROBE = """<script>
window.addEventListener("load", () => {
  const broken = [...document.images].filter((i) => !i.complete || i.naturalWidth === 0);
  document.body.setAttribute("data-images", String(document.images.length));
  document.body.setAttribute("data-broken", broken.map((i) => i.getAttribute("src")).join(" "));
});
</script></body>"""


@pytest.fixture(scope="module")
def report(
    analytic_case: Case, tmp_path_factory: pytest.TempPathFactory
) -> tuple[PlanReport, Path]:
    protocol = load_protocol(REPO_ROOT / "protocols" / "tg119_cshape_easier.yaml")
    r = plan_loop(analytic_case, protocol, max_iterations=2)
    out = tmp_path_factory.mktemp("report")
    r.write(out)
    return r, out


def test_the_report_shows_isodose_planes_hot_spots_and_goal_trends(
    report: tuple[PlanReport, Path],
) -> None:
    r, out = report
    html = (out / "report.html").read_text()
    assert "<title>RadPilot plan report: analytic-cshape, tg119-cshape-easier</title>" in html
    # planes through the isocentre, the global maximum and each organ's centroid
    names = {p.name for p in out.glob("dose_*.png")}
    assert {"dose_axial.png", "dose_sagittal.png", "dose_coronal.png"} <= names
    assert {"dose_hot_axial.png", "dose_hot_sagittal.png", "dose_oar_Core.png"} <= names
    assert all(f'src="{n}"' in html for n in names)
    assert "Isodose lines at " + ", ".join(f"{p} %" for p in ISODOSE_PCT) in html
    assert "CT window -200 to 300 HU (width 500, level 50)" in html
    spot = r.hot_spots()["global"]
    assert f"through the global maximum: {spot['dose_gy']:.1f} Gy" in html
    # the goal trend: one series per goal, as many values as iterations
    trend = r.goal_trends()
    assert trend["iterations"] == [it.iteration for it in r.iterations]
    assert [g["label"] for g in trend["goals"]] == [x.goal.label for x in r.check.results]
    assert all(len(g["values"]) == len(r.iterations) for g in trend["goals"])
    assert (out / "goal_trends.png").stat().st_size > 5000 and 'src="goal_trends.png"' in html
    assert "<h2>Hot spots</h2>" in html and spot["text"] in html
    # the DVHs of the best plan against the first and last iterations
    others = [it.iteration for it in (r.iterations[0], r.iterations[-1])]
    if any(i != r.best_iteration for i in others):
        assert 'src="dvh_iterations.png"' in html and (out / "dvh_iterations.png").is_file()
        assert set(r.compared()) == {
            f"{label} (iteration {i})"
            for label, i in zip(("first", "last"), others, strict=True)
            if i != r.best_iteration
        }


def test_every_image_of_the_report_loads_in_headless_chromium(
    report: tuple[PlanReport, Path],
) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it where it can)")
    _, out = report
    page = out / "report-probe.html"  # beside the report, so its relative image paths resolve
    page.write_text((out / "report.html").read_text().replace("</body>", PROBE, 1))
    run = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--allow-file-access-from-files",
            "--virtual-time-budget=15000",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    body = re.search(r"<body[^>]*>", run.stdout)
    assert body is not None, run.stdout[:2000]
    count = re.search(r'data-images="(\d+)"', body.group(0))
    broken = re.search(r'data-broken="([^"]*)"', body.group(0))
    assert count is not None and broken is not None, body.group(0)
    expected = len(list(out.glob("*.png")))
    assert int(count.group(1)) == expected >= 8
    assert broken.group(1) == "", f"images that did not load: {broken.group(1)}"


def test_an_fmo_restarted_from_zero_fluence_says_why_in_the_report_and_the_api(
    report: tuple[PlanReport, Path], tmp_path: Path
) -> None:
    import json
    from html import escape

    from services.common.convert import record_to_proto

    r, _ = report
    it = r.iterations[-1]
    why = "Core D10 <= 10 Gy missed in the last 3 rounds, the miss not halved (10.90 -> 10.80 Gy)"
    it.cold_start = why
    try:
        r.write(tmp_path)
        html = (tmp_path / "report.html").read_text()
        summary = json.loads((tmp_path / "summary.json").read_text())
        message = record_to_proto(it)
    finally:
        it.cold_start = ""
    assert f"started from zero fluence: {escape(why)}" in html
    assert [p["cold_start"] for p in summary["per_iteration"]][-1] == why
    assert message.cold_start == why
