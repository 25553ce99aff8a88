"""One GPU session that measures every GPU target of the study, in at most 9 minutes of an H200.

    python bench/gpu_session.py                       # all parts, results in $OUT (or out/gpu_session)
    python bench/gpu_session.py --parts=train,beam    # some parts; --out=DIR elsewhere
    python bench/gpu_session.py --dry_run             # on a CPU: tiny shapes, Triton's interpreter, ~2 minutes

Each part runs in a process of its own, under its own time budget (and the session's, --budget_s): a part skips
what its budget no longer covers, with a note; a part that fails or overruns is recorded, and the next one runs.
The parts, most wanted first:
  info      the device, versions, shared memory; a bf16 matmul and a copy (the two ceilings)
  train     training tokens/s and MFU of the 6-layer model (16 x 1024, fused AdamW): first ours with the defaults a
            GPU user gets (bf16 autocast, torch.compile, padded vocabulary, the loss_impl and attn_impl defaults),
            then transformers' GPT2LMHeadModel compiled, then one change at a time (the chunked loss, the unpadded
            vocabulary, our attention kernel, eager); host syncs per step; one step profiled
  kernels   attention forward and forward+backward against SDPA flash (B 8 and 16, H 12, T 1024, D 64); LoRA linear:
            our kernel, the concatenated PyTorch path and the unfused one against the base GEMM alone (16384 x 768 ->
            2304 and x 1024 -> 3072, r 4, 8, 16); the configs chosen; compiled shared memory against the estimate
  finetune  LoRA fine-tuning tokens/s on batches of 8 E2E-sized sequences (rank 4, alpha 32, dropout 0.1): ours with
            the defaults, then PEFT on GPT2LMHeadModel, then each lora_impl eager; 6-layer and GPT-2 medium shapes
  beam      beam search over 630 E2E-like MRs (beam 10, length penalty 0.8, no repeated 4-gram, <= 64 tokens), ours
            against transformers' generate on the same random weights
  pipeline  the study once, small, with the device's defaults: pretraining -> samples -> LoRA -> beam decoding of
            the E2E test MRs, whose outputs it returns (pipeline.txt) unscored (the official metrics need Java)
  tests     tests/test_kernels.py on CUDA, one pytest worker per CPU; the whole process group ends at its budget
Writes (at most 8 files) into the output folder, rewritten whenever a part records a row, so that a session cut
short at any moment leaves every finished row: session.md (the summary first, then every table), session.json,
log.txt (all the parts printed), tests.txt, kernels.md, profile.txt, pipeline.txt. Ratios are reference time /
our time: above 1, ours is faster. Each row a part could skip carries its time estimate, checked against the time
it took (the dry run checks the dry estimates).
"""

import dataclasses
import importlib.util
import itertools
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from gpt2study.cli import load_config, run_main
from model import UserError, setting

ROOT = Path(__file__).resolve().parents[1]

PARTS = ("info", "train", "kernels", "finetune", "beam", "pipeline", "tests")
FILES = ("session.md", "session.json", "log.txt", "tests.txt", "kernels.md", "profile.txt", "pipeline.txt")
E2E_TRAIN_PAIRS = 42061  # the official training set
SEARCH = dict(beam_size=10, length_penalty=0.8, no_repeat_ngram_size=4)


@dataclass
class SessionConfig:
    out: str = setting("", "output folder (default: $OUT if set, else out/gpu_session, out/gpu_session_dry)")
    dry_run: bool = setting(False, "tiny shapes on the CPU, Triton's interpreter: checks the script, measures nothing")
    parts: tuple = setting(PARTS, "parts to run, in order", choices=PARTS)
    budget_s: float = setting(510.0, "the whole session's time (seconds): 8.5 minutes, inside a 9-minute slot",
                              above=0.0)
    info_s: float = setting(15.0, "time budget of the info part (seconds)", above=0.0)
    train_s: float = setting(200.0, "time budget of the train part (seconds)", above=0.0)
    kernels_s: float = setting(75.0, "time budget of the kernels part (seconds)", above=0.0)
    finetune_s: float = setting(70.0, "time budget of the finetune part (seconds)", above=0.0)
    beam_s: float = setting(40.0, "time budget of the beam part (seconds)", above=0.0)
    pipeline_s: float = setting(90.0, "time budget of the pipeline part (seconds)", above=0.0)
    tests_s: float = setting(60.0, "time budget of the tests part (seconds; what the session has left)", above=0.0)
    part: str = setting("", "run this one part in this process (what the session does for each)",
                        choices=("", *PARTS))
    result: str = setting("", "with --part: write its results (JSON) here")


# ----------------------------------------------------------------------------- a part's record


class Record:
    """What a part measured: tables, summary rows (one per target of the issue), notes, files for the output folder.
    Saved after every change, so that a part killed at its budget keeps what it had."""

    def __init__(self, path: str, budget_s: float, dry_run: bool):
        self.path, self.dry_run = Path(path) if path else None, dry_run
        self.deadline = time.monotonic() + budget_s
        self.data = _empty_record()
        self._open = None  # (what, estimate, start) of the step afford() let run last

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def afford(self, seconds: float, what: str) -> bool:
        """Whether `seconds` (an estimate) fit the budget left; if not, a note that `what` was skipped. The step
        allowed runs until the next call (or `done`), which records the time it took against the estimate."""
        self.done()
        if self.left() >= seconds:
            self._open = (what, seconds, time.monotonic())
            return True
        self.note(f"skipped {what}: {self.left():.0f} s of the part's budget left, it needs about {seconds:.0f} s")
        return False

    def done(self) -> None:
        """The step afford() allowed last is over: its estimate and the time it took, recorded."""
        if self._open is not None:
            what, estimate, t0 = self._open
            self._open = None
            self.data["estimates"].append({"step": what, "estimate s": estimate,
                                           "took s": round(time.monotonic() - t0, 1)})
            self.save()

    def note(self, text: str) -> None:
        print(f"  note: {text}", file=sys.stderr, flush=True)
        self.data["notes"].append(text)
        self.save()

    def table(self, title: str, rows: list) -> None:
        self.data["tables"][title] = rows
        self.save()

    def add_row(self, title: str, row: dict) -> None:
        self.data["tables"].setdefault(title, []).append(row)
        self.save()

    def check(self, item: str, what: str, value: str, target: str, met) -> None:
        """A summary row: `met` True/False against the issue's target, None where it cannot be judged (a dry run)."""
        self.data["summary"].append({"item": item, "measurement": what, "value": value, "target": target,
                                     "met": None if self.dry_run else met})
        self.save()

    def fact(self, key: str, value) -> None:
        self.data["facts"][key] = value
        self.save()

    def file(self, name: str, text: str) -> None:
        assert name in FILES
        self.data["files"][name] = self.data["files"].get(name, "") + text
        self.save()

    def save(self) -> None:
        if self.path is not None:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.data, default=str))
            tmp.replace(self.path)


def _bench_module():
    """bench/kernel_speed.py (its name clashes with the kernels package, so it is loaded from its file)."""
    spec = importlib.util.spec_from_file_location("kernel_bench", ROOT / "bench" / "kernel_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _x(v, digits=2):
    return "n/a" if v is None else f"{v:.{digits}f}x"


def _device():
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _sync(device):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _peak_flops(device):
    """Dense bf16 peak of the GPU (FLOP/s), by name (trainer.PEAK_BF16_FLOPS); None elsewhere."""
    import torch

    from gpt2study.training import peak_flops_of

    return peak_flops_of(torch.cuda.get_device_name()) if device == "cuda" else None


def _error(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


# ----------------------------------------------------------------------------- parts


def part_info(rec: Record, cfg: SessionConfig) -> None:
    import platform

    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", "transformers", "peft"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = "absent"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    row = {**versions, "commit": commit or "n/a", "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET")}
    if torch.cuda.is_available():
        import kernels

        props = torch.cuda.get_device_properties(0)
        row.update(device=torch.cuda.get_device_name(), capability=".".join(map(str, kernels._capability(
            torch.device("cuda", 0)))), SMs=props.multi_processor_count, memory_GiB=round(props.total_memory / 2**30),
            smem_per_block=kernels._smem_limit(torch.device("cuda", 0)))
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        row["nvidia-smi"] = smi.stdout.strip() or smi.stderr.strip()[:100]
        rec.fact("capability", row["capability"])
        rec.fact("device", row["device"])
        # The two ceilings: a large bf16 matmul on random data, and a device-to-device copy (bytes read + written).
        a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        for _ in range(3):
            a @ b
        _sync("cuda")
        t0 = time.perf_counter()
        for _ in range(10):
            a @ b
        _sync("cuda")
        row["bf16 matmul TFLOP/s"] = round(10 * 2 * 8192**3 / (time.perf_counter() - t0) / 1e12)
        src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        dst.copy_(src)
        _sync("cuda")
        t0 = time.perf_counter()
        for _ in range(10):
            dst.copy_(src)
        _sync("cuda")
        row["copy TB/s"] = round(10 * 2 * 2**30 / (time.perf_counter() - t0) / 1e12, 2)
    else:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
        row.update(device=f"CPU: {cpu}, {torch.get_num_threads()} threads")
        rec.fact("device", row["device"])
    rec.table("Device", [row])


def part_tests(rec: Record, cfg: SessionConfig) -> None:
    cmd = [sys.executable, "-m", "pytest", "tests/test_kernels.py", "-q", "-p", "no:cacheprovider", "--maxfail=5"]
    if cfg.dry_run:  # the interpreter runs every kernel test in minutes: the quick ones only
        cmd += ["-k", "prune or wins or interpreter_runs or unwritten"]
    elif importlib.util.find_spec("xdist"):  # triton compiles on the CPU: one worker per CPU shares the GPU
        cmd += ["-n", str(os.cpu_count() or 4)]
    output, last, _ = run_group(cmd, max(rec.left() - 5, 1))
    rec.file("tests.txt", " ".join(cmd) + "\n\n" + output)
    counts = pytest_counts(last)
    rec.check("tests", "kernel tests" + (" (interpreter, quick subset)" if cfg.dry_run else " (CUDA)"),
              last or "no output", "all pass", counts.get("passed", 0) > 0 and not counts.get("failed")
              and not counts.get("error"))


def run_group(cmd: list[str], timeout: float, cwd: Path = ROOT, env: dict | None = None) -> tuple[str, str, int]:
    """(output, its last line or 'timed out', exit status: -9 when timed out) of `cmd` in a process group of its
    own, the whole group (pytest's workers, a script's children) killed at `timeout` seconds."""
    import signal
    import tempfile

    with tempfile.TemporaryFile("w+") as out:
        child = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, text=True,
                                 start_new_session=True)
        try:
            status = child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            status = None
        out.seek(0)
        output = out.read()
    last = "timed out" if status is None else (output.strip().splitlines() or [""])[-1]
    return output, last, -9 if status is None else status


def pytest_counts(line: str) -> dict:
    """{'passed': 3, 'failed': 1, ...} from pytest's last line ('3 passed, 1 failed, 2 skipped in 4.1s')."""
    counts = {}
    for words in (w.split() for w in line.strip("= ").split(" in ")[0].split(", ")):
        if len(words) == 2 and words[0].isdigit():
            counts[words[1].rstrip("s") if words[1] in ("errors", "warnings") else words[1]] = int(words[0])
    return counts


def part_kernels(rec: Record, cfg: SessionConfig) -> None:
    import torch

    kb = _bench_module()
    device = _device()
    if device == "cuda":
        dtype, attn_shapes = torch.bfloat16, [(8, 12, 1024, 64), (16, 12, 1024, 64)]
        lora_shapes = [(i, o, r, 16384, 0.0) for r in (8, 4, 16) for i, o in ((768, 2304), (1024, 3072))]
        cost_attn, cost_lora = 25, 12  # seconds: the first attention shape autotunes, a LoRA shape about this
    else:
        dtype, attn_shapes, lora_shapes = torch.float32, [(1, 2, 64, 32)], [(32, 48, 4, 64, 0.0)]
        cost_attn, cost_lora = 5, 3
    title_a = "Causal attention, ours (triton) against SDPA (flash on CUDA), ms"
    title_l = "LoRA linear, ours (triton), concatenated and unfused PyTorch, against the base GEMM alone, ms"
    for rows, title, shapes, cost in ((kb.attention_rows, title_a, attn_shapes, cost_attn),
                                      (kb.lora_rows, title_l, lora_shapes, cost_lora)):
        for shape in shapes:
            if rec.afford(cost, f"{title.split(',')[0]} {shape}"):
                try:
                    for row in rows([shape], device, dtype):
                        rec.add_row(title, row)
                except Exception as e:  # a kernel that fails to compile or run: the next shape may still work
                    rec.note(f"{title.split(',')[0]} {shape} failed: {_error(e)}")
                cost = cost_lora  # autotuned once: the next shapes cost less
    rec.table("Configs the autotuner chose", kb.tuned_rows())
    rec.table("Compiled configs: shared memory (bytes) against the pruning estimate", kb.compiled_rows())
    tables = rec.data["tables"]
    rec.file("kernels.md", "\n".join(kb.markdown(t, rows) for t, rows in tables.items() if rows))

    wins = {}
    for r in tables.get(title_a, []):
        shape = f"B {r['B']}, H {r['H']}, T {r['T']}, D {r['D']}"
        x, mode = r["flash/triton time"], r["pass"]
        fwd = mode == "fwd"
        rec.check("attention", f"attention {mode}, {shape}: flash/ours time", _x(x), "≥ 1.2x" if fwd else "≥ 1.0x",
                  x is not None and x >= (1.2 if fwd else 1.0))
        kind = "attention_fwd" if fwd else "attention"
        wins[kind] = wins.get(kind, True) and x is not None and x > 1.0
    for r in tables.get(title_l, []):
        shape, mode = f"{r['N']} x {r['in']} -> {r['out']}, r {r['r']}", r["pass"]
        if mode == "fwd":
            for path in ("concat", "triton"):
                x = r[f"{path}/base time"]
                rec.check("LoRA", f"LoRA fwd, {shape}: {path}/base GEMM time", _x(x), "≤ 1.10x",
                          x is not None and x <= 1.10)
        x = r["unfused/concat time"]  # the CUDA default (lora_impl auto) is concat: it should beat unfused
        rec.check("LoRA", f"LoRA {mode}, {shape}: unfused/concat time", _x(x), "> 1.0x", x is not None and x > 1.0)
        x = r["concat/triton time"]  # the kernel becomes the default only where it beats concat
        rec.check("LoRA", f"LoRA {mode}, {shape}: concat/triton time", _x(x), "> 1.0x", x is not None and x > 1.0)
        kind = "lora_linear_fwd" if mode == "fwd" else "lora_linear"
        wins[kind] = wins.get(kind, True) and x is not None and x > 1.0
    covered = [r["estimate covers it"] for r in tables.get("Compiled configs: shared memory (bytes) against the "
                                                           "pruning estimate", []) if "estimate covers it" in r]
    if covered:
        rec.check("kernels", "compiled configs whose shared memory the estimate covers",
                  f"{sum(covered)}/{len(covered)}", "all", all(covered))
    rec.fact("kernel_wins", wins)


def _train_models(dry_run):
    """(our GPTConfig, transformers GPT2Config, batch, T) of the training part: one architecture, dropout off."""
    from transformers import GPT2Config

    from gpt2study.hf_format import hf_config
    from model import GPTConfig

    shape = dict(n_layer=2, n_head=2, n_embd=64) if dry_run else dict(n_layer=6, n_head=12, n_embd=768)
    batch, T = (2, 32) if dry_run else (16, 1024)
    ours = GPTConfig(**shape, block_size=max(T, 64), dropout=0.0)
    hf = GPT2Config.from_dict(hf_config(ours))
    return ours, hf, batch, T


def _time_steps(step, device, warmup: int, steps: int):
    """(seconds of the first call, which compiles; mean seconds per step after warm-up). One sync at each end."""
    _sync(device)
    t0 = time.perf_counter()
    step()
    _sync(device)
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return first, (time.perf_counter() - t0) / steps


def _compile(model, dry_run: bool):
    """torch.compile; a dry run traces the graphs (dynamo, AOT autograd) without inductor's CPU code generation,
    which would take most of its time and says nothing about the GPU's."""
    import torch

    return torch.compile(model, backend="aot_eager" if dry_run else "inductor")


def _count_syncs(step) -> int:
    """Host-device synchronizations in one step (CUDA's sync debug mode warns at each)."""
    import warnings

    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in caught)


def _profile(step, device, title: str) -> str:
    import torch
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        step()
        _sync(device)
    averages = prof.key_averages()
    for key in (("self_device_time_total", "self_cuda_time_total") if device == "cuda" else ("self_cpu_time_total",)):
        try:
            table = averages.table(sort_by=key, row_limit=15, max_name_column_width=70)
            break
        except (AttributeError, KeyError, ValueError):
            table = f"(profiler cannot sort by {key} in torch {torch.__version__})"
    return f"== {title}: one step, top 15 by {'GPU' if device == 'cuda' else 'CPU'} time\n{table}\n"


# (row name, who, compiled, our GPTConfig changes): the headline rows first, ours with the defaults a GPU user gets
# (auto dtype, loss_impl and attn_impl; vocabulary padded to 50304), then transformers compiled; then one change at
# a time, each of which is a default's reason
TRAIN_VARIANTS = [
    ("ours, defaults (compiled)", "ours", True, {}),
    ("transformers compiled sdpa", "transformers", True, {}),
    ("ours compiled, chunked loss", "ours", True, {"loss_impl": "chunked"}),
    ("ours compiled, vocabulary 50257", "ours", True, {"vocab_multiple": 1}),
    ("ours eager", "ours", False, {}),
    ("ours compiled, triton attention", "ours", True, {"attn_impl": "triton"}),
    ("ours eager, triton attention", "ours", False, {"attn_impl": "triton"}),
]


def _train_variant(who, changes, ours_cfg, hf_cfg, idx, device):
    """(model, loss function, parameters whose FLOPs count: the real vocabulary's rows, not the padding)."""
    import torch
    from transformers import GPT2LMHeadModel

    from model import GPT

    torch.manual_seed(0)
    inputs, targets = idx[:, :-1], idx[:, 1:]
    if who == "ours":
        model = GPT(dataclasses.replace(ours_cfg, **changes)).to(device)
        pad_rows = model.config.padded_vocab - model.config.vocab_size
        return model, lambda m: m(inputs, targets)[1], model.num_params() - pad_rows * ours_cfg.n_embd
    model = GPT2LMHeadModel(hf_cfg).to(device)
    n_params = sum(p.numel() for p in model.parameters()) - model.transformer.wpe.weight.numel()
    return model, lambda m: m(input_ids=inputs, labels=inputs).loss, n_params


def part_train(rec: Record, cfg: SessionConfig) -> None:
    import torch

    device = _device()
    ours_cfg, hf_cfg, batch, T = _train_models(cfg.dry_run)
    bf16 = device == "cuda"  # what dtype='auto' gives on a GPU with bfloat16
    peak = _peak_flops(device)
    torch.manual_seed(0)
    idx = torch.randint(0, ours_cfg.vocab_size, (batch, T + 1), device=device)
    eager_s, compiled_s = (5, 45) if cfg.dry_run else (15, 60)
    title = f"Training, {ours_cfg.n_layer} layers x {ours_cfg.n_embd}, batch {batch} x {T}, " + (
        "bf16 autocast" if bf16 else "float32") + ", AdamW (fused on CUDA)"
    results = {}
    for name, who, compiled, changes in TRAIN_VARIANTS:
        if not rec.afford(compiled_s if compiled else eager_s, name):
            continue
        model = opt = run = None
        try:
            model, loss_fn, n_params = _train_variant(who, changes, ours_cfg, hf_cfg, idx, device)
            model.train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
            run = _compile(model, cfg.dry_run) if compiled else model

            def step(run=run, opt=opt, loss_fn=loss_fn):
                with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
                    loss = loss_fn(run)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            first, per_step = _time_steps(step, device, warmup=3, steps=2 if cfg.dry_run else 10)
            tokens_s = batch * T / per_step
            flops = 6 * n_params + 12 * ours_cfg.n_layer * T * ours_cfg.n_embd  # per token
            row = {"model": name, "first step s": first, "ms/step": 1e3 * per_step, "tokens/s": tokens_s,
                   "MFU %": None if peak is None else 100 * tokens_s * flops / peak}
            if who == "transformers":
                row["attention"] = getattr(model.config, "_attn_implementation", "n/a")
            if device == "cuda" and who == "ours" and not compiled:
                row["host syncs/step"] = _count_syncs(step)
            results[name] = row
            rec.add_row(title, row)
            if name in ("ours, defaults (compiled)", "ours eager"):
                rec.file("profile.txt", _profile(step, device, f"{name}, {title}"))
        except Exception as e:
            rec.note(f"{name} failed: {_error(e)}")
        finally:
            model = opt = run = None
            if device == "cuda":
                torch.cuda.empty_cache()
    rec.done()
    _train_checks(rec, results)


def _train_checks(rec: Record, results: dict) -> None:
    def tokens(name):
        return results[name]["tokens/s"] if name in results else None

    def over(a, b):
        return None if tokens(a) is None or tokens(b) is None else tokens(a) / tokens(b)

    ours = results.get("ours, defaults (compiled)")
    if ours is not None:
        mfu = ours["MFU %"]
        rec.check("train", "training MFU, ours with the defaults", "n/a" if mfu is None else f"{mfu:.1f} %", "≥ 40 %",
                  mfu is not None and mfu >= 40)
    x = over("ours, defaults (compiled)", "transformers compiled sdpa")
    rec.check("train", "training tokens/s, ours with the defaults / transformers compiled", _x(x), "≥ 1.3x",
              x is not None and x >= 1.3)
    # on CUDA the defaults' loss is the plain one (loss_impl='auto')
    x = over("ours, defaults (compiled)", "ours compiled, chunked loss")
    rec.check("train", "training tokens/s, defaults (plain loss on CUDA) / chunked loss, compiled", _x(x), "> 1.0x",
              x is not None and x > 1.0)
    x = over("ours, defaults (compiled)", "ours compiled, vocabulary 50257")
    rec.check("train", "training tokens/s, vocabulary padded to 50304 / 50257 (compiled)", _x(x), "> 1.0x",
              x is not None and x > 1.0)
    x = over("ours, defaults (compiled)", "ours eager")
    rec.check("train", "training tokens/s, compiled / eager (compile='auto' is on for CUDA)", _x(x), "> 1.0x",
              x is not None and x > 1.0)
    for mode, (t, sd) in {"eager": ("ours eager, triton attention", "ours eager"),
                          "compiled": ("ours compiled, triton attention", "ours, defaults (compiled)")}.items():
        if over(t, sd) is not None:
            rec.fact(f"train_triton_over_sdpa_{mode}", over(t, sd))
    syncs = [r["host syncs/step"] for r in results.values() if "host syncs/step" in r]
    if syncs:
        rec.check("train", "host-device syncs in one training step (ours, eager)", str(max(syncs)), "0",
                  max(syncs) == 0)


def _lora_setups(dry_run):
    """(name, our GPTConfig fields) of the fine-tuning part's two bases."""
    if dry_run:
        return [("tiny 2-layer", dict(n_layer=2, n_head=2, n_embd=64)), ("tiny 4-layer", dict(n_layer=4, n_head=4,
                                                                                              n_embd=128))]
    return [("6-layer", dict(n_layer=6, n_head=12, n_embd=768)), ("GPT-2 medium", dict(n_layer=24, n_head=16,
                                                                                      n_embd=1024))]


def _e2e_train_pairs() -> int:
    meta = ROOT / "data" / "e2e" / "prepared" / "meta.json"
    try:
        return int(json.loads(meta.read_text())["counts"]["train"]["pairs"])
    except (OSError, KeyError, ValueError, TypeError):
        return E2E_TRAIN_PAIRS


def part_finetune(rec: Record, cfg: SessionConfig) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    from gpt2study.hf_format import hf_config
    from lora import LoRAConfig, inject_lora
    from model import GPT, GPTConfig

    device = _device()
    bf16 = device == "cuda"
    batch, T = 8, (16 if cfg.dry_run else 64)
    steps_5_epochs = 5 * math.ceil(_e2e_train_pairs() / batch)
    r, alpha, dropout = 4, 32.0, 0.1
    title = (f"LoRA fine-tuning, batch {batch} x {T} tokens, rank {r}, alpha {alpha:g}, dropout {dropout}, "
             + ("bf16 autocast" if bf16 else "float32") + f"; 5 E2E epochs = {steps_5_epochs:,} steps")
    eager_s, compiled_s = (5, 40) if cfg.dry_run else (8, 45)
    # (who, compiled, lora_impl): ours with the defaults a GPU user gets (compiled, lora_impl auto), PEFT as users run
    # it (eager), then each of our LoRA paths eager
    variants = {"ours (q, v), defaults (compiled)": ("ours", True, "auto"), "PEFT (c_attn)": ("peft", False, None),
                "ours (q, v) eager, concat": ("ours", False, "concat"),
                "ours (q, v) eager, unfused": ("ours", False, "unfused"),
                "ours (q, v) eager, LoRA kernel": ("ours", False, "triton")}
    results = {}
    for (base, shape), (variant, (who, compiled, impl)) in itertools.product(_lora_setups(cfg.dry_run),
                                                                              variants.items()):
        name = f"{base}: {variant}"
        if impl == "triton" and device != "cuda":
            rec.note(f"skipped {name}: the LoRA kernel runs on CUDA only")
            continue
        if not rec.afford(compiled_s if compiled else eager_s, name):
            continue
        model = opt = run = None
        try:
            torch.manual_seed(0)
            if who == "ours":
                model = GPT(GPTConfig(**shape, dropout=0.0, lora_impl=impl)).to(device)
                inject_lora(model, LoRAConfig(lora_r=r, lora_alpha=alpha, lora_dropout=dropout,
                                              lora_targets=("q", "v")))
                vocab = model.config.vocab_size

                def loss_fn(m, idx):
                    return m(idx[:, :-1], idx[:, 1:])[1]
            else:
                hf = GPT2LMHeadModel(GPT2Config.from_dict(hf_config(GPTConfig(**shape, dropout=0.0))))
                # GPT-2's q, k, v are one Conv1D: PEFT can only adapt it whole (stored (in, out): fan_in_fan_out).
                model = get_peft_model(hf, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                                                      target_modules=["c_attn"], fan_in_fan_out=True)).to(device)
                vocab = hf.config.vocab_size

                def loss_fn(m, idx):
                    return m(input_ids=idx[:, :-1], labels=idx[:, :-1]).loss
            model.train()
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.01, fused=device == "cuda")
            run = _compile(model, cfg.dry_run) if compiled else model
            idx = torch.randint(0, vocab, (batch, T + 1), device=device)

            def step(run=run, opt=opt, loss_fn=loss_fn, idx=idx):
                with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
                    loss = loss_fn(run, idx)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            first, per_step = _time_steps(step, device, warmup=3, steps=3 if cfg.dry_run else 20)
            row = {"model": name, "trainable": sum(p.numel() for p in params), "first step s": first,
                   "ms/step": 1e3 * per_step, "tokens/s": batch * T / per_step,
                   "5 epochs, min": steps_5_epochs * per_step / 60}
            results[name] = row
            rec.add_row(title, row)
        except Exception as e:
            rec.note(f"{name} failed: {_error(e)}")
        finally:
            model = opt = run = None
            if device == "cuda":
                torch.cuda.empty_cache()

    for i, (base, _) in enumerate(_lora_setups(cfg.dry_run)):
        ours = [row for n, row in results.items() if n.startswith(f"{base}: ours")]
        peft = results.get(f"{base}: PEFT (c_attn)")
        concat, fused = results.get(f"{base}: ours (q, v) eager, concat"), results.get(
            f"{base}: ours (q, v) eager, LoRA kernel")
        if concat and fused:  # the kernel against the PyTorch path 'auto' takes on CUDA without it
            rec.fact(f"finetune_kernel_over_pytorch_{i}", fused["tokens/s"] / concat["tokens/s"])
        best = max(ours, key=lambda row: row["tokens/s"], default=None)
        if best is None:
            continue
        limit = (3, 10)[i]
        rec.check("finetune", f"5 E2E epochs, {best['model']}", f"{best['5 epochs, min']:.1f} min", f"≤ {limit} min",
                  best["5 epochs, min"] <= limit)
        x = None if peft is None else best["tokens/s"] / peft["tokens/s"]
        rec.check("finetune", f"fine-tuning tokens/s, {best['model']} / PEFT", _x(x), "≥ 1.5x",
                  x is not None and x >= 1.5)


def e2e_like_prompts(n: int, test: Path = ROOT / "data" / "e2e" / "prepared" / "test.jsonl",
                     seed: int = 0) -> tuple[list[list[int]], str]:
    """The first n E2E test prompts of `test` (data/e2e/prepare.py's test.jsonl) if it has them, else n synthetic
    MRs of the same form ('name : X | eatType : Y | ... ||', 3 to 8 attributes), tokenized; and which of the two."""
    import random

    from gpt2study.tokenizer import encode_batch

    if test.is_file():
        prompts = [json.loads(line)["prompt"] for line in test.read_text().splitlines() if line.strip()]
        if len(prompts) >= n:
            return prompts[:n], f"the first {n} MRs of {test.name}"
    values = {"eatType": ["coffee shop", "pub", "restaurant"], "food": ["French", "Italian", "Chinese", "English",
              "Japanese", "Indian", "Fast food"], "priceRange": ["cheap", "moderate", "high", "less than £20",
              "£20-25", "more than £30"], "customer rating": ["low", "average", "high", "1 out of 5", "3 out of 5",
              "5 out of 5"], "area": ["city centre", "riverside"], "familyFriendly": ["yes", "no"],
              "near": ["The Bakers", "Raja Indian Cuisine", "Café Sicilia", "Crowne Plaza Hotel", "The Portland Arms"]}
    names = ["The Eagle", "The Mill", "Loch Fyne", "Alimentum", "Aromi", "Blue Spice", "Cotto", "Fitzbillies",
             "Green Man", "Strada", "The Vaults", "Wildwood", "Zizzi", "Browns Cambridge", "The Cricketers"]
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        keys = rng.sample(list(values), rng.randint(2, 7))
        pairs = [("name", rng.choice(names))] + [(k, rng.choice(values[k])) for k in values if k in keys]
        texts.append(" | ".join(f"{k} : {v}" for k, v in pairs) + " ||")
    return encode_batch(texts), f"{n} synthetic E2E-like MRs"


def part_beam(rec: Record, cfg: SessionConfig) -> None:
    import torch

    beam_bench = _load_beam_bench()
    from gpt2study.decoding import beam_search
    from gpt2study.tokenizer import EOT
    from model import GPTConfig

    device = _device()
    n, max_live, new_tokens = (6, 3, 8) if cfg.dry_run else (630, 51, 64)
    shape = dict(n_layer=2, n_head=2, n_embd=64) if cfg.dry_run else {}
    ours, hf = beam_bench.random_models(GPTConfig(**shape), seed=0)
    ours, hf = ours.to(device).eval(), hf.to(device).eval()
    prompts, source = e2e_like_prompts(n)
    bf16 = device == "cuda"
    search = dict(**SEARCH, max_new_tokens=new_tokens)
    title = (f"Beam search, {source}, beam 10, length penalty 0.8, no repeated 4-gram, <= {new_tokens} new tokens, "
             f"{max_live} MRs side by side, {'bf16 autocast' if bf16 else 'float32'}, same random weights")

    def ours_run(mrs):
        return beam_search(ours, mrs, **search, eos=EOT, max_live=max_live)

    def hf_run(mrs):
        return beam_bench.hf_beam_search(hf, mrs, max_new_tokens=new_tokens)

    with torch.inference_mode(), torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
        for run in (ours_run, hf_run):  # one-time setup outside the timing
            run(prompts[:2])
        _sync(device)
        t0 = time.perf_counter()
        ours_out = ours_run(prompts)
        _sync(device)
        ours_s = time.perf_counter() - t0
        rec.add_row(title, {"decoder": "ours (decoding.beam_search, continuous batching)", "MRs": n, "s": ours_s,
                            "new tokens": sum(map(len, ours_out)), "MRs/s": n / ours_s})
        hf_out, hf_s = [], 0.0
        for start in range(0, n, max_live):  # a batch at a time, while the budget lasts
            if hf_out and not rec.afford(hf_s / len(hf_out) * max_live + 2, "the rest of transformers' batches"):
                break
            t0 = time.perf_counter()
            hf_out += hf_run(prompts[start:start + max_live])
            _sync(device)
            hf_s += time.perf_counter() - t0
    done = len(hf_out)
    rec.add_row(title, {"decoder": "transformers generate (num_beams=10, a batch at a time)", "MRs": done, "s": hf_s,
                        "new tokens": sum(map(len, hf_out)), "MRs/s": done / hf_s if hf_s else None})
    same = sum(a == b for a, b in zip(ours_out, hf_out))
    rec.note(f"identical outputs on the {done} MRs both decoded: {same} (random weights make near-ties common)")
    x = (hf_s / done) / (ours_s / n) if done else None  # seconds per MR, theirs over ours
    rec.check("beam", f"beam search of {n} MRs, ours", f"{ours_s:.1f} s", "seconds", ours_s < 60)
    rec.check("beam", "beam search MRs/s, ours / transformers generate", _x(x), "≥ 2x", x is not None and x >= 2)


def _shared_file(relative: str) -> Path | None:
    """A file of the shared data (beside the repository, or inside it), if this machine has it."""
    return next((p for p in (ROOT.parent / "shared" / relative, ROOT / "shared" / relative) if p.is_file()), None)


def _synthetic_e2e(folder: Path, n_train: int = 256, n_test: int = 630) -> None:
    """A prepared E2E folder of synthetic MRs (what data/e2e/prepare.py writes, in form only), for a machine
    without the release: the pipeline still runs every step; its outputs then say nothing about E2E."""
    from gpt2study.tokenizer import EOT, decode, encode_batch

    prompts, _ = e2e_like_prompts(n_train + n_test, test=folder / "absent.jsonl", seed=1)
    texts = [decode(p).removesuffix(" ||").split(" | ")[0].removeprefix("name : ") + " is a place." for p in prompts]
    targets = [[*t, EOT] for t in encode_batch([" " + t for t in texts])]
    folder.mkdir(parents=True, exist_ok=True)
    pairs = [json.dumps({"mr": decode(p), "ref": r, "prompt": p, "target": t})
             for p, r, t in zip(prompts, texts, targets)]
    (folder / "train.jsonl").write_text("\n".join(pairs[:n_train]) + "\n")
    (folder / "dev.jsonl").write_text("\n".join(pairs[:32]) + "\n")
    (folder / "test.jsonl").write_text("\n".join(json.dumps({"mr": decode(p), "refs": [r], "prompt": p})
                                                  for p, r in zip(prompts[n_train:], texts[n_train:])) + "\n")


def _pipeline_steps(work: Path, corpus: Path, e2e_zip: Path | None, dry_run: bool) -> list[tuple[str, list, float]]:
    """(name, command, estimated seconds) of the study's steps at config/study_tiny.py's size."""
    e2e, device = work / "e2e", ["--device=cpu"] if dry_run else ["--device=auto"]
    # a dry run on a CPU: a few steps of the smallest shapes, to check the steps fit together
    iters, seq = (("--max_iters=6", "--eval_interval=3"), 64) if dry_run else (("--max_iters=30", "--eval_interval=15"),
                                                                             128)
    tiny = ["--n_layer=2", "--n_head=2", "--n_embd=64", f"--block_size={seq}", "--batch_size=8", "--eval_iters=2",
            "--log_interval=5", "--progress=False", *device]
    py = sys.executable
    steps = [("prepare text", [py, "data/text/prepare.py", f"--src={corpus}", f"--out_dir={work / 'corpus'}"], 15)]
    if e2e_zip is not None:
        steps.append(("prepare E2E", [py, "data/e2e/prepare.py", f"--src={e2e_zip}", f"--out_dir={e2e}"], 20))
    steps += [
        ("pretrain", [py, "train.py", "config/pretrain_small.py", f"--data_dir={work / 'corpus'}",
                      f"--out_dir={work / 'pretrain'}", *tiny, *iters, "--warmup_iters=2"], 50 if dry_run else 45),
        ("sample", [py, "sample.py", f"--model={work / 'pretrain'}", "--prompts=prompts.txt", "--max_new_tokens=16",
                    f"--out={work / 'samples.txt'}", *device], 35 if dry_run else 15),
        ("LoRA", [py, "finetune.py", "config/lora_e2e_small.py", f"--init_from={work / 'pretrain'}",
                  f"--data_dir={e2e}", f"--out_dir={work / 'lora'}", "--train_subset=256", "--batch_size=8",
                  f"--max_seq_len={seq}", *iters, "--eval_iters=2", "--log_interval=5", "--warmup_iters=2",
                  "--progress=False", *device], 50 if dry_run else 45),
    ]
    return steps


def part_pipeline(rec: Record, cfg: SessionConfig) -> None:
    """The study once, small, on this machine's defaults; the decoded test MRs go to pipeline.txt, unscored."""
    import tempfile

    import torch

    from gpt2study.decoding import continuations
    from gpt2study.e2e_data import load_prepared
    from gpt2study.loading import load_model
    from gpt2study.tokenizer import decode

    work = Path(tempfile.mkdtemp(prefix="gpu_session_pipeline_"))
    corpus, e2e_zip = _shared_file("data/corpus/inaugural.txt"), _shared_file("data/e2e/e2e-dataset.zip")
    if corpus is None:  # any English text does for minutes of pretraining: the repository's own
        corpus = work / "readme.txt"
        corpus.write_text((ROOT / "README.md").read_text(encoding="utf-8") * 20, encoding="utf-8")
        rec.note("no shared corpus on this machine: pretraining on README.md")
    if e2e_zip is None:
        _synthetic_e2e(work / "e2e")
        rec.note("no E2E release on this machine: synthetic MRs (the outputs say nothing about E2E)")
    title = "Pipeline, the study at config/study_tiny.py's size on this machine's defaults"
    for name, cmd, estimate in _pipeline_steps(work, corpus, e2e_zip, cfg.dry_run):
        if not rec.afford(estimate, name):
            return
        t0 = time.perf_counter()
        output, last, status = run_group(cmd, max(rec.left() - 2, 1), env={**os.environ, "PYTHONPATH": str(ROOT)})
        print(f"\n----- pipeline: {name}\n$ {' '.join(map(str, cmd))}\n{output[-4000:]}", flush=True)  # to log.txt
        rec.add_row(title, {"step": name, "s": time.perf_counter() - t0, "exit status": status,
                            "last line": last[:100]})
        if status != 0:
            rec.note(f"pipeline step {name} failed: {last[:200]}")
            return
    n = 10 if cfg.dry_run else 630
    if not rec.afford(20 if cfg.dry_run else 30, f"beam decoding of {n} test MRs"):
        return
    t0 = time.perf_counter()
    model = load_model(str(work / "lora")).to(_device()).eval()
    prompts = [r["prompt"] for r in load_prepared(work / "e2e", "test")][:n]
    with torch.inference_mode(), torch.autocast(_device(), dtype=torch.bfloat16, enabled=_device() == "cuda"):
        outputs = continuations(model, prompts, method="beam", progress=False, **SEARCH,
                                max_new_tokens=16 if cfg.dry_run else 64)
    rec.file("pipeline.txt", "".join(decode(o).replace("\n", " ").strip() + "\n" for o in outputs))
    rec.add_row(title, {"step": f"beam decoding of {len(prompts)} test MRs", "s": time.perf_counter() - t0,
                        "last line": "pipeline.txt: one output per MR, in test-set order"})
    rec.check("pipeline", "the study end to end on this machine, decoded test MRs", f"{len(outputs)} outputs",
              "pretrain -> sample -> LoRA -> beam decoding", len(outputs) == len(prompts))


def _load_beam_bench():
    spec = importlib.util.spec_from_file_location("beam_bench", ROOT / "bench" / "beam.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- the session


def _proposed_wins(parts: dict) -> tuple[str, str]:
    """The kernels.MEASURED_WINS entry this session's numbers support, and its line for the summary."""
    facts = {k: v for p in parts.values() for k, v in p.get("facts", {}).items()}
    wins = dict(facts.get("kernel_wins", {}))
    # A kernel that wins alone must also not slow the whole training or fine-tuning step, where that was measured.
    for kind, prefix in (("attention", "train_triton_over_sdpa"), ("lora_linear", "finetune_kernel_over_pytorch")):
        if kind in wins:
            wins[kind] = wins[kind] and all(x >= 1.0 for k, x in facts.items() if k.startswith(prefix))
    kinds = sorted(k for k, won in wins.items() if won)
    cap = facts.get("capability")
    if not wins or cap is None:
        return "", "nothing measured on a GPU: every CUDA default stays PyTorch"
    key = tuple(int(c) for c in cap.split("."))
    entry = "{" + ", ".join(f'"{k}": "bench/results/<this session>.md"' for k in kinds) + "}"
    return f"{key}: {entry}", f"{key}: {entry}" if kinds else f"{key}: none won, every default stays PyTorch"


def _part_command(name: str, cfg: SessionConfig, budget: float, result: Path) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), f"--part={name}", f"--result={result}",
            f"--{name}_s={budget}"] + (["--dry_run"] if cfg.dry_run else [])


def run_part(name: str, cfg: SessionConfig, budget: float, workdir: Path, log, grace: float = 20.0,
             on_update=None) -> dict:
    """Run one part in a child process (a process group of its own), killed at its budget plus `grace`; its
    record, with how it ended (whatever it saved before a failure or the kill is kept). `on_update(record)` is
    called with the record so far whenever the child saves it."""
    result = workdir / f"{name}.json"
    cmd = _part_command(name, cfg, budget, result)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if cfg.dry_run:  # the CPU and Triton's interpreter, even on a machine with a GPU
        env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    log.write(f"\n===== part {name} (budget {budget:.0f} s)\n")
    log.flush()
    t0 = time.monotonic()
    child = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    seen = None
    while True:
        try:
            status = child.wait(timeout=1.0)
            ended = "done" if status == 0 else f"failed (exit status {status})"
            break
        except subprocess.TimeoutExpired:
            if time.monotonic() - t0 > budget + grace:
                os.killpg(child.pid, 9)
                child.wait()
                ended = "killed at its budget"
                break
        stamp = result.stat().st_mtime_ns if result.exists() else None
        if on_update is not None and stamp != seen:
            seen = stamp
            on_update({**_read_record(result), "ended": "running", "seconds": time.monotonic() - t0})
    return {**_read_record(result), "ended": ended, "seconds": time.monotonic() - t0}


def _read_record(path: Path) -> dict:
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        saved = {}
    return {**_empty_record(), **saved}


def _empty_record() -> dict:
    return {"tables": {}, "summary": [], "notes": [], "files": {}, "facts": {}, "estimates": []}


def _markdown_summary(rows: list) -> str:
    lines = ["| item | measurement | value | target | met |", "|---|---|---|---|---|"]
    for r in rows:
        met = {True: "yes", False: "**no**", None: "—"}[r["met"]]
        lines.append(f"| {r['item']} | {r['measurement']} | {r['value']} | {r['target']} | {met} |")
    return "\n".join(lines) + "\n"


def _estimate_rows(parts: dict) -> list:
    """One summary row per part that ran steps under an estimate: how many took no longer than it said."""
    rows = []
    for name, p in parts.items():
        steps = p.get("estimates", [])
        if steps:
            within = sum(e["took s"] <= e["estimate s"] for e in steps)
            over = [e["step"] for e in steps if e["took s"] > e["estimate s"]]
            rows.append({"item": "session", "measurement": f"part {name}: steps within their time estimate",
                         "value": f"{within}/{len(steps)}" + (f" (over: {', '.join(over[:3])})" if over else ""),
                         "target": "all", "met": within == len(steps)})
    return rows


def write_outputs(out: Path, cfg: SessionConfig, parts: dict, seconds: float, final: bool) -> str:
    """session.md (the summary first), session.json and the parts' files, from what `parts` holds now: rewritten
    at every update, so that a session cut short leaves its finished rows. Returns the summary table."""
    kb = _bench_module()
    summary = [{"item": "session", "measurement": f"part {n}", "value": f"{p['ended']}, {p['seconds']:.0f} s",
                "target": "done", "met": None if cfg.dry_run or p["ended"] == "running" else p["ended"] == "done"}
               for n, p in parts.items()]
    summary += [row for p in parts.values() for row in p["summary"]]
    summary += _estimate_rows(parts)
    entry, line = _proposed_wins(parts)
    summary.append({"item": "session", "measurement": "kernels.MEASURED_WINS entry these numbers support",
                    "value": line, "target": "defaults follow measurements", "met": None})
    summary.append({"item": "session", "measurement": "the whole session" + ("" if final else " (so far)"),
                    "value": f"{seconds:.0f} s", "target": "≤ 540 s",
                    "met": None if cfg.dry_run or not final else seconds <= 540})
    device = next((p["facts"]["device"] for p in parts.values() if "device" in p.get("facts", {})), "n/a")
    head = (f"# GPU session{' (DRY RUN: tiny shapes on the CPU, nothing here is a measurement)' if cfg.dry_run else ''}"
            f"\n\n{device}; {time.strftime('%Y-%m-%d %H:%M')}; parts: {', '.join(cfg.parts)}"
            + ("" if final else "; IN PROGRESS (or cut short)") + "\n")
    body = []
    for name, p in parts.items():
        body.append(f"## {name}: {p['ended']} ({p['seconds']:.0f} s)\n")
        body += [kb.markdown(title, rows) for title, rows in p["tables"].items() if rows]
        if p.get("estimates"):
            body.append(kb.markdown(f"{name}: time estimates against the time taken", p["estimates"]))
        body += [f"- {n}" for n in p["notes"]]
        body.append("")
    table = _markdown_summary(summary)
    _atomic_write(out / "session.md", head + "\n## Summary\n\n" + table + "\n" + "\n".join(body))
    _atomic_write(out / "session.json", json.dumps({"dry_run": cfg.dry_run, "device": device, "seconds": seconds,
                                                    "complete": final, "proposed_wins": entry, "parts": parts},
                                                   indent=1, default=str))
    files = {}
    for p in parts.values():
        for fname, text in p["files"].items():
            files[fname] = files.get(fname, "") + text
    for fname, text in files.items():
        _atomic_write(out / fname, text)
    return table


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def session(cfg: SessionConfig) -> None:
    import tempfile

    out = Path(cfg.out or os.environ.get("OUT") or ROOT / "out" / ("gpu_session_dry" if cfg.dry_run else "gpu_session"))
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    parts: dict = {}
    with tempfile.TemporaryDirectory() as tmp, open(out / "log.txt", "w") as log:
        for name in cfg.parts:
            left = cfg.budget_s - (time.monotonic() - start)
            budget = min(getattr(cfg, f"{name}_s"), left - 5)
            if budget < 5:
                parts[name] = {**_empty_record(), "ended": "skipped: the session's budget is spent", "seconds": 0.0}
            else:
                print(f"part {name}: budget {budget:.0f} s ...", flush=True)

                def update(record, name=name):
                    write_outputs(out, cfg, {**parts, name: record}, time.monotonic() - start, final=False)

                parts[name] = run_part(name, cfg, budget, Path(tmp), log, on_update=update)
            write_outputs(out, cfg, parts, time.monotonic() - start, final=False)
            print(f"part {name}: {parts[name]['ended']} ({parts[name]['seconds']:.0f} s)", flush=True)
    table = write_outputs(out, cfg, parts, time.monotonic() - start, final=True)
    print(f"\nwrote {', '.join(f for f in FILES if (out / f).exists())} in {out}\n")
    print(table)


def main() -> None:
    cfg = load_config(SessionConfig, sys.argv[1:], doc=__doc__)
    if cfg.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
        if "triton" in sys.modules and os.environ["TRITON_INTERPRET"] != "1":
            raise UserError("TRITON_INTERPRET must be 1 for a dry run")
    if not cfg.part:
        return session(cfg)
    rec = Record(cfg.result, getattr(cfg, f"{cfg.part}_s"), cfg.dry_run)
    rec.save()
    import torch

    if not cfg.dry_run and not torch.cuda.is_available():
        raise UserError("no CUDA device: this session measures a GPU; --dry_run checks the script on a CPU")
    globals()[f"part_{cfg.part}"](rec, cfg)
    rec.done()


if __name__ == "__main__":
    run_main(main)
