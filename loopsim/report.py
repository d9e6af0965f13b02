"""``loopsim report RUN_DIR``: a loop run as one self-contained HTML file.

The report holds the metrics table (every iteration and site, loop and no-refine baseline, with 95%
intervals), the loop's plots (``plots/*.png``), the failure modes of each iteration (deployment
episodes from the operational store, evaluation episodes from ``eval.json``), and per iteration
the paths of the deployed episodes over the workcell and short videos of representative episodes —
a success and the most common failure modes — rendered by replaying them from the run's stores
(iteration 0: the expert demonstrations). Every image and video is embedded
(:mod:`loopsim.html_report`), so the file opens without a server or internet. A run with replicates
(``--seeds``) gets one section per ``seed_<r>`` folder.
"""

from __future__ import annotations

import csv
import html
import json
import os
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from loopsim.html_report import HtmlReport

__all__ = ["ReportError", "write_loop_report"]

PLOTS = (("success.png", "Success at the deployment site(s) vs operational episodes gathered, beside the "
          "no-refine baseline (95% intervals)"),
         ("lab.png", "Success at lab over the iterations (forgetting)"),
         ("failure_modes.png", "Failure modes per iteration at the deployment site(s)"))


class ReportError(ValueError):
    """The directory is not a loop run (no ``metrics.csv``), or a report argument is invalid."""


def _runs(run_dir: Path) -> list[tuple[str, Path]]:
    if (run_dir / "metrics.csv").is_file():
        return [("", run_dir)]
    reps = sorted((p for p in run_dir.glob("seed_*") if (p / "metrics.csv").is_file()),
                  key=lambda p: int(p.name.split("_", 1)[1]) if p.name.split("_", 1)[1].isdigit() else 0)
    if not reps:
        raise ReportError(f"{run_dir} is not a finished loop run: it has no metrics.csv (nor seed_<r>/"
                          "metrics.csv replicates); run `loopsim loop CONFIG --run-dir` first")
    return [(f"replicate {p.name.split('_', 1)[1]}: ", p) for p in reps]


#: Columns every loop run's metrics.csv has (what the report and the aggregate read).
_METRICS_COLUMNS = ("iteration", "site", "arm", "episodes", "success_rate", "success_low", "success_high")


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of ``path/metrics.csv``, numbers as ``int``/``float``.

    Raises:
        ReportError: If the file is not UTF-8, lacks a column of :data:`_METRICS_COLUMNS`, has no rows,
            a row without the header's fields, an ``iteration`` that is not an integer >= 0, or a
            count or success rate that is not a number (a damaged file: the report crashed on it).
    """
    where = path / "metrics.csv"
    try:
        return _parse_metrics(where)
    except UnicodeDecodeError as exc:
        raise ReportError(f"{where} is damaged: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _parse_metrics(where: Path) -> list[dict[str, Any]]:
    """:func:`_read_metrics` of one file (see there)."""
    rows: list[dict[str, Any]] = []
    with open(where, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in _METRICS_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ReportError(f"{where} is damaged: it has no column(s) {missing}")
        for row in reader:
            short = [k for k, v in row.items() if v is None or k is None]
            if short:  # a row cut short (or one with extra fields): None values / a None key
                raise ReportError(f"{where} is damaged: row {len(rows) + 1} does not have the header's "
                                  f"{len(reader.fieldnames or [])} fields")
            out: dict[str, Any] = {}
            for k, v in row.items():
                try:
                    out[k] = int(v)
                except ValueError:
                    try:
                        out[k] = float(v)
                    except ValueError:
                        out[k] = v
            if not isinstance(out.get("iteration"), int) or out["iteration"] < 0:
                raise ReportError(f"{where} is damaged: row {len(rows) + 1} has iteration "
                                  f"{row.get('iteration')!r}, not an integer >= 0")
            text = [c for c in _METRICS_COLUMNS[3:] if not isinstance(out.get(c), int | float)]
            if text:
                raise ReportError(f"{where} is damaged: row {len(rows) + 1} has {text[0]} "
                                  f"{row.get(text[0])!r}, not a number")
            rows.append(out)
    if not rows:
        raise ReportError(f"{where} is damaged: it has no rows")
    return rows


def _pick(meta: dict[str, np.ndarray], where: np.ndarray, failures: int) -> list[tuple[int, str]]:
    """A success (the first) and one failure of each of the ``failures`` most common failure modes."""
    idx = np.flatnonzero(where)
    chosen = []
    ok = [int(i) for i in idx if meta["success"][i]]
    if ok:
        chosen.append((ok[0], "success"))
    modes = Counter(str(meta["failure_mode"][i]) or "unknown" for i in idx if not meta["success"][i])
    for mode, _ in modes.most_common(failures):
        first = next(int(i) for i in idx if not meta["success"][i] and (str(meta["failure_mode"][i]) or
                                                                         "unknown") == mode)
        chosen.append((first, f"failure: {mode}"))
    return chosen


def write_loop_report(
    run_dir: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    videos: bool = True,
    paths: bool = True,
    video_size: int = 160,
    frame_step: int = 3,
    failures: int = 2,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write the HTML report of a loop run.

    Args:
        run_dir: The run directory (``loopsim loop --run-dir``), or the parent of ``seed_<r>``
            replicates.
        out: Output file (default ``<run_dir>/report.html``).
        videos: Embed videos of representative episodes (replayed and rendered: the slow part,
            ~0.05 s per frame at 160 px on one core).
        paths: Embed the trajectory plot of each iteration's deployed episodes.
        video_size: Side of the video frames [px] (16..2048).
        frame_step: Keep every ``frame_step``-th state in videos (played at real time).
        failures: Videos of this many failure modes (the most common) per iteration.
        progress: Called with ``(done, total)`` media items.

    Returns:
        The report's path.

    Raises:
        ReportError: If ``run_dir`` is not a finished loop run or an argument is out of range
            (checked before any work).
    """
    from loopsim.datasets import EpisodeStore
    from loopsim.replay import render_video
    from loopsim.trajectory import plot_trajectories

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir} is not a directory")
    if not (16 <= int(video_size) <= 2048) or int(frame_step) < 1 or int(failures) < 0:
        raise ReportError(f"video_size={video_size} must be in [16, 2048], frame_step={frame_step} >= 1, "
                          f"failures={failures} >= 0")
    out = Path(out) if out is not None else run_dir / "report.html"
    if out.is_dir() or not out.parent.is_dir():
        raise ReportError(f"{out}: cannot write the report there (a directory, or the folder is missing)")
    runs = _runs(run_dir)
    first_cfg = _config(runs[0][1])
    env_id = (first_cfg.get("env") or {}).get("id", "?")
    strategy = (first_cfg.get("strategy") or {}).get("type", "?")
    report = HtmlReport(f"loopsim loop run {run_dir.resolve().name}",
                        subtitle=f"{env_id}, strategy {strategy}; {run_dir.resolve()}")

    # plan the media first, for a progress total
    plans = []
    for prefix, path in runs:
        plans.append((prefix, path, _plan(path, failures) if (videos or paths) else {}))
    total = sum(len(p) * int(paths) + sum(len(v) for v in p.values()) * int(videos) for *_, p in plans)
    done = [0]

    def tick() -> None:
        done[0] += 1
        if progress is not None:
            progress(done[0], total)

    _aggregate_section(report, run_dir, len(runs))
    with tempfile.TemporaryDirectory(prefix="loopsim-report-") as tmp:
        for prefix, path, plan in plans:
            rows = _read_metrics(path)
            cfg = _config(path)
            _summary(report, prefix, rows, cfg)
            _metrics_table(report, prefix, rows)
            report.heading(f"{prefix}Plots")
            report.begin_row()
            for name, caption in PLOTS:
                if (path / "plots" / name).is_file():
                    report.image(path / "plots" / name, caption, width=520)
            report.end_row()
            _failure_tables(report, prefix, path)
            if plan:
                report.heading(f"{prefix}Episodes per iteration")
                report.paragraph(
                    "Replayed from the run's stores (iteration 0: the expert demonstrations, if the "
                    "strategy uses them; later: the episodes the policy deployed). "
                    "Paths: end effector from above, green = success, red = "
                    "failure, dot = start, square = end, x = where the parts ended up. Videos play at real "
                    f"time, one frame every {frame_step} control steps.")
            for k, episodes in plan.items():
                store_path = path / ("demos.zarr" if k == 0 else "operational.zarr")
                report.heading(f"{prefix}iteration {k}" + (" (expert demonstrations)" if k == 0 else
                                                           " (deployment)"), level=3)
                report.begin_row()
                with EpisodeStore.open(store_path) as store:
                    meta = store.metadata()
                    if paths:
                        idx = [int(i) for i in np.flatnonzero(meta["iteration"] == k)][:40]
                        png = Path(tmp) / f"paths_{len(prefix)}_{k}.png"
                        try:
                            plot_trajectories(store, idx, png, title=f"iteration {k}: {len(idx)} episodes "
                                              f"({store_path.name})")
                            report.image(png, f"iteration {k}: paths of {len(idx)} episodes", width=420)
                        except KeyError as exc:  # a domain without a trajectory view: no paths, say so
                            report.paragraph(f"(no paths: {exc.args[0]})")
                        tick()
                    if videos:
                        for index, label in episodes:
                            gif = Path(tmp) / f"ep_{len(prefix)}_{k}_{index}.gif"
                            v = render_video(store, index, gif, size=int(video_size),
                                             frame_step=int(frame_step))
                            m = store.metadata_row(index)
                            diverged = v.replay is not None and not v.replay.ok
                            caption = (f"{label} — episode {index} of {store_path.name}, site {m.site}, "
                                       f"seed {m.seed}, {m.length} steps, return {m.episode_return:.1f}")
                            if diverged:
                                caption += " (replay DIVERGED from the store)"
                            report.video(gif, caption, width=int(video_size) + 80)
                            tick()
                report.end_row()
            report.heading(f"{prefix}Configuration", level=3)
            report.raw(f"<pre>{html.escape((path / 'config.yaml').read_text(encoding='utf-8'))}</pre>"
                       if (path / "config.yaml").is_file() else "<p>(no config.yaml)</p>")
        return report.write(out)


def _config(path: Path) -> dict[str, Any]:
    import yaml

    f = path / "config.yaml"
    if not f.is_file():
        return {}
    return yaml.safe_load(f.read_text(encoding="utf-8")) or {}


def _aggregate_section(report: HtmlReport, run_dir: Path, n_runs: int) -> None:
    """The replicates' aggregate (``aggregate.json`` of a ``--seeds`` run): IQM and P(improvement)."""
    file = run_dir / "aggregate.json"
    if n_runs < 2 or not file.is_file():
        return
    try:
        aggregate = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        report.paragraph(f"({file.name} is unreadable: no aggregate over replicates)")
        return
    report.heading("Aggregate over replicates")
    report.paragraph(
        "Final-iteration success at each deployment site over independent replicates: interquartile mean "
        "(IQM) with a 95% stratified-bootstrap interval, and the probability that the loop's final policy "
        "beats the never-refined baseline (rliable; Agarwal et al. 2021).")
    rows = []
    for site, agg in aggregate.items():
        iqm, poi = agg["iqm_success"], agg["probability_of_improvement"]
        rows.append({
            "site": site, "replicates": agg["replicates"],
            "loop IQM [95% CI]": f"{iqm['loop']['value']:.1%} [{iqm['loop']['ci'][0]:.1%}, "
                                 f"{iqm['loop']['ci'][1]:.1%}]",
            "baseline IQM [95% CI]": f"{iqm['baseline']['value']:.1%} [{iqm['baseline']['ci'][0]:.1%}, "
                                     f"{iqm['baseline']['ci'][1]:.1%}]",
            "P(loop > baseline) [95% CI]": f"{poi['value']:.2f} [{poi['ci'][0]:.2f}, {poi['ci'][1]:.2f}]",
            "loop final success per replicate": ", ".join(f"{v:.0%}" for v in agg["final_success"]["loop"]),
        })
    report.table(rows)


def _plan(path: Path, failures: int) -> dict[int, list[tuple[int, str]]]:
    """Iteration -> episodes to show ``[(store index, label)]``, for the iterations with a store."""
    from loopsim.datasets import EpisodeStore

    plan: dict[int, list[tuple[int, str]]] = {}
    for k0, name in ((True, "demos.zarr"), (False, "operational.zarr")):
        if not (path / name).exists():
            continue
        with EpisodeStore.open(path / name) as store:
            if not len(store):
                continue
            meta = store.metadata()
        if k0:
            plan[0] = _pick(meta, np.ones(len(meta["success"]), dtype=bool), 0)
            continue
        for k in sorted(set(int(i) for i in meta["iteration"])):
            plan[k] = _pick(meta, meta["iteration"] == k, failures)
    return dict(sorted(plan.items()))


def _summary(report: HtmlReport, prefix: str, rows: list[dict[str, Any]], cfg: dict[str, Any]) -> None:
    report.heading(f"{prefix}Summary")
    last = max(r["iteration"] for r in rows)
    finals = [r for r in rows if r["iteration"] == last]
    lines = []
    for site in dict.fromkeys(r["site"] for r in finals):
        loop = next(r for r in finals if r["site"] == site and r["arm"] == "loop")
        base = next(r for r in finals if r["site"] == site and r["arm"] == "baseline")
        lines.append({"site": site, "iteration": last,
                      "operational episodes": loop["operational_episodes"],
                      "loop success": f"{loop['success_rate']:.0%} [{loop['success_low']:.0%}, "
                                      f"{loop['success_high']:.0%}]",
                      "no-refine baseline": f"{base['success_rate']:.0%} [{base['success_low']:.0%}, "
                                            f"{base['success_high']:.0%}]"})
    loop_cfg = cfg.get("loop") or {}
    report.paragraph(f"{last} loop iteration(s) of {loop_cfg.get('episodes', '?')} deployment episodes at "
                     f"{', '.join(loop_cfg.get('deploy_sites') or ['?'])}; evaluation on "
                     f"{(cfg.get('eval') or {}).get('episodes', '?')} held-out seeds per site, the same "
                     "every iteration.")
    report.table(lines, caption="final iteration; 95% percentile-bootstrap intervals")


def _metrics_table(report: HtmlReport, prefix: str, rows: list[dict[str, Any]]) -> None:
    report.heading(f"{prefix}Metrics")
    shown = []
    for r in rows:
        shown.append({**r, "success": f"{r['success_rate']:.0%} [{r['success_low']:.0%}, "
                                      f"{r['success_high']:.0%}]"})
    cols = ["iteration", "site", "arm", "success", "mean_return", "operational_episodes",
            "operational_transitions", "deploy_success_rate", "intervention_rate", "expert_actions",
            "deploy_s", "refine_s", "evaluate_s"]
    cols = [c for c in cols if c == "success" or c in rows[0]]
    report.table(shown, columns=cols,
                 formats={"mean_return": "{:.2f}", "deploy_success_rate": "{:.0%}",
                          "intervention_rate": "{:.1%}", "deploy_s": "{:.1f}", "refine_s": "{:.1f}",
                          "evaluate_s": "{:.1f}"},
                 caption="metrics.csv: arm 'baseline' is the iteration-0 policy, never refined; times in "
                         "seconds")


def _failure_tables(report: HtmlReport, prefix: str, path: Path) -> None:
    """Failure modes per iteration: deployment episodes (operational store) and evaluation episodes."""
    from loopsim.datasets import EpisodeStore

    report.heading(f"{prefix}Failure modes per iteration")
    rows: list[dict[str, Any]] = []
    op = path / "operational.zarr"
    if op.exists():
        with EpisodeStore.open(op) as store:
            meta = store.metadata() if len(store) else None
        if meta is not None:
            for k in sorted(set(int(i) for i in meta["iteration"])):
                for site in dict.fromkeys(str(s) for s in meta["site"]):
                    sel = (meta["iteration"] == k) & (meta["site"] == site)
                    if sel.any():
                        rows.append(_mode_row(k, f"deployment @ {site}", meta["success"][sel],
                                              meta["failure_mode"][sel]))
    for it in sorted((path / "iterations").glob("[0-9][0-9][0-9]")):
        f = it / "eval.json"
        if not f.is_file():
            continue
        for site, res in json.loads(f.read_text(encoding="utf-8")).items():
            eps = res.get("per_episode") or []
            rows.append(_mode_row(int(it.name), f"evaluation @ {site}", [e["success"] for e in eps],
                                  [e.get("failure_mode") or "" for e in eps]))
    rows.sort(key=lambda r: (r["iteration"], r["episodes of"]))
    modes = sorted({m for r in rows for m in r if m not in ("iteration", "episodes of", "n", "success")})
    report.table(rows, columns=["iteration", "episodes of", "n", "success", *modes],
                 formats={"success": "{:.0%}"}, caption="count of each failure mode among failed episodes")


def _mode_row(k: int, what: str, success: Any, modes: Any) -> dict[str, Any]:
    success = [bool(s) for s in success]
    counts = Counter(str(m) or "unknown" for m, s in zip(modes, success, strict=True) if not s)
    return {"iteration": k, "episodes of": what, "n": len(success),
            "success": sum(success) / len(success) if success else float("nan"), **counts}
