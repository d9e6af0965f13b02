"""The ``loopsim`` command line (Typer).

Commands so far: ``loopsim envs`` (registered envs, spaces, sites), ``loopsim sites`` (site
parameters and bundled sites of a domain), ``loopsim bench CONFIG`` (benchmark suites, see
:mod:`loopsim.bench`), ``loopsim expert`` (run a task's scripted expert at one
or more sites and report success with 95% confidence intervals), ``loopsim info STORE`` (summary of
an episode store), ``loopsim store check STORE [--repair]`` (verify a store, drop a killed writer's
uncommitted tail), ``loopsim export STORE --to minari NAME`` and ``loopsim import NAME STORE --from
minari`` (Minari datasets), ``loopsim replay STORE`` (re-simulate stored episodes and check the store
reproduces them; videos), ``loopsim report RUN_DIR`` (a loop run as one HTML file).

Exit codes of the store commands: 0 done (for ``check``: the store is ok), 1 ``check`` found
problems or an uncommitted tail that remain, 2 the command could not run (missing path, not a store,
locked, newer schema, bad arguments), reported as one red line without a traceback.
"""

from __future__ import annotations

import math
import os
import shlex
import signal
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from loopsim.envs import ENV_ENTRY_POINTS, SiteError, available_sites, env_class, site_name, site_name_key

#: loopsim.config.MAX_EPISODES (config is imported lazily: pydantic slows start-up); tested equal.
_MAX_EPISODES = 100_000

app = typer.Typer(
    name="loopsim",
    help="loopsim: simulate the data flywheel of deployed robots.",
    no_args_is_help=True,
    add_completion=False,
    # Help texts are plain text: with rich markup, "[px]", "[m/s]" or "[default: lab]" would be read
    # as markup tags and vanish from --help.
    rich_markup_mode=None,
)
#: Piped output (logs, CI) is 120 columns wide rather than rich's 80, so tables do not fold, and text
#: lines are never wrapped (one message, one line: greppable); a terminal keeps its own width and
#: wrapping, and ``COLUMNS`` overrides the width. No console markup: what is printed holds names,
#: paths and messages of users' own (``[draft]plant.yaml``, "uniform needs [lo, hi]"), and rich read
#: their bracketed words as tags and dropped them; colour is given with ``style=`` instead.
_PIPED = not sys.stdout.isatty()
console = Console(width=120 if _PIPED and "COLUMNS" not in os.environ else None, soft_wrap=_PIPED,
                  markup=False)
#: Errors go to stderr (scripts that keep stdout for results read them apart), one line each.
err_console = Console(stderr=True, width=120 if not sys.stderr.isatty() and "COLUMNS" not in os.environ
                      else None, soft_wrap=not sys.stderr.isatty(), markup=False)
store_app = typer.Typer(
    name="store",
    help="Episode stores: verify and repair.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
)
app.add_typer(store_app)


#: ``--site`` of ``loopsim expert`` and ``loopsim eval`` (resolved by :func:`_resolve_sites`).
_SiteOption = Annotated[
    list[str] | None,
    typer.Option(
        "--site", "-s",
        help="A bundled site's name or the path of a site file of your own (YAML with params; "
        "description and name optional, the name by default the file's stem). Repeatable. "
        "[default: lab]",
    ),
]


def _terminated(signum: int, frame: Any) -> None:
    """SIGTERM handler: stop as Ctrl-C does (KeyboardInterrupt), so the command says how to resume."""
    raise KeyboardInterrupt(f"signal {signum}")


@app.callback()
def _setup() -> None:
    # Job schedulers and `kill` stop a process with SIGTERM, whose default action ends Python at once:
    # no "interrupted: ... resume with ..." line and no clean shutdown of worker processes. Handled as
    # Ctrl-C instead (every finished episode, cell and checkpoint is on disk either way).
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminated)


def _space_str(space) -> str:
    import gymnasium as gym

    if isinstance(space, gym.spaces.Dict):
        return "Dict " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in space.spaces.items())
    return f"{type(space).__name__}{tuple(space.shape)} {space.dtype}"


@app.command()
def envs() -> None:
    """List every registered env id with its observation and action spaces and its sites."""
    import gymnasium as gym

    table = Table(title="loopsim environments", show_lines=True)
    table.add_column("env id", style="bold", no_wrap=True)
    table.add_column("obs_mode: observation space")
    table.add_column("action, control, sites")
    for env_id in ENV_ENTRY_POINTS:
        cls = env_class(env_id)
        spaces = []
        for mode in ("state", "goal", "rgb"):
            env = gym.make(env_id, obs_mode=mode)
            spaces.append(f"{mode}: {_space_str(env.observation_space)}")
            action = _space_str(env.action_space)
            control = f"{env.metadata['render_fps']} Hz, limit {env.unwrapped.max_steps} steps"
            env.close()
        site_names = ", ".join(available_sites(cls.site_schema.domain))
        table.add_row(env_id, "\n".join(spaces), f"{action}\n{control}\nsites: {site_names}")
    console.print(table)


@app.command()
def sites(domain: Annotated[str, typer.Argument(help="Domain, e.g. factory.")] = "factory") -> None:
    """Show a domain's site parameters (lab value, range, unit) and what each bundled site changes."""
    from loopsim.envs import load_site

    schemas = {env_class(i).site_schema.domain: env_class(i).site_schema for i in ENV_ENTRY_POINTS}
    if domain not in schemas:
        raise _error(f"unknown domain {domain!r}; domains are {sorted(schemas)}")
    schema = schemas[domain]
    params = Table(title=f"{domain} site parameters")
    for col in ("parameter", "lab", "range", "unit", "meaning"):
        params.add_column(col)
    for p in schema.params.values():
        params.add_row(p.name, f"{p.lab:g}", f"[{p.low:g}, {p.high:g}]", p.unit, p.doc)
    console.print(params)
    table = Table(title=f"{domain} sites")
    for col in ("site", "changes", "description"):
        table.add_column(col)
    for name in available_sites(domain):
        site = load_site(schema, name)
        changes = "\n".join(f"{k}: {v}" for k, v in site.overrides.items()) or "(nominal)"
        table.add_row(name, changes, site.description)
    console.print(table)


@app.command()
def expert(
    env_id: Annotated[str, typer.Argument(help="Env id, e.g. loopsim/FactoryPickPlace-v0.")],
    site: _SiteOption = None,
    episodes: Annotated[
        int, typer.Option("--episodes", "-n", min=1, max=_MAX_EPISODES, help="Episodes per site.")
    ] = 20,
    seed: Annotated[
        int, typer.Option(min=0, max=2**31 - 1, help="Seed of the first episode; episode i uses seed+i.")
    ] = 0,
    noise: Annotated[float, typer.Option(min=0.0, help="Std of the expert's action noise.")] = 0.0,
    store: Annotated[
        str | None,
        typer.Option(help="Record every episode into this episode store (created, or appended to)."),
    ] = None,
) -> None:
    """Run the task's scripted expert at one or more sites and report success with 95% intervals.

    A site is a bundled site's name or the path of a site file (YAML with params, and optionally
    description and name); every one is checked before the first episode runs.

    With --store, every episode is recorded (with the expert's action at each state and is_success as
    step extras, policy id "expert"); see: loopsim info STORE.
    """
    from loopsim.evaluation import run_expert

    if env_id not in ENV_ENTRY_POINTS:
        raise _error(f"unknown env id {env_id!r}; loopsim envs are {sorted(ENV_ENTRY_POINTS)}")
    if not math.isfinite(noise):
        raise _error(f"--noise {noise} must be a finite number >= 0")
    from loopsim.config import MAX_SEED

    if seed + episodes - 1 > MAX_SEED:  # as eval and collect refuse it
        raise _error(f"--seed {seed} + --episodes {episodes} - 1 exceeds the largest seed {MAX_SEED}")
    try:
        sites_to_run = _resolve_sites(env_id, site or ["lab"])
    except SiteError as exc:
        raise _error(f"--site: {exc}") from None
    summaries = []
    episode_store = (_open_expert_store(store, env_id, sites_to_run, range(seed, seed + episodes))
                     if store else None)
    wrap = None
    if episode_store is not None:
        from loopsim.datasets import RecordEpisodes
        from loopsim.envs import ExpertActionInfo

        def wrap(env: Any) -> Any:
            return RecordEpisodes(ExpertActionInfo(env), episode_store, policy_id="expert",
                                  policy_version=f"noise_std={noise:g}")

    try:
        with _progress() as progress:
            for site_arg in sites_to_run:
                task = progress.add_task(f"{env_id} @ {site_name(site_arg)}", total=episodes)
                try:
                    summary = run_expert(
                        env_id, site_arg, episodes, seed, noise,
                        on_episode=lambda _r, t=task: progress.advance(t), wrap=wrap,
                    )
                except SiteError as exc:  # pragma: no cover - sites were checked above
                    raise _error(str(exc)) from exc
                summaries.append(summary)
    finally:
        if episode_store is not None:
            episode_store.close()
    table = Table(
        title=f"scripted expert, {env_id}",
        caption=(
            f"{episodes} episodes per site, seeds {seed}..{seed + episodes - 1}; 95% CI: Wilson interval; "
            "return: sum of the dense reward; length: control steps"
        ),
    )
    for col in ("site", "success", "95% CI", "return", "length", "failure modes"):
        table.add_column(col)
    for s in summaries:
        lo, hi = s.success_ci
        modes = ", ".join(f"{k}: {v}" for k, v in s.failure_modes.items()) or "-"
        table.add_row(
            s.site,
            f"{s.success_rate:.0%}",
            f"[{lo:.0%}, {hi:.0%}]",
            f"{s.mean_return:.2f}",
            f"{s.mean_length:.0f}",
            modes,
        )
    console.print(table)
    if episode_store is not None:
        console.print(f"recorded {sum(x.n for x in summaries)} episodes into {store} "
                      f"({len(episode_store)} in total); see: loopsim info {store}")


# ----------------------------------------------------------------------------- episode stores


def _looks_like_path(value: str) -> bool:
    """Whether a ``--site`` value names a file rather than a bundled site."""
    return value.endswith((".yaml", ".yml")) or os.sep in value or "/" in value or os.path.exists(value)


def _resolve_sites(env_id: str, values: list[str]) -> list[str | dict[str, Any]]:
    """Resolve ``--site`` values (``loopsim expert``, ``loopsim eval``), checking every one first.

    A bundled site's name wins over a file of the same name in the working directory.

    Args:
        env_id: A registered loopsim env id.
        values: Bundled site names or paths of site files (:func:`loopsim.envs.read_site_file`).

    Returns:
        One entry per distinct site, in the order given (a site given twice is run once): the name of
        a bundled site, or the site document read from a file.

    Raises:
        SiteError: For a value that is neither a bundled site of the env's domain nor a readable,
            valid site file (unknown parameter, malformed spec, a bundled site's name with other
            conditions), or two different sites that would be recorded under one name.
    """
    from loopsim.envs import load_site, read_site_file

    schema = env_class(env_id).site_schema
    valid = available_sites(schema.domain)
    resolved: list[str | dict[str, Any]] = []
    for value in values:
        if value in valid:
            if os.path.isfile(value):
                console.print(f"note: --site {value} is the bundled site; for the file of that name give "
                              f"./{value} (with a name of its own inside, 'name: ...', if its conditions "
                              f"differ from the bundled {value}'s)", style="yellow", highlight=False,
                              soft_wrap=True)
            resolved.append(value)
        elif _looks_like_path(value):
            doc = read_site_file(value)
            try:
                load_site(schema, doc)
            except SiteError as exc:
                raise SiteError(f"site file {value!r}: {exc}") from None
            resolved.append(doc)
        else:
            try:
                load_site(schema, value)
            except SiteError as exc:  # always: the bundled names were checked above
                raise SiteError(f"{exc}; or give the path of a site file (.yaml)") from None
            raise AssertionError(f"{value!r} is no bundled site, yet load_site took it")  # pragma: no cover
    unique: list[str | dict[str, Any]] = []
    for r in resolved:
        look_alike = [u for u in unique if site_name_key(site_name(u)) == site_name_key(site_name(r))]
        if look_alike and site_name(look_alike[0]) != site_name(r):
            raise SiteError(
                f"the site names {site_name(look_alike[0])!r} and {site_name(r)!r} differ only in "
                "case or Unicode form: tables and stores would show two rows that read alike; give one "
                "of them another name"
            )
        if not look_alike:
            unique.append(r)
        elif load_site(schema, look_alike[0]).overrides != load_site(schema, r).overrides:
            raise SiteError(
                f"two different sites are named {site_name(r)!r} (a site file is named by its "
                "'name', else its file's stem); their episodes would be reported and recorded as one "
                "site's: give one of them another name"
            )
    return unique


def _open_expert_store(url: str, env_id: str, sites: list[Any], seeds: range) -> Any:
    """Create the store for ``loopsim expert --store`` (or open it to append, if it is one for ``env_id``).

    An existing store must hold ``env_id`` made with its default kwargs (defaults compared filled in),
    with the ``expert_action`` extra, and none of ``seeds`` at any of ``sites`` (as ``collect``'s
    append refuses them: the episodes would be stored twice).
    """
    import gymnasium as gym

    from loopsim.datasets import EpisodeStore
    from loopsim.envs import env_kwargs_with_defaults

    with _store_errors():
        try:
            existing = EpisodeStore.open(url, mode="a")
        except FileNotFoundError:
            existing = None
        if existing is not None:
            problem = None
            if existing.env_id != env_id or "expert_action" not in existing.step_extras:
                problem = (f"holds episodes of {existing.env_id!r} (step extras {existing.step_extras}); "
                           f"--store needs a new path or a store of {env_id!r} with the expert_action extra")
            elif (env_kwargs_with_defaults(env_id, existing.env_kwargs)
                  != env_kwargs_with_defaults(env_id, {})):
                problem = (f"was recorded with env kwargs {existing.env_kwargs}; loopsim expert runs "
                           f"{env_id} with its defaults: give a new --store path")
            else:
                from loopsim.rollout import held_seeds

                held, after = held_seeds(existing, [site_name(s) for s in sites], seeds)
                if held:
                    problem = (f"already holds {len(held)} episodes of these seeds at these sites (e.g. seed "
                               f"{held[0]}): they would be stored twice; continue with --seed {after}")
            if problem:
                existing.close()
                raise _error(f"{url} {problem}")
            return existing
        env = gym.make(env_id)
        try:
            return EpisodeStore.create(url, observation_space=env.observation_space,
                                       action_space=env.action_space, env_id=env_id,
                                       step_extras=["expert_action", "is_success"])
        finally:
            env.close()


class ExportFormat(StrEnum):
    """Formats ``loopsim export`` writes."""

    minari = "minari"


class ImportFormat(StrEnum):
    """Formats ``loopsim import`` reads."""

    minari = "minari"


def _folded(table: Table) -> Table:
    """Fold long cells onto more lines instead of cutting them (a narrow or piped console is 80 wide)."""
    for column in table.columns:
        column.overflow = "fold"
    return table


def _error(message: str) -> typer.Exit:
    """Print one red line (no markup, no wrapping) and return the exit-code-2 exception to raise."""
    err_console.print(f"error: {message}", style="red", markup=False, highlight=False, soft_wrap=True)
    return typer.Exit(2)


def _is_store(url: str) -> bool:
    """Whether ``url`` holds an episode store that opens (an interrupted job's hint depends on it)."""
    from loopsim.datasets import EpisodeStore, StoreError

    try:
        EpisodeStore.open(url).close()
    except (FileNotFoundError, StoreError, OSError):
        return False
    return True


@contextmanager
def _before_work() -> Iterator[None]:
    """A Ctrl-C while a command reads and checks its config (imports, env builds: 1-2 s) says so.

    It ended the command with no word (exit 130); nothing is written until the checks pass.
    """
    try:
        yield
    except KeyboardInterrupt:
        err_console.print("interrupted before any work started: nothing was written; run the command again",
                          style="yellow", markup=False, soft_wrap=True)
        raise typer.Exit(130) from None


@contextmanager
def _store_errors(*extra: type[BaseException]) -> Iterator[None]:
    """Turn the expected failures of a store command into one red line and exit code 2."""
    from loopsim.datasets import StoreError

    try:
        yield
    except (StoreError, OSError, *extra) as exc:
        raise _error(str(exc) or type(exc).__name__) from None


def _disk_size(url: str) -> int | None:
    """Bytes of all files under a local store (``None`` for a remote URL)."""
    from loopsim.datasets.store import _is_local, _local_path

    if not _is_local(url):
        return None
    root = _local_path(url)
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover - unreachable


def _pending_count(store: Any) -> int:
    """Committed episodes not yet merged into the arrays (in the ``pending/`` write-ahead log)."""
    return int(store.n_pending)


def _rate(successes: int, n: int) -> tuple[str, str]:
    """Success rate and its 95% Wilson interval, formatted (``-`` for no episodes)."""
    from loopsim.evaluation import wilson_interval

    if n == 0:
        return "-", "-"
    lo, hi = wilson_interval(successes, n)
    return f"{successes / n:.1%}", f"[{lo:.1%}, {hi:.1%}]"


def _failure_counts(failure_modes: Any, success: Any) -> dict[str, int]:
    """Count of each failure mode among failed episodes (``unknown`` if none recorded), most common first."""
    counts = Counter(str(m) or "unknown" for m, ok in zip(failure_modes, success, strict=True) if not ok)
    return dict(counts.most_common())


@app.command()
def info(
    store: Annotated[str, typer.Argument(help="Episode store: a directory or an fsspec URL (s3://...).")],
) -> None:
    """Summarise an episode store: episodes, transitions, sites, success rates, failure modes, size."""
    import json

    import numpy as np

    from loopsim.datasets import EpisodeStore

    with _store_errors():
        opened = EpisodeStore.open(store, mode="r")
    with opened as s, _store_errors():
        cols = s.metadata()
        n = len(s)
        lengths = cols["length"]
        success = cols["success"].astype(bool)
        overview = Table(title=f"episode store {s.url}", show_header=False)
        overview.add_column("", style="bold")
        overview.add_column("")
        size = _disk_size(s.url)
        rate, ci = _rate(int(success.sum()), n)
        rows = [
            ("env id", s.env_id or "-"),
            ("env kwargs", json.dumps(s.env_kwargs) if s.env_kwargs else "-"),
            ("schema version", str(s.schema_version)),
            ("loopsim version", f"{s.loopsim_version} (created {s.info.get('created', '?')})"),
            ("observation space", _space_str(s.observation_space)),
            ("action space", _space_str(s.action_space)),
            ("step extras", ", ".join(s.step_extras) or "-"),
            ("episodes", str(n)),
            ("transitions", str(s.n_transitions)),
            ("pending episodes", f"{_pending_count(s)} (committed, not yet merged into the arrays)"),
            ("success", f"{rate} {ci} (95% Wilson)" if n else "-"),
            ("size on disk", "n/a (remote store)" if size is None
             else f"{_human_bytes(size)} ({size} bytes)"),
        ]
        for key, value in rows:
            overview.add_row(key, value)
        console.print(_folded(overview))
        if n == 0:
            console.print("no episodes yet")
            return

        sites = Table(title="sites", caption="steps: transitions; 95% CI: Wilson interval; return: mean "
                      "per episode")
        for col in ("site", "episodes", "steps", "success", "95% CI", "return", "failure modes"):
            sites.add_column(col, justify="right" if col in ("episodes", "steps") else "left")
        names = sorted(set(cols["site"].tolist()))
        for name in [*names, None]:
            mask = np.ones(n, dtype=bool) if name is None else cols["site"] == name
            k = int(mask.sum())
            rate, ci = _rate(int(success[mask].sum()), k)
            modes = _failure_counts(cols["failure_mode"][mask], success[mask])
            sites.add_row(
                "(all)" if name is None else (name or "(none)"), str(k), str(int(lengths[mask].sum())),
                rate, ci, f"{cols['return'][mask].mean():.3f}",
                ", ".join(f"{m}: {c}" for m, c in modes.items()) or "-",
                style="bold" if name is None else None,
            )
        console.print(_folded(sites))

        modes = _failure_counts(cols["failure_mode"], success)
        failures = Table(title="failure modes (failed episodes)")
        for col in ("failure mode", "episodes", "share of failures"):
            failures.add_column(col)
        total_failed = int((~success).sum())
        for mode, count in modes.items():
            failures.add_row(mode, str(count), f"{count / total_failed:.1%}")
        if not modes:
            failures.add_row("-", "0", "-")
        console.print(_folded(failures))

        policies = Table(title="policies and loop iterations")
        for col in ("policy id", "version", "iteration", "episodes", "success", "95% CI"):
            policies.add_column(col)
        keys = sorted(set(zip(cols["policy_id"].tolist(), cols["policy_version"].tolist(),
                              cols["iteration"].tolist(), strict=True)), key=lambda t: (t[2], t[0], t[1]))
        for pid, pver, it in keys:
            mask = (cols["policy_id"] == pid) & (cols["policy_version"] == pver) & (cols["iteration"] == it)
            k = int(mask.sum())
            rate, ci = _rate(int(success[mask].sum()), k)
            policies.add_row(pid or "-", pver or "-", str(it), str(k), rate, ci)
        console.print(_folded(policies))


@store_app.command("check")
def store_check(
    store: Annotated[str, typer.Argument(help="Episode store: a directory or an fsspec URL.")],
    repair: Annotated[
        bool,
        typer.Option("--repair", help="Drop a killed writer's uncommitted tail (takes the writer lock)."),
    ] = False,
) -> None:
    """Verify a store (index, every chunk, lengths, flags, metadata vs data); exit 1 if anything is wrong.

    With --repair, the uncommitted leftovers of a killed writer are removed; committed episodes are
    never changed. Damage (damaged or missing chunks, data and metadata disagreeing) is reported, not
    repaired.
    """
    from loopsim.datasets import EpisodeStore, StoreDamagedError

    with _store_errors():
        try:
            opened = EpisodeStore.open(store, mode="a" if repair else "r")
        except StoreDamagedError as exc:
            console.print(f"problem: {exc}", style="red", markup=False, highlight=False, soft_wrap=True)
            console.print("the store cannot be opened; --repair cannot fix this", style="red")
            raise typer.Exit(1) from None
        with opened as s:
            found = s.check()
            live_writer = not repair and bool(found.uncommitted) and s.writer_active() is True
            console.print(f"{s.url}: {found.episodes} committed episodes, {s.n_transitions} transitions",
                          markup=False, highlight=False, soft_wrap=True)
            for item in found.uncommitted:
                console.print(f"{'in flight' if live_writer else 'uncommitted'}: {item}", style="yellow",
                              markup=False, soft_wrap=True)
            for item in found.problems:
                console.print(f"problem: {item}", style="red", markup=False, soft_wrap=True)
            result = found
            if repair and found.uncommitted:
                result = s.repair()
                dropped = len(found.uncommitted) - len(result.uncommitted)
                console.print(f"repaired: removed {dropped} uncommitted leftover(s); "
                              f"{result.episodes} committed episodes kept", style="green")
                for item in result.uncommitted:
                    console.print(f"still uncommitted: {item}", style="yellow", markup=False,
                                  soft_wrap=True)
    if result.ok:
        console.print("ok", style="bold green")
        return
    if live_writer and not result.problems:
        # Not leftovers: a live writer's episodes not yet merged (or being appended). Nothing is wrong.
        console.print("ok: a writer holds the store's lock; the items above are its episodes in flight, "
                      "not a killed writer's leftovers", style="bold green", soft_wrap=True)
        return
    if result.uncommitted and not repair:
        console.print("run `loopsim store check STORE --repair` to drop the uncommitted leftovers",
                      markup=False, soft_wrap=True)
    if result.problems:
        console.print(f"{len(result.problems)} problem(s): committed episodes are damaged (chunks that "
                      "cannot be read or are missing, or data and metadata that disagree); --repair "
                      "does not change committed episodes", style="red", soft_wrap=True)
    raise typer.Exit(1)


def _progress() -> Progress:
    """A transient progress bar, shown only on a terminal (nothing in pipes, logs and tests)."""
    columns = (TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    return Progress(*columns, console=console, transient=True, disable=not console.is_terminal)


@app.command()
def export(
    store: Annotated[str, typer.Argument(help="Episode store: a directory or an fsspec URL.")],
    name: Annotated[str, typer.Argument(help="Minari dataset id, (namespace/)name-v<version>.")],
    to: Annotated[ExportFormat, typer.Option("--to", help="Format to export to.")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing dataset NAME.")] = False,
) -> None:
    """Export a store's committed episodes to a Minari dataset (under $MINARI_DATASETS_PATH)."""
    from loopsim.datasets import EpisodeStore
    from loopsim.datasets.minari_io import export_to_minari, minari_dataset_path

    with _store_errors(ValueError, TypeError, IndexError):
        path = minari_dataset_path(name)
        with EpisodeStore.open(store, mode="r") as s, _progress() as progress:
            task = progress.add_task(f"{to.value} {name}", total=len(s))
            dataset = export_to_minari(s, name, overwrite=overwrite,
                                       on_episodes=lambda k: progress.advance(task, k))
            episodes, steps = len(s), s.n_transitions
    console.print(f"exported {episodes} episodes ({steps} transitions) to Minari dataset {dataset.id} "
                  f"at {path}", markup=False, highlight=False, soft_wrap=True)


@app.command("import")
def import_(
    name: Annotated[str, typer.Argument(help="Minari dataset id (a local dataset).")],
    store: Annotated[str, typer.Argument(help="Episode store to create: a directory or an fsspec URL.")],
    from_: Annotated[ImportFormat, typer.Option("--from", help="Format to import from.")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing store STORE.")] = False,
) -> None:
    """Create an episode store from a local Minari dataset (from $MINARI_DATASETS_PATH)."""
    from loopsim.datasets.minari_io import import_from_minari

    with _store_errors(ValueError, TypeError), _progress() as progress:
        task = progress.add_task(f"{from_.value} {name}", total=None)
        s = import_from_minari(name, store, overwrite=overwrite,
                               on_episodes=lambda k: progress.advance(task, k))
    with s:
        console.print(f"imported {len(s)} episodes ({s.n_transitions} transitions) from Minari dataset "
                      f"{name} into {s.url} (env id {s.env_id or 'unknown'})",
                      markup=False, highlight=False, soft_wrap=True)


def main() -> None:  # pragma: no cover - console entry point
    """Entry point of the ``loopsim`` console script."""
    app()


# ------------------------------------------------------------------------------ policies and runs
def _overrides_help(example: str) -> str:
    """The help of a command's ``key=value`` overrides, with an example of its own config's keys."""
    return f"Config overrides key.sub=value (value parsed as YAML), e.g. {example}."


_OVERRIDES_HELP = _overrides_help("train.epochs=50 seed=3")


@contextmanager
def _run_errors() -> Iterator[None]:
    """Turn a bad config, store, checkpoint or run directory into one red line and exit code 2."""
    from loopsim.config import ConfigError
    from loopsim.datasets import StoreError
    from loopsim.policies import CheckpointError
    from loopsim.training import RunDirError, TrainingDivergedError

    try:
        yield
    except (ConfigError, StoreError, CheckpointError, RunDirError, TrainingDivergedError) as exc:
        raise _error(str(exc)) from None


def _result_table(title: str, results: list[Any], caption: str) -> Table:
    table = Table(title=title, caption=caption)
    for col in ("site", "n", "success [95% CI]", "return [95% CI]", "length", "failure modes"):
        table.add_column(col)
    for r in results:
        (slo, shi), (rlo, rhi) = r.success_ci, r.return_ci
        modes = ", ".join(f"{k}: {v}" for k, v in r.failure_modes.items()) or "-"
        table.add_row(
            r.site,
            str(r.n),
            f"{r.success_rate:.0%} [{slo:.0%}, {shi:.0%}]",
            f"{r.mean_return:.1f} [{rlo:.1f}, {rhi:.1f}]",
            f"{r.mean_length:.0f}",
            modes,
        )
    return _folded(table)


@app.command()
def collect(
    config: Annotated[
        Path, typer.Argument(help="Collect config (YAML), e.g. configs/collect/factory_pick_lab.yaml.")
    ],
    overrides: Annotated[
        list[str] | None,
        typer.Argument(help=_overrides_help("episodes=50 env.site=fast_conveyor"), show_default=False),
    ] = None,
) -> None:
    """Run a policy (by default the task's expert) at a site for N episodes into an episode store.

    Episode i is reset with seed seed + i; the config's workers processes run whole episodes each; every
    finished episode is committed to the store at once, in seed order.
    """
    from loopsim.config import CollectConfig, load_config
    from loopsim.rollout import collect as run_collect

    with _before_work(), _run_errors():
        cfg = load_config(CollectConfig, config, overrides or [])
    done = [0]

    def tick(_r: Any) -> None:
        done[0] += 1
        progress.advance(task)

    try:
        with _run_errors(), _store_errors(), _progress() as progress:
            task = progress.add_task(f"{cfg.env.id} @ {cfg.env.site} -> {cfg.store}", total=cfg.episodes)
            result = run_collect(cfg, on_episode=tick)
    except KeyboardInterrupt:
        left = cfg.episodes - done[0]
        if not _is_store(cfg.store):  # stopped before it was created (the env checks, the workers' start)
            err_console.print(f"interrupted before {cfg.store} was created: nothing was written; run the "
                              "command again", style="yellow", markup=False, soft_wrap=True)
            raise typer.Exit(130) from None
        if left <= 0:
            console.print(f"interrupted after the last episode: all {done[0]} are committed to {cfg.store}",
                          style="yellow", markup=False, soft_wrap=True)
            raise typer.Exit(130) from None
        # the same overrides (the store, the site...), with where to go on in place of the job's own
        kept = [o for o in overrides or [] if o.split("=", 1)[0].strip() not in ("mode", "seed", "episodes")]
        again = " ".join(["loopsim collect", shlex.quote(str(config)), *map(shlex.quote, kept),
                          "mode=append", f"seed={cfg.seed + done[0]}", f"episodes={left}"])
        console.print(f"interrupted: the {done[0]} episodes finished so far are committed to {cfg.store}; "
                      f"continue with: {again}", style="yellow", markup=False, soft_wrap=True)
        raise typer.Exit(130) from None
    console.print(
        _result_table(
            f"collected with {cfg.policy.type}, {cfg.env.id}",
            [result.summary],
            f"seeds {cfg.seed}..{cfg.seed + cfg.episodes - 1}; 95% CI: percentile bootstrap (rliable)",
        )
    )
    console.print(
        f"stored {result.stored_after - result.stored_before} episodes in {result.store} "
        f"({result.stored_after} in total); see: loopsim info {result.store}"
    )


@app.command()
def train(
    config: Annotated[
        Path, typer.Argument(help="Training config (YAML), e.g. configs/train/factory_pick_bc.yaml.")
    ],
    overrides: Annotated[list[str] | None, typer.Argument(help=_OVERRIDES_HELP, show_default=False)] = None,
    run_dir: Annotated[
        Path | None,
        typer.Option(help="Run directory. [default: run_dir from the config, else runs/<config stem>]"),
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run in the run directory.")] = False,
) -> None:
    """Train a policy (SB3 or behaviour cloning) from a config; write a run directory with its checkpoint.

    The run directory holds the resolved config (config.yaml), the deployable checkpoint (checkpoint/),
    evaluations.csv, TensorBoard logs (tb/) and private resume state (resume/).
    """
    from loopsim.config import TrainConfig, load_config
    from loopsim.training import default_run_dir
    from loopsim.training import train as run_train

    with _before_work(), _run_errors():
        cfg = load_config(TrainConfig, config, overrides or [])
    directory = run_dir or default_run_dir(config, cfg)
    try:
        with _run_errors(), _store_errors():
            # progress bars (tqdm, on stderr) only on a terminal, as every other command's
            run = run_train(cfg, directory, resume=resume,
                            progress_bar=console.is_terminal and sys.stderr.isatty())
    except KeyboardInterrupt:
        if not (Path(directory) / "config.yaml").is_file() and not resume:  # during the checks
            err_console.print(f"interrupted before the run started: nothing was written to {directory}; "
                              "run the command again", style="yellow", markup=False, soft_wrap=True)
            raise typer.Exit(130) from None
        again = " ".join(["loopsim train", shlex.quote(str(config)), *map(shlex.quote, overrides or []),
                          "--run-dir", shlex.quote(str(directory)), "--resume"])
        every = "train.checkpoint_every" if cfg.policy.type == "sb3" else "one per finished epoch"
        kept = (f"keeps its last periodic checkpoint ({every})" if (Path(directory) / "checkpoint").is_dir()
                else "has no checkpoint yet (the run starts over)")
        console.print(f"interrupted: {directory} {kept}; continue with: {again}",
                      style="yellow", markup=False, soft_wrap=True)
        raise typer.Exit(130) from None
    evals = run.evaluations()
    last = [r for r in evals if r["step"] == evals[-1]["step"]] if evals else []
    table = Table(
        title=f"final evaluation, {cfg.env.id}",
        caption=f"{cfg.eval.episodes} episodes per site, seeds from {cfg.eval.seed}; "
        "95% CI: percentile bootstrap (rliable)",
    )
    for col in ("site", "success", "95% CI", "return"):
        table.add_column(col)
    for r in last:
        table.add_row(
            r["site"],
            f"{r['success_rate']:.1%}",
            f"[{r['success_low']:.1%}, {r['success_high']:.1%}]",
            f"{r['mean_return']:.2f}",
        )
    console.print(table)
    console.print(
        f"run directory: {run.path}\ncheckpoint: {run.checkpoint_dir}\n"
        f"deploy it: loopsim eval {shlex.quote(str(run.checkpoint_dir))} --env {shlex.quote(cfg.env.id)}"
        + (f" --site {shlex.quote(cfg.env.site)}" if isinstance(cfg.env.site, str) else "  (--site: a site "
           "file with the inline site's params, or a bundled site)"),
        markup=False,
    )


@app.command(name="eval")
def eval_(
    policy: Annotated[
        Path, typer.Argument(help="A policy checkpoint directory (e.g. runs/<run>/checkpoint).")
    ],
    env_id: Annotated[str, typer.Option("--env", help="Env id, e.g. loopsim/FactoryPickPlace-v0.")],
    site: _SiteOption = None,
    episodes: Annotated[
        int, typer.Option("--episodes", "-n", min=1, max=_MAX_EPISODES, help="Episodes per site.")
    ] = 20,
    seed: Annotated[
        int,
        typer.Option(min=0, max=2**31 - 1, help="Seed of the first episode; episode i uses seed+i. The "
                     "default is held out from the bundled demo seeds (0..) as in the training configs."),
    ] = 1_000_000,
    workers: Annotated[int, typer.Option(min=1, max=64, help="Worker processes.")] = 1,
    env_kwarg: Annotated[
        list[str] | None,
        typer.Option(
            "--env-kwarg",
            help="Env kwarg key=value (YAML value), repeatable; "
            "default: the kwargs the policy was trained with.",
        ),
    ] = None,
    stochastic: Annotated[
        bool, typer.Option(help="Sample actions instead of the deterministic mode.")
    ] = False,
    store: Annotated[
        str | None,
        typer.Option(help="Also record every episode into this new episode store (one site only)."),
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the results as JSON here.")] = None,
) -> None:
    """Evaluate a policy checkpoint: success rate and return with 95% bootstrap intervals, per site."""
    import json

    from pydantic import ValidationError

    from loopsim.config import (
        MAX_SEED,
        CheckpointPolicyConfig,
        CollectConfig,
        ConfigError,
        EnvConfig,
        apply_overrides,
        check_env_config,
    )
    from loopsim.policies import read_checkpoint
    from loopsim.rollout import collect as run_collect
    from loopsim.rollout import evaluate_policy

    if seed + episodes - 1 > MAX_SEED:
        raise _error(f"--seed {seed} + --episodes {episodes} - 1 exceeds the largest seed {MAX_SEED}")
    if json_out is not None and (json_out.is_dir() or not json_out.parent.is_dir()
                                 or not os.access(json_out.parent, os.W_OK)):
        raise _error(f"--json {json_out}: cannot write a file there (a directory, or the folder is missing "
                     "or not writable)")
    if store is not None and Path(store).exists():
        raise _error(f"--store {store} already exists: give a new path (loopsim collect can append)")
    with _run_errors():
        meta, _ = read_checkpoint(policy)
        trained = (meta.get("config") or {}).get("env") or {}
        kwargs = dict(trained.get("kwargs") or {}) if trained.get("id") == env_id else {}
        kwargs = apply_overrides(kwargs, env_kwarg or [])
        if env_id in ENV_ENTRY_POINTS:  # names and site files, each checked; a repeated one runs once
            try:
                site_list = _resolve_sites(env_id, site or ["lab"])
            except SiteError as exc:
                raise ConfigError(f"--site: {exc}") from None
        else:  # refused just below, naming the env id
            site_list = list(dict.fromkeys(site or ["lab"]))
        site_names = [site_name(s) for s in site_list]
        try:
            env_cfg = EnvConfig(id=env_id, site=site_list[0], kwargs=kwargs)
        except ValidationError as exc:
            msgs = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg'].removeprefix('Value error, ')}"
                             for e in exc.errors())
            raise ConfigError(f"--env {env_id!r} / --env-kwarg {kwargs}: {msgs}") from None
        check_env_config(env_cfg, [s for s in site_list if isinstance(s, str)])
        spec = CheckpointPolicyConfig(path=str(policy))
        if store is not None and len(site_list) != 1:
            raise ConfigError("--store records one site at a time: give exactly one --site")
    with _run_errors(), _store_errors(), _progress() as progress:
        task = progress.add_task(f"{policy} @ {', '.join(site_names)}", total=episodes * len(site_names))
        if store is not None:
            result = run_collect(
                CollectConfig(
                    seed=seed,
                    env=env_cfg,
                    policy=spec,
                    episodes=episodes,
                    workers=workers,
                    store=store,
                    deterministic=not stochastic,
                ),
                on_episode=lambda _r: progress.advance(task),
            )
            results = {result.summary.site: result.summary}
        else:
            results = evaluate_policy(
                spec,
                env_cfg,
                sites=site_list,
                episodes=episodes,
                seed=seed,
                workers=workers,
                deterministic=not stochastic,
                on_episode=lambda _r: progress.advance(task),
            )
    console.print(
        _result_table(
            f"{meta.get('kind')} policy {policy}, {env_id}",
            list(results.values()),
            f"{episodes} episodes per site, seeds {seed}..{seed + episodes - 1}; "
            "95% CI: percentile bootstrap (rliable)",
        )
    )
    if store is not None:
        console.print(f"recorded into {store}; see: loopsim info {store}")
    if json_out is not None:
        json_out.write_text(
            json.dumps({k: v.as_dict() for k, v in results.items()}, indent=2), encoding="utf-8"
        )


@app.command()
def loop(
    config: Annotated[Path, typer.Argument(help="Loop config (YAML), e.g. configs/loop/quickstart.yaml.")],
    overrides: Annotated[
        list[str] | None, typer.Argument(help=_overrides_help("loop.iterations=2 seed=1"), show_default=False)
    ] = None,
    run_dir: Annotated[
        Path | None,
        typer.Option(help="Run directory. [default: run_dir from the config, else runs/<config stem>]"),
    ] = None,
    seeds: Annotated[
        str | None,
        typer.Option(
            help="Independent replicates, e.g. 0,1,2 (aggregated with IQM and "
            "probability of improvement); each in <run_dir>/seed_<r>."
        ),
    ] = None,
    report_html: Annotated[
        bool,
        typer.Option("--report/--no-report", help="At the end, write <run_dir>/report.html (as loopsim "
                     "report; replaying a few episodes per iteration for its videos takes ~10-60 s)."),
    ] = True,
) -> None:
    """Run the data loop: deploy, gather, refine, evaluate, redeploy; resume by re-running the command.

    Writes the run directory (config.yaml, demos.zarr, operational.zarr, iterations/, metrics.csv,
    plots/) and prints success at the deployment and lab sites per iteration, beside the no-refine
    baseline.
    """
    from loopsim.config import load_config
    from loopsim.loop import LoopConfig, check_loop_config, run_loop

    with _before_work(), _run_errors():
        cfg = load_config(LoopConfig, config, overrides or [])
    replicate_list = None
    if seeds is not None:
        try:
            replicate_list = [int(x) for x in seeds.split(",")]  # "0,,1" or "0," is refused too
        except ValueError:
            raise _error(f"--seeds {seeds!r} must be comma-separated integers, e.g. 0,1,2") from None
        if (
            not replicate_list
            or any(r < 0 or r > 99 for r in replicate_list)
            or len(set(replicate_list)) != len(replicate_list)
        ):
            raise _error(f"--seeds {seeds!r}: give distinct integers in 0..99, e.g. 0,1,2")
    directory = run_dir or (Path(cfg.run_dir) if cfg.run_dir else Path("runs") / config.stem)
    with _before_work(), _run_errors():
        check_loop_config(cfg)
    with _run_errors(), _store_errors(), _progress() as progress:
        tasks: dict[str, Any] = {}

        def report(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = progress.add_task(phase, total=total)
            progress.update(tasks[phase], completed=done, total=total)

        def log(line: str) -> None:
            progress.console.print(line, markup=False, highlight=False, soft_wrap=True)

        try:
            result = run_loop(cfg, directory, seeds=replicate_list, progress=report, log=log)
        except KeyboardInterrupt:
            again = " ".join(["loopsim loop", shlex.quote(str(config)), *map(shlex.quote, overrides or []),
                              "--run-dir", shlex.quote(str(directory))]
                             + ([] if seeds is None else ["--seeds", shlex.quote(seeds)])
                             + ([] if report_html else ["--no-report"]))
            progress.stop()
            console.print(f"interrupted: every finished phase and episode is kept in {directory}; resume "
                          f"with: {again}", style="yellow", markup=False, soft_wrap=True)
            raise typer.Exit(130) from None
    for replicate, rows in result["runs"].items():
        where = directory if replicate_list is None else directory / f"seed_{replicate}"
        table = Table(
            title=f"data loop ({cfg.strategy.type}), {cfg.env.id}"
            + ("" if replicate_list is None else f", replicate {replicate}"),
            caption=f"{cfg.eval.episodes} evaluation episodes per site, the same seeds every "
            "iteration; 95% CI: percentile bootstrap (rliable); baseline: the iteration-0 "
            "policy, never refined",
        )
        show_interventions = cfg.strategy.type == "intervention"
        cols = ["iter", "episodes gathered", "site", "success [95% CI]", "no-refine baseline"]
        for col in cols + (["interventions"] if show_interventions else []):
            table.add_column(col)
        base = {(r["iteration"], r["site"]): r for r in rows if r["arm"] == "baseline"}
        for r in (r for r in rows if r["arm"] == "loop"):
            b = base[(r["iteration"], r["site"])]
            cells = [str(r["iteration"]), str(r["operational_episodes"]), r["site"],
                     f"{r['success_rate']:.0%} [{r['success_low']:.0%}, {r['success_high']:.0%}]",
                     f"{b['success_rate']:.0%} [{b['success_low']:.0%}, {b['success_high']:.0%}]"]
            if show_interventions:
                rate = r["intervention_rate"]
                cells.append("-" if rate != rate else f"{rate:.1%}")
            table.add_row(*cells)
        console.print(_folded(table))
        console.print(f"run directory: {where} (metrics.csv, plots/success.png)")
    for site, agg in result["aggregate"].items():
        iqm, poi = agg["iqm_success"], agg["probability_of_improvement"]
        console.print(
            f"{site}: IQM final success over {agg['replicates']} replicates: "
            f"loop {iqm['loop']['value']:.1%} [{iqm['loop']['ci'][0]:.1%}, {iqm['loop']['ci'][1]:.1%}], "
            f"no-refine baseline {iqm['baseline']['value']:.1%} [{iqm['baseline']['ci'][0]:.1%}, "
            f"{iqm['baseline']['ci'][1]:.1%}]; "
            f"P(loop > baseline) = {poi['value']:.2f} [{poi['ci'][0]:.2f}, {poi['ci'][1]:.2f}]",
            soft_wrap=True,  # one line per site in logs, whatever the width
        )
    if report_html:
        from loopsim.replay import ReplayError
        from loopsim.report import ReportError, write_loop_report

        with _store_errors(ReportError, ReplayError):
            path = write_loop_report(directory)
        console.print(f"report: {path}", markup=False, soft_wrap=True)


# ------------------------------------------------------------------------------ replay and video
@app.command()
def replay(
    store: Annotated[str, typer.Argument(help="Episode store: a directory or an fsspec URL.")],
    episode: Annotated[
        int | None, typer.Option("--episode", "-e", help="Episode index (negative counts from the end).")
    ] = None,
    all_: Annotated[
        bool, typer.Option("--all", help="Replay every episode: the store's reproducibility audit.")
    ] = False,
    tolerance: Annotated[
        float,
        typer.Option(min=0.0, help="Largest absolute deviation of a float observation entry or reward "
                     "that passes [observation units: m, m/s...]."),
    ] = 1e-4,
    pixel_tolerance: Annotated[
        float,
        typer.Option(min=0.0, max=1.0, help="Largest fraction of differing pixel values in one rgb "
                     "frame that passes."),
    ] = 0.01,
    workers: Annotated[int, typer.Option(min=1, max=64, help="Worker processes (with --all).")] = 1,
    video: Annotated[
        Path | None,
        typer.Option(help="Render the episode to this video (.mp4, .webm or .gif), headless."),
    ] = None,
    from_store: Annotated[
        bool,
        typer.Option("--from-store", help="Make the video from the stored rgb observations (no "
                     "simulation) instead of rendering a replay."),
    ] = False,
    size: Annotated[int, typer.Option(min=16, max=2048, help="Side of rendered video frames [px].")] = 480,
    fps: Annotated[
        float | None, typer.Option(min=0.1, help="Video frames per second [default: the control rate]")
    ] = None,
    overlay: Annotated[bool, typer.Option(help="Overlay step, reward, success and failure mode.")] = True,
    gui: Annotated[bool, typer.Option(help="Replay in the PyBullet GUI (needs a display).")] = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the results as JSON here.")] = None,
) -> None:
    """Re-simulate stored episodes and check the store reproduces them; render videos of them.

    Each episode is rebuilt from the store's env id and kwargs, the episode's seed and sampled site
    parameters, and its stored actions; replayed observations, rewards and events (end step,
    terminated/truncated, success, failure mode) are compared with the stored ones. Exit code 0:
    every episode reproduced within the tolerances; 1: some diverged; 2: the command could not run.
    """
    import json

    from loopsim.datasets import EpisodeStore
    from loopsim.replay import ReplayError, render_video, replay_gui, replay_store

    if (episode is None) == (not all_):
        raise _error("give either --episode N or --all")
    if all_ and (video is not None or gui):
        raise _error("--video and --gui show one episode: give --episode N instead of --all")
    if video is not None and gui:
        raise _error("give either --video or --gui, not both")
    if from_store and video is None:
        raise _error("--from-store makes a video: add --video out.mp4 (or .gif)")
    if video is not None and video.suffix.lower() not in (".mp4", ".webm", ".gif"):
        raise _error(f"--video {video}: the suffix must be .mp4, .webm or .gif")
    for path, flag in ((video, "--video"), (json_out, "--json")):
        if path is not None and (path.is_dir() or not path.parent.is_dir()
                                 or not os.access(path.parent, os.W_OK)):
            raise _error(f"{flag} {path}: cannot write a file there (a directory, or the folder is missing "
                         "or not writable)")
    with _store_errors():
        opened = EpisodeStore.open(store, mode="r")
    with opened as s, _store_errors(ReplayError, IndexError):
        n = len(s)
        if n == 0:
            raise _error(f"{store} holds no episodes: nothing to replay")
        if episode is not None and not -n <= episode < n:
            raise _error(f"--episode {episode} is out of range: the store has {n} episodes")
        if video is not None:
            out = render_video(s, episode, video, source="store" if from_store else "replay", size=size,
                               fps=fps, overlay=overlay)
            console.print(f"wrote {out.path}: {out.frames} frames of {out.size[1]}x{out.size[0]} px at "
                          f"{out.fps:g} fps", markup=False, soft_wrap=True)
            results = [] if out.replay is None else [out.replay]
        elif gui:
            results = [replay_gui(s, episode)]
        elif episode is not None:
            results = list(replay_store(s.url, [episode], tolerance=tolerance,
                                        pixel_tolerance=pixel_tolerance))
    if all_:
        with _store_errors(ReplayError, IndexError), _progress() as progress:
            task = progress.add_task(f"replaying {store}", total=n)
            results = list(replay_store(store, workers=workers, tolerance=tolerance,
                                        pixel_tolerance=pixel_tolerance,
                                        on_episode=lambda _r: progress.advance(task)))
    if not results:  # a video straight from the store: nothing was compared
        return
    _print_replay(results, tolerance, pixel_tolerance, detail=not all_)
    if json_out is not None:
        json_out.write_text(json.dumps([r.as_dict() for r in results], indent=2), encoding="utf-8")
    if not all(r.ok for r in results):
        raise typer.Exit(1)


def _print_replay(results: list[Any], tolerance: float, pixel_tolerance: float, detail: bool) -> None:
    """Print one episode's deviations per key, or the audit summary of many."""
    if detail:
        r = results[0]
        table = Table(title=f"replay of episode {r.index} (seed {r.seed}, site {r.site}, {r.steps} steps)")
        for col in ("compared", "max deviation", "tolerance", "ok"):
            table.add_column(col)
        for key, dev in r.deviations.items():
            img = key in r.image_keys
            tol = pixel_tolerance if img else tolerance
            name = ("observation" if key == "" else key if key == "reward" else f"observation/{key}")
            shown = f"{dev:.2%} of pixel values" if img else f"{dev:.3g}"
            table.add_row(name, shown, f"{tol:g}", "yes" if dev <= tol else "NO")
        stored = "success" if r.success else f"failed: {r.failure_mode or '?'}"
        again = "success" if r.replayed_success else f"failed: {r.replayed_failure_mode or '?'}"
        table.add_row("events", f"replay: {again}, {r.replayed_steps} steps", f"stored: {stored}",
                      "yes" if not r.events else "NO")
        console.print(_folded(table))
        for event in r.events:
            console.print(f"diverged: {event}", style="red", markup=False, soft_wrap=True)
        if r.site_source:
            how = ("resampled by name (the recorded parameters came out again)" if r.site_source == "name"
                   else f"rebuilt from the recorded {r.site_source}")
            console.print(f"site {r.site}: {how}", markup=False, soft_wrap=True)
        verdict = ("reproduced exactly (bit-identical)" if r.exact else "reproduced within tolerance"
                   if r.ok else "NOT reproduced")
        console.print(f"episode {r.index}: {verdict}", style=None if r.ok else "red", markup=False)
        return
    exact = sum(r.exact for r in results)
    ok = sum(r.ok for r in results)
    bad = [r for r in results if not r.ok]
    summary = Table(title=f"replay audit: {len(results)} episodes", show_header=False)
    summary.add_column("", style="bold")
    summary.add_column("")
    summary.add_row("bit-identical", str(exact))
    summary.add_row("within tolerance, not identical", str(ok - exact))
    summary.add_row("diverged", str(len(bad)))
    worst = max(r.max_deviation for r in results)
    summary.add_row("max float deviation", f"{worst:.3g} (tolerance {tolerance:g})")
    if any(r.image_keys for r in results):
        summary.add_row("max pixel deviation", f"{max(r.max_pixel_deviation for r in results):.2%} "
                        f"(tolerance {pixel_tolerance:.2%})")
    console.print(summary)
    shown = [r for r in results if not r.exact][:20]
    if shown:
        table = Table(title="episodes not replayed bit for bit" + (" (first 20)" if len(shown) == 20 else ""))
        for col in ("episode", "seed", "site", "steps", "max deviation", "pixels", "events", "ok"):
            table.add_column(col)
        for r in shown:
            table.add_row(str(r.index), str(r.seed), r.site, str(r.steps), f"{r.max_deviation:.3g}",
                          f"{r.max_pixel_deviation:.2%}" if r.image_keys else "-",
                          "; ".join(r.events) or "-", "yes" if r.ok else "NO")
        console.print(_folded(table))


@app.command()
def paths(
    store: Annotated[str, typer.Argument(help="Episode store: a directory or an fsspec URL.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output image (.png, .svg or .pdf).")],
    episode: Annotated[
        list[int] | None,
        typer.Option("--episode", "-e", help="Episode index (repeatable). [default: the first --limit]"),
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="Episodes plotted without --episode.")] = 50,
) -> None:
    """Plot where the robot went: end-effector paths over a top view of the workcell (by domain).

    Episodes are replayed (no rendering) and drawn green for successes, red for failures; the
    domain's trajectory view (loopsim.trajectory) draws the scene and per-episode marks.
    """
    from loopsim.datasets import EpisodeStore
    from loopsim.replay import ReplayError
    from loopsim.trajectory import plot_trajectories

    if out.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise _error(f"--out {out}: the suffix must be .png, .svg or .pdf")
    if out.is_dir() or not out.parent.is_dir() or not os.access(out.parent, os.W_OK):
        raise _error(f"--out {out}: cannot write a file there (a directory, or the folder is missing or "
                     "not writable)")
    with _store_errors():
        opened = EpisodeStore.open(store, mode="r")
    with opened as s, _store_errors(ReplayError, IndexError, KeyError, ValueError):
        n = len(s)
        indices = list(dict.fromkeys(episode)) if episode else list(range(min(n, limit)))
        bad = [i for i in indices if not -n <= i < n]
        if bad:
            raise _error(f"--episode {bad[0]} is out of range: the store has {n} episodes")
        if not indices:
            raise _error(f"{store} holds no episodes")
        plot_trajectories(s, indices, out)
    console.print(f"wrote {out}: paths of {len(indices)} episode(s)", markup=False, soft_wrap=True)


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A loop run directory (loopsim loop --run-dir).")],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Output HTML file. [default: RUN_DIR/report.html]")
    ] = None,
    videos: Annotated[
        bool, typer.Option(help="Embed videos of a success and the commonest failures per iteration.")
    ] = True,
    paths: Annotated[bool, typer.Option(help="Embed each iteration's end-effector paths.")] = True,
    video_size: Annotated[int, typer.Option(min=16, max=2048, help="Side of video frames [px].")] = 160,
    frame_step: Annotated[
        int, typer.Option(min=1, max=50, help="Show every n-th control step in videos (real-time playback).")
    ] = 3,
) -> None:
    """Write a loop run as one self-contained HTML file: metrics, plots, failure modes, paths, videos.

    Videos and paths are replayed from the run's stores (demos.zarr, operational.zarr) and embedded,
    so the file opens without a server or internet.
    """
    from loopsim.replay import ReplayError
    from loopsim.report import ReportError, write_loop_report

    with _store_errors(ReportError, ReplayError), _progress() as progress:
        task = progress.add_task(f"report of {run_dir}", total=None)
        path = write_loop_report(run_dir, out, videos=videos, paths=paths, video_size=video_size,
                                 frame_step=frame_step,
                                 progress=lambda d, t: progress.update(task, completed=d, total=t))
    size = path.stat().st_size
    console.print(f"wrote {path} ({_human_bytes(size)}); open it in a browser", markup=False, soft_wrap=True)




@app.command()
def bench(
    config: Annotated[
        str,
        typer.Argument(help="Benchmark config (YAML), or a bundled suite name: factory-v0, shift-v0, "
                       "warehouse-v0."),
    ],
    overrides: Annotated[
        list[str] | None, typer.Argument(help=_overrides_help("eval.episodes=10 seed=1"), show_default=False)
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Output directory. [default: runs/bench/<name>]")
    ] = None,
) -> None:
    """Benchmark policies across envs, sites and training seeds; resume by re-running the command.

    Every cell (policy x env x site x training seed) runs the same held-out episode seeds in worker
    processes and is written to the output directory as soon as it finishes; finished cells are not
    run again. Writes results.json, results.csv (one row per cell), results.md, plots/*.png and
    report.html, with IQM, mean and probability of improvement (rliable, 95% stratified bootstrap).
    """
    from loopsim.bench import BenchConfig, BenchError, bundled_suite, run_bench
    from loopsim.config import load_config

    path = Path(config)
    if not path.exists() and bundled_suite(config) is not None:
        path = bundled_suite(config)
    if not path.exists():
        from importlib import resources

        suites = sorted(p.name.removesuffix(".yaml")
                        for p in resources.files("loopsim.configs").joinpath("bench").iterdir()
                        if p.name.endswith(".yaml"))
        raise _error(f"config {config!r}: no such file, and not a bundled suite; the suites are {suites}")
    with _before_work(), _run_errors():
        cfg = load_config(BenchConfig, path, overrides or [])
    directory = out or Path("runs") / "bench" / cfg.name
    with _run_errors(), _store_errors(BenchError), _progress() as progress:
        tasks: dict[str, Any] = {}

        def report(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = progress.add_task(phase, total=total)
            progress.update(tasks[phase], completed=done, total=total)

        def log(line: str) -> None:
            progress.console.print(line, markup=False, highlight=False, soft_wrap=True)

        try:
            run_bench(cfg, directory, progress=report, log=log)
        except KeyboardInterrupt:
            again = " ".join(["loopsim bench", shlex.quote(str(config)), *map(shlex.quote, overrides or []),
                              "--out", shlex.quote(str(directory))])
            progress.stop()
            console.print(f"interrupted: every finished cell and training run is kept in {directory}; "
                          f"resume with: {again}", style="yellow", markup=False, soft_wrap=True)
            raise typer.Exit(130) from None
    console.print((directory / "results.md").read_text(encoding="utf-8"), markup=False, highlight=False,
                  soft_wrap=True)
    console.print(f"output directory: {directory} (results.json, results.csv, results.md, plots/, "
                  "report.html)", markup=False, soft_wrap=True)
