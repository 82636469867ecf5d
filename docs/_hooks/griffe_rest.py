"""Griffe extension: render tagcache's reStructuredText docstrings as mkdocstrings' Markdown.

The sources use Sphinx markup that mkdocstrings would otherwise print verbatim or parse
badly:

* cross-reference roles (``:class:`~tagcache.Cache```, ``:meth:`aclose```) become optional
  autorefs links (plain code when the target is not in the reference);
* ``text::`` literal-block markers become ``text:`` (the indented block that follows is a
  Markdown code block already), and an inline literal wrapped onto a line starting with
  ``+ `` is joined back (Markdown would start a list item there);
* Sphinx field lists (``:param name: ...``, ``:raises Error: ...``, ``:returns: ...``) become
  Google-style ``Args:``/``Raises:``/``Returns:`` sections, ending where reStructuredText ends
  them (a blank line followed by an unindented paragraph);
* attributes documented by ``#:`` comments above them (module constants, dataclass fields)
  get those comments as their docstrings.

Loaded from ``mkdocs.yml`` (``extensions:`` of the python handler); changes nothing in ``src/``.
"""

from __future__ import annotations

import html
import re
from typing import Any

import griffe

_XREF_ROLES = {"class", "meth", "func", "attr", "data", "exc", "mod", "obj", "const"}
_ROLE = re.compile(
    r":(?:py:)?(?P<role>[a-z]+):`(?P<tilde>~?)(?P<text>[^`<]+?)(?:\s*<(?P<target>[^>`]+)>)?`"
)
_FIELD = re.compile(
    r"^:(?P<kind>param|parameter|arg|argument|key|keyword|raises?|except|exception|returns?|rtype|type)"
    r"(?:\s+(?P<arg>[^:]+?))?:\s?(?P<text>.*)$"
)
_SECTION = {
    "param": "Args",
    "parameter": "Args",
    "arg": "Args",
    "argument": "Args",
    "key": "Args",
    "keyword": "Args",
    "raise": "Raises",
    "raises": "Raises",
    "except": "Raises",
    "exception": "Raises",
    "return": "Returns",
    "returns": "Returns",
}


class RestToMarkdown(griffe.Extension):
    """Rewrite docstrings from reStructuredText to the Markdown mkdocstrings renders."""

    def on_package(self, *, pkg: griffe.Module, loader: Any, **kwargs: Any) -> None:
        self.on_object(obj=pkg, loader=loader)  # on_object is called for the package's members only

    def on_object(self, *, obj: griffe.Object, loader: Any, **kwargs: Any) -> None:
        if obj.docstring is None and obj.kind is griffe.Kind.ATTRIBUTE:
            comment = _comment_above(obj)
            if comment:
                obj.docstring = griffe.Docstring(comment, lineno=obj.lineno, parent=obj)
        if obj.docstring is not None:
            text = _fields_to_sections(obj.docstring.value)
            text = _ROLE.sub(lambda m: _role(m, obj), text)
            text = _literal_markers(text)
            obj.docstring.value = text


def _comment_above(obj: griffe.Object) -> str | None:
    """The ``#:`` comment lines right above an attribute's assignment, without the markers."""
    filepath = obj.filepath
    if isinstance(filepath, list) or filepath not in obj.lines_collection or not obj.lineno:
        return None
    lines = obj.lines_collection[filepath]
    if not lines:
        return None
    found: list[str] = []
    index = obj.lineno - 2
    while index >= 0 and lines[index].lstrip().startswith("#:"):
        found.append(lines[index].lstrip()[2:].removeprefix(" "))
        index -= 1
    return "\n".join(reversed(found)) or None


def _fields_to_sections(text: str) -> str:
    """Sphinx field lists as Google-style sections, placed where the first field was."""
    lines = text.splitlines()
    out: list[str] = []
    sections: dict[str, list[str]] = {}
    inserted_at: int | None = None
    current: list[str] | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        field = _FIELD.match(line)
        if field:
            kind = field["kind"]
            if inserted_at is None:
                inserted_at = len(out)
            if kind in ("rtype", "type"):
                current = []  # types come from the signature: drop
            else:
                section = sections.setdefault(_SECTION[kind], [])
                arg = (field["arg"] or "").split()[-1] if field["arg"] else ""
                if _SECTION[kind] == "Returns":
                    section.append(f"    {field['text']}")
                else:
                    section.append(f"    {arg}: {field['text']}")
                current = section
            i += 1
            continue
        if current is not None:
            indented = line.startswith((" ", "\t"))
            blank = not line.strip()
            following = next((ln for ln in lines[i + 1 :] if ln.strip()), None)
            if indented or (blank and following is not None and following.startswith((" ", "\t"))):
                current.append("        " + line.strip() if not blank else "")
                i += 1
                continue
            current = None
        out.append(line)
        i += 1
    if inserted_at is None:
        return text
    block: list[str] = []
    for title in ("Args", "Raises", "Returns"):
        if title in sections:
            if block:
                block.append("")
            block += [f"{title}:", *sections[title]]
    if inserted_at and out[inserted_at - 1].strip():
        block.insert(0, "")
    if inserted_at < len(out) and out[inserted_at].strip():
        block.append("")
    return "\n".join(out[:inserted_at] + block + out[inserted_at:])


def _role(match: re.Match[str], obj: griffe.Object) -> str:
    role, text = match["role"], match["text"].strip()
    if role not in _XREF_ROLES:
        return f"`{text}`"
    target = (match["target"] or text).strip().removesuffix("()").lstrip(".")
    display = text.removesuffix("()")
    if match["tilde"]:
        display = display.rsplit(".", 1)[-1]
    if role in ("meth", "func"):
        display += "()"
    identifier = _resolve(target, obj)
    return (
        f'<autoref identifier="{html.escape(identifier)}" optional>'
        f"<code>{html.escape(display)}</code></autoref>"
    )


def _resolve(target: str, obj: griffe.Object) -> str:
    """The identifier a reference names, seen from ``obj``'s docstring."""
    if target.startswith("tagcache.") or target == "tagcache":
        return target
    head = target.split(".", 1)[0]
    scopes: list[griffe.Object] = []
    scope: griffe.Object | None = obj
    while scope is not None:
        if scope.kind in (griffe.Kind.CLASS, griffe.Kind.MODULE):
            scopes.append(scope)
        scope = scope.parent
    for candidate in scopes:
        members = candidate.all_members if candidate.kind is griffe.Kind.CLASS else candidate.members
        if head in members:
            return f"{candidate.path}.{target}"
    if "." in target:
        return target  # another package (random.Random, starlette.requests.Request)
    return f"{scopes[0].path}.{target}" if scopes else target


def _literal_markers(text: str) -> str:
    """``text::`` introduces a literal block in reStructuredText; Markdown needs ``text:``.

    Also joins a line to the previous one when it continues an inline literal that the
    previous line opened and it starts like a Markdown list item (``+ rate(...)``).
    """
    lines: list[str] = []
    for line in text.splitlines():
        stripped = line.rstrip()
        if lines and line.lstrip()[:2] in ("+ ", "- ", "* ") and lines[-1].count("``") % 2:
            lines[-1] = f"{lines[-1].rstrip()} {line.strip()}"
        elif stripped.strip() == "::":
            lines.append("")
        elif stripped.endswith("::") and not stripped.endswith(":::"):
            lines.append(stripped[:-1])
        else:
            lines.append(line)
    return "\n".join(lines)
