"""The HTML building blocks: embedded media, escaped tables, atomic single-file output."""

from __future__ import annotations

import base64
import re

import numpy as np
import pytest

from loopsim.html_report import HtmlReport, data_uri, image_tag, table_html, video_tag


def _png(tmp_path):
    import imageio.v3 as iio

    path = tmp_path / "a.png"
    iio.imwrite(path, np.full((4, 5, 3), 200, dtype=np.uint8))
    return path


def test_data_uri_round_trips_the_bytes(tmp_path):
    path = _png(tmp_path)
    uri = data_uri(path)
    assert uri.startswith("data:image/png;base64,")
    assert base64.b64decode(uri.split(",", 1)[1]) == path.read_bytes()
    assert data_uri(b"abc", "image/gif") == "data:image/gif;base64,YWJj"
    with pytest.raises(ValueError, match="needs mime"):
        data_uri(b"abc")
    with pytest.raises(ValueError, match="unknown media type"):
        data_uri(tmp_path / "x.bmpx")


def test_gif_is_an_img_and_mp4_a_video(tmp_path):
    gif, mp4 = tmp_path / "v.gif", tmp_path / "v.mp4"
    gif.write_bytes(b"GIF89a")
    mp4.write_bytes(b"\x00")
    assert video_tag(gif).startswith('<img src="data:image/gif;base64,')
    tag = video_tag(mp4, width=200)
    assert tag.startswith("<video autoplay muted loop") and 'type="video/mp4"' in tag and 'width="200"' in tag
    with pytest.raises(ValueError, match="not a video"):
        video_tag(_png(tmp_path))


def test_table_formats_and_escapes():
    out = table_html([{"a": 0.5, "b": "<x>", "c": float("nan")}, {"a": 1.0, "b": "y", "c": 3}],
                     formats={"a": "{:.0%}"}, caption="cap & co", headers={"a": "rate"})
    assert "<th>rate</th>" in out and "<td>50%</td>" in out and "<td>100%</td>" in out
    assert "&lt;x&gt;" in out and "<x>" not in out
    assert "<td>-</td>" in out  # NaN
    assert "cap &amp; co" in out


def test_report_is_one_self_contained_file(tmp_path):
    r = HtmlReport("Run <1>", subtitle="sub")
    r.heading("Plots")
    r.begin_row()
    r.image(_png(tmp_path), caption="a plot")
    r.end_row()
    r.paragraph("text & more")
    r.table([{"x": 1}])
    out = r.write(tmp_path / "r.html")
    text = out.read_text()
    assert text.startswith("<!DOCTYPE html>") and "<title>Run &lt;1&gt;</title>" in text
    assert '<div class="row"><figure><img src="data:image/png;base64,' in text
    # nothing is fetched from elsewhere: every src/href is a data: URI
    assert all(u.startswith("data:") for u in re.findall(r'(?:src|href)="([^"]*)"', text))
    assert not list(tmp_path.glob("*.partial"))
    assert image_tag(_png(tmp_path), alt='"q"').count('alt="&quot;q&quot;"') == 1
