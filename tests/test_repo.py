"""The repository keeps its promises: the README's commands are what CI runs; every config loads."""

import re

import pytest
from conftest import REPO

from common import load_config
from settings import FinetuneConfig, PretrainConfig, StudyConfig


def readme_commands() -> tuple[str, str]:
    """The README's first two code blocks: set-up (+ the main job), and the tests."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    return blocks[0].strip(), blocks[1].strip()


def test_ci_runs_the_readme_commands():
    setup, tests = readme_commands()
    ci = (REPO / ".ci" / "run").read_text()
    assert setup.splitlines()[0] in ci.splitlines()  # the set-up line, verbatim (not the training run)
    assert tests in ci.splitlines()
    assert "pip install torch==2.13.0 &&" in setup  # torch first: any other spec pulls a multi-GB CUDA build


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "config").glob("*.py")))
def test_every_config_loads(config):
    cls = FinetuneConfig if config.startswith("lora") else StudyConfig if config.startswith("study") else PretrainConfig
    cfg = load_config(cls, [str(REPO / "config" / config)])
    assert cfg.out_dir.startswith("out/")


ENTRY_SCRIPTS = {"train", "finetune", "sample", "e2e_eval", "export", "study",
                 "data.text.prepare", "data.wikitext103.prepare", "data.e2e.prepare"}


def project_imports() -> dict[str, set[str]]:
    """module -> the project modules it imports (at the top or inside functions)."""
    import ast

    skip = {".venv", "tests", "bench", "config", "out"}
    files = [p for p in REPO.rglob("*.py") if not skip & set(p.relative_to(REPO).parts)]
    names = {str(p.relative_to(REPO).with_suffix("")).replace("/", ".").removesuffix(".__init__"): p for p in files}
    graph = {}
    for name, path in names.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                found.add(f"{base}.{node.module}".strip(".") if node.level else node.module)
        graph[name] = {d for d in found if d in names and d != name}
    return graph


def test_imports_flow_one_way():
    """No import cycles, and no module imports an entry script (README: how the pieces depend on each other)."""
    graph = project_imports()
    assert "model" in graph and "decoding.beam" in graph["decoding"]
    for name, deps in graph.items():
        assert not deps & ENTRY_SCRIPTS, f"{name} imports the entry script(s) {deps & ENTRY_SCRIPTS}"

    def reaches(start, goal, seen):
        return any(d == goal or (d not in seen and not seen.add(d) and reaches(d, goal, seen)) for d in graph[start])

    cycles = [name for name in graph if reaches(name, name, set())]
    assert not cycles, f"import cycles through {cycles}"
