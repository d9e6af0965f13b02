"""Sites: named distributions over the operating conditions of one deployment.

A *site* maps parameter names to distributions. Every domain (factory, warehouse) declares the
parameters its tasks read as a :class:`SiteSchema` (name, nominal ``lab`` value, allowed range, unit,
type). A site names a distribution for some of them; the rest keep their ``lab`` value. The env samples
every parameter at ``reset`` from its own seeded generator and reports the values in
``info["site_params"]``.

Distribution specs (YAML or inline mappings)::

    part_mass: 0.3                       # a constant
    part_mass: {uniform: [0.4, 0.8]}     # uniform on [lo, hi] (integers: inclusive)
    sensor_noise: {normal: [0.01, 0.002]}  # normal(mean, std), clipped to the allowed range
    action_delay: {choice: [1, 2]}       # uniform choice among values

Site files live in the ``loopsim.configs`` package data at ``sites/<domain>/<name>.yaml``::

    description: Heavy, slippery parts.
    params:
      part_mass: {uniform: [0.4, 0.8]}
"""

from __future__ import annotations

import difflib
import math
import numbers
import os
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np
import yaml

from loopsim.yaml_io import describe_yaml_error, load_unique, number_text_hint

__all__ = [
    "ParamDef",
    "SiteSchema",
    "Site",
    "SiteError",
    "available_sites",
    "load_site",
    "read_site_file",
    "site_name",
]

_SPEC_KINDS = ("uniform", "normal", "choice")


class SiteError(ValueError):
    """A site name, parameter name or distribution spec is invalid."""


@dataclass(frozen=True)
class ParamDef:
    """One operating-condition parameter of a domain.

    Attributes:
        name: Parameter name as used in site files and ``info["site_params"]``.
        lab: Nominal value, used at the ``lab`` site and wherever a site does not name the parameter.
        low: Smallest allowed value (inclusive). Normal samples are clipped to ``[low, high]``.
        high: Largest allowed value (inclusive).
        unit: Unit of the value, e.g. ``"kg"``, ``"m/s"``, ``"control steps"``, ``"-"``.
        doc: One-line description of what the parameter changes in the simulation.
        integer: Whether values are integers (e.g. a delay counted in control steps).
    """

    name: str
    lab: float
    low: float
    high: float
    unit: str
    doc: str
    integer: bool = False


class SiteSchema:
    """The parameters one domain's tasks read, with their nominal values and allowed ranges.

    Args:
        domain: Domain name, e.g. ``"factory"``; site files are looked up in ``sites/<domain>/``.
        params: The parameter definitions.
    """

    def __init__(self, domain: str, params: list[ParamDef]) -> None:
        self.domain = domain
        self.params: dict[str, ParamDef] = {p.name: p for p in params}

    @property
    def names(self) -> list[str]:
        """Parameter names, in declaration order."""
        return list(self.params)

    def lab_values(self) -> dict[str, float | int]:
        """Return the nominal (``lab``) value of every parameter."""
        return {n: (int(p.lab) if p.integer else float(p.lab)) for n, p in self.params.items()}


def _check_number(value: Any, where: str) -> float:
    hint = number_text_hint(value)
    if hint is not None:
        raise SiteError(f"{where}: expected a finite number, got the text {value!r} ({hint})")
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
        raise SiteError(f"{where}: expected a finite number, got {value!r}")
    try:
        out = float(value)
    except OverflowError:
        out = math.inf
    if not math.isfinite(out):
        raise SiteError(f"{where}: expected a finite number, got {value!r}")
    return out


class _Dist:
    """A validated distribution spec for one parameter."""

    def __init__(self, pdef: ParamDef, spec: Any, site: str) -> None:
        where = f"site {site!r}, parameter {pdef.name!r}"
        self.pdef = pdef
        if isinstance(spec, Mapping):
            if len(spec) != 1 or next(iter(spec)) not in _SPEC_KINDS:
                raise SiteError(
                    f"{where}: a distribution is a number or a mapping with exactly one of "
                    f"{list(_SPEC_KINDS)}, got {dict(spec)!r}"
                )
            self.kind, args = next(iter(spec.items()))
            if not isinstance(args, list | tuple) or not args:
                raise SiteError(f"{where}: {self.kind} needs a non-empty list, got {args!r}")
            self.args = [_check_number(a, where) for a in args]
        else:
            self.kind, self.args = "constant", [_check_number(spec, where)]
        lo, hi = pdef.low, pdef.high
        if self.kind == "uniform":
            if len(self.args) != 2 or self.args[0] > self.args[1]:
                raise SiteError(f"{where}: uniform needs [lo, hi] with lo <= hi, got {self.args}")
            support = self.args
        elif self.kind == "normal":
            if len(self.args) != 2 or self.args[1] < 0:
                raise SiteError(f"{where}: normal needs [mean, std] with std >= 0, got {self.args}")
            support = [self.args[0]]
        else:
            support = self.args
        bad = [v for v in support if not lo <= v <= hi]
        if bad:
            raise SiteError(f"{where}: value(s) {bad} outside the allowed range [{lo}, {hi}] {pdef.unit}")
        if pdef.integer and self.kind in ("constant", "choice", "uniform"):
            if any(v != int(v) for v in self.args):
                raise SiteError(f"{where}: parameter is an integer ({pdef.unit}), got {self.args}")

    def sample(self, rng: np.random.Generator) -> float | int:
        """Draw one value from ``rng``.

        A constant still spends one ``rng.random()`` so that most specs advance the stream alike, but
        the stream is NOT kept aligned across sites in general: NumPy's bounded integers (``uniform``
        of an integer parameter, ``choice``) and ``normal`` (ziggurat) use rejection sampling and now
        and then take more than one draw. The same site and seed always give the same values.
        """
        p = self.pdef
        if self.kind == "constant":
            rng.random()  # keep the number of draws independent of the spec kind
            v = self.args[0]
        elif self.kind == "uniform":
            lo, hi = self.args
            v = rng.integers(int(lo), int(hi) + 1) if p.integer else rng.uniform(lo, hi)
        elif self.kind == "normal":
            v = float(np.clip(rng.normal(self.args[0], self.args[1]), p.low, p.high))
        else:
            v = self.args[int(rng.integers(len(self.args)))]
        return int(math.floor(v + 0.5)) if p.integer else float(v)

    def to_spec(self) -> Any:
        """Return the spec in its YAML form."""
        args = [int(a) for a in self.args] if self.pdef.integer and self.kind != "normal" else list(self.args)
        if self.kind == "constant":
            return args[0]
        return {self.kind: args}


class Site:
    """One deployment's operating conditions: a distribution for every parameter of a domain.

    Args:
        schema: The domain's parameter schema.
        name: Site name (``"lab"`` is the nominal site; inline sites are named ``"custom"``).
        params: Mapping of parameter name to distribution spec; unnamed parameters keep ``lab``.
        description: Human-readable description of the conditions.

    Raises:
        SiteError: If a parameter name is not in the schema (the message lists the valid names), a
            spec is malformed or outside the parameter's allowed range, or the name is empty, not
            printable or has leading or trailing whitespace.
    """

    def __init__(
        self,
        schema: SiteSchema,
        name: str = "lab",
        params: Mapping[str, Any] | None = None,
        description: str = "",
    ) -> None:
        if params is not None and not isinstance(params, Mapping):
            raise SiteError(f"site {name!r}: params must be a mapping of parameter names, got {params!r}")
        params = dict(params or {})
        if not isinstance(name, str) or not isinstance(description, str):
            raise SiteError(f"site name and description must be strings, got {name!r}, {description!r}")
        if not name or name != name.strip() or not name.isprintable():
            # the name is a key of info["site"], the store's site column and per-site tables: an
            # empty or blank one made a row with no label, " lab" one that looked like lab's
            raise SiteError(
                f"site name {name!r} must be non-empty, printable and without leading or trailing "
                "whitespace"
            )
        bad_keys = [k for k in params if not isinstance(k, str)]
        if bad_keys:
            raise SiteError(f"site {name!r}: parameter names must be strings, got {bad_keys}")
        unknown = sorted(set(params) - set(schema.params))
        if unknown:
            raise SiteError(
                f"site {name!r}: unknown parameter(s) {unknown} for the {schema.domain} domain; "
                f"valid parameters are {schema.names}"
            )
        self.schema = schema
        self.name = name
        self.description = description
        self._dists = {n: _Dist(p, params.get(n, p.lab), name) for n, p in schema.params.items()}
        self.overrides = {n: self._dists[n].to_spec() for n in params}

    def sample(self, rng: np.random.Generator) -> dict[str, float | int]:
        """Sample one value per parameter, in schema order, from ``rng``.

        Args:
            rng: The env's seeded generator (``env.np_random``).

        Returns:
            Mapping of every parameter name to a Python ``float`` (or ``int`` for integer params).
        """
        return {n: d.sample(rng) for n, d in self._dists.items()}

    def __repr__(self) -> str:
        return f"Site({self.name!r}, {self.overrides!r})"


def _spec(site: Site) -> dict[str, Any]:
    """Every parameter's distribution spec of ``site`` (overrides and ``lab`` values alike)."""
    return {n: d.to_spec() for n, d in site._dists.items()}


def _site_dir(domain: str):
    return resources.files("loopsim.configs").joinpath("sites", domain)


def available_sites(domain: str) -> list[str]:
    """Names of the bundled sites of a domain (the YAML files in ``configs/sites/<domain>/``).

    Args:
        domain: Domain name, e.g. ``"factory"``.

    Returns:
        Sorted site names, ``lab`` included.
    """
    d = _site_dir(domain)
    if not d.is_dir():
        return []
    return sorted(f.name[: -len(".yaml")] for f in d.iterdir() if f.name.endswith(".yaml"))


def site_name_key(name: str) -> str:
    """A site name as compared for look-alikes: Unicode compatibility form (NFKC), case-folded.

    Names equal under this key read alike in tables and stores: ``Lab``, ``LAB`` and the fullwidth
    ``ｌａｂ`` are all ``lab`` (NFC alone keeps fullwidth letters apart). NFKC is applied again after
    case folding, as Unicode's ``NFKC_Casefold`` does (case folding can undo the normal form).

    Args:
        name: A site name.

    Returns:
        The comparison key.
    """
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", name).casefold())


def _check_bundled_name(schema: SiteSchema, site: Site, what: str) -> None:
    """Refuse a site that takes a bundled site's name (in any case) with other conditions or spelling.

    ``info["site"]``, stores and per-site tables file episodes under the site's name: shifted
    conditions named ``lab`` would be counted as lab's, and ``Lab`` would be a second row beside it.

    Raises:
        SiteError: Naming the bundled site and what to do instead.
    """
    bundled = available_sites(schema.domain)
    same = [b for b in bundled if site_name_key(b) == site_name_key(site.name)]
    if not same:
        return
    if same[0] != site.name:
        raise SiteError(
            f"{what} named {site.name!r}: the bundled {schema.domain} site {same[0]!r} differs only in "
            f"case or Unicode form; use {same[0]!r} (with its conditions) or a name of its own "
            f"(bundled sites: {bundled})"
        )
    if _spec(site) != _spec(load_site(schema, site.name)):
        raise SiteError(
            f"{what} named {site.name!r}: a bundled {schema.domain} site has that name and other "
            f"conditions; give this site its own name (bundled sites: {bundled})"
        )


def site_name(site: str | Mapping[str, Any] | Site | None) -> str:
    """The name episodes at ``site`` are recorded under (``info["site"]``, a store's site column).

    The same rule as :func:`load_site`, without loading anything: ``None`` is ``lab``, a name is
    itself, a site document its ``name`` (``custom`` if it has none), any other mapping (an inline
    site) ``custom``, a :class:`Site` its ``name``.

    Args:
        site: Anything ``site=`` accepts.

    Returns:
        The site's name (``str(site)`` for a value ``load_site`` would refuse).
    """
    if site is None:
        return "lab"
    if isinstance(site, Site):
        return site.name
    if isinstance(site, Mapping):
        return str(site.get("name", "custom")) if "params" in site else "custom"
    return str(site)


def load_site(schema: SiteSchema, site: str | Mapping[str, Any] | Site | None) -> Site:
    """Resolve a site given by name, inline mapping or :class:`Site`.

    Args:
        schema: The domain's parameter schema.
        site: ``None`` or ``"lab"`` for nominal conditions, a bundled site name, a mapping of
            parameter specs (an inline site, named ``"custom"``; it may also be a full site document
            with ``name``/``description``/``params``), or a ready :class:`Site`.

    Returns:
        The validated site.

    Raises:
        SiteError: For an unknown site name (the message lists the bundled ones), an unknown
            parameter or a malformed spec, a site document (``name``/``description``) without
            ``params``, a site document that takes a bundled site's name with other conditions
            (its episodes would be recorded under that name) or a name that differs from a bundled
            one only in case, and an empty or blank name (see :class:`Site`).
    """
    if site is None:
        site = "lab"
    if isinstance(site, Site):
        if site.schema is not schema and site.schema.domain != schema.domain:
            raise SiteError(f"site {site.name!r} is for {site.schema.domain}, not {schema.domain}")
        _check_bundled_name(schema, site, "site")
        return site
    if isinstance(site, Mapping):
        doc = dict(site)
        if "params" in doc:
            extra = sorted(set(doc) - {"name", "description", "params"})
            if extra:
                raise SiteError(f"site document has unknown keys {extra}; allowed: name, description, params")
            # the name as given: Site refuses a non-string (a blank YAML "name:" is None, which
            # str() recorded as a site named "None")
            if not isinstance(doc["params"], Mapping):  # as in a site file: params: {} for lab's conditions
                raise SiteError(
                    f"site document {doc.get('name', 'custom')!r} needs 'params', a mapping of parameter "
                    f"names to distribution specs ({{}} for lab's conditions); got {doc['params']!r}"
                )
            built = Site(schema, doc.get("name", "custom"), doc["params"], doc.get("description", ""))
            _check_bundled_name(schema, built, "site document")
            return built
        if {"name", "description"} & set(doc):
            raise SiteError(
                f"site document with keys {sorted(doc)} has no 'params': a document is "
                "{name, description, params}; a mapping of parameters alone is an inline site"
            )
        return Site(schema, "custom", doc)
    if not isinstance(site, str):
        raise SiteError(f"site must be a name, a mapping or a Site, got {type(site).__name__}")
    names = available_sites(schema.domain)
    if site not in names:
        key = site_name_key(site.strip())
        near = [n for n in names if site_name_key(n) == key] or difflib.get_close_matches(site, names, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise SiteError(f"unknown {schema.domain} site {site!r}{hint}; available sites are {names}")
    text = _site_dir(schema.domain).joinpath(f"{site}.yaml").read_text(encoding="utf-8")
    doc = _parse_site_text(text, f"site file {site}.yaml", allow_name=False)
    return Site(schema, site, doc["params"], doc["description"])


def _parse_site_text(text: str, where: str, allow_name: bool) -> dict[str, Any]:
    """Parse a site file's YAML text into ``{"description": str, "params": dict}`` (and ``"name"``).

    One rule for bundled site files and one's own (:func:`read_site_file`): a mapping with
    ``params`` (a mapping, ``{}`` for lab's conditions) and an optional ``description``; ``name`` only
    where ``allow_name`` (a bundled site is named by its file).

    Args:
        text: The file's text.
        where: How messages name the file, e.g. ``"site file 'dock3.yaml'"``.
        allow_name: Whether a ``name`` key is allowed.

    Returns:
        The document, ``description`` defaulting to ``""``; ``name`` only if the file has one.

    Raises:
        SiteError: If the text is not valid YAML (a key given twice included), not a mapping, has
            other keys, has no ``params`` mapping, or a ``description`` or ``name`` that is not text.
    """
    try:
        doc = load_unique(text)
    except yaml.YAMLError as exc:
        raise SiteError(f"{where} is not valid YAML: {describe_yaml_error(exc)}") from None
    if not isinstance(doc, Mapping):
        raise SiteError(f"{where} must hold a mapping with 'params', got {type(doc).__name__}")
    allowed = ["name", "description", "params"] if allow_name else ["description", "params"]
    extra = sorted(str(k) for k in set(doc) - set(allowed))
    if extra:
        raise SiteError(
            f"{where} has unknown keys {extra}; allowed: {', '.join(allowed)} (the conditions go under "
            "params)"
        )
    if not isinstance(doc.get("params"), Mapping):
        raise SiteError(
            f"{where} needs 'params', a mapping of parameter names to distribution specs ({{}} for "
            f"lab's conditions); got {doc.get('params')!r}"
        )
    for key in ("name", "description"):
        if key in doc and not isinstance(doc[key], str):
            raise SiteError(f"{where}: {key} must be text, got {doc[key]!r}")
    out = {"description": doc.get("description", ""), "params": dict(doc["params"])}
    if "name" in doc:
        out["name"] = doc["name"]
    return out


def read_site_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a site file of one's own into a site document that ``site=`` and :func:`load_site` take.

    The file has the bundled sites' format (``description`` and ``params``, see the module
    docstring), optionally with a ``name``; without one the site is named after the file (``dock3.yaml``
    is ``dock3``), as bundled sites are. The document is not checked against a domain here:
    :func:`load_site` (or ``gymnasium.make(id, site=doc)``) does that, naming any unknown parameter.

    Args:
        path: Path of the YAML file.

    Returns:
        ``{"name": str, "description": str, "params": dict}``, a new dict.

    Raises:
        SiteError: If the file cannot be read (missing, a directory, not a regular file, not UTF-8),
            is not valid YAML (a key given twice included), is not a mapping, has keys other than
            ``name``, ``description`` and ``params``, or has no ``params`` mapping (the message names
            the file).
    """
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isfile(path):  # a directory, a FIFO (open() would block)...
        raise SiteError(f"site file {path!r} cannot be read: not a regular file")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise SiteError(f"site file {path!r} cannot be read: {exc}") from None
    doc = _parse_site_text(text, f"site file {path!r}", allow_name=True)
    stem = os.path.splitext(os.path.basename(path))[0]
    return {"name": doc.get("name", stem), "description": doc["description"], "params": doc["params"]}
