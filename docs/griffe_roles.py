"""Griffe extension: the Sphinx roles of the package's docstrings (``:func:`~sensitivity.x.f```) read as Markdown.

A role naming an object this site documents becomes a cross-reference (``[`f`][sensitivity.x.f]``); any other
role becomes inline code. ``~`` keeps the last part of the name, as in Sphinx.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import griffe

sys.path.insert(0, str(Path(__file__).parent))
import hooks  # noqa: E402 (this folder's build hook: which page documents which object)

_ROLE = re.compile(r":(?:func|class|mod|data|meth|attr|obj|exc|ref):`(~?)([^`]+)`")


class SphinxRoles(griffe.Extension):
    """Rewrites Sphinx roles in every docstring of the package once it is loaded."""

    def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:  # noqa: D102
        documented = set(hooks._owners())

        def known(target: str, obj: griffe.Object) -> str | None:
            if target in documented:
                return target
            for scope in (obj.module.path, obj.module.package.path):  # a short name from the docstring's module
                if f"{scope}.{target}" in documented:
                    return f"{scope}.{target}"
            return None

        def visit(obj: griffe.Object) -> None:
            if obj.docstring is not None:
                def replace(m: re.Match) -> str:
                    tilde, target = m.groups()
                    shown = target.rsplit(".", 1)[-1] if tilde else target
                    ident = known(target, obj)
                    return f"[`{shown}`][{ident}]" if ident else f"`{shown}`"

                obj.docstring.value = _ROLE.sub(replace, obj.docstring.value)
            for member in obj.members.values():
                if not member.is_alias:
                    visit(member)

        visit(pkg)
