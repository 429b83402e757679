"""Method registries: pruning methods, ablation kinds, attribution methods and allocators, each a name with its
options, its defaults and what it needs.

Each stage owns one :class:`Methods` table and registers its implementations in it; the command line, the jobs,
the report, the grid and the explainer read the tables instead of copying names. Adding a method is one function
plus one registration, also from user code:

Examples:
    >>> from sensitivity.pruning import METHODS, UnstructuredOptions
    >>> @METHODS.register("random", options=UnstructuredOptions, calibration=False,
    ...                   description="zero random weights (a baseline)")
    ... def prune_random(lm, options, *, schedule, windows, seed, batch_size, show_progress): ...
    >>> "random" in METHODS
    True
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .spec import Spec, SpecError, validate

__all__ = ["Method", "Methods", "NoOptions"]


class NoOptions(Spec):
    """A method without options."""


class _Info(dict):
    """A method's ``info``: what its declaration states, completed by its implementation module (imported the first
    time a key the declaration lacks is read)."""

    def __init__(self, data: dict, load: Callable[[], None] | None) -> None:
        super().__init__(data)
        self._load = load

    def _complete(self) -> None:
        if self._load is not None:
            load, self._load = self._load, None
            load()

    def __getitem__(self, key):
        if key not in self:
            self._complete()
        return super().__getitem__(key)

    def get(self, key, default=None):
        if key not in self:
            self._complete()
        return super().get(key, default)


@dataclass(frozen=True)
class Method:
    """One registered method.

    A method is either registered with its implementation (:meth:`Methods.register`), or declared where its options
    live and implemented in a module imported only when the implementation is needed (:meth:`Methods.declare`,
    :meth:`Methods.implement`): validating a spec that names it imports nothing heavy.

    Attributes:
        name: What users type (``wanda``, ``zero``, ``taylor``, ``owl``).
        fn: The implementation (its signature is the table's convention); for a declared method, reading it imports
            the implementing module.
        impl: The implementation as stored: None for a declared method until its module is imported (read
            :attr:`fn` instead).
        options: The :class:`~sensitivity.core.spec.Spec` its options validate into.
        description: One line for ``--help`` and tables.
        calibration: Whether it needs calibration windows: a bool, or a function of its validated options.
        archs: Architectures it applies to (None: every one).
        info: Anything else the owning stage records (e.g. the structured unit, covered components).
        module: For a declared method, the module that implements it.
    """

    name: str
    impl: Callable | None
    options: type[Spec] = NoOptions
    description: str = ""
    calibration: bool | Callable[[Spec], bool] = False
    archs: tuple[str, ...] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    module: str | None = None

    @property
    def fn(self) -> Callable:
        if self.impl is None:
            _import(self.module, self.name)
        if self.impl is None:
            raise RuntimeError(f"{self.module} did not implement {self.name!r}")
        return self.impl

    def needs_calibration(self, options: Spec | None = None) -> bool:
        """Whether this method, with these options, reads calibration windows."""
        if callable(self.calibration):
            return bool(self.calibration(options if options is not None else self.options()))
        return bool(self.calibration)

    def applies_to(self, arch: str) -> bool:
        """Whether the method applies to architecture ``arch`` (a ``model_type``)."""
        return self.archs is None or arch in self.archs

    def validate(self, options: dict | Spec | None = None, where: str = "options") -> Spec:
        """The options as this method's validated options (errors name the field under ``where``)."""
        if isinstance(options, self.options):
            return options
        if isinstance(options, Spec):
            options = options.to_dict()
        if options is not None and not isinstance(options, dict):
            raise SpecError(f"{options!r} is not a mapping of {self.name}'s options", where)
        try:
            return validate(self.options, dict(options or {}), where)
        except SpecError as e:
            if e.detail.startswith("unknown field"):
                allowed = ", ".join(self.options.model_fields) or "none"
                raise SpecError(f"not an option of {self.name!r}; its options: {allowed}", e.field) from None
            raise


def _import(module: str | None, name: str) -> None:
    if module is None:
        raise RuntimeError(f"method {name!r} has no implementation")
    importlib.import_module(module)


class Methods:
    """A named table of :class:`Method` entries of one kind (``"pruning method"``, ``"ablation kind"``...).

    Attributes:
        kind: What the entries are, as error messages name them (``"pruning method"``, ``"job"``...).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Method] = {}

    def register(self, name: str, *, options: type[Spec] = NoOptions, description: str = "",
                 calibration: bool | Callable[[Spec], bool] = False, archs: tuple[str, ...] | None = None,
                 replace: bool = False, **info: Any) -> Callable[[Callable], Callable]:  # fmt: skip
        """Decorator registering ``fn`` as method ``name``.

        Raises:
            ValueError: If ``name`` is taken (unless ``replace``) or is not a plain identifier-like name.
        """
        if not name or not name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"{self.kind} name {name!r} must be letters, digits, '_' or '-'")
        if name in self._entries and not replace:
            raise ValueError(f"{self.kind} {name!r} is already registered; pass replace=True to replace it")
        if not (isinstance(options, type) and issubclass(options, Spec)):
            raise ValueError(f"options of {self.kind} {name!r} must be a sensitivity.core.spec.Spec subclass")

        def decorate(fn: Callable) -> Callable:
            self._entries[name] = Method(name, fn, options, description, calibration, archs, dict(info))
            return fn

        return decorate

    def declare(self, name: str, module: str, *, options: type[Spec] = NoOptions, description: str = "",
                calibration: bool | Callable[[Spec], bool] = False, archs: tuple[str, ...] | None = None,
                **info: Any) -> None:  # fmt: skip
        """Declare method ``name``, implemented in ``module`` (which calls :meth:`implement` when imported): its
        name, options and ``info`` are known without importing ``module``."""
        self.register(name, options=options, description=description, calibration=calibration, archs=archs)(None)
        load = lambda: _import(module, name)  # noqa: E731
        object.__setattr__(self._entries[name], "module", module)
        object.__setattr__(self._entries[name], "info", _Info(info, load))

    def implement(self, name: str, **info: Any) -> Callable[[Callable], Callable]:
        """Decorator giving the declared method ``name`` its implementation (and the ``info`` only it can give); an
        entry registered over the declaration meanwhile (``register(..., replace=True)``) keeps its own."""
        entry = self._entries.get(name)

        def decorate(fn: Callable) -> Callable:
            if entry is not None and entry.module is not None and entry.impl is None:
                object.__setattr__(entry, "impl", fn)
                dict.update(entry.info, info)
            return fn

        return decorate

    def unregister(self, name: str) -> None:
        """Remove ``name`` (tests and notebooks that register throwaway methods)."""
        self[name]
        del self._entries[name]

    def __getitem__(self, name: str) -> Method:
        if not isinstance(name, str) or name not in self._entries:
            raise SpecError(f"unknown {self.kind} {name!r}; allowed: {', '.join(self._entries)}")
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def names(self, arch: str | None = None) -> tuple[str, ...]:
        """Registered names, in registration order (those that apply to ``arch`` when given)."""
        return tuple(n for n, m in self._entries.items() if arch is None or m.applies_to(arch))

    def check(self, name: str, arch: str | None = None, field: str = "") -> Method:
        """The entry of ``name``, which must apply to ``arch`` when given; errors name ``field``."""
        try:
            method = self[name]
        except SpecError as e:
            raise e.within(field) from None
        if arch is not None and not method.applies_to(arch):
            raise SpecError(f"{self.kind} {name!r} does not apply to {arch} models; it needs "
                            f"{' or '.join(method.archs or ())}", field)  # fmt: skip
        return method

    def spec_validators(self) -> tuple[Callable, Callable]:
        """Field validators for a spec naming a method of this table in ``method`` and its options in ``options``::

            known, options_for = METHODS.spec_validators()
            _method = field_validator("method")(known)
            _options = field_validator("options", mode="before")(options_for)
        """

        def known(name: str) -> str:
            return self[name].name

        def options_for(options, info) -> Spec:
            method = info.data.get("method")
            return self[method].validate(options, where="") if method in self._entries else options

        return known, options_for

    def __repr__(self) -> str:
        return f"Methods({self.kind!r}: {', '.join(self._entries)})"
