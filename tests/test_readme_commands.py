"""README's install and test commands are exactly what CI runs, so a newcomer's commands cannot drift from CI's."""

from __future__ import annotations

import re

from conftest import REPO

README = REPO / "README.md"
CI = REPO / ".ci" / "run"


def readme_block(heading: str) -> list[str]:
    """The non-empty lines of the first code block under ``## <heading>``."""
    match = re.search(
        rf"^## {heading}\n.*?```bash\n(.*?)```", README.read_text(encoding="utf-8"), re.S | re.M
    )
    assert match, f"README.md has no ```bash block under '## {heading}'"
    return [line for line in match[1].splitlines() if line.strip()]


def test_ci_runs_readme_install_and_test_lines_verbatim_and_in_order():
    ci_lines = CI.read_text(encoding="utf-8").splitlines()
    expected = readme_block("Install") + readme_block("Test")
    positions = []
    for line in expected:
        assert line in ci_lines, f".ci/run does not run README's line verbatim: {line!r}"
        positions.append(ci_lines.index(line))
    assert positions == sorted(positions), "README's commands run in another order in .ci/run"


def test_readme_install_brings_every_package_the_tests_import():
    """Each plugin whose tests README's test command collects is installed by README's install lines."""
    install = " ".join(readme_block("Install"))
    for tests in sorted((REPO / "plugins").glob("kd-plugin-*/tests")):
        assert f"-e plugins/{tests.parent.name}" in install, (
            f"README's install never installs {tests.parent.name}"
        )
