"""The columns of a recipients CSV as a template sees them: by name, and by identifier form.

Spreadsheets name columns ``First Name``, ``E-mail Address`` or ``Company (legal)``, which are
not names a Jinja2 expression can use. A template reaches such a column as ``row["First Name"]``
or by its identifier form, ``first_name``; a template naming a column that does not exist is
told which columns do, and which one it probably meant.
"""

from __future__ import annotations

import difflib
import keyword
import re
from collections.abc import Iterable

import jinja2.nodes

from twistmail.errors import TemplateError

__all__ = ["column_aliases", "column_identifier", "columns_read", "unknown_columns_error"]

_NOT_IDENTIFIER = re.compile(r"\W+")
# Names Jinja2 reads as something else, never offered as a column's identifier form.
_JINJA_WORDS = frozenset({"and", "or", "not", "in", "is", "if", "else", "true", "false", "none"})


def column_aliases(columns: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """``(identifier form, column)`` for each column reachable under another name.

    The identifier form is the column's name in lower case with each run of characters that
    cannot be in a name turned into ``_`` (``E-mail Address`` -> ``e_mail_address``). A form
    equal to a column's own name, shared by two columns, or not a usable name is left out.
    """
    names = set(columns)
    forms: dict[str, list[str]] = {}
    for column in columns:
        form = column_identifier(column)
        if form is not None and form not in names:
            forms.setdefault(form, []).append(column)
    return tuple((form, found[0]) for form, found in forms.items() if len(found) == 1)


def column_identifier(column: str) -> str | None:
    """The identifier form of a column name (see :func:`column_aliases`), or None."""
    form = _NOT_IDENTIFIER.sub("_", column.strip().lower()).strip("_")
    if form[:1].isdigit():
        form = "_" + form
    if not form.isidentifier() or keyword.iskeyword(form) or form in _JINJA_WORDS:
        return None
    return form


def _alias_of(column: str, aliases: tuple[tuple[str, str], ...]) -> str | None:
    return next((alias for alias, named in aliases if named == column), None)


def _closest(name: str, candidates: list[str], aliases: dict[str, str]) -> str:
    """``; did you mean ...?`` for the candidate most like ``name``, or nothing."""
    by_fold = {candidate.casefold(): candidate for candidate in candidates}
    found = difflib.get_close_matches(name.casefold(), list(by_fold), n=1, cutoff=0.6)
    if not found:
        return ""
    match = by_fold[found[0]]
    column = f" (column {aliases[match]!r})" if match in aliases else ""
    return f", did you mean {match!r}{column}?"


def unknown_columns_error(
    template: str,
    variables: list[tuple[str, int | None]],
    row_keys: list[str],
    columns: tuple[str, ...],
    aliases: tuple[tuple[str, str], ...],
) -> TemplateError:
    """The error for template ``variables`` (with the line of their first use) and
    ``row["..."]`` keys that no column of ``columns`` provides."""
    by_alias = dict(aliases)
    names = sorted({*columns, *by_alias})
    problems = [
        f"{name!r}{f' (line {line})' if line else ''}{_closest(name, names, by_alias)}"
        for name, line in variables
    ]
    problems += [f"row[{key!r}]{_closest(key, list(columns), {})}" for key in row_keys]
    plural = "s" if len(problems) > 1 else ""
    listed = ", ".join(
        f"{column!r} ({alias})" if (alias := _alias_of(column, aliases)) else repr(column)
        for column in columns
    )
    return TemplateError(
        f"{template}: no CSV column for template variable{plural} {'; '.join(problems)}. "
        f"The columns are: {listed}"
    )


def columns_read(
    asts: Iterable[jinja2.nodes.Template], columns: tuple[str, ...]
) -> tuple[str, ...] | None:
    """The columns whose cells ``asts`` read, in order of first use (a column by its name, its
    identifier form or ``row["Name"]``); None when they read the whole ``row`` mapping (a loop
    over it, or a key that is not a constant)."""
    by_name = {column: column for column in columns}
    for alias, column in column_aliases(columns):
        by_name.setdefault(alias, column)
    row_is_column = "row" in by_name
    found: dict[str, None] = {}
    for ast in asts:
        constant_lookups: set[int] = set()
        for node in ast.find_all((jinja2.nodes.Getitem, jinja2.nodes.Name)):
            if isinstance(node, jinja2.nodes.Getitem):
                if (
                    not row_is_column
                    and isinstance(node.node, jinja2.nodes.Name)
                    and node.node.name == "row"
                    and isinstance(node.arg, jinja2.nodes.Const)
                    and isinstance(node.arg.value, str)
                ):
                    constant_lookups.add(id(node.node))
                    if node.arg.value in columns:
                        found.setdefault(node.arg.value)
                continue
            if not isinstance(node, jinja2.nodes.Name) or node.ctx != "load":
                continue
            if node.name == "row" and not row_is_column:
                if id(node) not in constant_lookups:
                    return None
                continue
            named = by_name.get(node.name)
            if named is not None:
                found.setdefault(named)
    return tuple(found)
