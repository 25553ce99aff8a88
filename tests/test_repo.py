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
