"""Sparsity schedules: how much of each (layer, component) weight matrix to prune, as one validated, editable object.

A :class:`Schedule` maps ``(layer, component)`` to a sparsity in [0, 1) for the mixers' weight matrices the
unstructured pruners target (``Registry.weights``); everything not listed stays dense. It carries the parameter
count of each entry, so its overall and per-layer sparsities are parameter-weighted, and it round-trips exactly
through YAML (:meth:`Schedule.to_yaml`, :meth:`Schedule.from_yaml`) so people can derive and edit schedules by hand.
:meth:`Schedule.to_recipe` writes an llm-compressor recipe with the same per-layer budget.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cache
from typing import Annotated, Literal

import pandas as pd
import yaml
from pydantic import Field, JsonValue
from torch import nn

from ..core.loading import LoadedModel, as_loaded, tiny_config
from ..core.masks import Structure
from ..core.output import atomic_write_text
from ..core.registry import ARCHITECTURES, DEFAULT_EXCLUDE, Registry, build_registry
from ..core.spec import Count, Exclude, Fraction, Int, Spec, SpecError, load_yaml
from .options import RECIPE_HEADER, SCHEDULE_HEADER

__all__ = ["RECIPE_HEADER", "RECIPE_MODIFIERS", "SCHEDULE_HEADER", "Schedule", "uniform_schedule"]

logger = logging.getLogger(__name__)

RECIPE_MODIFIERS = ("WandaPruningModifier", "SparseGPTModifier")
"""llm-compressor one-shot modifiers that take a per-layer ``sparsity`` list (``MagnitudePruningModifier`` does not:
it is a gradual training-time pruner with ``init_sparsity``/``final_sparsity``)."""
BUDGET_TOL = 1e-6
"""How far :meth:`Schedule.overall` may be from ``budget``."""
Meta = dict[str, JsonValue]
"""Plain data: str keys; str, int, float (finite), bool, None, lists and mappings of them."""


class _Entry(Spec):
    layer: Annotated[Int, Field(ge=0)]
    component: str
    params: Count
    sparsity: Fraction


class _Document(Spec):
    """The ``schedule:`` mapping of the YAML form: what every schedule must satisfy field by field."""

    arch: Literal[ARCHITECTURES]  # type: ignore[valid-type]
    n_layers: Count
    method: Annotated[str, Field(min_length=1, pattern=r"^[^\n]+$")] = "custom"
    budget: Fraction | None = None
    exclude: Exclude = ()
    meta: Meta = {}
    units: list[dict[str, str]] | None = None
    entries: Annotated[list[_Entry], Field(min_length=1)]


class _Recipe(Spec):
    mask_structure: Structure = None


@cache
def _arch_registry(arch: str) -> Registry:
    """A registry of ``arch`` (from a tiny config): which module holds each component does not depend on sizes."""
    return build_registry(tiny_config(arch))


@dataclass(frozen=True)
class Schedule:
    """Per-(layer, component) sparsities of the mixers' weight matrices, with the parameter counts behind them.

    Attributes:
        arch: ``"mamba"``, ``"mamba2"`` or ``"falcon_mamba"``.
        n_layers: Number of mixer layers of the model it was made for.
        sparsity: ``{(layer, component): fraction to prune}``, each in [0, 1); components not listed stay dense.
        params: ``{(layer, component): prunable weights}``, same keys as ``sparsity`` (for budget arithmetic).
        method: How it was made (``uniform``, ``owl``, ``depth``, ``sensitivity``, or anything for a custom one).
        budget: The overall (parameter-weighted) sparsity it was made to meet, or None; when set,
            :meth:`overall` must equal it within :data:`BUDGET_TOL`.
        exclude: Components deliberately kept dense (recorded; they may not appear in ``sparsity``).
        meta: Allocator parameters needed to reproduce it (``owl_m``, ``owl_lambda``, ``source``, ``seed``...), as
            plain data.
        units: On hybrids, the model's layout (``Registry.units``: per layer, unit kind -> module path), so the
            schedule can be checked against a model and exported as a recipe; empty for pure SSM models.

    Raises:
        ValueError: On construction, for a bad type or range, mismatched ``sparsity``/``params`` keys, an excluded
            component listed, or a ``budget`` the entries do not meet (naming both numbers).

    Examples:
        >>> s = uniform_schedule(load_model("tiny:mamba2"), 0.5)
        >>> s.overall(), s.per_layer()
        (0.5, [0.5, 0.5])
        >>> Schedule.from_yaml(s.to_yaml()) == s
        True
    """

    arch: str
    n_layers: int
    sparsity: dict[tuple[int, str], float]
    params: dict[tuple[int, str], int]
    method: str = "custom"
    budget: float | None = None
    exclude: tuple[str, ...] = ()
    meta: dict = field(default_factory=dict)
    units: tuple[dict[str, str], ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.sparsity, dict) or not isinstance(self.params, dict):
            raise SpecError("sparsity and params must be dicts keyed by (layer, component)")
        for key in (*self.sparsity, *self.params):
            if not (isinstance(key, tuple) and len(key) == 2):
                raise SpecError(f"schedule key {key!r} must be a (layer, component) tuple")
        if missing := [k for k in self.sparsity if k not in self.params]:
            raise SpecError(f"entry {missing[0]!r} has a sparsity but no params count")
        if extra := [k for k in self.params if k not in self.sparsity]:
            raise SpecError(f"entry {extra[0]!r} has a params count but no sparsity")
        doc = _Document(arch=self.arch, n_layers=self.n_layers, method=self.method, budget=self.budget,
                        exclude=self.exclude, meta=self.meta if isinstance(self.meta, dict) else None,
                        units=list(self.units) or None,
                        entries=[{"layer": layer, "component": comp, "params": self.params[(layer, comp)],
                                  "sparsity": s} for (layer, comp), s in self.sparsity.items()])  # fmt: skip
        self._adopt(doc)

    def _adopt(self, doc: _Document) -> None:
        """Take the validated document's values, then check what spans fields."""
        sparsity, params = {}, {}
        for i, e in enumerate(doc.entries):
            key = (e.layer, e.component)
            if key in sparsity:
                raise SpecError(f"repeats (layer, component) {key!r}", f"entries.{i}")
            if e.layer >= doc.n_layers:
                raise SpecError(f"{e.layer} is out of range; allowed: 0..{doc.n_layers - 1}", f"entries.{i}.layer")
            sparsity[key], params[key] = e.sparsity, e.params
        if listed := sorted({c for _, c in sparsity} & set(doc.exclude)):
            raise SpecError(f"component {listed[0]!r} is excluded (exclude={list(doc.exclude)}) but has entries",
                            "exclude")  # fmt: skip
        if doc.units is not None and len(doc.units) != doc.n_layers:
            raise SpecError(f"lists {len(doc.units)} layers' units but n_layers is {doc.n_layers}", "units")
        for name in ("arch", "n_layers", "method", "budget", "exclude", "meta"):
            object.__setattr__(self, name, getattr(doc, name))
        object.__setattr__(self, "units", tuple(dict(u) for u in doc.units or ()))
        object.__setattr__(self, "sparsity", sparsity)
        object.__setattr__(self, "params", params)
        if self.budget is not None and abs(self.overall() - self.budget) > BUDGET_TOL:
            raise SpecError(f"the entries prune {self.overall():.8f} of their parameters but budget is "
                            f"{self.budget:.8f}; fix the sparsities or set budget to null", "budget")  # fmt: skip

    # ---- queries ----

    def get(self, layer: int, component: str) -> float:
        """Sparsity of (layer, component); 0.0 for a dense (unlisted) one."""
        return self.sparsity.get((layer, component), 0.0)

    @property
    def components(self) -> tuple[str, ...]:
        """The components with entries, sorted."""
        return tuple(sorted({c for _, c in self.sparsity}))

    def overall(self) -> float:
        """Parameter-weighted mean sparsity over the entries (the budget the schedule meets)."""
        total = math.fsum(self.params.values())
        return math.fsum(self.params[k] * s for k, s in self.sparsity.items()) / total

    def per_layer(self) -> list[float]:
        """Parameter-weighted sparsity of each layer's entries (0.0 for a layer without entries)."""
        pruned, total = [0.0] * self.n_layers, [0] * self.n_layers
        for key, s in self.sparsity.items():
            pruned[key[0]] += self.params[key] * s
            total[key[0]] += self.params[key]
        return [p / t if t else 0.0 for p, t in zip(pruned, total)]

    def frame(self) -> pd.DataFrame:
        """One row per entry: ``layer, component, params, sparsity``."""
        rows = [(layer, comp, self.params[(layer, comp)], s) for (layer, comp), s in self.sparsity.items()]
        df = pd.DataFrame(rows, columns=["layer", "component", "params", "sparsity"])
        return df.astype({"layer": "int64", "component": "object", "params": "int64", "sparsity": "float64"})

    def validate(self, registry: Registry, model: LoadedModel | nn.Module | None = None) -> Schedule:
        """Check the schedule fits a model: same architecture and depth, prunable non-excluded components, and (when
        ``model`` is given) parameter counts equal to the model's.

        Returns:
            ``self``, for chaining.

        Raises:
            ValueError: Naming the bad value and the allowed ones.
        """
        if self.arch != registry.arch:
            raise ValueError(f"schedule is for arch {self.arch!r} but the model is {registry.arch!r}")
        if self.n_layers != registry.n_layers:
            raise ValueError(f"schedule is for {self.n_layers} layers but the model has {registry.n_layers}")
        if self.units and tuple(self.units) != tuple(registry.units):
            raise ValueError("schedule is for another layout of layers (units) than the model's")
        allowed = [c for c in registry.prunable_components if c not in self.exclude]
        for layer, comp in self.sparsity:
            registry.check_layer(layer)
            if comp not in allowed:
                raise ValueError(f"schedule component {comp!r} (layer {layer}) is not prunable on {registry.arch} "
                                 f"with exclude={list(self.exclude)}; allowed: {', '.join(allowed)}")  # fmt: skip
            if not registry.has(layer, comp):
                raise ValueError(f"schedule component {comp!r} is not in layer {layer}, a {registry.layer_kind(layer)}"
                                 f" layer; layers with it: {', '.join(map(str, registry.layers_with(comp)))}")
        if model is not None:
            sizes = registry.weight_sizes(as_loaded(model).model, self.components)
            for key, n in self.params.items():
                if sizes[key] != n:
                    raise ValueError(f"entry {key!r} lists {n} params but the model's prunable weights have "
                                     f"{sizes[key]}")  # fmt: skip
        return self

    # ---- serialisation ----

    def to_dict(self) -> dict:
        """Plain data (the ``schedule:`` mapping of the YAML form), JSON- and YAML-serialisable."""
        entries = [{"layer": layer, "component": comp, "params": self.params[(layer, comp)], "sparsity": s}
                   for (layer, comp), s in self.sparsity.items()]  # fmt: skip
        units = {"units": [dict(u) for u in self.units]} if self.units else {}
        return {"arch": self.arch, "n_layers": self.n_layers, "method": self.method, "budget": self.budget,
                "exclude": list(self.exclude), "meta": self.meta, **units, "entries": entries}  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict) -> Schedule:
        """Inverse of :meth:`to_dict`.

        Raises:
            SpecError: For a missing or unknown key or a value of the wrong type, naming the key.
        """
        if not isinstance(d, dict):
            raise SpecError(f"a schedule must be a mapping with keys {', '.join(_Document.model_fields)}; got "
                            f"{type(d).__name__}")  # fmt: skip
        doc = _Document(**d)
        schedule = object.__new__(cls)
        schedule._adopt(doc)
        return schedule

    def to_yaml(self, path: str | os.PathLike | None = None) -> str:
        """The schedule as YAML (one flow-style line per entry), written atomically to ``path`` when given.

        Floats are written with Python's shortest round-trip repr, so :meth:`from_yaml` gives back an equal schedule.
        """
        header = (f"{SCHEDULE_HEADER}{self.method}, {len(self.sparsity)} entries, overall "
                  f"{self.overall():.6f} of the listed weights; entries not listed stay dense\n")  # fmt: skip
        body = yaml.safe_dump({"schedule": self.to_dict()}, sort_keys=False, default_flow_style=None, width=120)
        text = header + body
        if path is not None:
            atomic_write_text(path, text)
            logger.info("wrote schedule to %s", path)
        return text

    @classmethod
    def from_yaml(cls, source: str | os.PathLike) -> Schedule:
        """Read a schedule from a YAML file path or YAML text (the bounded, alias-free loader of
        :func:`sensitivity.core.spec.load_yaml`).

        Raises:
            SpecError: For a missing file, malformed YAML, a document without a top-level ``schedule:`` mapping, or
                any invalid key or value (naming it).
        """
        doc = load_yaml(source)
        where = str(source) if isinstance(source, os.PathLike) or "\n" not in str(source) else "the schedule text"
        if isinstance(doc, str) and "\n" not in str(source).strip():
            raise SpecError(f"{str(source).strip()!r} is neither an existing schedule file nor schedule YAML")
        if not isinstance(doc, dict) or "schedule" not in doc:
            raise SpecError(f"{where} has no top-level 'schedule:' mapping (see Schedule.to_yaml for the format)")
        if extra := [k for k in doc if k != "schedule"]:
            raise SpecError(f"{where} has unknown top-level key {extra[0]!r}; allowed: schedule")
        try:
            return cls.from_dict(doc["schedule"])
        except SpecError as e:
            raise e.within("schedule") from None

    def to_recipe(self, modifier: str = "WandaPruningModifier", mask_structure: str = "0:0") -> str:
        """An llm-compressor recipe (YAML) pruning each layer to this schedule's per-layer sparsity.

        llm-compressor's one-shot sparsity modifiers take ``sparsity`` as one float or a list with one value per
        *target layer* (the modules matched by ``targets``) and prune every Linear/Conv module inside a target
        layer, except those matched by ``ignore``, at that layer's value. The recipe therefore targets the mixer
        blocks (``re:backbone\\.layers\\.\\d+$``), gives :meth:`per_layer` as the list, and ignores ``lm_head``
        and every mixer module holding no entry (``conv1d`` by default). Per-component sparsities inside one
        module (the packed ``in_proj``) are averaged per layer, parameter-weighted; the recipe's comments say so
        and list any dense rows of a targeted module that llm-compressor would prune as well.

        Args:
            modifier: One of :data:`RECIPE_MODIFIERS`.
            mask_structure: ``"0:0"`` (unstructured) or ``"n:m"``; an ``n:m`` pattern fixes every sparsity to
                ``1 - n/m``, so it needs a schedule whose layers all have that sparsity.

        Returns:
            The recipe text (``sparsity_stage: sparsity_modifiers: {modifier}: ...``), loadable by
            ``llmcompressor.oneshot(recipe=...)`` as a file.

        Raises:
            ValueError: For another modifier, a bad ``mask_structure``, or an ``n:m`` pattern the schedule does not
                follow.
        """
        if modifier not in RECIPE_MODIFIERS:
            raise ValueError(f"unknown modifier {modifier!r}; allowed: {', '.join(RECIPE_MODIFIERS)} "
                             "(MagnitudePruningModifier takes no per-layer sparsity)")  # fmt: skip
        nm = _Recipe(mask_structure=mask_structure).mask_structure
        mask_structure = "0:0" if nm is None else nm
        layers = self.per_layer()
        if nm is not None:
            n, m = map(int, nm.split(":"))
            implied = 1 - n / m
            if bad := [(i, s) for i, s in enumerate(layers) if abs(s - implied) > 1e-9]:
                raise ValueError(f"mask_structure {mask_structure!r} prunes {implied:g} of every weight but layer "
                                 f"{bad[0][0]} of the schedule has sparsity {bad[0][1]:.6g}")  # fmt: skip
        reg = _arch_registry(self.arch)
        if reg.is_hybrid and not self.units:
            raise ValueError(f"a {self.arch} schedule needs its layers' units to be exported as a recipe; make it "
                             "from the model (uniform_schedule, allocate)")  # fmt: skip
        blocks = re.escape(reg.layers_path)
        paths = self.units or (reg.units[0],) * self.n_layers  # per layer: unit kind -> module path in the block
        module_of = lambda t: t.param.rsplit(".", 1)[0]
        holds: dict[tuple[str, str], list[str]] = {}  # (unit kind, module) -> prunable components inside it
        for comp in reg.prunable_components:
            for t in reg.weights(comp):
                key = (reg.component(comp).unit, module_of(t))
                holds.setdefault(key, [])
                if comp not in holds[key]:
                    holds[key].append(comp)
        ignore = ["re:.*lm_head"]
        notes = []
        for (kind, module), comps in holds.items():
            held = [layer for layer in range(self.n_layers) if kind in paths[layer]]
            if not held:
                continue
            targeted = [layer for layer in held if any((layer, c) in self.sparsity for c in comps)]
            unit_paths = sorted({paths[layer][kind] for layer in held})
            if not targeted:
                ignore += [f"re:.*{re.escape(u)}\\.{re.escape(module)}$" for u in unit_paths]
                continue
            ignore += [f"re:{blocks}\\.{layer}\\.{re.escape(paths[layer][kind])}\\.{re.escape(module)}$"
                       for layer in held if layer not in targeted]  # fmt: skip
            dense: dict[tuple[str, ...], list[int]] = {}
            for layer in targeted:
                if missing := tuple(c for c in comps if (layer, c) not in self.sparsity):
                    dense.setdefault(missing, []).append(layer)
            notes += [f"# note: {module} of layer(s) {_ranges(ls)} also holds {', '.join(miss)}, dense in the "
                      "schedule; llm-compressor prunes the whole module at the layer's sparsity"
                      for miss, ls in dense.items()]  # fmt: skip
        if reg.is_hybrid:  # modules no schedule entry can reach: routers, experts, MoE shared experts
            ignore += ["re:.*router$", "re:.*gate$", "re:.*experts.*"]
        stage = {"sparsity_stage": {"sparsity_modifiers": {modifier: {
            "sparsity": [float(s) for s in layers],
            "mask_structure": mask_structure,
            "targets": [f"re:{blocks}\\.\\d+$"],
            "ignore": ignore,
        }}}}  # fmt: skip
        header = [
            f"{RECIPE_HEADER}({self.method}, arch {self.arch}, {self.n_layers} "
            f"layers, overall {self.overall():.6f}).",
            "# sparsity: one value per target layer (mixer block), the parameter-weighted mean of the schedule's",
            "# entries in that layer. llm-compressor prunes whole modules, so per-component sparsities inside a",
            "# packed in_proj are averaged per layer in this recipe; use sensitivity's pruner for per-component ones.",
            *notes,
        ]
        body = yaml.safe_dump(stage, sort_keys=False, default_flow_style=None, width=120)
        return "\n".join(header) + "\n" + body


def _ranges(layers: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``."""
    runs: list[list[int]] = []
    for layer in layers:
        if runs and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    return ", ".join(f"{r[0]}" if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def uniform_schedule(
    model: LoadedModel | nn.Module,
    sparsity: float,
    exclude: Iterable[str] | None = DEFAULT_EXCLUDE,
    components: Iterable[str] | str | None = None,
) -> Schedule:
    """The same sparsity for every prunable (layer, component) not excluded.

    Args:
        model: A ``LoadedModel`` or HF Mamba causal LM.
        sparsity: Fraction to prune, in [0, 1).
        exclude: Components kept dense (default ``conv1d``).
        components: Components to prune (default every prunable one not excluded).

    Returns:
        A :class:`Schedule` with ``method="uniform"`` and ``budget=sparsity``.

    Examples:
        >>> uniform_schedule(load_model("tiny:mamba"), 0.5).get(1, "out_proj")
        0.5
    """
    lm = as_loaded(model)
    names = lm.registry.resolve(components, exclude)
    sizes = lm.registry.weight_sizes(lm.model, names)
    units = lm.registry.units if lm.registry.is_hybrid else ()
    return Schedule(arch=lm.arch, n_layers=lm.registry.n_layers, sparsity={k: float(sparsity) for k in sizes},
                    params=sizes, method="uniform", budget=sparsity, exclude=exclude, units=units)  # fmt: skip
