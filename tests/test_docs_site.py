"""The documentation site builds with MkDocs in strict mode, with the CLI and API references generated."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import pytest
import yaml
from conftest import REPO

NEEDED = ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")


def load_hooks():
    spec = importlib.util.spec_from_file_location("kd_docs_hooks", REPO / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def nav_pages(nav) -> list[str]:
    if isinstance(nav, list):
        return [page for item in nav for page in nav_pages(item)]
    if isinstance(nav, dict):
        return [page for value in nav.values() for page in nav_pages(value)]
    return [nav]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    missing = [name for name in NEEDED if importlib.util.find_spec(name.split(".")[0]) is None]
    if missing:
        pytest.skip(f"the docs tool chain is not installed ({', '.join(missing)}): pip install -e '.[docs]'")
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(REPO / "mkdocs.yml"), "-d", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stderr[-4000:]}"
    return out


def text_of(path) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", path.read_text()))


def test_site_builds_strict_with_every_written_page(site):
    out = site
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())
    for page in nav_pages(config["nav"]):
        built = out / page.removesuffix(".md") / "index.html" if page != "index.md" else out / "index.html"
        written = (REPO / "docs" / page).is_file() or page in ("index.md", "cli.md")
        assert built.is_file() == written, f"{page}: written {written}, built {built.is_file()}"


def test_every_docs_page_is_in_the_nav():
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())
    listed = set(nav_pages(config["nav"]))
    pages = {p.relative_to(REPO / "docs").as_posix() for p in (REPO / "docs").rglob("*.md")}
    assert pages <= listed, f"add these pages to the nav in mkdocs.yml: {sorted(pages - listed)}"


def test_index_is_the_readme(site):
    out = site
    index = text_of(out / "index.html")
    first = (REPO / "README.md").read_text().splitlines()[2]  # the README's first sentence
    assert first.split("**")[0].strip() in index


def test_cli_reference_is_generated_from_the_typer_app(site):
    import typer.main

    from kdcore.cli import app

    out = site
    page = text_of(out / "cli" / "index.html")
    group = typer.main.get_command(app)
    for name, command in group.commands.items():
        assert f"kd {name}" in page, name
        for param in command.params:
            for opt in param.opts:
                if opt.startswith("--"):
                    assert opt in page, f"kd {name} {opt}"


def test_api_reference_documents_the_public_api(site):
    import kdcore

    out = site
    page = text_of(out / "api" / "index.html")
    for name in kdcore.__all__:
        if name != "__version__":
            assert f"kdcore.{name}" in page, name
    assert ":class:" not in page


def test_readme_links_become_site_links():
    hooks = load_hooks()
    readme = (
        "[Strategies](docs/strategies.md), [gone](docs/nope.md), [bench](bench/x.py), [web](https://x.org)"
    )
    assert hooks.readme_as_index(readme, {"strategies.md"}) == (
        "[Strategies](strategies.md), gone, bench, [web](https://x.org)"
    )


def test_nav_pages_not_written_yet_are_left_out():
    hooks = load_hooks()
    missing: list[str] = []
    nav = [{"Home": "index.md"}, {"Soon": "soon.md"}, {"Ref": [{"CLI": "cli.md"}, {"Later": "later.md"}]}]
    assert hooks._prune(nav, {"index.md", "cli.md"}, missing) == [
        {"Home": "index.md"},
        {"Ref": [{"CLI": "cli.md"}]},
    ]
    assert missing == ["soon.md", "later.md"]


def test_links_to_planned_pages_become_text_until_they_exist():
    hooks = load_hooks()
    text = "See [results](results.md#table) and [plugins](plugins.md)."
    assert hooks.soften_planned_links(text, {"results.md"}) == "See results and [plugins](plugins.md)."
