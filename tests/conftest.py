"""Fixtures shared by the test files: paths, tiny models and data, running the CLIs."""

import os
import subprocess
import sys
from pathlib import Path

import torch

# Without a GPU the Triton kernels run in Triton's interpreter, which must be chosen before
# anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"  # read-only data beside the repo (absent in a user's fresh clone)


def shared_path(*parts) -> Path:
    """A file under ../shared, or a skip saying it is missing."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not found: this test needs the shared data beside the repo (../shared)")
    return path


def load_script(relative: str):
    """A command under data/ or bench/ (not a package) as a module, for tests that call its functions."""
    import importlib.util

    path = REPO / relative
    spec = importlib.util.spec_from_file_location(path.stem + "_" + path.parent.name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_cli(*args, cwd=REPO, env=None, timeout=600) -> subprocess.CompletedProcess:
    """Run `python <args>` in the repo the way a user would; captures output as text."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    """The process failed with exit status 2 and one 'error: ...' line naming the problem, no traceback."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=32)


@pytest.fixture
def tiny_model():
    from model import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=64, **TINY)).eval()


@pytest.fixture
def token_data(tmp_path) -> Path:
    """A data dir with train.bin / val.bin of random GPT-2 token ids (enough for a few steps),
    drawn from a skewed distribution so that there is something to learn."""
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    data.mkdir()
    for split, n in (("train", 40_000), ("val", 4_000)):
        np.minimum(rng.zipf(1.3, n), 50256).astype(np.uint16).tofile(data / f"{split}.bin")
    return data


def tiny_train_args(data: Path, out: Path, **overrides) -> list[str]:
    """train.py arguments for a seconds-long run of a tiny model on `data`."""
    settings = {"data_dir": data, "out_dir": out, "device": "cpu", "batch_size": 4, "max_iters": 6,
                "eval_interval": 3, "eval_iters": 2, "log_interval": 1, "warmup_iters": 2, "lr": 1e-3,
                "progress": False, **TINY, **overrides}
    return [f"--{k}={v}" for k, v in settings.items()]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on one thread: on a busy 2-core machine two threads make them slower, not faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_entry(module, args, monkeypatch, capsys) -> subprocess.CompletedProcess:
    """An entry point's main under cli.run_main, in this process, as its command line runs it:
    the exit status and what it printed."""
    from gpt2study.cli import run_main

    monkeypatch.setattr(sys, "argv", [f"{module.__name__}.py", *map(str, args)])
    capsys.readouterr()
    try:
        run_main(module.main)
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return subprocess.CompletedProcess(module.__name__, code, out.out, out.err)


def write_prepared_e2e(root: Path, pairs, copies: int) -> Path:
    """A prepared E2E folder (data/e2e/prepare.py's format) of `pairs` (mr, ref), `copies` times each for
    train and dev, and one test MR per pair."""
    import json

    from gpt2study.e2e_data import tokenize_example

    lines = []
    for mr, ref in pairs * copies:
        prompt, target = tokenize_example(mr, ref)
        lines.append(json.dumps({"mr": mr, "ref": ref, "prompt": prompt, "target": target}))
    for split in ("train", "dev"):
        (root / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    test = [json.dumps({"mr": mr, "refs": [ref], "prompt": tokenize_example(mr, ref)[0]}) for mr, ref in pairs]
    (root / "test.jsonl").write_text("\n".join(test) + "\n")
    return root
