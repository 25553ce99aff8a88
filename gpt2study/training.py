"""The training machinery that pretraining (train.py) and LoRA fine-tuning (finetune.py) share.

One loop, `fit`, with everything around it: the run's devices and DDP, AdamW with a
warmup-then-decay schedule, gradient accumulation and clipping, mixed precision, an
epoch-based data order that can be resumed exactly, evaluation, logging (TensorBoard,
metrics.jsonl, a progress bar) and atomic checkpoints.

A dataset here is anything with `len(ds)` (a number of examples) and
`ds.batch(indices) -> (x, y)`: token ids and targets (IGNORE_INDEX where not scored).
"""

import contextlib
import json
import math
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from gpt2study import folder_lock
from gpt2study.checkpoints import STATE_FILE, load_train_state, save_checkpoint
from gpt2study.checkpoints import run_info as checkpoint_info
from gpt2study.cli import DEVICE_HELP, resolve_device
from gpt2study.files import write_atomic
from model import IGNORE_INDEX, UserError, setting


@dataclass
class TrainConfig:
    out_dir: str = setting("out/run", "the run's folder: checkpoint/, metrics.jsonl, tb/")
    init_from: str = setting("scratch", "'resume' continues out_dir's run exactly; other values: see each script")
    # length: epochs over the training set, or an exact number of optimizer steps
    epochs: float = setting(1.0, "passes over the training set", above=0.0)
    max_iters: int = setting(0, "optimizer steps; > 0 overrides epochs", at_least=0)
    batch_size: int = setting(8, "sequences per micro-batch, per process", at_least=1)
    grad_accum: int = setting(1, "micro-batches per optimizer step", at_least=1)
    # AdamW and the learning-rate schedule
    lr: float = setting(3e-4, "peak learning rate", above=0.0)
    min_lr: float = setting(3e-5, "the schedule decays to this (at most lr)", at_least=0.0)
    warmup_iters: int = setting(0, "steps of linear warmup from 0 to lr", at_least=0)
    decay: str = setting("cosine", "after warmup", choices=("cosine", "linear", "constant"))
    weight_decay: float = setting(0.1, "AdamW's, on matrices only (never biases or LayerNorm gains)", at_least=0.0)
    beta1: float = setting(0.9, "AdamW's first-moment decay", at_least=0.0, below=1.0)
    beta2: float = setting(0.95, "AdamW's second-moment decay", at_least=0.0, below=1.0)
    grad_clip: float = setting(1.0, "clip the gradient norm to this; 0 disables", at_least=0.0)
    label_smoothing: float = setting(0.0, "of the training loss (evaluation never smooths)", at_least=0.0, below=1.0)
    # evaluation, logging, checkpoints
    eval_interval: int = setting(500, "steps between evaluations; 0 evaluates once per epoch", at_least=0)
    eval_iters: int = setting(100, "validation batches per evaluation; 0 uses the whole validation set", at_least=0)
    ckpt_interval: int = setting(0, "steps between checkpoints; 0 saves at every evaluation", at_least=0)
    log_interval: int = setting(10, "steps between training records (means over the steps since the last), the "
                                "only host syncs besides evaluations and checkpoints; under DDP also where the "
                                "processes agree to stop on a signal", at_least=1)
    progress: bool = setting(True, "show a progress bar")
    # system
    device: str = setting("auto", DEVICE_HELP)
    dtype: str = setting("auto", "float32, or autocast to bfloat16 / float16; auto: bfloat16 on a GPU that has it "
                         "(float16 with loss scaling on one that does not), float32 elsewhere",
                         choices=("auto", "float32", "bfloat16", "float16"))
    compile: bool | None = setting(None, "torch.compile the training model; None (auto): on CUDA only")
    seed: int = setting(1337, "of the data order, initialisation and dropout", at_least=0)
    peak_flops: float = setting(0.0, "the device's peak FLOP/s for MFU; 0 guesses from the GPU's name", at_least=0.0)

    def check(self):
        if self.min_lr > self.lr:
            raise UserError(f"config key 'min_lr' is {self.min_lr}; it must be at most lr ({self.lr})")
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise UserError(f"config key 'device' is {self.device!r}; use auto, cpu, cuda or cuda:N")


# ----------------------------------------------------------------------------- the run's devices


@dataclass
class Runtime:
    device: torch.device
    rank: int
    local_rank: int
    world: int
    autocast: Callable  # () -> context manager
    scaler: torch.amp.GradScaler
    dtype: str  # what cfg.dtype became ('auto' resolved)
    compile: bool  # what cfg.compile became

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def ddp(self) -> bool:
        return self.world > 1


def world_size() -> int:
    """How many processes train together (torchrun sets WORLD_SIZE); known before any is set up."""
    return int(os.environ.get("WORLD_SIZE", 1))


def setup_runtime(cfg: TrainConfig) -> Runtime:
    """Devices, DDP (when started by torchrun), seeds and mixed precision for this process."""
    rank, local_rank = (int(os.environ.get(k, 0)) for k in ("RANK", "LOCAL_RANK"))
    world = world_size()
    want = resolve_device(cfg.device)
    if world > 1:
        if want.startswith("cuda"):
            want = f"cuda:{local_rank}"
            torch.cuda.set_device(want)
        dist.init_process_group("nccl" if want.startswith("cuda") else "gloo")
    device = torch.device(want)
    torch.manual_seed(cfg.seed + rank)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    resolved = resolve_precision(cfg, device)
    if rank == 0 and (cfg.dtype == "auto" or cfg.compile is None):
        print(f"on {device.type}: dtype={resolved['dtype']}, compile={resolved['compile']} (auto settings decided)")
    # the run records what it ran with (config.json 'train'): what 'auto' became, not 'auto'
    cfg.dtype, cfg.compile = resolved["dtype"], resolved["compile"]
    dtype = DTYPES[cfg.dtype]
    if dtype == torch.float32:
        autocast = contextlib.nullcontext
    else:
        def autocast():
            return torch.autocast(device.type, dtype=dtype)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    return Runtime(device, rank, local_rank, world, autocast, scaler, cfg.dtype, cfg.compile)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_precision(cfg: TrainConfig, device: torch.device) -> dict:
    """{'dtype', 'compile'} with 'auto' / None decided for `device`. On CUDA: bfloat16 autocast where the GPU has
    it (Ampere on), else float16 with the gradient scaler, and torch.compile: the speed a GPU user expects. On a
    CPU or MPS: float32 without compiling, whose first steps would take longer than a small run."""
    cuda = device.type == "cuda"
    dtype = cfg.dtype
    if dtype == "auto":
        dtype = ("bfloat16" if torch.cuda.is_bf16_supported(including_emulation=False) else "float16") if cuda \
            else "float32"
    if dtype not in DTYPES:
        raise UserError(f"dtype must be one of auto, {', '.join(DTYPES)}, not '{dtype}'")
    return {"dtype": dtype, "compile": cuda if cfg.compile is None else bool(cfg.compile)}


# Fine-tuning batches are as long as their longest pair: padded to a multiple of this, a compiled model sees a few
# shapes (at most block_size / LENGTH_BUCKET) instead of a new one, and a recompilation, nearly every step.
LENGTH_BUCKET = 64


class _LengthBuckets(torch.nn.Module):
    """`compiled(idx, targets)` with idx and targets padded on the right to the next multiple of LENGTH_BUCKET
    (at most the model's context). The loss is unchanged: causal attention keeps the padding out of every real
    position, and padded targets are IGNORE_INDEX."""

    def __init__(self, model, compiled):
        super().__init__()
        self.compiled = compiled
        object.__setattr__(self, "model", model)  # the same parameters: not registered twice
        self.block_size = model.config.block_size

    def forward(self, idx, targets=None, **kwargs):
        T = idx.size(1)
        L = min(-(-T // LENGTH_BUCKET) * LENGTH_BUCKET, max(self.block_size, T))
        if targets is None or L == T:
            return self.compiled(idx, targets, **kwargs)
        idx = torch.nn.functional.pad(idx, (0, L - T), value=0)
        targets = torch.nn.functional.pad(targets, (0, L - T), value=IGNORE_INDEX)
        return self.compiled(idx, targets, **kwargs)


def compile_model(model, backend: str | Callable = "inductor"):
    """The training model under torch.compile, fed lengths from a few buckets (_LengthBuckets) and compiled for
    each of them (static shapes: the fastest kernels, and the chunked loss's loop stays unrolled)."""
    import torch._dynamo

    buckets = -(-model.config.block_size // LENGTH_BUCKET) + 1
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, buckets + 2)
    return _LengthBuckets(model, torch.compile(model, backend=backend, dynamic=False))


def once_per_run(rt: Runtime, work: Callable[[], object]) -> None:
    """`work` (a download, say) on the master process alone; the others wait for it."""
    if rt.master:
        work()
    if rt.ddp:
        dist.barrier()


def teardown(rt: Runtime) -> None:
    if rt.ddp and dist.is_initialized():
        dist.destroy_process_group()


def micro_batch_seed(seed: int, step: int, micro: int) -> int:
    """The RNG seed (dropout) of the micro-batch that is the `micro`-th of a step's global batch,
    whichever process runs it. Derived, never stored: a run resumed at any step, on any number
    of processes with the same global batch, draws what the uninterrupted run drew."""
    return (seed * 1_000_003 + step) * 65_537 + micro


def check_resume(cfg: TrainConfig, ckpt: Path, world: int) -> None:
    """A run continues exactly only with its global batch: the data position and the schedule
    are counted in it. Refuse, in one line saying what must match, any other."""
    info = checkpoint_info(ckpt)
    train = info.get("train", {})
    recorded = info.get("global_batch", train.get("batch_size", 0) * train.get("grad_accum", 0))
    processes = info.get("processes", 1)
    have = cfg.batch_size * cfg.grad_accum * world
    if recorded and have != recorded:
        was = f"{recorded} sequences (batch_size {train.get('batch_size')} x grad_accum {train.get('grad_accum')} x " \
              f"{processes} process(es))"
        if recorded % world:
            hint = f"run it on a number of processes that divides {recorded}"
        else:
            per = recorded // world
            hint = f"with {world} process(es) batch_size x grad_accum must be {per}, e.g. --batch_size=" \
                   f"{math.gcd(per, cfg.batch_size)} --grad_accum={per // math.gcd(per, cfg.batch_size)}"
        raise UserError(f"the run in {cfg.out_dir} was trained with a global batch of {was}, not {have}: to "
                        f"continue it exactly, {hint}")


# ----------------------------------------------------------------------------- data order


class EpochSampler:
    """A fresh random order of the examples each epoch, walked a global batch at a time.

    The order depends only on (seed, epoch), so the position (epoch, offset) is all that a
    checkpoint needs to continue exactly where the run stopped.
    """

    def __init__(self, n: int, global_batch: int, seed: int):
        if n < global_batch:
            raise UserError(f"the training set has {n} examples, fewer than one optimizer step needs "
                            f"({global_batch} = batch_size x grad_accum x processes); lower batch_size")
        self.n, self.global_batch, self.seed = n, global_batch, seed
        self.epoch, self.offset = 0, 0
        self._order = None

    @property
    def steps_per_epoch(self) -> int:
        return self.n // self.global_batch  # the incomplete last batch of an epoch is dropped

    def next_batch(self) -> list[int]:
        if self.offset + self.global_batch > self.n:
            self.epoch, self.offset, self._order = self.epoch + 1, 0, None
        if self._order is None:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._order = torch.randperm(self.n, generator=g).tolist()
        batch = self._order[self.offset:self.offset + self.global_batch]
        self.offset += self.global_batch
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.offset, self._order = state["epoch"], state["offset"], None


# ----------------------------------------------------------------------------- optimizer, schedule


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; weight decay on matrices only (not biases, gains)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warmup from 0 to lr, then cosine or linear decay to min_lr at the last step."""
    if step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / cfg.warmup_iters
    if cfg.decay == "constant" or total <= cfg.warmup_iters:
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_iters) / max(1, total - cfg.warmup_iters))
    if cfg.decay == "linear":
        return cfg.lr + (cfg.min_lr - cfg.lr) * progress
    if cfg.decay == "cosine":
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))
    raise UserError(f"decay must be 'cosine', 'linear' or 'constant', not '{cfg.decay}'")


# ----------------------------------------------------------------------------- logging


class RunLog:
    """TensorBoard, out_dir/metrics.jsonl and the progress bar, on the master process only.

    A resumed run (start > 0) keeps the records up to its checkpoint; a new run moves the logs
    of an earlier one that left no checkpoint aside (old_logs.N/), so that two runs never mix.
    """

    def __init__(self, cfg: TrainConfig, rt: Runtime, start: int, total: int):
        self.enabled = rt.master
        if not self.enabled:
            return
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        out = Path(cfg.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.jsonl = out / "metrics.jsonl"
        if start:
            self._keep_records_until(start)
        else:
            self._set_aside(out)
        self.tb = SummaryWriter(str(out / "tb"), purge_step=start or None)
        self.bar = tqdm(total=total, initial=start, disable=not cfg.progress, dynamic_ncols=True, unit="step")

    def _keep_records_until(self, start: int) -> None:
        """Records past the checkpoint describe steps that will be redone; a line torn by a kill is dropped."""
        if not self.jsonl.exists():
            return
        keep, torn = [], 0
        for line in self.jsonl.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
                step = int(record["step"])
            except (ValueError, TypeError, KeyError):
                torn += bool(line.strip())
                continue
            if step <= start:
                keep.append(line + "\n")
        write_atomic(self.jsonl, "".join(keep))
        if torn:
            print(f"warning: {self.jsonl}: dropped {torn} unreadable line(s), torn by a crash", file=sys.stderr)

    def _set_aside(self, out: Path) -> None:
        stale = [p for p in (self.jsonl, out / "tb") if p.exists()]
        if not stale:
            return
        held_by = folder_lock.holder(out)
        if held_by:  # a live run's logs, not a dead one's
            raise UserError(f"{out} is in use by another run ({held_by}); its logs are left where they are")
        n = 1
        while (out / f"old_logs.{n}").exists():
            n += 1
        dest = out / f"old_logs.{n}"
        dest.mkdir()
        for p in stale:
            p.rename(dest / p.name)
        print(f"{out} held the logs of an earlier run that left no checkpoint: moved them to {dest}")

    def record(self, step: int, split: str, values: dict) -> None:
        if not self.enabled:
            return
        # JSON has no NaN or infinity: a value that is not finite is recorded as null
        values = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in values.items()}
        for k, v in values.items():
            if v is not None:
                self.tb.add_scalar(f"{split}/{k}", v, step)
        try:
            with open(self.jsonl, "a") as f:
                f.write(json.dumps({"step": step, "split": split, **values}, allow_nan=False) + "\n")
        except OSError as e:
            raise UserError(f"could not append to {self.jsonl}: {e.strerror or e}") from None

    def advance(self, **shown) -> None:
        if self.enabled:
            self.bar.update(1)
            if shown:
                self.bar.set_postfix(shown, refresh=False)

    def write(self, text: str) -> None:
        if self.enabled:
            self.bar.write(text)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.tb.close()


# Dense bf16 peaks by GPU name, the first name that the device's contains (so "H100 PCIe" before "H100").
PEAK_BF16_FLOPS = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "H800": 989e12, "A100": 312e12,
                   "L40S": 362e12, "A10G": 125e12, "L4": 121e12, "4090": 165e12, "3090": 71e12}


def peak_flops_of(name: str) -> float | None:
    """The dense bf16 peak FLOP/s of a GPU by its name, if known."""
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def peak_flops(cfg: TrainConfig, device: torch.device) -> float | None:
    if cfg.peak_flops:
        return cfg.peak_flops
    if device.type == "cuda":
        return peak_flops_of(torch.cuda.get_device_name(device))
    return None


def flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per token (PaLM's estimate): 2N forward, 2N backward to activations,
    2N_trainable for weight gradients, plus attention over a context of seq_len."""
    n = model.num_params()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    c = model.config
    return 4 * n + 2 * trainable + 12 * c.n_layer * c.n_embd * seq_len


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model, val_set, cfg: TrainConfig, rt: Runtime) -> dict:
    """Validation loss (without label smoothing), perplexity and next-token accuracy."""
    was_training = model.training
    model.eval()
    n_batches = math.ceil(len(val_set) / cfg.batch_size)
    if cfg.eval_iters:
        n_batches = min(n_batches, cfg.eval_iters)
    dtype = torch.float32 if rt.device.type == "mps" else torch.float64  # MPS has no float64
    totals = torch.zeros(3, dtype=dtype, device=rt.device)
    for b in range(rt.rank, n_batches, rt.world):
        idx = list(range(b * cfg.batch_size, min(len(val_set), (b + 1) * cfg.batch_size)))
        x, y = val_set.batch(idx)
        with rt.autocast():
            scores = model.score(x.to(rt.device), y.to(rt.device))
        # summed where they are (numbers, or tensors on the device), read once at the end
        totals += torch.stack([torch.as_tensor(v, device=rt.device).to(dtype) for v in scores])
    if rt.ddp:
        dist.all_reduce(totals)
    loss_sum, correct, count = totals.tolist()
    model.train(was_training)
    loss = loss_sum / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700)), "accuracy": correct / max(count, 1),
            "tokens": int(count)}


# ----------------------------------------------------------------------------- the loop


class _StopRequest:
    """The first SIGINT (Ctrl-C) or SIGTERM (a job scheduler, a preemption): finish the current
    step, save a checkpoint and exit with 128 + the signal's number (130, 143), so that a chain
    `train.py ... && finetune.py ...` stops there. The second: stop at once. (A repeat within a
    second is the same request: torchrun passes on the signal its workers got from the terminal.)"""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, quiet: bool):
        self.signum, self.quiet, self._previous, self._at = None, quiet, {}, 0.0
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame):
        if self.signum is not None:
            if time.monotonic() - self._at < 1.0:
                return
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        self.signum, self._at = signum, time.monotonic()
        if not self.quiet:  # os.write: a handler may interrupt a print
            os.write(2, f"\n{signal.Signals(signum).name}: stopping after this step, with a checkpoint "
                        f"(again to stop at once)\n".encode())

    def restore(self):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def _check_optimizer_fits(optimizer, ckpt: Path) -> None:
    """Each moment buffer of a loaded optimizer state has its parameter's shape."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            for name, buf in optimizer.state.get(p, {}).items():
                if torch.is_tensor(buf) and buf.dim() and buf.shape != p.shape:
                    raise UserError(f"{ckpt / STATE_FILE} does not fit the model: its {name} of shape "
                                    f"{tuple(buf.shape)} belongs to a parameter of shape {tuple(p.shape)}")


class _Tally:
    """The steps since the last check, kept on the device so that no step waits for it: the sums of the
    training record in progress (loss, finite gradient norms, how many were finite), whether every loss and
    gradient norm so far was finite, and the first step that was not, with its values."""

    def __init__(self, dev: torch.device, sums: list, steps: int, step: int, scaler_skips: bool):
        self.sums = torch.tensor(sums, dtype=torch.float32, device=dev)
        self.steps = steps
        self.all_finite = torch.ones((), dtype=torch.bool, device=dev)
        self.first_bad = torch.zeros(3, dtype=torch.float32, device=dev)
        self.step = torch.tensor(float(step), device=dev)
        self.scaler_skips = scaler_skips  # fp16's scaler skips a step whose gradients overflow, by design

    def add(self, train_loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        self.step += 1
        norm_ok = torch.isfinite(grad_norm)
        good = torch.isfinite(train_loss) & (norm_ok | self.scaler_skips)
        bad_now = torch.stack([self.step, train_loss, grad_norm.float()])
        self.first_bad = torch.where(self.all_finite & ~good, bad_now, self.first_bad)
        self.all_finite &= good
        self.sums += torch.stack([train_loss, torch.where(norm_ok, grad_norm, 0.0), norm_ok.float()])
        self.steps += 1

    def take_record(self, rt: Runtime) -> tuple[float, float | None]:
        """The mean loss and gradient norm since the last record (averaged over the processes); starts anew."""
        if rt.ddp:
            dist.all_reduce(self.sums, op=dist.ReduceOp.AVG)
        loss_total, norm_total, norms = self.sums.tolist()
        mean_loss, mean_norm = loss_total / max(self.steps, 1), norm_total / norms if norms else None
        self.sums.zero_()
        self.steps = 0
        return mean_loss, mean_norm


class _Loop:
    """`fit`'s state and its pieces: restore, step, check, evaluate, checkpoint."""

    def __init__(self, cfg: TrainConfig, rt: Runtime, model, train_set, val_set, export, run_info: dict):
        self.cfg, self.rt, self.raw, self.model = cfg, rt, model, model
        self.train_set, self.val_set, self.export = train_set, val_set, export
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(model, cfg, rt.device)
        self.global_batch = cfg.batch_size * cfg.grad_accum * rt.world
        self.sampler = EpochSampler(len(train_set), self.global_batch, cfg.seed)
        self.total = cfg.max_iters or max(1, math.ceil(cfg.epochs * self.sampler.steps_per_epoch))
        self.eval_every = cfg.eval_interval or self.sampler.steps_per_epoch
        self.ckpt_every = cfg.ckpt_interval or self.eval_every
        self.step, self.last_eval, self.tokens_seen, self.last_ckpt = 0, {}, 0, None
        self.log_sums, self.log_steps = [0.0, 0.0, 0.0], 0
        self.run_info = {**run_info, "train": asdict(cfg), "total_steps": self.total,
                         "global_batch": self.global_batch, "processes": rt.world}

    def restore(self, ckpt: Path) -> bool:
        """Continue from a checkpoint's optimizer, schedule and data position (its weights are loaded
        already); True when that run is already complete."""
        state = load_train_state(ckpt)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise UserError(f"{ckpt / STATE_FILE} does not fit the model ({str(e)[:150]})") from None
        _check_optimizer_fits(self.optimizer, ckpt)
        self.rt.scaler.load_state_dict(state["scaler"])
        self.sampler.load_state_dict(state["sampler"])
        self.step, self.last_eval = state["step"], state.get("last_eval", {})
        self.log_sums, self.log_steps = state.get("log", (self.log_sums, self.log_steps))
        self.tokens_seen, self.last_ckpt = state.get("tokens_seen", 0), self.step
        if self.step > self.total:
            raise UserError(f"the run in {self.cfg.out_dir} is at step {self.step}, past the {self.total} steps "
                            f"asked for: raise max_iters or epochs to continue it")
        if self.step == self.total and self.rt.master:
            print(f"the run in {self.cfg.out_dir} is complete (step {self.step} of {self.total}): nothing to do")
        return self.step == self.total

    def wrap_model(self) -> None:
        """Compile and DDP wrap the model that steps run through; evaluation and checkpoints use the raw one."""
        if self.cfg.compile:
            self.model = compile_model(self.model)
        if self.rt.ddp:
            from torch.nn.parallel import DistributedDataParallel

            cuda = self.rt.device.type == "cuda"
            self.model = DistributedDataParallel(self.model, device_ids=[self.rt.local_rank] if cuda else None)

    def stop_not_finite(self, what: str):
        kept = f"the last good checkpoint (step {self.last_ckpt}) is kept in {self.cfg.out_dir}" \
            if self.last_ckpt is not None else "no checkpoint was written"
        raise UserError(f"{what}; stopped, {kept}. Lower lr, raise warmup_iters, or use dtype=bfloat16 instead of "
                        f"float16")

    def train_step(self, tally: _Tally) -> tuple[float, int]:
        """One optimizer step over a global batch, this process's share of it; (lr, tokens read)."""
        cfg, rt, dev = self.cfg, self.rt, self.rt.device
        lr = lr_at(self.step, self.total, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batch = self.sampler.next_batch()
        loss_sum, tokens = torch.zeros((), device=dev), 0
        for micro in range(cfg.grad_accum):
            shard = micro * rt.world + rt.rank  # this micro-batch's place in the global batch
            torch.manual_seed(micro_batch_seed(cfg.seed, self.step, shard))
            x, y = self.train_set.batch(batch[shard * cfg.batch_size:(shard + 1) * cfg.batch_size])
            if dev.type == "cuda":  # a copy from pinned memory does not wait for the device
                x, y = x.pin_memory(), y.pin_memory()
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            tokens += x.numel() * rt.world  # padding included: what the model read
            # DDP averages gradients across processes only on the last micro-batch
            sync = not rt.ddp or micro == cfg.grad_accum - 1
            with (contextlib.nullcontext() if sync else self.model.no_sync()), rt.autocast():
                _, loss = self.model(x, y, label_smoothing=cfg.label_smoothing)
            rt.scaler.scale(loss / cfg.grad_accum).backward()
            loss_sum += loss.detach()
        rt.scaler.unscale_(self.optimizer)
        if cfg.grad_clip:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        rt.scaler.step(self.optimizer)
        rt.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        tally.add(loss_sum / cfg.grad_accum, grad_norm)
        self.seq_len = x.size(1)
        return lr, tokens

    def check(self, tally: _Tally, stop: _StopRequest) -> int:
        """The one place the host waits for the device (and the processes agree): a step that was not finite
        stops the run; returns the signal that asks it to stop, or 0."""
        dev = self.rt.device
        flags = torch.stack([(~tally.all_finite).float(), torch.tensor(float(stop.signum or 0), device=dev)])
        if self.rt.ddp:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            dist.all_reduce(tally.first_bad, op=dist.ReduceOp.MAX)
        bad, signum = flags.tolist()
        if bad:
            at, bad_loss, bad_norm = tally.first_bad.tolist()
            self.stop_not_finite(f"the training loss is {bad_loss:g} (gradient norm {bad_norm:g}) at step {int(at)}")
        return int(signum)

    def evaluate(self, log: RunLog) -> None:
        self.last_eval = evaluate(self.raw, self.val_set, self.cfg, self.rt)
        if not math.isfinite(self.last_eval["loss"]):
            self.stop_not_finite(f"the validation loss is {self.last_eval['loss']:g} at step {self.step}")
        log.record(self.step, "val", {**self.last_eval, "tokens_seen": self.tokens_seen})
        log.write(f"step {self.step}: val loss {self.last_eval['loss']:.4f}, perplexity "
                  f"{self.last_eval['perplexity']:.2f}, accuracy {self.last_eval['accuracy']:.4f}")

    def checkpoint(self, tally: _Tally) -> None:
        """Only from a state whose weights are finite (the losses were checked just before)."""
        if not torch.isfinite(torch.nn.utils.get_total_norm(self.params)):
            self.stop_not_finite(f"the weights are not finite after step {self.step}")
        if self.rt.ddp:  # every process holds the record's sums of all of them, for any process count to resume
            dist.all_reduce(tally.sums, op=dist.ReduceOp.AVG)
        if self.rt.master:
            state = {"step": self.step, "optimizer": self.optimizer.state_dict(), "scaler": self.rt.scaler.state_dict(),
                     "sampler": self.sampler.state_dict(), "last_eval": self.last_eval,
                     "log": (tally.sums.tolist(), tally.steps), "global_batch": self.global_batch,
                     "tokens_seen": self.tokens_seen}
            save_checkpoint(self.cfg.out_dir, self.export, state, {**self.run_info, "step": self.step})
        if self.rt.ddp:
            dist.barrier()
        self.last_ckpt = self.step

    def run(self) -> dict:
        cfg, rt, total = self.cfg, self.rt, self.total
        self.wrap_model()
        log = RunLog(cfg, rt, self.step, total)
        peak = peak_flops(cfg, rt.device)
        tally = _Tally(rt.device, self.log_sums, self.log_steps, self.step, rt.scaler.is_enabled())
        stop = _StopRequest(quiet=not rt.master)
        self.model.train()
        t_last, tokens_since = time.perf_counter(), 0
        try:
            while self.step < total:
                lr, tokens = self.train_step(tally)
                tokens_since += tokens
                self.tokens_seen += tokens
                step = self.step
                record_now = step % cfg.log_interval == 0 or step == total
                eval_now = step % self.eval_every == 0 or step == total
                ckpt_now = step % self.ckpt_every == 0 or step == total
                if not (record_now or eval_now or ckpt_now or (stop.signum and not rt.ddp)):
                    log.advance()
                    continue
                signum = self.check(tally, stop)
                if record_now:
                    mean_loss, mean_norm = tally.take_record(rt)
                    tok_s = tokens_since / (time.perf_counter() - t_last)
                    mfu = tok_s * flops_per_token(self.raw, self.seq_len) / peak if peak else None
                    log.record(step, "train", {"loss": mean_loss, "lr": lr, "grad_norm": mean_norm,
                                               "tokens_per_s": tok_s, "mfu": mfu,
                                               "epoch": step / self.sampler.steps_per_epoch,
                                               "tokens_seen": self.tokens_seen})
                    log.advance(loss=f"{mean_loss:.3f}", tok_s=f"{tok_s:.0f}")
                    t_last, tokens_since = time.perf_counter(), 0
                else:
                    log.advance()
                if eval_now:
                    self.evaluate(log)
                if ckpt_now or signum:
                    self.checkpoint(tally)
                if signum:
                    log.write(f"stopped by {signal.Signals(signum).name} at step {step} of {total}, checkpoint "
                              f"saved; continue with --init_from=resume")
                    raise SystemExit(128 + signum)
        finally:
            stop.restore()
            log.close()
        return self.last_eval


def fit(cfg: TrainConfig, rt: Runtime, model, train_set, val_set, export: Callable[[Path], None],
        run_info: dict, resume_from: Path | None = None) -> dict:
    """Train `model`'s trainable parameters; returns the last evaluation's metrics.

    `export(folder)` writes the weights a checkpoint keeps (the whole model, or an adapter).
    `resume_from`: a checkpoint folder whose optimizer, schedule and data position to continue
    from (the caller has already loaded its weights into `model`).

    The host waits for the device only every log_interval steps, at evaluations and at
    checkpoints. There the losses and gradient norms of the steps since are checked: a value that
    is not finite stops the run (UserError) without a checkpoint, so that a checkpoint is only
    ever written from a state whose losses, gradient norms, validation loss and weights are all
    finite, and the last one kept is good. A signal ends the run with SystemExit(128 + signum)
    after a checkpoint.
    """
    loop = _Loop(cfg, rt, model, train_set, val_set, export, run_info)
    if resume_from is not None and loop.restore(resume_from):
        return loop.last_eval
    return loop.run()
