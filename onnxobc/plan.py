"""Per-layer plans: which :class:`~onnxobc.engine.spec.LayerSpec` each layer gets.

A plan is a list of rules, first match wins::

    [{"match": "conv1$", "bits": 8},
     {"match": "classifier", "skip": true},
     {"match": ".", "bits": 4, "group_size": 32}]

``match`` is a Python regular expression searched in the layer's name (what ``onnxobc inspect`` lists); the
other keys are the per-layer options named like the CLI's (``method``, ``sparsity``, ``nm``, ``block_size``,
``bits``, ``group_size``, ``sym``, ``grid``, ``damp``, ``dtype``, ``device``), and replace the run's global
options for the layers the rule matches (``null`` clears one); ``"skip": true`` leaves a layer as it is.
Layers that no rule matches get the global options. The ``plan`` key of a ``--report`` holds the plan that was
used, one rule per layer, in this format: a report can be edited and fed back (``--plan report.json``).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .engine.spec import SPEC_NAMES, LayerSpec, check_method, spec_fields
from .errors import UsageError

log = logging.getLogger(__name__)

_TYPES = {f.name: f.metadata for f in spec_fields()}


@dataclass(frozen=True)
class Rule:
    """One rule of a plan: ``match`` (regex searched in the layer name), ``skip``, and the options it sets."""

    match: str
    skip: bool = False
    options: tuple[tuple[str, Any], ...] = ()

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"match": self.match}
        if self.skip:
            d["skip"] = True
        d.update(self.options)
        return d


def _value(key: str, v: Any, where: str) -> Any:
    """A rule's option value checked against the type of the option (ValueError naming the rule)."""
    if v is None:
        return None
    meta = _TYPES[key]
    if key == "nm":
        if not isinstance(v, (str, list, tuple)):
            raise ValueError(f"{where}: nm must be a string N:M such as \"2:4\", got {v!r}")
        return v if isinstance(v, str) else f"{v[0]}:{v[1]}"
    if meta.get("action") == "store_true":
        if not isinstance(v, bool):
            raise ValueError(f"{where}: {key} must be true or false, got {v!r}")
        return v
    typ = meta.get("type") or str
    if typ is int and (isinstance(v, bool) or not isinstance(v, int)):
        raise ValueError(f"{where}: {key} must be an integer, got {v!r}")
    if typ is float and (isinstance(v, bool) or not isinstance(v, (int, float))):
        raise ValueError(f"{where}: {key} must be a number, got {v!r}")
    if typ is str and not isinstance(v, str):
        raise ValueError(f"{where}: {key} must be a string, got {v!r}")
    return float(v) if typ is float else v


def parse_rules(rules: Any) -> tuple[Rule, ...]:
    """Rules from a list of dicts (or Rule objects, or a report / {"plan": [...]} dict); ValueError when a
    rule is malformed, naming the rule and what is wrong."""
    if isinstance(rules, dict):
        if "plan" in rules:
            rules = rules["plan"]
        else:
            raise ValueError("a plan is a list of rules, or a report with a 'plan' key")
    if not isinstance(rules, (list, tuple)):
        raise ValueError(f"a plan is a list of rules, got {type(rules).__name__}")
    out = []
    for i, r in enumerate(rules):
        if isinstance(r, Rule):
            out.append(r)
            continue
        where = f"plan rule {i + 1}"
        if not isinstance(r, dict):
            raise ValueError(f"{where}: expected an object such as {{\"match\": \"conv\", \"bits\": 8}}, got {r!r}")
        unknown = sorted(set(r) - set(SPEC_NAMES) - {"match", "skip"})
        if unknown:
            raise ValueError(f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                             f"(known: match, skip, {', '.join(SPEC_NAMES)})")
        match = r.get("match")
        if not isinstance(match, str):
            raise ValueError(f"{where}: needs \"match\": a regular expression on the layer name")
        try:
            re.compile(match)
        except re.error as e:
            raise ValueError(f"{where}: match {match!r} is not a valid regular expression: {e}") from None
        skip = r.get("skip", False)
        if not isinstance(skip, bool):
            raise ValueError(f"{where}: skip must be true or false, got {skip!r}")
        opts = tuple((k, _value(k, r[k], where)) for k in SPEC_NAMES if k in r)
        if skip and opts:
            raise ValueError(f"{where}: a rule with \"skip\": true sets no options (got {', '.join(k for k, _ in opts)})")
        out.append(Rule(match, skip, opts))
    return tuple(out)


def load_plan(path: str | Path) -> tuple[Rule, ...]:
    """Rules from a JSON file (or YAML, with PyYAML installed); UsageError saying what is wrong otherwise."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise UsageError(f"--plan {p}: cannot read it ({e.strerror or e})") from None
    if p.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise UsageError(f"--plan {p}: reading YAML needs PyYAML (pip install pyyaml), or write the plan as JSON") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise UsageError(f"--plan {p}: not valid YAML: {e}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"--plan {p}: not valid JSON: {e}") from None
    try:
        return parse_rules(data)
    except ValueError as e:
        raise UsageError(f"--plan {p}: {e}") from None


def resolve(names: list[str], base: LayerSpec, rules: tuple[Rule, ...] | None, *,
            check: Any = None, force_sym: bool = False, final: bool = True) -> dict[str, LayerSpec | None]:
    """{layer name: its spec, or None to leave it as it is}. ``base`` is the run's global spec; ``check(spec)``
    (the export format's constraints) raises ValueError for a spec the run cannot store; ``force_sym`` makes every
    grid symmetric (W8A8); ``final=False`` (a target will choose the pattern and bits) skips the check that a spec
    has something to do. Errors name the layer and the rule."""
    out: dict[str, LayerSpec | None] = {}
    used = [False] * len(rules or ())
    for name in names:
        idx = next((i for i, r in enumerate(rules or ()) if re.search(r.match, name)), None)
        if idx is not None:
            used[idx] = True
        rule = None if idx is None else rules[idx]
        where = (f"layer {name!r} (plan rule {idx + 1}, match {rule.match!r})" if rule is not None
                 else f"layer {name!r} (no plan rule matches: the global options apply)")
        if rule is not None and rule.skip:
            out[name] = None
            continue
        if rule is None and not final:  # a target chooses the rest: the run's options are the base as they are
            out[name] = base
            continue
        try:
            spec = base.spec() if rule is None else dataclasses.replace(base.spec(), **dict(rule.options))
            if force_sym and not spec.sym:
                spec = dataclasses.replace(spec, sym=True)
            if final:
                check_method(spec)
            if check is not None:
                check(spec)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        out[name] = spec
    for r, u in zip(rules or (), used):
        if not u:
            log.warning("plan rule with match %r matched no layer", r.match)
    return out


def plan_rules(names: list[str], specs: dict[str, LayerSpec | None]) -> list[dict]:
    """The plan that was used, one rule per layer (exact-name matches), in ``--plan`` format."""
    rules = []
    for name in names:
        rule: dict[str, Any] = {"match": "^" + re.escape(name) + "$"}
        spec = specs.get(name)
        if spec is None:
            rule["skip"] = True
        else:
            rule.update(spec.to_rule())
        rules.append(rule)
    return rules
