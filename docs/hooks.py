"""MkDocs hooks: pages generated at build time, so they cannot drift from the code.

- ``index.md`` is README.md, with its ``docs/...`` links pointing at the site's pages (a link to a
  page that does not exist, and any other relative link, becomes plain text).
- ``cli.md`` is every ``kd`` command's help, rendered from the typer app with typer's own Markdown
  generator (the same text as ``typer kdcore.cli utils docs --name kd``).
- A nav entry whose page does not exist (yet) is left out of the nav and named in the build log at
  INFO level, so pages being written can be listed in mkdocs.yml before they land; a link to such a
  planned page becomes plain text until it exists. Links to any other missing page still fail
  ``mkdocs build --strict``.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

log = logging.getLogger("mkdocs.hooks.kdcore")

REPO = Path(__file__).resolve().parents[1]
GENERATED = {"index.md", "cli.md"}
PLANNED: set[str] = set()  # nav pages not written yet (filled by on_config)
_LINK = re.compile(r"(?<!!)\[([^\]]+)\]\(([^)\s]+)\)")


def readme_as_index(readme: str, pages: set[str]) -> str:
    """README.md with links rewritten for the site (``docs/x.md`` -> ``x.md``)."""

    def link(match: re.Match[str]) -> str:
        label, target = match.group(1), match.group(2)
        if target.startswith(("http://", "https://", "mailto:", "#")):
            return match.group(0)
        path, _, anchor = target.partition("#")
        if path.startswith("docs/") and path[len("docs/") :] in pages:
            return f"[{label}]({path[len('docs/') :]}{'#' + anchor if anchor else ''})"
        return label

    return _LINK.sub(link, readme)


def cli_reference() -> str:
    import click
    import typer.main
    from typer.cli import get_docs_for_click

    from kdcore.cli import app

    command = typer.main.get_command(app)
    ctx = click.Context(command, info_name="kd")
    docs = get_docs_for_click(obj=command, ctx=ctx, name="kd", title="CLI reference")
    intro = (
        "Generated from the `kd` command itself when the site is built, so it always matches the "
        "installed version. `kd COMMAND --help` prints the same.\n\n"
    )
    head, _, rest = docs.partition("\n\n")
    return f"{head}\n\n{intro}{rest}"


def _prune(nav: Any, exists: set[str], missing: list[str]) -> Any:
    """The nav without entries whose Markdown file is neither in docs/ nor generated."""
    if isinstance(nav, list):
        items = [_prune(item, exists, missing) for item in nav]
        return [item for item in items if item is not None]
    if isinstance(nav, dict):
        out = {}
        for title, value in nav.items():
            pruned = _prune(value, exists, missing)
            if pruned not in (None, []):
                out[title] = pruned
        return out or None
    if isinstance(nav, str) and nav.endswith(".md") and nav not in exists:
        missing.append(nav)
        return None
    return nav


def on_config(config: Any) -> Any:
    docs = Path(config["docs_dir"])
    exists = {p.relative_to(docs).as_posix() for p in docs.rglob("*.md")} | GENERATED
    missing: list[str] = []
    if config.get("nav"):
        config["nav"] = _prune(config["nav"], exists, missing)
    PLANNED.clear()
    PLANNED.update(missing)
    if missing:
        log.info("nav pages not written yet, left out of the nav: %s", ", ".join(missing))
    return config


def soften_planned_links(markdown: str, planned: set[str]) -> str:
    """``[label](page.md#x)`` -> ``label`` when ``page.md`` is planned in the nav but not written yet."""

    def link(match: re.Match[str]) -> str:
        path = match.group(2).partition("#")[0]
        return match.group(1) if path in planned else match.group(0)

    return _LINK.sub(link, markdown)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    return soften_planned_links(markdown, PLANNED) if PLANNED else markdown


_ROLE = re.compile(r":(?:class|func|meth|attr|mod|data|exc|obj):(<code>)~?")


def on_page_content(html: str, page: Any, config: Any, files: Any) -> str:
    """Docstrings use Sphinx roles (``:class:`X` ``); on the site the code span alone reads better."""
    return _ROLE.sub(r"\1", html)


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    pages = {f.src_uri for f in files if f.src_uri.endswith(".md")} | GENERATED
    generated = {
        "index.md": readme_as_index((REPO / "README.md").read_text(encoding="utf-8"), pages),
        "cli.md": cli_reference(),
    }
    for name, content in generated.items():
        if files.get_file_from_path(name) is None:  # a real docs/index.md wins over the README copy
            files.append(File.generated(config, name, content=content))
    return files


# -- docs/api.md: the Python API as plain Markdown, readable on GitHub without a site build -------------
#: (section title, introduction, dotted names) in the order of the page.
API_SECTIONS = (
    ("Running", "", ("kdcore.run", "kdcore.RunConfig", "kdcore.StrategySpec")),
    (
        "Strategy interfaces",
        "Plugins subclass these; see [Writing a plugin](plugins.md).",
        (
            "kdcore.Strategy",
            "kdcore.DifficultyScorer",
            "kdcore.PacingFunction",
            "kdcore.ReliancePolicy",
            "kdcore.Divergence",
            "kdcore.ScorerContext",
            "kdcore.Source",
            "kdcore.SourceRequest",
            "kdcore.SourceRows",
            "kdcore.SourceContext",
            "kdcore.NoParams",
        ),
    ),
    (
        "Plugins and errors",
        "",
        ("kdcore.hookimpl", "kdcore.create_strategy", "kdcore.KdError", "kdcore.PluginError"),
    ),
    (
        "Testing plugins",
        "Helpers for a plugin's own tests (not needed at run time).",
        ("kdcore.testing.source_request",),
    ),
    (
        "Outputs",
        "The modules behind `kd report`, the model card and the experiment trackers.",
        (
            "kdcore.reports.build_report",
            "kdcore.runs.model_card.render_model_card",
            "kdcore.runs.model_card.refresh_model_card",
            "kdcore.runs.trackers.Tracking",
            "kdcore.runs.dry_run.dry_run",
        ),
    ),
)
#: What a name that is neither a class nor a function is, in place of its type's docstring.
_NOTES = {
    "kdcore.hookimpl": "pluggy's marker for kdcore's hooks: decorate a plugin's ``kd_register_*`` functions "
    "with it (see [Writing a plugin](plugins.md))."
}
_SPHINX_ROLE = re.compile(r":(?:class|func|meth|attr|mod|data|exc|obj):`(~?)([^`]+)`")


class _Annotation:
    """An annotation kept as written (``from __future__ import annotations``), shown without quotes."""

    def __init__(self, text: Any) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text if isinstance(self.text, str) else getattr(self.text, "__name__", repr(self.text))


def _signature(obj: Any) -> str:
    import inspect

    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return ""
    empty = inspect.Parameter.empty
    params = [
        p.replace(annotation=_Annotation(p.annotation)) if p.annotation is not empty else p
        for p in sig.parameters.values()
    ]
    ret = sig.return_annotation
    return str(
        sig.replace(parameters=params, return_annotation=_Annotation(ret) if ret is not empty else ret)
    )


def _markdown(doc: str) -> str:
    """A docstring in Markdown: Sphinx roles as code (``~`` keeps the last name), ````x```` as `x`."""

    def role(match: re.Match[str]) -> str:
        target = match.group(2)
        return f"`{target.rsplit('.', 1)[-1] if match.group(1) else target}`"

    return _SPHINX_ROLE.sub(role, doc).replace("``", "`")


def _entry(dotted: str) -> str:
    import importlib
    import inspect
    from dataclasses import is_dataclass

    module, _, name = dotted.rpartition(".")
    obj = getattr(importlib.import_module(module), name)
    lines = [f"### `{dotted}`", ""]
    if inspect.isclass(obj):  # a dataclass by its fields, any other class by its bases
        public = [next(c for c in base.__mro__ if not c.__name__.startswith("_")) for base in obj.__bases__]
        bases = ", ".join(base.__name__ for base in public if base is not object)
        shown = (
            _signature(obj).removesuffix(" -> None") if is_dataclass(obj) else f"({bases})" if bases else ""
        )
        lines += ["```python", f"class {name}{shown}", "```", ""]
    elif inspect.isfunction(obj):
        lines += ["```python", f"{name}{_signature(obj)}", "```", ""]
    doc = inspect.getdoc(obj) if inspect.isclass(obj) or inspect.isfunction(obj) else _NOTES.get(dotted)
    if doc:
        lines += [_markdown(inspect.cleandoc(doc)), ""]
    if inspect.isclass(obj):
        for member, value in vars(obj).items():
            function = getattr(value, "__func__", value)
            if member.startswith("_") or not inspect.isfunction(function) or not function.__doc__:
                continue
            lines += [
                f"#### `{name}.{member}{_signature(function)}`",
                "",
                _markdown(inspect.getdoc(function)),
                "",
            ]
    return "\n".join(lines)


def api_reference() -> str:
    """docs/api.md, generated from the docstrings (``python docs/hooks.py`` writes it)."""
    parts = [
        "# Python API",
        "",
        "The public API is what `kdcore` exports (`kdcore.__all__`): everything a plugin or a script needs.",
        "Importing `kdcore` does not import torch. This page is generated from the docstrings by",
        "`python docs/hooks.py` (a test checks that it is up to date).",
        "",
    ]
    for title, intro, names in API_SECTIONS:
        parts += [f"## {title}", ""]
        if intro:
            parts += [intro, ""]
        parts += [_entry(name) for name in names]
    return "\n".join(parts).rstrip() + "\n"


if __name__ == "__main__":
    (REPO / "docs" / "api.md").write_text(api_reference(), encoding="utf-8")
