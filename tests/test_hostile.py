"""Hostile inputs and faults, met as a user meets them: bad values, NaNs, corrupt or foreign
checkpoints, torn logs, signals, a full disk, kill -9 during checkpoint writes, a run moved to
another number of processes. Each ends in one clear line (exit status 2, no traceback), or in a
run that goes on exactly, and never costs the last good checkpoint."""

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    REPO,
    TINY,
    assert_one_line_error,
    run_cli,
    run_entry,
    shared_path,
    tiny_train_args,
    write_prepared_e2e,
)
from safetensors.torch import load_file, save_file

import finetune
import train
from gpt2study.checkpoints import find_checkpoint, load_train_state
from gpt2study.folder_lock import LOCK_FILE, STUDY_LOCK_FILE
from gpt2study.training import EpochSampler
from model import GPT, GPTConfig

ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # tiny models: threads only cost, the more so on a busy machine

pytestmark = pytest.mark.usefixtures("one_thread")


def strict_json(line: str):
    """json.loads that refuses NaN and Infinity, which are not JSON."""
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(line, parse_constant=refuse)


def records(out, split="train"):
    lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(strict_json, lines) if r["split"] == split]


def losses(out, split="train"):
    return [(r["step"], r["loss"]) for r in records(out, split)]


def snapshot(folder: Path) -> dict:
    """Every file under `folder` and its bytes: to show that nothing was written or lost. (Not the
    lock file, which names whichever run holds the folder now.)"""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in (LOCK_FILE, STUDY_LOCK_FILE)}


class Crash(Exception):
    pass


def crash_at(monkeypatch, step: int):
    """Make the run die (as if killed) when it begins `step`."""
    original = EpochSampler.next_batch

    def next_batch(self):
        if self.offset + self.epoch * self.n >= (step - 1) * self.global_batch:
            raise Crash
        return original(self)

    monkeypatch.setattr(EpochSampler, "next_batch", next_batch)
    return lambda: monkeypatch.setattr(EpochSampler, "next_batch", original)


PAIRS = [("name[The Eagle], eatType[coffee shop]", "The Eagle is a coffee shop."),
         ("name[Blue Spice], area[riverside]", "Blue Spice is in the riverside area.")]


@pytest.fixture(scope="module")
def lora_setup(tmp_path_factory):
    """A tiny base model file and a prepared E2E folder of a few pairs."""
    root = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    GPT(GPTConfig(**{**TINY, "block_size": 64})).save(root / "base.safetensors")
    return write_prepared_e2e(root, PAIRS, 8)


def finetune_args(setup, out, **overrides):
    settings = {"init_from": setup / "base.safetensors", "data_dir": setup, "out_dir": out, "device": "cpu",
                "batch_size": 4, "max_iters": 2, "eval_interval": 2, "eval_iters": 1, "log_interval": 1,
                "max_seq_len": 64, "lora_r": 2, "progress": False, **overrides}
    return [f"--{k}={v}" for k, v in settings.items()]


# ----------------------------------------------------------------------------- 2: bad values


# (key, value, what the line must say besides the value): the key and what is allowed
BAD_VALUES = [("batch_size", "-1", "'batch_size'", "at least 1"), ("batch_size", "0", "'batch_size'", "at least 1"),
              ("grad_accum", "0", "'grad_accum'", "at least 1"), ("eval_iters", "-1", "'eval_iters'", "at least 0"),
              ("max_iters", "-5", "'max_iters'", "at least 0"), ("lr", "-1", "'lr'", "above 0"),
              ("dropout", "2.0", "'dropout'", "below 1"),
              ("decay", "step", "'decay'", "choose from 'cosine', 'linear', 'constant'"),
              ("epochs", "0", "'epochs'", "above 0"), ("min_lr", "1.0", "'min_lr'", "at most lr")]
FINETUNE_BAD = [("lora_r", "0", "'lora_r'", "positive"), ("lora_dropout", "1.5", "'lora_dropout'", "below 1"),
                ("lora_alpha", "0", "'lora_alpha'", "above 0"),
                ("lora_targets", "q,x", "'lora_targets' has 'x'", "q, k, v"),
                ("max_seq_len", "1", "'max_seq_len'", "at least 2"),
                ("train_subset", "-3", "'train_subset'", "at least 0")]


def test_bad_values_are_one_line_and_write_nothing(token_data, lora_setup, tmp_path, monkeypatch, capsys):
    """Every bad value of the issue, for both entry points: exit status 2, one line naming the
    key, the value and what is allowed, and no out_dir made."""
    out = tmp_path / "never"
    cases = [(train, tiny_train_args(token_data, out), case) for case in BAD_VALUES]
    cases += [(finetune, finetune_args(lora_setup, out), case) for case in BAD_VALUES + FINETUNE_BAD]
    for module, args, (key, value, *needles) in cases:
        r = run_entry(module, [*args, f"--{key}={value}"], monkeypatch, capsys)
        assert_one_line_error(r, value.split(",")[-1], *needles)
        assert not out.exists()
    # and as a user runs them, in a process of their own: the value that used to hang, one that crashed late
    assert_one_line_error(run_cli("train.py", *tiny_train_args(token_data, out, batch_size=-1), env=ONE_THREAD),
                          "'batch_size' is -1")
    assert_one_line_error(run_cli("finetune.py", *finetune_args(lora_setup, out, decay="step"), env=ONE_THREAD),
                          "'decay' is 'step'")
    assert not out.exists()


def test_help_lists_every_key(monkeypatch, capsys):
    from dataclasses import fields

    from gpt2study.settings import FinetuneConfig, PretrainConfig

    for module, cls in ((train, PretrainConfig), (finetune, FinetuneConfig)):
        r = run_entry(module, ["--help"], monkeypatch, capsys)
        assert r.returncode == 0 and not r.stderr
        lines = r.stdout.splitlines()
        for f in fields(cls):
            line = next(line for line in lines if line.strip().startswith(f"--{f.name}="))
            assert repr(f.default) in line and f.metadata["help"][:30] in line, line


# ----------------------------------------------------------------------------- 1: NaN guard


def test_exploding_lr_keeps_a_good_checkpoint(token_data, tmp_path, monkeypatch, capsys):
    """--lr=1e6 diverges in a few steps. The run stops naming the checkpoint really kept, and that
    checkpoint is good: finite weights, a finite validation loss, and a run resumed from it at a
    sane lr trains on with finite losses. A good run resumed at lr 1e6 with a checkpoint every
    step keeps a good one too."""
    out = tmp_path / "run"
    r = run_entry(train, tiny_train_args(token_data, out, lr=1e6, eval_interval=1, max_iters=20), monkeypatch, capsys)
    line = assert_one_line_error(r, "stopped, the last good checkpoint")
    kept = load_train_state(find_checkpoint(out))["step"]
    assert f"(step {kept}) is kept" in line and 1 <= kept < 20
    weights = load_file(find_checkpoint(out) / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert all(v["loss"] is not None for v in records(out, "val"))  # every evaluation kept was finite
    r = run_entry(train, ["--init_from=resume", f"--out_dir={out}", "--lr=1e-4", "--min_lr=1e-5",
                          f"--max_iters={kept + 3}"], monkeypatch, capsys)
    assert r.returncode == 0, r.stderr
    assert [s for s, loss in losses(out)][-3:] == [kept + 1, kept + 2, kept + 3]
    assert all(loss is not None for _, loss in losses(out))

    good = tmp_path / "good"
    assert run_entry(train, tiny_train_args(token_data, good, max_iters=10), monkeypatch, capsys).returncode == 0
    r = run_entry(train, ["--init_from=resume", f"--out_dir={good}", "--lr=1e6", "--ckpt_interval=1",
                          "--eval_interval=1", "--max_iters=30"], monkeypatch, capsys)
    line = assert_one_line_error(r, "the last good checkpoint")
    kept = load_train_state(find_checkpoint(good))["step"]
    assert kept >= 10 and f"(step {kept}) is kept" in line
    weights = load_file(find_checkpoint(good) / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


class _InfGrad(torch.autograd.Function):
    """The identity, whose gradient overflows: a finite loss with infinite gradients."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_infinite_gradients(token_data, tmp_path, monkeypatch, capsys, dtype):
    """Infinite gradients at step 2 stop a float32 run (nothing saved from them); under float16
    the gradient scaler skips that step by design, and the run goes on."""
    original = train.GPT.forward

    def forward(self, idx, targets=None, label_smoothing=0.0):
        logits, loss = original(self, idx, targets, label_smoothing)
        if targets is not None and self.training:
            forward.calls += 1
            if forward.calls == 2:
                loss = _InfGrad.apply(loss)
        return logits, loss

    forward.calls = 0
    monkeypatch.setattr(train.GPT, "forward", forward)
    out = tmp_path / dtype
    r = run_entry(train, tiny_train_args(token_data, out, dtype=dtype, max_iters=4, log_interval=2,
                                         eval_interval=4), monkeypatch, capsys)
    if dtype == "float32":
        assert_one_line_error(r, "gradient norm", "at step 2", "no checkpoint was written")
        assert find_checkpoint(out) is None
    else:
        assert r.returncode == 0, r.stderr
        state = load_train_state(find_checkpoint(out))
        assert state["step"] == 4 and state["scaler"]["scale"] == 2.0 ** 16 / 2  # one skipped step
        assert [s for s, _ in losses(out)] == [2, 4]


# ----------------------------------------------------------------------------- 3: process counts


def test_resume_on_two_processes_continues_exactly(token_data, tmp_path, monkeypatch):
    """A one-process run (2 micro-batches a step) killed after its step-2 checkpoint, resumed under
    torchrun with 2 processes of one micro-batch each (the same global batch): the losses and
    weights of the run that was never interrupted."""
    settings = {"max_iters": 4, "ckpt_interval": 2, "eval_interval": 2, "dropout": 0.1}  # the same masks too
    whole, moved = tmp_path / "whole", tmp_path / "moved"
    monkeypatch.setattr(sys, "argv", ["train.py", *tiny_train_args(token_data, whole, grad_accum=2, **settings)])
    train.main()
    undo = crash_at(monkeypatch, 3)
    monkeypatch.setattr(sys, "argv", ["train.py", *tiny_train_args(token_data, moved, grad_accum=2, **settings)])
    with pytest.raises(Crash):
        train.main()
    undo()
    r = run_cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
                f"--out_dir={moved}", "--init_from=resume", "--grad_accum=1", env=ONE_THREAD)
    assert r.returncode == 0, r.stderr + r.stdout
    for split in ("train", "val"):
        assert [s for s, _ in losses(moved, split)] == [s for s, _ in losses(whole, split)]
        for (_, a), (_, b) in zip(losses(whole, split), losses(moved, split)):
            assert a == pytest.approx(b, abs=1e-5)
    wa, wb = (load_file(d / "checkpoint" / "model.safetensors") for d in (whole, moved))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_resume_with_another_global_batch_is_refused(token_data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert run_entry(train, tiny_train_args(token_data, out, grad_accum=2, max_iters=2), monkeypatch,
                     capsys).returncode == 0
    before = snapshot(out)
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun --nproc_per_node=2 starts it
    r = run_entry(train, [f"--out_dir={out}", "--init_from=resume", "--max_iters=4"], monkeypatch, capsys)
    assert_one_line_error(r, "global batch of 8", "batch_size 4 x grad_accum 2 x 1", "--batch_size=4 --grad_accum=1")
    assert snapshot(out) == before


# ----------------------------------------------------------------------------- 4: corrupt or foreign


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """A finished 4-step run: checkpoint/ at step 4, checkpoint.old/ at step 2, and its data."""
    import numpy as np

    root = tmp_path_factory.mktemp("two")
    data = root / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 20_000), ("val", 2_000)):
        np.minimum(rng.zipf(1.3, n), 50256).astype(np.uint16).tofile(data / f"{split}.bin")
    argv = sys.argv
    sys.argv = ["train.py", *tiny_train_args(data, root / "run", max_iters=4, ckpt_interval=2, dropout=0.1)]
    try:
        train.main()
    finally:
        sys.argv = argv
    assert [load_train_state(root / "run" / d)["step"] for d in ("checkpoint", "checkpoint.old")] == [4, 2]
    return root / "run"


def copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


def test_truncated_checkpoint_falls_back_to_the_one_before(two_checkpoints, tmp_path, monkeypatch, capsys):
    """A torn checkpoint/train_state.pt: resume says so, in one line, continues from
    checkpoint.old (step 2) exactly as the run went, and sets the torn one aside."""
    run = copy_run(two_checkpoints, tmp_path / "run")
    state = run / "checkpoint" / "train_state.pt"
    truncate(state, state.stat().st_size - 100)
    torn = state.read_bytes()
    r = run_entry(train, [f"--out_dir={run}", "--init_from=resume"], monkeypatch, capsys)
    assert r.returncode == 0, r.stderr
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "checkpoint/train_state.pt is truncated" in warnings[0]
    assert "checkpoint.old (step 2)" in warnings[0]
    assert losses(run) == losses(two_checkpoints) and losses(run, "val") == losses(two_checkpoints, "val")
    assert load_train_state(run / "checkpoint")["step"] == 4
    assert (run / "checkpoint.bad" / "train_state.pt").read_bytes() == torn  # set aside, not deleted


def write_foreign_model(path: Path):
    GPT(GPTConfig(**{**TINY, "n_embd": 64})).save(path)


def write_malicious_pickle(path: Path):
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {path.parent / 'PWNED'}",))

    import pickle

    path.write_bytes(pickle.dumps({"step": 4, "x": Payload()}))


def truncate(path: Path, size: int):
    path.write_bytes(path.read_bytes()[:size])


CORRUPTIONS = {
    "truncated weights": (lambda c: truncate(c / "model.safetensors", 5000), "model.safetensors is truncated"),
    "truncated state": (lambda c: truncate(c / "train_state.pt", 3000), "train_state.pt is truncated"),
    "weights of another shape": (lambda c: write_foreign_model(c / "model.safetensors"),
                                 "model.safetensors belongs to another model: n_embd=64 (config.json: 32)"),
    "malicious pickle": (lambda c: write_malicious_pickle(c / "train_state.pt"), "train_state.pt is truncated, corr"),
    "torn config.json": (lambda c: (c / "config.json").write_text('{"model": {'), "config.json is truncated"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_broken_checkpoint_without_fallback_is_one_line(two_checkpoints, tmp_path, monkeypatch, capsys, case):
    run = copy_run(two_checkpoints, tmp_path / "run")
    shutil.rmtree(run / "checkpoint.old")
    damage, needle = CORRUPTIONS[case]
    damage(run / "checkpoint")
    before = snapshot(run)
    r = run_entry(train, [f"--out_dir={run}", "--init_from=resume", "--max_iters=6"], monkeypatch, capsys)
    assert_one_line_error(r, "no intact checkpoint", str(run / "checkpoint"), needle)
    assert snapshot(run) == before and not (run / "PWNED").exists()
    # a new run there is refused too: the broken checkpoint is the user's to look at
    r = run_entry(train, tiny_train_args(two_checkpoints.parent / "data", run), monkeypatch, capsys)
    assert_one_line_error(r, "already holds a run")
    assert snapshot(run) == before


def test_foreign_weights_fall_back_too(two_checkpoints, tmp_path, monkeypatch, capsys):
    run = copy_run(two_checkpoints, tmp_path / "run")
    write_foreign_model(run / "checkpoint" / "model.safetensors")
    r = run_entry(train, [f"--out_dir={run}", "--init_from=resume", "--max_iters=5"], monkeypatch, capsys)
    assert r.returncode == 0, r.stderr
    assert "belongs to another model" in r.stderr and "checkpoint.old (step 2)" in r.stderr
    assert [s for s, _ in losses(run)] == [1, 2, 3, 4, 5]


def test_torn_metrics_line_never_blocks_resume(two_checkpoints, tmp_path, monkeypatch, capsys):
    run = copy_run(two_checkpoints, tmp_path / "run")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "split": "tr')  # a kill in the middle of a record
    r = run_entry(train, [f"--out_dir={run}", "--init_from=resume", "--max_iters=6"], monkeypatch, capsys)
    assert r.returncode == 0, r.stderr
    assert "dropped 1 unreadable line" in r.stderr
    assert [s for s, _ in losses(run)] == [1, 2, 3, 4, 5, 6]  # every line valid JSON again


def test_wrong_entry_point_for_the_run(two_checkpoints, lora_setup, tmp_path, monkeypatch, capsys):
    lora = tmp_path / "lora"
    assert run_entry(finetune, finetune_args(lora_setup, lora), monkeypatch, capsys).returncode == 0
    before = snapshot(lora)
    r = run_entry(train, [f"--out_dir={lora}", "--init_from=resume"], monkeypatch, capsys)
    assert_one_line_error(r, "holds a LoRA fine-tuning run", "python finetune.py")
    pre = copy_run(two_checkpoints, tmp_path / "pre")
    r = run_entry(finetune, [f"--out_dir={pre}", "--init_from=resume", f"--data_dir={lora_setup}"], monkeypatch,
                  capsys)
    assert_one_line_error(r, "holds a pretraining run", "python train.py")
    assert snapshot(lora) == before and snapshot(pre) == snapshot(two_checkpoints)


# ----------------------------------------------------------------------------- 5: runs never mix


def test_new_run_sets_a_dead_runs_logs_aside(token_data, tmp_path, monkeypatch, capsys):
    """A run that died before its first checkpoint left metrics.jsonl and tb/: a new run in that
    out_dir starts its own, and the dead run's are kept aside, untouched."""
    out = tmp_path / "run"
    undo = crash_at(monkeypatch, 3)
    with pytest.raises(Crash):
        run_entry(train, tiny_train_args(token_data, out, max_iters=6), monkeypatch, capsys)
    undo()
    assert find_checkpoint(out) is None and (out / "metrics.jsonl").exists()
    dead = snapshot(out)
    r = run_entry(train, tiny_train_args(token_data, out, max_iters=3), monkeypatch, capsys)
    assert r.returncode == 0, r.stderr
    assert "moved them to" in r.stdout
    assert {f"old_logs.1/{k}": v for k, v in dead.items()} == \
        {k: v for k, v in snapshot(out).items() if k.startswith("old_logs.1/")}
    assert [s for s, _ in losses(out)] == [1, 2, 3]
    assert len(list((out / "tb").iterdir())) == 1


# ----------------------------------------------------------------------------- 6: signals and disks


def wait_for(predicate, timeout=120.0, poll=0.02):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(poll)


def train_records_so_far(out: Path) -> int:
    try:
        return sum('"split": "train"' in line for line in (out / "metrics.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


def test_sigterm_finishes_the_step_saves_and_exits_143(token_data, tmp_path):
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "train.py", *tiny_train_args(token_data, out, max_iters=10_000,
                                                                       eval_interval=10_000)],
                         cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, **ONE_THREAD})
    wait_for(lambda: train_records_so_far(out) >= 2)
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 143, stderr
    assert "Traceback" not in stderr and "stopped by SIGTERM" in stdout
    step = load_train_state(find_checkpoint(out))["step"]
    assert step == records(out)[-1]["step"] >= 2 and f"at step {step} of 10000" in stdout


def test_ctrl_c_saves_and_exits_130(token_data, tmp_path, monkeypatch, capsys):
    """Ctrl-C during step 3: the step finishes, is saved, and the exit status stops a `&&` chain.
    Under torchrun a worker gets the terminal's SIGINT and then torchrun's own: that repeat, at
    once, is the same request, not a second Ctrl-C."""
    original = EpochSampler.next_batch

    def next_batch(self):
        if self.offset == 2 * self.global_batch:  # during step 3
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return original(self)

    monkeypatch.setattr(EpochSampler, "next_batch", next_batch)
    out = tmp_path / "run"
    r = run_entry(train, tiny_train_args(token_data, out, max_iters=6), monkeypatch, capsys)
    assert r.returncode == 130 and "Traceback" not in r.stderr
    assert load_train_state(find_checkpoint(out))["step"] == 3 and "stopped by SIGINT at step 3" in r.stdout


@pytest.mark.parametrize("how", ["write fails", "write lost"])
def test_full_disk_while_saving(token_data, tmp_path, monkeypatch, capsys, how):
    """The disk fills up during the second checkpoint: one line, the first checkpoint intact, no
    temporary folder. Either the write fails (OSError ENOSPC), or, as safetensors can do, it
    loses the tail of the file without a word."""
    from gpt2study import checkpoints

    out = tmp_path / "run"
    first = {}  # the first checkpoint as it was before the second was tried
    if how == "write fails":
        real = checkpoints.torch.save

        def save(obj, f):
            if (out / "checkpoint").exists() and not first:
                first.update(snapshot(out / "checkpoint"))
                f.write(b"partial")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            real(obj, f)

        monkeypatch.setattr(checkpoints.torch, "save", save)
    else:
        real = GPT.save

        def save(self, path):
            real(self, path)
            if (out / "checkpoint").exists() and not first:
                first.update(snapshot(out / "checkpoint"))
                Path(path).write_bytes(Path(path).read_bytes()[:4096])

        monkeypatch.setattr(GPT, "save", save)
    r = run_entry(train, tiny_train_args(token_data, out, max_iters=4, ckpt_interval=2), monkeypatch, capsys)
    needle = "No space left on device" if how == "write fails" else "model.safetensors is truncated"
    assert_one_line_error(r, "could not write a checkpoint", needle, "(step 2) is intact")
    assert snapshot(out / "checkpoint") == first and not (out / "checkpoint.tmp").exists()


# ----------------------------------------------------------------------------- kill -9


def checkpoint_step(out: Path) -> int:
    try:
        return json.loads((out / "checkpoint" / "config.json").read_text())["step"]
    except (OSError, ValueError):
        return 0


def test_kill_9_during_checkpoint_writes_then_resume(tmp_path, monkeypatch):
    """SIGKILL at a random moment of a checkpoint write (a checkpoint every step), four times:
    every restart loads, and the run ends with the losses and the byte-identical weights of a
    run never interrupted. (A vocabulary of 256 keeps the steps short against the writes.)"""
    import numpy as np

    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 8_000), ("val", 1_000)):
        rng.integers(0, 256, n, dtype=np.uint16).tofile(data / f"{split}.bin")
    settings = {"max_iters": 16, "eval_interval": 4, "dropout": 0.1, "vocab_size": 256}
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    monkeypatch.setattr(sys, "argv", ["train.py", *tiny_train_args(data, whole, **settings)])
    train.main()
    rng = random.Random(12)
    kills = 0
    for attempt in range(5):
        resume = {"init_from": "resume"} if attempt else {}
        p = subprocess.Popen([sys.executable, "train.py", *tiny_train_args(data, killed, ckpt_interval=1, **settings,
                                                                           **resume)],
                             cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, **ONE_THREAD})
        if attempt < 4:
            # once this process has saved a checkpoint, kill it while it writes a later one
            start = checkpoint_step(killed)
            wait_for(lambda p=p, start=start: checkpoint_step(killed) > start or p.poll() is not None)
            wait_for(lambda p=p: (killed / "checkpoint.tmp").exists() or p.poll() is not None, poll=0.001)
            time.sleep(rng.uniform(0.0, 0.02))
            if p.poll() is None:
                p.kill()
                kills += 1
        stderr = p.communicate(timeout=120)[1]
        # every restart loaded, and no checkpoint it found was ever torn
        assert not [line for line in stderr.splitlines() if line.startswith("error") or "Traceback" in line
                    or ("warning" in line and "checkpoint" in line)], stderr
    assert p.returncode == 0 and kills >= 3
    assert losses(killed) == losses(whole) and losses(killed, "val") == losses(whole, "val")
    assert (killed / "checkpoint" / "model.safetensors").read_bytes() == \
        (whole / "checkpoint" / "model.safetensors").read_bytes()


# ----------------------------------------------------------------------------- sample.py, e2e_eval.py, data (items 7-9)


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory):
    """A finished tiny pretraining run to sample from."""
    tmp = tmp_path_factory.mktemp("sample_run")
    rng = np.random.default_rng(0)
    data = tmp / "data"
    data.mkdir()
    for split, n in (("train", 20_000), ("val", 2_000)):
        rng.integers(0, 50256, n).astype(np.uint16).tofile(data / f"{split}.bin")
    out = tmp / "run"
    result = run_cli("train.py", *tiny_train_args(data, out, max_iters=2, eval_interval=2))
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.parametrize("args", [("--top_k", "0"), ("--top_p", "1.5"), ("--top_p", "0"), ("--num_samples", "0"),
                                  ("--temperature", "-1"), ("--max_new_tokens", "-3")])
def test_sample_refuses_bad_values_in_one_line(args, sample_run, tmp_path):
    key = args[0].lstrip("-")
    result = run_cli("sample.py", "--model", sample_run, "--out", tmp_path / "s.txt", *args)
    assert_one_line_error(result, f"config key '{key}'")
    assert not (tmp_path / "s.txt").exists()


def test_sample_refuses_a_prompt_file_that_is_not_utf8(sample_run, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_bytes("caf\xe9\n".encode("latin-1"))
    assert_one_line_error(run_cli("sample.py", "--model", sample_run, "--prompts", prompts), "not UTF-8", "iconv")


@pytest.mark.parametrize("where", ["run", "checkpoint", "model.safetensors"])
def test_sample_takes_every_model_path_and_writes_beside_the_run(where, sample_run, tmp_path):
    path = {"run": sample_run, "checkpoint": sample_run / "checkpoint",
            "model.safetensors": sample_run / "checkpoint" / "model.safetensors"}[where]
    prompts = tmp_path / "p.txt"
    prompts.write_text("Hello\nThe cat\n")
    samples = sample_run / "samples.txt"
    before = samples.read_text() if samples.exists() else ""
    result = run_cli(REPO / "sample.py", "--model", path, "--prompts", prompts, "--max_new_tokens", "3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    added = samples.read_text()[len(before):]
    assert added.count("Hello") == 1 and added.count("The cat") == 1
    assert not (tmp_path / "out").exists()  # never under the working directory's out/out/...


def test_token_ids_beyond_the_vocabulary_fail_in_one_line(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "val"):
        np.full(5_000, 60_000, dtype=np.uint16).tofile(data / f"{split}.bin")
    result = run_cli("train.py", *tiny_train_args(data, tmp_path / "out"))
    assert_one_line_error(result, "token id 60000", "vocabulary")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("script", ["data/text/prepare.py", "data/e2e/prepare.py"])
def test_prepare_refuses_an_out_dir_that_is_a_file(script, tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    src = shared_path("data", "e2e", "e2e-dataset.zip") if "e2e" in script else REPO / "README.md"
    assert_one_line_error(run_cli(script, "--src", src, "--out_dir", target), "is a file")
    assert target.read_text() == "mine"


def test_a_partial_or_other_decoding_table_never_takes_the_study_tables_name():
    from e2e_eval import variant
    from gpt2study.settings import EvalConfig

    assert variant(EvalConfig(), 630, 630) == ""  # the study's table: scores.md
    assert variant(EvalConfig(max_mrs=3), 3, 630) == "first3"
    assert variant(EvalConfig(method="greedy"), 630, 630) == "method_greedy"
    assert variant(EvalConfig(beam_rule="paper", beam_size=4), 630, 630) == "beam_size_4_beam_rule_paper"
    assert variant(EvalConfig(batch_size=7), 630, 630) == ""  # batching does not change the outputs
    assert variant(EvalConfig(rerank_slots=False), 630, 630) == "rerank_slots_false"
    assert variant(EvalConfig(method="greedy", rerank_slots=False), 630, 630) == "method_greedy"  # beam only
    assert variant(EvalConfig(widen_beam=20), 630, 630) == "widen_beam_20"


# ----------------------------------------------------------------------------- one owner per folder

HOLDER = """
import sys
from gpt2study.folder_lock import hold
with hold(sys.argv[1], "run", sys.argv[2]):
    print("held", flush=True)
    sys.stdin.read()
"""


@pytest.fixture
def hold_elsewhere():
    """Hold a folder from another process (as a second terminal's run would), until the test ends."""
    procs = []

    def start(folder: Path, lock_name: str = LOCK_FILE) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), lock_name], cwd=REPO, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert p.stdout.readline().strip() == "held"
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.communicate(input="", timeout=30)


def test_two_trainings_into_one_out_dir(token_data, tmp_path, monkeypatch, capsys):
    """The first run is writing its logs, before its first checkpoint, when a second starts there:
    the second stops at once naming the first (pid, host, since), and leaves its logs alone; the
    first goes on and saves. Once it has ended, the folder is free again."""
    import socket

    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "train.py", *tiny_train_args(token_data, out, max_iters=10_000,
                                                                           eval_interval=10_000)],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, **ONE_THREAD})
    wait_for(lambda: train_records_so_far(out) >= 2)
    for args in (tiny_train_args(token_data, out), [f"--out_dir={out}", "--init_from=resume"]):
        r = run_entry(train, args, monkeypatch, capsys)
        assert_one_line_error(r, f"{out} is in use by another run", f"pid {first.pid} on {socket.gethostname()}",
                              "since ")
        assert not list(out.glob("old_logs*")) and first.poll() is None
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=120) == 143
    step = load_train_state(find_checkpoint(out))["step"]
    assert [r["step"] for r in records(out)] == list(range(1, step + 1))  # one run's records, whole
    r = run_entry(train, [f"--out_dir={out}", "--init_from=resume", f"--max_iters={step + 1}"], monkeypatch, capsys)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("command", ["finetune", "e2e_eval", "study"])
def test_a_held_folder_refuses_a_second_run_and_touches_nothing(command, lora_setup, hold_elsewhere, tmp_path):
    """Two fine-tunings, two E2E evaluations into one folder, a second study in the same folder:
    the second stops in one line naming the holder, and writes nothing."""
    folder = tmp_path / "held"
    folder.mkdir()
    (folder / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": 5.0}\n')
    holder = hold_elsewhere(folder, STUDY_LOCK_FILE if command == "study" else LOCK_FILE)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    args = {"finetune": ["finetune.py", *finetune_args(lora_setup, folder)],
            "e2e_eval": ["e2e_eval.py", f"--out_dir={folder}", f"--data_dir={lora_setup}", "--device=cpu"],
            "study": ["study.py", "config/study_tiny.py", f"--out_dir={folder}"]}[command]
    r = run_cli(*args, env=ONE_THREAD)
    assert_one_line_error(r, f"{folder} is in use by another {'study' if command == 'study' else 'run'}",
                          f"pid {holder.pid}")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # the lock file's text too


def test_a_studys_own_lock_never_blocks_its_steps(token_data, tmp_path, monkeypatch, capsys):
    """study.py holds its folder while its steps, processes of their own, hold their sub-folders."""
    from gpt2study.folder_lock import hold

    study_dir = tmp_path / "study"
    with hold(study_dir, "study", STUDY_LOCK_FILE):
        r = run_cli("train.py", *tiny_train_args(token_data, study_dir / "pretrain", max_iters=2), env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    assert find_checkpoint(study_dir / "pretrain") is not None


def test_kill_9_then_resume_at_once(token_data, tmp_path, monkeypatch, capsys):
    """A run killed with SIGKILL leaves its lock file (naming the dead process) but no lock: the
    resume started the moment after is not blocked."""
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "train.py", *tiny_train_args(token_data, out, max_iters=10_000,
                                                                       ckpt_interval=2, eval_interval=10_000)],
                         cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         env={**os.environ, **ONE_THREAD})
    wait_for(lambda: checkpoint_step(out) >= 2)
    p.kill()
    p.wait()
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == p.pid  # what a stale lock file would be
    r = run_entry(train, [f"--out_dir={out}", "--init_from=resume", f"--max_iters={checkpoint_step(out) + 1}"],
                  monkeypatch, capsys)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()


def rank_worker(parent: int, rank: int) -> int | None:
    """The pid of the worker of `rank` that torchrun `parent` started, once it is there."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            env = (stat.parent / "environ").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and f"\0RANK={rank}\0".encode() in b"\0" + env:
            return int(stat.parent.name)
    return None


def test_one_of_two_processes_dies(token_data, tmp_path, monkeypatch, capsys):
    """torchrun with 2 processes; rank 1 is killed (-9) after a checkpoint: the run ends with a
    failure, the folder is free at once, and the run resumes on one process from its last
    checkpoint, which is intact."""
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "train.py", *tiny_train_args(token_data, out, max_iters=10_000, ckpt_interval=2,
                                                       eval_interval=10_000)],
                         cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, **ONE_THREAD})
    wait_for(lambda: checkpoint_step(out) >= 2)
    os.kill(rank_worker(p.pid, 1), signal.SIGKILL)
    p.communicate(timeout=120)
    assert p.returncode != 0
    step = checkpoint_step(out)
    r = run_entry(train, [f"--out_dir={out}", "--init_from=resume", "--grad_accum=2", f"--max_iters={step + 2}"],
                  monkeypatch, capsys)
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr
    assert [x["step"] for x in records(out)][-2:] == [step + 1, step + 2]


def test_a_live_runs_logs_are_never_set_aside(tmp_path, hold_elsewhere):
    """RunLog moves an earlier run's logs aside only when no process holds the folder."""
    from gpt2study.settings import PretrainConfig
    from gpt2study.training import RunLog, Runtime
    from model import UserError

    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": 5.0}\n')
    cfg = PretrainConfig(out_dir=str(out), progress=False)
    rt = Runtime(torch.device("cpu"), 0, 0, 1, None, None, dtype="float32", compile=False)
    hold_elsewhere(out)
    with pytest.raises(UserError, match="in use by another run"):
        RunLog(cfg, rt, 0, 10)
    assert (out / "metrics.jsonl").exists() and not (out / "old_logs.1").exists()


def test_out_dir_under_a_file_or_a_lock_that_is_a_folder(token_data, tmp_path, monkeypatch, capsys):
    """Root ignores permission bits, so a folder that cannot be written is made another way: a path
    under a file. And a lock file that someone made a folder. One line each; the file is untouched."""
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    r = run_entry(train, tiny_train_args(token_data, notes / "run"), monkeypatch, capsys)
    assert_one_line_error(r, f"{notes} is a file")
    assert notes.read_text() == "mine"
    out = tmp_path / "run"
    (out / LOCK_FILE).mkdir(parents=True)
    r = run_entry(train, tiny_train_args(token_data, out), monkeypatch, capsys)
    assert_one_line_error(r, f"cannot open the lock file {out / LOCK_FILE}")


# ----------------------------------------------------------------------------- every file checked


def bad_token_file(kind: str, path: Path):
    tokens = np.arange(5_000, dtype=np.uint16)
    if kind == "odd length":  # a copy cut short in the middle of a token
        path.write_bytes(tokens.tobytes()[:-1])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "a folder":
        path.mkdir()
    elif kind == "one block":  # block_size tokens: no target for the last
        tokens[:TINY["block_size"]].tofile(path)
    else:  # an id past GPT-2's 50,257 tokens, which a model padded to 50,304 would take in silence
        tokens[1234] = 50_300
        tokens.tofile(path)


@pytest.mark.parametrize("kind,needle", [("odd length", "9,999 bytes, not a whole number of 2-byte token ids"),
                                         ("empty", "holds 0 tokens, fewer than one block of 32 + 1"),
                                         ("a folder", "is not a file"),
                                         ("one block", "holds 32 tokens, fewer than one block of 32 + 1"),
                                         ("id 50300", "token id 50300 (first at token 1,234)")])
@pytest.mark.parametrize("split", ["train", "val"])
def test_bad_token_files_fail_before_training(kind, needle, split, token_data, tmp_path, monkeypatch, capsys):
    (token_data / f"{split}.bin").unlink()
    bad_token_file(kind, token_data / f"{split}.bin")
    out = tmp_path / "out"
    r = run_entry(train, tiny_train_args(token_data, out, vocab_size=50_304), monkeypatch, capsys)
    assert_one_line_error(r, str(token_data / f"{split}.bin"), needle)
    assert not out.exists()  # the folder made to hold the run is gone again


E2E_DAMAGE = {
    "missing key": (lambda rec: rec.pop("target"), "line 3: 'target' is missing"),
    "id out of range": (lambda rec: rec["prompt"].append(70_000), "line 3: token id 70000 is not a GPT-2 token"),
    "ids as text": (lambda rec: rec.update(prompt=["The"]), "line 3: 'prompt' is not a list of int"),
    "not a record": (lambda rec: [rec.clear(), rec.update(x=1)], "line 3: 'mr' is missing"),
}


@pytest.mark.parametrize("case", [*E2E_DAMAGE, "not UTF-8", "empty"])
def test_damaged_prepared_e2e_is_one_line(case, lora_setup, tmp_path, monkeypatch, capsys):
    data = tmp_path / "e2e"
    shutil.copytree(lora_setup, data)
    lines = (data / "train.jsonl").read_text().splitlines()
    if case == "not UTF-8":
        needle = "line 2: not UTF-8"
        (data / "train.jsonl").write_bytes(lines[0].encode() + b"\n\xff\xfe\n")
    elif case == "empty":
        needle = "holds no records"
        (data / "train.jsonl").write_text("")
    else:
        damage, needle = E2E_DAMAGE[case]
        record = json.loads(lines[2])
        damage(record)
        lines[2] = json.dumps(record)
        (data / "train.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    r = run_entry(finetune, finetune_args(lora_setup, out, data_dir=data), monkeypatch, capsys)
    assert_one_line_error(r, str(data / "train.jsonl"), needle)
    assert not out.exists()


def test_a_config_that_sets_a_key_twice_or_includes_itself(token_data, tmp_path, monkeypatch, capsys):
    twice = tmp_path / "twice.py"
    twice.write_text("lr = 1e-3\nbatch_size = 4\n# later, having forgotten the first\nlr = 3e-4\n")
    r = run_entry(train, [twice, *tiny_train_args(token_data, tmp_path / "out")], monkeypatch, capsys)
    assert_one_line_error(r, f"config file {twice} sets 'lr' twice (lines 1 and 4)")
    (tmp_path / "a.py").write_text("include('b.py')\n")
    (tmp_path / "b.py").write_text("lr = 1e-3\ninclude('a.py')\n")
    r = run_entry(train, [tmp_path / "a.py"], monkeypatch, capsys)
    assert_one_line_error(r, "includes itself: a.py -> b.py -> a.py")
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_from_a_newer_version(two_checkpoints, tmp_path, monkeypatch, capsys):
    """A checkpoint whose config.json says a newer format, and a model file with a setting this
    version does not know: one line saying to update the code, for a resume and for sampling."""
    run = copy_run(two_checkpoints, tmp_path / "run")
    for ckpt in ("checkpoint", "checkpoint.old"):
        info = json.loads((run / ckpt / "config.json").read_text())
        assert info["format"] == 1  # every checkpoint says which format it is
        (run / ckpt / "config.json").write_text(json.dumps({**info, "format": 2}))
    before = snapshot(run)
    r = run_entry(train, [f"--out_dir={run}", "--init_from=resume"], monkeypatch, capsys)
    assert_one_line_error(r, "checkpoint format 2, this version reads format 1", "newer version", "update the code")
    assert snapshot(run) == before
    prompts = tmp_path / "p.txt"
    prompts.write_text("Hello\n")
    assert_one_line_error(run_cli("sample.py", "--model", run, "--prompts", prompts, "--out", tmp_path / "s.txt"),
                          "newer version")

    model = tmp_path / "model.safetensors"
    src = two_checkpoints / "checkpoint" / "model.safetensors"
    arch = json.loads(metadata(src)["gpt_config"])
    save_file(load_file(src), str(model), metadata={"gpt_config": json.dumps({**arch, "rope_theta": 1e4})})
    assert_one_line_error(run_cli("sample.py", "--model", model, "--prompts", prompts, "--out", tmp_path / "s.txt"),
                          "model settings this version does not know (rope_theta)", "newer version")
    assert not (tmp_path / "s.txt").exists()


def metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def test_an_adapter_with_damaged_metadata(lora_setup, tmp_path, monkeypatch, capsys):
    """An adapter whose LoRA config is torn, or has a key this version does not know: one line."""
    from gpt2study.loading import load_adapter_into, load_base
    from model import UserError

    run = tmp_path / "lora"
    assert run_entry(finetune, finetune_args(lora_setup, run), monkeypatch, capsys).returncode == 0
    adapter = run / "checkpoint" / "adapter.safetensors"
    meta = metadata(adapter)
    newer = json.dumps({**json.loads(meta["lora_config"]), "lora_rank_pattern": 1})
    for config, needle in (('{"lora_r": 2, ', "JSONDecodeError"), (newer, "TypeError")):
        odd = tmp_path / "odd.safetensors"
        save_file(load_file(adapter), str(odd), metadata={**meta, "lora_config": config})
        with pytest.raises(UserError, match=f"metadata this version cannot read \\({needle}"):
            load_adapter_into(load_base(str(lora_setup / "base.safetensors")), odd)


def test_a_symlink_loop_in_the_corpus(tmp_path):
    """A --src that is a symlink loop, and a loop among a folder's .txt files: one line each."""
    loop = tmp_path / "loop.txt"
    loop.symlink_to(loop)
    r = run_cli("data/text/prepare.py", "--src", loop, "--out_dir", tmp_path / "out")
    assert_one_line_error(r, f"--src {loop}: no such file")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("One document.\n\nAnother one.\n")
    (corpus / "b.txt").symlink_to(corpus / "b.txt")
    r = run_cli("data/text/prepare.py", "--src", corpus, "--out_dir", tmp_path / "out")
    assert_one_line_error(r, f"{corpus / 'b.txt'}: Too many levels of symbolic links")
    assert not (tmp_path / "out" / "train.bin").exists()


def test_ctrl_c_during_a_prompt_file_of_100000_lines(sample_run, tmp_path):
    """100,000 prompts start at once (no pass over them first); Ctrl-C stops with status 130 and
    keeps every continuation made, each a whole line."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"Prompt number {i}\n" for i in range(100_000)))
    out = tmp_path / "s.txt"
    p = subprocess.Popen([sys.executable, "sample.py", "--model", str(sample_run), "--prompts", str(prompts),
                          "--out", str(out), "--max_new_tokens", "2", "--device", "cpu"], cwd=REPO,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ, **ONE_THREAD})
    wait_for(lambda: out.exists() and out.read_text().count("\n") >= 6)
    p.send_signal(signal.SIGINT)
    stderr = p.communicate(timeout=60)[1]
    assert p.returncode == 130 and "Traceback" not in stderr and "interrupted" in stderr, stderr
    lines = out.read_text().splitlines()
    assert lines[0].startswith("# ") and len(lines) > 5
    assert all(line.startswith(f"Prompt number {i}") for i, line in enumerate(lines[1:]))


def test_a_full_disk_while_the_study_writes_its_report(tmp_path, monkeypatch, capsys):
    """The disk fills up while study.py writes study.md (its steps are not run here: the fault is in
    the report): one line naming the file, the earlier report kept whole, no temporary file left."""
    import study

    out = tmp_path / "study"
    out.mkdir()
    (out / "study.md").write_text("the earlier report\n")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("One document.\n\nAnother one.\n")
    monkeypatch.setattr(study, "run_step", lambda *args: None)
    real = Path.write_text

    def write_text(self, text, *args, **kwargs):
        if self.name == "study.md.tmp":
            real(self, text[:10], *args, **kwargs)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as a write fails: no file name
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    r = run_entry(study, ["config/study_tiny.py", f"--corpus={corpus}", f"--out_dir={out}"], monkeypatch, capsys)
    assert_one_line_error(r, f"could not write {out / 'study.md'}: No space left on device", "earlier one is kept")
    assert (out / "study.md").read_text() == "the earlier report\n" and not (out / "study.md.tmp").exists()
