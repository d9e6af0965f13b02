"""Self-contained HTML reports: one file, every image and video inside it as a ``data:`` URI.

The file opens from disk without a server and without internet (no scripts, fonts or styles from
elsewhere). Building blocks, reusable by any report (loop runs, benchmarks)::

    report = HtmlReport("Loop run runs/quickstart", subtitle="loopsim/FactoryPickPlace-v0")
    report.heading("Metrics")
    report.table(rows, columns=["iteration", "site", "success_rate"], formats={"success_rate": "{:.0%}"})
    report.image("runs/quickstart/plots/success.png", caption="success vs data")
    report.video("episode.gif", caption="a success")   # GIF: <img>; MP4 / WebM: <video>
    report.write("report.html")

Videos: an animated GIF in ``<img>`` plays everywhere (Chromium included) with no codec question;
WebM (VP9) and MP4 (H.264) go into ``<video autoplay muted loop controls>`` (Debian's Chromium
plays WebM; H.264 depends on the build), so GIF is the default for embedded episode videos.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from loopsim.atomic import atomic_write

__all__ = ["HtmlReport", "data_uri", "image_tag", "table_html", "video_tag"]

MIME_TYPES = {
    ".png": "image/png", ".gif": "image/gif", ".jpg": "image/jpeg", ".jpeg": "image/jpeg",
    ".svg": "image/svg+xml", ".webp": "image/webp", ".mp4": "video/mp4", ".webm": "video/webm",
}

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; margin-bottom: 0.1em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
.subtitle { color: #666; margin-top: 0; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.88em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f2f2f2; } td.text { text-align: left; } td { white-space: nowrap; }
.scroll { overflow-x: auto; max-width: 100%; }
caption { caption-side: bottom; color: #666; font-size: 0.9em; padding-top: 4px; text-align: left; }
figure { display: inline-block; margin: 0.5em 1em 0.5em 0; vertical-align: top; }
figcaption { color: #555; font-size: 0.85em; max-width: 480px; }
img, video { max-width: 100%; border: 1px solid #ddd; }
.row { display: flex; flex-wrap: wrap; gap: 0.5em; }
footer { margin-top: 3em; color: #888; font-size: 0.8em; }
"""


def _mime(name: str | os.PathLike, mime: str | None) -> str:
    if mime:
        return mime
    suffix = Path(name).suffix.lower()
    if suffix not in MIME_TYPES:
        raise ValueError(f"{name}: unknown media type {suffix!r}; known: {sorted(MIME_TYPES)} "
                         "(or pass mime=)")
    return MIME_TYPES[suffix]


def data_uri(data: bytes | str | os.PathLike, mime: str | None = None) -> str:
    """A ``data:<mime>;base64,...`` URI of a file or of raw bytes.

    Args:
        data: A file path, or the bytes themselves (then ``mime`` is required).
        mime: Media type (default: from the file suffix, see :data:`MIME_TYPES`).

    Returns:
        The URI.

    Raises:
        ValueError: For bytes without ``mime`` or an unknown suffix.
        FileNotFoundError: If the file does not exist.
    """
    if isinstance(data, bytes | bytearray):
        if not mime:
            raise ValueError("data_uri(bytes) needs mime=, e.g. 'image/png'")
        raw = bytes(data)
    else:
        mime = _mime(data, mime)
        raw = Path(data).read_bytes()
    return f"data:{mime};base64,{base64.b64encode(raw).decode('ascii')}"


def image_tag(source: bytes | str | os.PathLike, alt: str = "", mime: str | None = None,
              width: int | None = None) -> str:
    """An ``<img>`` with the image (PNG, GIF, SVG...) embedded; ``width`` in CSS px."""
    w = f' width="{int(width)}"' if width else ""
    return f'<img src="{data_uri(source, mime)}" alt="{html.escape(alt)}"{w}>'


def video_tag(source: bytes | str | os.PathLike, alt: str = "", mime: str | None = None,
              width: int | None = None) -> str:
    """An embedded, looping video: GIF as ``<img>``, MP4 / WebM as a muted autoplaying ``<video>``."""
    mime = _mime(source, mime) if not isinstance(source, bytes | bytearray) else mime
    if mime == "image/gif":
        return image_tag(source, alt, mime, width)
    if mime not in ("video/mp4", "video/webm"):
        raise ValueError(f"video_tag: {mime!r} is not a video type (gif, mp4, webm)")
    w = f' width="{int(width)}"' if width else ""
    return (f'<video autoplay muted loop playsinline controls{w} title="{html.escape(alt)}">'
            f'<source src="{data_uri(source, mime)}" type="{mime}"></video>')


def _cell(value: Any, fmt: str | None) -> tuple[str, bool]:
    """Formatted text of a table cell and whether it is text (left-aligned) rather than a number."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-", False
    if fmt:
        try:
            return fmt.format(value), False
        except (ValueError, TypeError):
            pass
    if isinstance(value, float):
        return f"{value:.4g}", False
    return str(value), not isinstance(value, int | float)


def table_html(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None,
               formats: Mapping[str, str] | None = None, caption: str | None = None,
               headers: Mapping[str, str] | None = None) -> str:
    """An HTML table of ``rows`` (escaped).

    Args:
        rows: One mapping per row.
        columns: Keys to show, in order (default: the first row's keys).
        formats: Per column, a ``str.format`` pattern (``"{:.1%}"``); NaN and ``None`` show as ``-``.
        caption: Text under the table.
        headers: Per column, the header text (default: the key).

    Returns:
        The ``<table>`` element.
    """
    columns = list(columns if columns is not None else (rows[0].keys() if rows else []))
    formats, headers = dict(formats or {}), dict(headers or {})
    out = ['<div class="scroll"><table>']
    if caption:
        out.append(f"<caption>{html.escape(caption)}</caption>")
    out.append("<tr>" + "".join(f"<th>{html.escape(headers.get(c, c))}</th>" for c in columns) + "</tr>")
    for row in rows:
        cells = []
        for c in columns:
            text, is_text = _cell(row.get(c), formats.get(c))
            cls = ' class="text"' if is_text else ""
            cells.append(f"<td{cls}>{html.escape(text)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table></div>")
    return "\n".join(out)


class HtmlReport:
    """A single-file HTML report, built section by section.

    Args:
        title: Page title and first heading.
        subtitle: A line under the title.
    """

    def __init__(self, title: str, subtitle: str = "") -> None:
        self.title = title
        self.subtitle = subtitle
        self._parts: list[str] = []
        self._row: list[str] | None = None

    def _add(self, fragment: str) -> None:
        (self._row if self._row is not None else self._parts).append(fragment)

    def heading(self, text: str, level: int = 2) -> None:
        """Add a heading (``level`` 2..4)."""
        level = min(4, max(2, int(level)))
        self._parts.append(f"<h{level}>{html.escape(text)}</h{level}>")

    def paragraph(self, text: str) -> None:
        """Add a paragraph of plain (escaped) text."""
        self._add(f"<p>{html.escape(text)}</p>")

    def raw(self, fragment: str) -> None:
        """Add an HTML fragment as is (the caller escapes what needs escaping)."""
        self._add(fragment)

    def table(self, rows: Sequence[Mapping[str, Any]], **kwargs: Any) -> None:
        """Add a table (see :func:`table_html` for the arguments)."""
        self._add(table_html(rows, **kwargs))

    def _figure(self, inner: str, caption: str) -> None:
        cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
        self._add(f"<figure>{inner}{cap}</figure>")

    def image(self, source: bytes | str | os.PathLike, caption: str = "", mime: str | None = None,
              width: int | None = None) -> None:
        """Add an embedded image with a caption."""
        self._figure(image_tag(source, caption, mime, width), caption)

    def video(self, source: bytes | str | os.PathLike, caption: str = "", mime: str | None = None,
              width: int | None = None) -> None:
        """Add an embedded video (GIF, MP4 or WebM) with a caption."""
        self._figure(video_tag(source, caption, mime, width), caption)

    def figure(self, fig: Any, caption: str = "", dpi: int = 110) -> None:
        """Add a matplotlib figure, embedded as PNG."""
        import io

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi)
        self.image(buf.getvalue(), caption, mime="image/png")

    def begin_row(self) -> None:
        """Lay the following figures side by side, until :meth:`end_row`."""
        self.end_row()
        self._row = []

    def end_row(self) -> None:
        """Close a row begun by :meth:`begin_row` (no-op without one)."""
        if self._row is not None:
            self._parts.append('<div class="row">' + "".join(self._row) + "</div>")
            self._row = None

    def render(self) -> str:
        """The whole HTML document."""
        self.end_row()
        made = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
        sub = f'<p class="subtitle">{html.escape(self.subtitle)}</p>' if self.subtitle else ""
        return (
            "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(self.title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
            f"<h1>{html.escape(self.title)}</h1>\n{sub}\n" + "\n".join(self._parts)
            + f"\n<footer>made by loopsim on {made}; a single self-contained file</footer>\n"
            "</body>\n</html>\n"
        )

    def write(self, path: str | os.PathLike) -> Path:
        """Write the report to ``path`` (whole or not at all: a temporary file renamed into place)."""
        return atomic_write(path, self.render(), mkdir=False)
