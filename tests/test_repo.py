"""The repository keeps its promises: the README's commands are what CI runs; every config loads."""

import re

import pytest
from conftest import REPO

from gpt2study.cli import load_config
from gpt2study.settings import FinetuneConfig, PretrainConfig, StudyConfig


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
                 "data.text.prepare", "data.wikitext103.prepare", "data.wikitext2.prepare", "data.e2e.prepare"}


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
                module = f"{base}.{node.module or ''}".strip(".") if node.level else node.module
                if node.module:  # `from . import name` imports the package's names, not the package's __init__ anew
                    found.add(module)
                found |= {f"{module}.{a.name}" for a in node.names}  # `from package import module`
        graph[name] = {d for d in found if d in names and d != name}
    return graph


def test_imports_flow_one_way():
    """No import cycles, and no module imports an entry script (README: how the pieces depend on each other)."""
    graph = project_imports()
    assert "model" in graph and "gpt2study.decoding.beam" in graph["gpt2study.decoding"]
    for name, deps in graph.items():
        assert not deps & ENTRY_SCRIPTS, f"{name} imports the entry script(s) {deps & ENTRY_SCRIPTS}"

    def reaches(start, goal, seen):
        return any(d == goal or (d not in seen and not seen.add(d) and reaches(d, goal, seen)) for d in graph[start])

    cycles = [name for name in graph if reaches(name, name, set())]
    assert not cycles, f"import cycles through {cycles}"


def layer(module: str) -> int:
    """Where a module stands: the commands on top, the library below them, then lora.py, model.py, kernels/."""
    if module in ENTRY_SCRIPTS:
        return 3
    if module.startswith("gpt2study"):
        return 2
    return {"lora": 1, "model": 0.5}.get(module, 0)  # kernels/


def test_imports_run_down_the_layers():
    """Commands import the library, the library imports lora.py and model.py, those import kernels/ and
    nothing above them: model.py and lora.py read on their own, and no arrow runs back up."""
    for name, deps in project_imports().items():
        up = {d for d in deps if layer(d) > layer(name)}
        assert not up, f"{name} imports {up}, which stand above it"


def test_no_sys_path_edits():
    """The library is found through the editable install (requirements.txt), not by editing sys.path."""
    skip = {".venv", "tests", "out"}
    edits = [str(p.relative_to(REPO)) for p in REPO.rglob("*.py")
             if not skip & set(p.relative_to(REPO).parts) and "sys.path" in p.read_text()]
    assert not edits


def test_a_hidden_hugging_face_kernels_package_is_named():
    """transformers >= 5.25 imports Hugging Face's `kernels` package, which our kernels/ folder hides when Python
    runs from this repository: what it asks for gets a message saying so, not a bare 'cannot import name'."""
    with pytest.raises(ImportError, match=r"hides Hugging Face's `kernels` package.*transformers"):
        from kernels import CUDAProperties  # noqa: F401
    with pytest.raises(ImportError, match="another folder"):
        from kernels import kernelize  # noqa: F401
    import kernels

    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        kernels.nothing_here  # noqa: B018
