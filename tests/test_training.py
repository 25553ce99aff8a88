"""train.py and trainer.py: exact resume, DDP against one process, checkpoints, schedule, errors."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, assert_one_line_error, run_cli, run_entry, tiny_train_args

import train
from gpt2study.checkpoints import find_checkpoint, load_train_state, run_info, save_checkpoint
from gpt2study.cli import load_config
from gpt2study.settings import PretrainConfig
from gpt2study.training import (
    LENGTH_BUCKET,
    EpochSampler,
    TrainConfig,
    compile_model,
    lr_at,
    make_optimizer,
    resolve_precision,
)
from model import GPT, IGNORE_INDEX, GPTConfig, UserError

pytestmark = pytest.mark.usefixtures("one_thread")


def records(out, split="train"):
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["split"] == split]


def run_train(monkeypatch, args):
    monkeypatch.setattr(sys, "argv", ["train.py", *map(str, args)])
    train.main()


class Crash(Exception):
    pass


def test_resume_equals_uninterrupted(token_data, tmp_path, monkeypatch):
    """Kill a run mid-way (at step 6, last checkpoint at step 4), resume it: the same losses as a
    run that was never interrupted. Dropout is on, so the RNG state must come back too."""
    settings = {"max_iters": 9, "ckpt_interval": 2, "eval_interval": 3, "dropout": 0.1}
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    run_train(monkeypatch, tiny_train_args(token_data, whole, **settings))

    original = EpochSampler.next_batch

    def crashing_next_batch(self):
        if self.offset + self.epoch * self.n >= 5 * self.global_batch:  # step 6 never finishes
            raise Crash
        return original(self)

    monkeypatch.setattr(EpochSampler, "next_batch", crashing_next_batch)
    with pytest.raises(Crash):
        run_train(monkeypatch, tiny_train_args(token_data, broken, **settings))
    monkeypatch.setattr(EpochSampler, "next_batch", original)
    assert torch.load(find_checkpoint(broken) / "train_state.pt", weights_only=True)["step"] == 4
    run_train(monkeypatch, tiny_train_args(token_data, broken, init_from="resume", **settings))

    expected = [(r["step"], r["loss"]) for r in records(whole)]
    assert [r[0] for r in expected] == list(range(1, 10))
    assert [(r["step"], r["loss"]) for r in records(broken)] == expected
    assert [(r["step"], r["loss"]) for r in records(broken, "val")] == \
        [(r["step"], r["loss"]) for r in records(whole, "val")]
    a = torch.load(whole / "checkpoint" / "train_state.pt", weights_only=True)
    b = torch.load(broken / "checkpoint" / "train_state.pt", weights_only=True)
    assert a["sampler"] == b["sampler"] and a["step"] == b["step"] == 9
    from safetensors.torch import load_file

    wa, wb = (load_file(d / "checkpoint" / "model.safetensors") for d in (whole, broken))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_ddp_two_processes_match_one(token_data, tmp_path):
    """2 CPU processes (gloo) of batch 4 against 1 process accumulating 2 micro-batches of 4."""
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    r = run_cli("train.py", *tiny_train_args(token_data, single, grad_accum=2, max_iters=4),
                env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    r = run_cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
                *tiny_train_args(token_data, ddp, grad_accum=1, max_iters=4), env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr + r.stdout
    for split in ("train", "val"):
        one, two = records(single, split), records(ddp, split)
        assert [x["step"] for x in one] == [x["step"] for x in two]
        for x, y in zip(one, two):
            assert x["loss"] == pytest.approx(y["loss"], abs=1e-5)
    from safetensors.torch import load_file

    wa, wb = (load_file(d / "checkpoint" / "model.safetensors") for d in (single, ddp))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


@pytest.mark.parametrize("log_interval", [1, 4])
def test_nan_loss_stops_and_keeps_last_checkpoint(token_data, tmp_path, monkeypatch, log_interval):
    """A NaN loss at step 5 stops the run naming step 5 and the checkpoint really kept (step 4).
    With log_interval=4 the host looks only at step 8 (the loss stays on the device until then):
    the NaN is still reported at step 5, and nothing is saved from step 8's broken state."""
    out = tmp_path / "run"
    original = train.GPT.forward

    def forward(self, idx, targets=None, label_smoothing=0.0):
        logits, loss = original(self, idx, targets, label_smoothing)
        if targets is not None and self.training and forward.calls == 4:
            loss = loss * float("nan")
        forward.calls += targets is not None and self.training
        return logits, loss

    forward.calls = 0
    monkeypatch.setattr(train.GPT, "forward", forward)
    with pytest.raises(UserError, match=r"training loss is nan \(gradient norm nan\) at step 5; stopped, the last "
                                        r"good checkpoint \(step 4\) is kept"):
        run_train(monkeypatch, tiny_train_args(token_data, out, ckpt_interval=4, eval_interval=4, max_iters=12,
                                               log_interval=log_interval))
    assert load_train_state(find_checkpoint(out))["step"] == 4
    assert max(r["step"] for r in records(out)) == 4  # no record of a broken step


def test_host_reads_the_device_only_at_checks(token_data, tmp_path, monkeypatch):
    """Between log steps, evaluations and checkpoints, no code of ours in the step loop reads a
    tensor's value on the host (item, tolist, bool, float, ...): on a GPU each such read waits for
    the queue to drain. Here every read is traced to its call site and step."""
    ours = {str(REPO / f) for f in (
        "gpt2study/training.py", "model.py", "kernels/linear_cross_entropy.py", "lora.py", "train.py")}
    step, reads = [0], []
    original = EpochSampler.next_batch

    def next_batch(self):
        step[0] += 1
        return original(self)

    monkeypatch.setattr(EpochSampler, "next_batch", next_batch)
    def spy(name, real):
        def read(self, *args, **kwargs):
            caller = sys._getframe(1)
            # (the data order is a host tensor from the start: EpochSampler reads nothing off the device)
            if caller.f_code.co_filename in ours and step[0] and caller.f_code.co_name != "next_batch":
                reads.append((step[0], name, Path(caller.f_code.co_filename).name, caller.f_lineno))
            return real(self, *args, **kwargs)
        return read

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, spy(name, getattr(torch.Tensor, name)))
    run_train(monkeypatch, tiny_train_args(token_data, tmp_path / "run", max_iters=12, log_interval=4,
                                           eval_interval=6, dropout=0.1))
    assert {s for s, *_ in reads} == {4, 6, 8, 12}, reads  # the log steps, the evaluations (with checkpoints)


def test_existing_run_is_not_overwritten(token_data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    run_train(monkeypatch, tiny_train_args(token_data, out, max_iters=2))
    before = (out / "checkpoint" / "model.safetensors").read_bytes()
    with pytest.raises(UserError, match="already holds a run .*--init_from=resume"):
        run_train(monkeypatch, tiny_train_args(token_data, out, max_iters=2))
    assert (out / "checkpoint" / "model.safetensors").read_bytes() == before
    with pytest.raises(UserError, match="nothing to resume"):
        run_train(monkeypatch, tiny_train_args(token_data, tmp_path / "new", init_from="resume"))


def test_continue_from_another_runs_weights(token_data, tmp_path, monkeypatch):
    first, second = tmp_path / "first", tmp_path / "second"
    run_train(monkeypatch, tiny_train_args(token_data, first, max_iters=3))
    # the architecture comes from the weights: a setting that says otherwise is refused, not ignored
    with pytest.raises(UserError, match="has n_layer=2, not 7"):
        run_train(monkeypatch, tiny_train_args(token_data, second, max_iters=2, init_from=first, n_layer=7))
    assert not second.exists()
    run_train(monkeypatch, tiny_train_args(token_data, second, max_iters=2, init_from=first))
    info = json.loads((second / "checkpoint" / "config.json").read_text())
    assert info["model"]["n_layer"] == 2 and info["init_from"] == str(first)


def test_checkpoint_swap_survives_a_crash(tmp_path, tiny_model, capsys):
    from dataclasses import asdict

    def save(step):
        state = {"step": step, "optimizer": {}, "sampler": {"epoch": 0, "offset": step}}
        info = {"model": asdict(tiny_model.config), "train": {}, "step": step}
        return save_checkpoint(tmp_path, lambda folder: tiny_model.save(folder / "model.safetensors"), state, info)

    save(1)
    assert find_checkpoint(tmp_path) == tmp_path / "checkpoint"
    save(2)  # the previous checkpoint is kept as checkpoint.old
    assert load_train_state(tmp_path / "checkpoint.old")["step"] == 1
    # a crash between the two renames leaves only checkpoint.old (and maybe a half-written tmp)
    shutil.rmtree(tmp_path / "checkpoint.old")
    (tmp_path / "checkpoint").rename(tmp_path / "checkpoint.old")
    (tmp_path / "checkpoint.tmp").mkdir()
    assert find_checkpoint(tmp_path) == tmp_path / "checkpoint.old"
    save(3)
    assert find_checkpoint(tmp_path) == tmp_path / "checkpoint"
    assert not (tmp_path / "checkpoint.tmp").exists()
    assert load_train_state(find_checkpoint(tmp_path))["step"] == 3
    # a torn checkpoint/: the one before it is used, with a warning; the next save sets the torn one aside
    weights = tmp_path / "checkpoint" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert find_checkpoint(tmp_path) == tmp_path / "checkpoint.old"
    assert "model.safetensors is truncated" in capsys.readouterr().err
    save(4)
    assert [load_train_state(tmp_path / d)["step"] for d in ("checkpoint", "checkpoint.old")] == [4, 2]
    assert (tmp_path / "checkpoint.bad" / "model.safetensors").stat().st_size == 1000


def test_lr_schedule():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_iters=10, decay="cosine")
    assert lr_at(0, 110, cfg) == pytest.approx(0.1)
    assert lr_at(9, 110, cfg) == pytest.approx(1.0)
    assert lr_at(60, 110, cfg) == pytest.approx(0.55)  # half way: the cosine's midpoint
    assert lr_at(110, 110, cfg) == pytest.approx(0.1)
    cfg.decay = "linear"
    assert lr_at(35, 110, cfg) == pytest.approx(1.0 - 0.9 * 0.25)
    cfg.decay = "constant"
    assert lr_at(100, 110, cfg) == 1.0


def test_epoch_sampler_order_and_resume():
    s = EpochSampler(10, 3, seed=1)
    assert s.steps_per_epoch == 3
    epoch = [i for _ in range(3) for i in s.next_batch()]
    assert len(set(epoch)) == 9  # no example twice in an epoch
    state = s.state_dict()
    rest = [s.next_batch() for _ in range(4)]
    t = EpochSampler(10, 3, seed=1)
    t.load_state_dict(state)
    assert [t.next_batch() for _ in range(4)] == rest
    assert state == {"epoch": 0, "offset": 9} and s.epoch == 2  # 3 batches of epoch 1, one of epoch 2
    with pytest.raises(UserError, match="fewer than one optimizer step"):
        EpochSampler(2, 3, seed=1)


def test_optimizer_decays_matrices_only(tiny_model):
    opt = make_optimizer(tiny_model, TrainConfig(weight_decay=0.1), torch.device("cpu"))
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and all(p.dim() == 2 for p in decayed["params"])
    assert plain["weight_decay"] == 0.0 and all(p.dim() == 1 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(tiny_model.parameters()))


# ----------------------------------------------------------------------------- config and CLI errors


def test_config_files_and_overrides(tmp_path):
    cfg = load_config(PretrainConfig, [str(REPO / "config/pretrain_continue.py"), "--lr=1e-3", "--epochs=2"])
    assert cfg.init_from == "out/pretrain" and cfg.n_layer == 6 and cfg.lr == 1e-3 and cfg.epochs == 2.0
    with pytest.raises(UserError, match="unknown config key 'lrr' .* known keys: .*lr"):
        load_config(PretrainConfig, ["--lrr=1"])
    with pytest.raises(UserError, match="config key 'batch_size' wants a int, got 'eight'"):
        load_config(PretrainConfig, ["--batch_size=eight"])
    with pytest.raises(UserError, match="config file 'nope.py' not found"):
        load_config(PretrainConfig, ["nope.py"])
    bad = tmp_path / "bad.py"
    bad.write_text("n_layer = 1 / 0\n")
    with pytest.raises(UserError, match="failed: ZeroDivisionError"):
        load_config(PretrainConfig, [str(bad)])


def test_cli_errors_are_one_line(tmp_path, monkeypatch, capsys):
    assert_one_line_error(run_cli("train.py", "config/pretrain_small.py", "--dropuot=0.1"), "unknown config key")
    # the rest in this process: the same main, the same one line, without a second start
    assert_one_line_error(run_entry(train, ["--data_dir"], monkeypatch, capsys), "needs a value")
    r = run_entry(train, [REPO / "config/pretrain_small.py", f"--data_dir={tmp_path}", f"--out_dir={tmp_path / 'o'}"],
                  monkeypatch, capsys)
    assert_one_line_error(r, "train.bin not found", "prepare")
    assert not (tmp_path / "o").exists()


def test_train_small_config_learns(token_data, tmp_path, monkeypatch):
    """The shipped small config runs end to end (on random tokens here: the loss must still fall
    from ln(50257) ≈ 10.8 as the model learns their skewed unigram distribution)."""
    out = tmp_path / "small"
    run_train(monkeypatch, [REPO / "config/pretrain_small.py", f"--data_dir={token_data}", f"--out_dir={out}",
                            "--max_iters=15", "--eval_interval=15", "--batch_size=4", "--progress=False",
                            "--block_size=64", "--warmup_iters=5", "--log_interval=1"])
    losses = [r["loss"] for r in records(out)]
    assert losses[0] > 10.5 and losses[-1] < losses[0] - 0.3
    assert any(f.name.startswith("events.out.tfevents") for f in (out / "tb").iterdir())


def test_compiled_model_trains_like_eager(token_data, tmp_path, monkeypatch):
    """--compile=True (torch.compile, inductor on the CPU) gives the eager run's losses; the runs record what
    they ran with, the eager one what 'auto' became on the CPU."""
    for name, flags in (("eager", {}), ("compiled", {"compile": True, "dtype": "float32"})):
        run_train(monkeypatch, tiny_train_args(token_data, tmp_path / name, max_iters=3, **flags))
    eager, compiled = ([r["loss"] for r in records(tmp_path / d)] for d in ("eager", "compiled"))
    assert compiled == pytest.approx(eager, abs=1e-4)
    recorded = {d: run_info(find_checkpoint(tmp_path / d))["train"] for d in ("eager", "compiled")}
    assert [(r["dtype"], r["compile"]) for r in recorded.values()] == [("float32", False), ("float32", True)]


def test_auto_precision_by_device(monkeypatch):
    """auto: bfloat16 autocast and torch.compile on CUDA (float16 where the GPU lacks bfloat16), float32 eager on a
    CPU; explicit values win everywhere, including the bare --compile flag and --compile=False."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    cfg = load_config(TrainConfig, [])
    assert (cfg.dtype, cfg.compile) == ("auto", None)
    assert resolve_precision(cfg, cpu) == {"dtype": "float32", "compile": False}
    for has_bf16, dtype in ((True, "bfloat16"), (False, "float16")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True, v=has_bf16: v)
        assert resolve_precision(cfg, cuda) == {"dtype": dtype, "compile": True}
    explicit = load_config(TrainConfig, ["--dtype=float32", "--compile=False"])
    assert resolve_precision(explicit, cuda) == {"dtype": "float32", "compile": False}
    assert resolve_precision(load_config(TrainConfig, ["--compile"]), cpu) == {"dtype": "float32", "compile": True}
    with pytest.raises(UserError, match="dtype"):
        load_config(TrainConfig, ["--dtype=float64"])


def test_compiled_lengths_are_bucketed():
    """Fine-tuning batches of many lengths reach the compiled model in a few padded lengths (so it compiles a few
    graphs, not one per step) and give the unpadded model's loss and gradients. With the plain loss, CUDA's
    default: the chunked one keeps only the scored rows on a CPU, a shape that depends on the data."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=256, vocab_size=64,
                          loss_impl="plain")).double()
    counter = CompileCounter()
    compiled = compile_model(model, backend=counter)
    lengths = [7, 70, 3, 130, 64, 65, 127, 200, 33, 256]
    for T in lengths:
        idx = torch.randint(0, 64, (2, T))
        targets = idx.roll(-1, 1).masked_fill(torch.rand(2, T) < 0.3, IGNORE_INDEX)
        _, loss = compiled(idx, targets)
        grads = torch.autograd.grad(loss, list(model.parameters()))
        _, want = model(idx, targets)
        assert torch.allclose(loss, want, rtol=1e-12)
        for g, w in zip(grads, torch.autograd.grad(want, list(model.parameters())), strict=True):
            assert torch.allclose(g, w, rtol=1e-9, atol=1e-12)
    buckets = {-(-T // LENGTH_BUCKET) for T in lengths}
    assert 1 <= counter.frame_count <= len(buckets) < len(set(lengths))
