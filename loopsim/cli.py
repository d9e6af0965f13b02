"""The ``loopsim`` command line (Typer).

Commands so far: ``loopsim envs`` (registered envs, spaces, sites), ``loopsim sites`` (site
parameters and bundled sites of a domain) and ``loopsim expert`` (run a task's scripted expert at one
or more sites and report success with 95% confidence intervals).
"""

from __future__ import annotations

import math
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from loopsim.envs import ENV_ENTRY_POINTS, SiteError, available_sites, env_class

app = typer.Typer(
    name="loopsim",
    help="loopsim: simulate the data flywheel of deployed robots.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()


def _space_str(space) -> str:
    import gymnasium as gym

    if isinstance(space, gym.spaces.Dict):
        return "Dict " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in space.spaces.items())
    return f"Box{tuple(space.shape)} {space.dtype}"


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
        console.print(f"[red]unknown domain {domain!r}; domains are {sorted(schemas)}[/red]")
        raise typer.Exit(2)
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
    site: Annotated[
        list[str] | None, typer.Option("--site", "-s", help="Site name (repeatable). [default: lab]")
    ] = None,
    episodes: Annotated[int, typer.Option("--episodes", "-n", min=1, help="Episodes per site.")] = 20,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the first episode; episode i uses seed+i.")] = 0,
    noise: Annotated[float, typer.Option(min=0.0, help="Std of the expert's action noise.")] = 0.0,
) -> None:
    """Run the task's scripted expert at one or more sites and report success with 95% intervals."""
    from loopsim.evaluation import run_expert

    if env_id not in ENV_ENTRY_POINTS:
        console.print(f"[red]unknown env id {env_id!r}; loopsim envs are {sorted(ENV_ENTRY_POINTS)}[/red]")
        raise typer.Exit(2)
    if not math.isfinite(noise):
        console.print(f"[red]--noise {noise} must be a finite number >= 0[/red]")
        raise typer.Exit(2)
    domain = env_class(env_id).site_schema.domain
    site_names = site or ["lab"]
    valid = available_sites(domain)
    bad = [s for s in site_names if s not in valid]
    if bad:
        console.print(f"[red]unknown {domain} site(s) {bad}; available sites are {valid}[/red]")
        raise typer.Exit(2)
    summaries = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        for name in site_names:
            task = progress.add_task(f"{env_id} @ {name}", total=episodes)
            try:
                summary = run_expert(
                    env_id, name, episodes, seed, noise, on_episode=lambda _r, t=task: progress.advance(t)
                )
            except SiteError as exc:  # pragma: no cover - names were checked above
                console.print(f"[red]{exc}[/red]")
                raise typer.Exit(2) from exc
            summaries.append(summary)
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


def main() -> None:  # pragma: no cover - console entry point
    """Entry point of the ``loopsim`` console script."""
    app()
