"""The package's layout as a contributor reads it: every module is listed, with one line, in the
README's Layout section, and the package imports only downward (nothing imports the package root)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mla_convert"


def _layout_section() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    return readme.split("## Layout", 1)[1].split("\n## ", 1)[0]


def test_every_module_and_subpackage_is_listed_in_the_readme_layout():
    section = _layout_section()
    listed = set(re.findall(r"^\s*([\w]+(?:\.py|/))\s", section, flags=re.MULTILINE))
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if relative.name != "__init__.py" or relative.parent == Path("."):
            if relative.name not in listed:
                missing.append(str(relative))
        for folder in relative.parents[:-1]:
            if f"{folder.name}/" not in listed:
                missing.append(f"{folder}/")
    assert not sorted(set(missing)), f"README Layout does not list: {sorted(set(missing))}"


def test_no_module_imports_the_package_root():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "__main__.py":
            continue
        depth = len(path.relative_to(PACKAGE).parts)  # 1: a top-level module
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == depth and not node.module:
                upward.append(f"{path.relative_to(ROOT)}:{node.lineno}")
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == "mla_convert":
                upward.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not upward, f"these import from the package root (import from the module instead): {upward}"
