"""The code's shape: imports run one way, evaluation needs no DeepSpeed, the style holds (ruff, with the project's
configuration in pyproject.toml), and every link in the repository's markdown leads somewhere."""

import ast
import re
import subprocess
import sys

import pytest
from conftest import ROOT

MODULES = {path.stem: path for path in ROOT.glob("*.py")}


def local_imports(path) -> set[str]:
    """The repository's modules that a file imports, at its top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & set(MODULES)


def test_imports_run_one_way():
    """No module imports one that imports it back, directly or through others (a delayed import counts too)."""
    graph = {name: local_imports(path) - {name} for name, path in MODULES.items()}

    def reaches(start, goal, seen=()):
        return any(n == goal or (n not in seen and reaches(n, goal, (*seen, n))) for n in graph[start])
    cycles = sorted(name for name in graph if reaches(name, name))
    assert not cycles, f"import cycles through {cycles}"
    assert graph["jasper"] == {"resim_counted"}  # the method stands on its own
    assert graph["commands"] == set()


def test_evaluation_and_the_teachers_need_no_deepspeed():
    for module in ("evaluate", "teachers", "train_minimal"):
        done = subprocess.run([sys.executable, "-c", f"import sys, {module}; print('deepspeed' in sys.modules)"],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.stdout.strip().splitlines()[-1] == "False", module + done.stderr[-2000:]


def test_train_minimal_is_short_and_plain():
    source = MODULES["train_minimal"].read_text()
    assert len(source.splitlines()) <= 160 and "deepspeed" not in local_imports(MODULES["train_minimal"])
    assert not re.search(r"^\s*(import|from) deepspeed", source, re.M)


def test_ruff_passes_with_the_projects_configuration():
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


MARKDOWN = sorted(p for p in ROOT.rglob("*.md") if ".git" not in p.parts and "runs" not in p.parts)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchors(path) -> set[str]:
    """GitHub's anchors for a markdown file's headings: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+\s+(.+?)\s*$", path.read_text(), re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("path", MARKDOWN, ids=[str(p.relative_to(ROOT)) for p in MARKDOWN])
def test_every_link_in_the_markdown_leads_somewhere(path):
    """Each relative link names a file of the repository, and each #anchor a heading of the file it points to (README
    sections that were renamed or never existed are the usual dead ends)."""
    for target in LINK.findall(path.read_text()):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        assert linked.exists(), f"{path.name}: {target} names no file"
        if anchor and linked.suffix == ".md":
            assert anchor in anchors(linked), f"{path.name}: {target} names no heading of {linked.name}"
