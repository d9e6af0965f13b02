"""``loopsim report RUN_DIR``: a loop run as one HTML file, checked in headless Chromium."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from typer.testing import CliRunner

from loopsim.cli import app
from loopsim.config import load_config
from loopsim.loop import LoopConfig, run_loop
from loopsim.report import ReportError, write_loop_report

runner = CliRunner()

TINY = {
    "seed": 0,
    "env": {"id": "loopsim/FactoryPickPlace-v0"},
    "demos": {"site": "lab", "episodes": 2, "noise_std": 0.1},
    "policy": {"type": "bc", "hidden_sizes": [32]},
    "train": {"epochs": 2, "batch_size": 128},
    "strategy": {"type": "dagger"},
    "loop": {"iterations": 1, "episodes": 2, "deploy_sites": ["fast_conveyor"], "workers": 1},
    "eval": {"episodes": 2, "workers": 1},
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("report") / "run"
    run_loop(load_config(LoopConfig, TINY, []), path)
    return path


def _gifs(text: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r'src="data:image/gif;base64,([^"]+)"', text)]


@pytest.mark.slow  # the tiny loop run takes ~10-25 s
def test_report_without_videos_has_tables_and_plots(run_dir, tmp_path):
    out = write_loop_report(run_dir, tmp_path / "r.html", videos=False, paths=False)
    text = out.read_text()
    for heading in ("Summary", "Metrics", "Plots", "Failure modes per iteration", "Configuration"):
        assert f"<h2>{heading}</h2>" in text or f"<h3>{heading}</h3>" in text, heading
    assert text.count('src="data:image/png;base64,') == 3  # success, lab, failure modes
    assert "evaluation @ fast_conveyor" in text and "deployment @ fast_conveyor" in text
    assert not _gifs(text)


def test_report_errors(tmp_path):
    with pytest.raises(ReportError, match="not a finished loop run"):
        write_loop_report(tmp_path)
    out = runner.invoke(app, ["report", str(tmp_path)])
    assert out.exit_code == 2 and "not a finished loop run" in out.output
    out = runner.invoke(app, ["report", str(tmp_path / "missing")])
    assert out.exit_code == 2 and "not a directory" in out.output


def test_a_metrics_file_that_is_not_utf8_is_one_line(tmp_path):
    (tmp_path / "metrics.csv").write_bytes(b"iteration,site\n0,\xff\n")
    with pytest.raises(ReportError, match="metrics.csv is damaged: not UTF-8 text"):
        write_loop_report(tmp_path, videos=False)


@pytest.mark.parametrize(
    ("text", "match"),
    [("garbage,,,\n", r"has no column\(s\) \['iteration'"),  # a traceback (max() of nothing) before
     ("iteration,site,arm,episodes,success_rate,success_low,success_high\n", "has no rows"),
     ("iteration,site,arm,episodes,success_rate,success_low,success_high\nx,lab,loop,1,1,1,1\n",
      "row 1 has iteration 'x', not an integer >= 0"),
     ("iteration,site,arm,episodes,success_rate,success_low,success_high\n-1,lab,loop,1,1,1,1\n",
      "row 1 has iteration '-1', not an integer >= 0"),
     # a file cut short: a row without its last fields (a TypeError traceback before)
     ("iteration,site,arm,episodes,success_rate,success_low,success_high\n0,lab,loop,1,1,1,1\n1,lab\n",
      "row 2 does not have the header's 7 fields"),
     ("iteration,site,arm,episodes,success_rate,success_low,success_high\n0,lab,loop,1,abc,1,1\n",
      "row 1 has success_rate 'abc', not a number")],
)
def test_a_damaged_metrics_file_is_one_line(tmp_path, text, match):
    (tmp_path / "metrics.csv").write_text(text)
    out = runner.invoke(app, ["report", str(tmp_path), "--no-videos"])
    assert out.exit_code == 2 and "metrics.csv is damaged" in out.output, out.output
    with pytest.raises(ReportError, match=match):
        write_loop_report(tmp_path, videos=False)


@pytest.mark.slow
def test_report_videos_are_replays_of_the_stores(run_dir):
    import imageio.v3 as iio

    from loopsim.datasets import EpisodeStore

    out = runner.invoke(app, ["report", str(run_dir), "--video-size", "96", "--frame-step", "4"])
    assert out.exit_code == 0, out.output
    text = (run_dir / "report.html").read_text()
    gifs = _gifs(text)
    # iteration 0: a demo success; iteration 1: its deployed episodes (a success and/or failures)
    with EpisodeStore.open(run_dir / "operational.zarr") as op:
        meta = op.metadata()
    expected = 1 + int(meta["success"].any()) + len(set(meta["failure_mode"][~meta["success"]]))
    assert len(gifs) == expected
    for raw in gifs:
        frames = iio.imread(io.BytesIO(raw), extension=".gif")
        assert frames.shape[1:3] == (96, 96) and frames.shape[0] > 5
        assert frames[..., :3].std() > 10
    assert len(re.findall(r"<figcaption>iteration \d: paths of", text)) == 2  # one per iteration
    assert "DIVERGED" not in text


#: Flags that run Debian's Chromium headless here, offline and quiet (plus a fresh --user-data-dir).
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync")


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.slow
@pytest.mark.skipif(_chromium() is None or shutil.which("chromedriver") is None,
                    reason="needs Debian's chromium and chromedriver (apt-get install chromium "
                    "chromium-driver; .ci/run installs them)")
def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    """The page shows its plots and plays its videos, with no console errors, from a file:// URL."""
    out = write_loop_report(run_dir, tmp_path / "report.html", video_size=96, frame_step=4)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = _chromium()
    for flag in (*FLAGS, "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}",
                 "--window-size=1280,2000"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=shutil.which("chromedriver"))  # the local driver: no download
    driver = webdriver.Chrome(options=opts, service=service)
    try:
        driver.set_page_load_timeout(120)
        driver.get(out.resolve().as_uri())
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight, "
            "i.src.slice(0, 15)]);")
        assert len(images) >= 3 + 2 + 2  # 3 loop plots, 2 path plots, >= 2 videos
        for complete, width, height, src in images:
            assert complete and width > 0 and height > 0, (src, width, height)
        assert sum(src.startswith("data:image/gif") for *_, src in images) >= 2
        # a GIF plays: two screenshots of the first video a moment apart differ
        video = driver.find_elements("css selector", 'img[src^="data:image/gif"]')[0]
        driver.execute_script("arguments[0].scrollIntoView();", video)
        first = video.screenshot_as_png
        driver.execute_script("return new Promise(r => setTimeout(r, 700));")
        second = video.screenshot_as_png
        assert first != second
        shot = _decode_png(driver.get_screenshot_as_png())
        assert shot.std() > 10  # not blank
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == [], json.dumps(errors)
    finally:
        driver.quit()


def _decode_png(raw: bytes) -> np.ndarray:
    import imageio.v3 as iio

    return np.asarray(iio.imread(io.BytesIO(raw)))


def test_chromium_flags_render_a_screenshot_without_selenium(tmp_path):
    """The plain --headless --screenshot path (no driver) works here too, or the test skips."""
    chromium = _chromium()
    if chromium is None:
        pytest.skip("needs Debian's chromium (.ci/run installs it)")
    page = tmp_path / "p.html"
    page.write_text("<!DOCTYPE html><html><body style='background:#c33'><h1>loopsim</h1></body></html>")
    shot = tmp_path / "s.png"
    subprocess.run([chromium, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--window-size=320,240",
                    f"--screenshot={shot}", page.as_uri()], check=True, capture_output=True, timeout=120)
    img = _decode_png(shot.read_bytes())
    assert img.shape[:2] == (240, 320)
    assert (np.abs(img[..., :3].astype(int) - [0xCC, 0x33, 0x33]).sum(-1) < 30).mean() > 0.5


@pytest.mark.slow
def test_loop_report_flag_writes_the_report_of_a_finished_run(run_dir, tmp_path):
    import yaml

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    (run_dir / "report.html").unlink(missing_ok=True)
    # Resumes (every phase is done) and writes the report: --report is the default.
    out = runner.invoke(app, ["loop", str(cfg), "--run-dir", str(run_dir)])
    assert out.exit_code == 0, out.output
    assert "report:" in out.output and (run_dir / "report.html").stat().st_size > 10_000
    (run_dir / "report.html").unlink()
    out = runner.invoke(app, ["loop", str(cfg), "--run-dir", str(run_dir), "--no-report"])
    assert out.exit_code == 0 and not (run_dir / "report.html").exists(), out.output


@pytest.mark.slow
def test_a_domain_without_a_trajectory_view_gets_a_note_not_a_failure(run_dir, tmp_path, monkeypatch):
    from loopsim.trajectory import TRAJECTORY_VIEWS

    monkeypatch.delitem(TRAJECTORY_VIEWS, "factory")
    text = write_loop_report(run_dir, tmp_path / "r.html", videos=False).read_text()
    assert text.count("(no paths: no trajectory view for domain") == 2
