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
