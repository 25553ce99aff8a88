"""Run the whole study in order, into one folder, and write its report.

    python study.py                          # the study that fits this machine: the full one on a GPU, else small
    python study.py config/study.py          # the original study at full size, for a GPU (WikiText-103)
    python study.py config/study_small.py    # every step, smaller, on a CPU in about an hour (WikiText-2)
    python study.py config/study_tiny.py     # every step in a few minutes: a first try

The steps: prepare the pretraining text (WikiText-103 or WikiText-2, downloaded, or local files)
and E2E (downloaded); pretraining run 1; run 2, continued from run 1's weights; the prompts
continued by run 2; LoRA on run 2; LoRA on GPT-2 medium (skipped, with the reason and its command,
when its weights cannot be had); beam decoding and official scoring of each base before and
after LoRA. Offline, give local copies of the downloads: --wikitext_src=ZIP (or --corpus=FILES)
and --e2e_src=ZIP; mirrors of your own: --wikitext_url / --e2e_url, or GPT2STUDY_MIRRORS.

Each step is one of the README's commands (train.py, sample.py, finetune.py, e2e_eval.py, a
data/*/prepare.py), run as its own process on a config file the study writes into
OUT_DIR/configs/: the step's config file, the study's paths, then its `*_overrides`. So each step
can be rerun alone with the command the study prints. Its output goes to OUT_DIR/logs/STEP.log.

Before the first step the study times a few training steps of run 1's model and says how long
pretraining will take here (and, when that is hours, which smaller preset to choose). A finished
step is skipped; an interrupted training run is resumed (--init_from=resume); a failed step stops
the study with its error and the command that reruns it. Ctrl-C stops the running step the way
it stops on its own (a training run saves a checkpoint first), then the study. At the end:
OUT_DIR/study.md and study.json (the steps and their wall times, what was trained on what, the
E2E table, the continuations) and curves_pretrain.png, curves_lora.png.
"""

import datetime
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from gpt2study.checkpoints import ADAPTER_FILE, MODEL_FILE, find_checkpoint, run_info
from gpt2study.cli import load_config, run_main
from gpt2study.download import DOWNLOAD_FAILED, Release
from gpt2study.files import write_atomic
from gpt2study.folder_lock import STUDY_LOCK_FILE, hold
from gpt2study.settings import EvalConfig, FinetuneConfig, PretrainConfig, SampleConfig, StudyConfig
from gpt2study.wikitext import RELEASES, WikiText
from model import UserError

REPO = Path(__file__).resolve().parent


def display(path) -> str:
    """A path as a user would type it here: relative below the current folder, absolute elsewhere."""
    rel = os.path.relpath(path)
    return str(path) if rel.startswith("..") else rel




# ----------------------------------------------------------------------------- the steps


@dataclass
class Step:
    """One of the README's commands, run on a config file the study writes; each kind of step says when
    it is done and what its row of the report says."""

    name: str
    script: str  # the entry script, relative to the repo
    config: Path  # the config file the study writes for it
    settings: dict  # what that file sets
    include: str = ""  # the config file it builds on
    parsed: object = None  # the script's config from its config file and overrides (before the study's paths)
    status: str = ""  # done, skipped, off (after the study ran it or looked at it)
    note: str = ""
    resumed_from: int | None = None  # the step an interrupted training run was resumed at

    def command(self, extra=()) -> list[str]:
        return [sys.executable, str(REPO / self.script), str(self.config), *extra]

    def shown(self, extra=()) -> str:
        return shlex.join(["python", display(REPO / self.script), display(self.config), *extra])

    def done(self, study: "Study") -> bool:
        raise NotImplementedError

    def what(self, study: "Study") -> str:
        """The report's account of what the finished step made."""
        raise NotImplementedError

    def update(self, study: "Study") -> None:
        """Settings that depend on the steps before it, set just before its config file is written."""

    def unavailable(self, study: "Study") -> tuple[str, str] | None:
        """(status, why) when the step is left out this time, else None."""
        return None

    def resume(self) -> list[str]:
        """Arguments that continue an interrupted attempt."""
        return []

    def stopped_at(self) -> str:
        """Where an unfinished attempt stopped, for messages."""
        return ""

    def failed(self, study: "Study", why: str, seconds: float, extra: list[str], log: Path) -> str:
        return (f"step {self.name} failed after {seconds:.0f} s: {why} -- rerun it alone: {self.shown(extra)} "
                f"(log: {display(log)}), or continue the study: {study.command}")

    def describe(self, study: "Study") -> str:
        if self.status != "done":
            return f"not run: {self.note}" if self.note else "not run"
        return self.what(study)


@dataclass
class DataStep(Step):
    """A data/*/prepare.py: done when its output folder holds every file it writes."""

    outputs: tuple[str, ...] = ("train.bin", "val.bin", "meta.json")
    release: Release | None = None  # what it downloads, if anything
    local_flag: str = ""  # the study's setting that takes a local copy of it instead

    @property
    def out(self) -> Path:
        return Path(self.settings["out_dir"])

    def meta(self) -> dict:
        return json.loads((self.out / "meta.json").read_text())

    def done(self, study) -> bool:
        return all((self.out / f).is_file() for f in self.outputs)

    def failed(self, study, why, seconds, extra, log) -> str:
        if self.release and why.startswith(DOWNLOAD_FAILED):  # two lines: what failed, and what to do offline
            return f"step {self.name}: {why}\n" + self.release.offline_hint(
                f"{study.command} --{self.local_flag}={self.release.name}")
        return super().failed(study, why, seconds, extra, log)

    def what(self, study) -> str:
        meta = self.meta()
        return f"{self.title(meta)}: {meta['train_tokens']:,} training and {meta['val_tokens']:,} validation tokens"

    def title(self, meta: dict) -> str:
        raise NotImplementedError

    def train_tokens(self) -> int:
        """The tokens of its training split: counted once prepared, guessed before."""
        return self.meta()["train_tokens"] if self.done(None) else self.guess_tokens()

    def guess_tokens(self) -> int:
        raise NotImplementedError


@dataclass
class TextData(DataStep):
    def done(self, study) -> bool:
        if not super().done(study):
            return False
        self.check_sources()
        return True

    def check_sources(self) -> None:
        """Prepared tokens are reused only if they are of the corpus the study names."""
        from gpt2study.text_data import expand_sources

        made = {Path(p).resolve() for p in self.meta().get("sources", [])}
        wanted = {p.resolve() for p in expand_sources(list(self.settings["src"]))}
        if made != wanted:
            raise UserError(f"{display(self.out)} holds the tokens of other files ({len(made)}, e.g. "
                            f"{display(min(made)) if made else 'none'}) than the study's corpus ({len(wanted)} "
                            f"file(s)); set pretrain_data to another folder, or delete that one to prepare it again")

    def title(self, meta) -> str:
        return f"{len(meta['sources'])} text file(s)"

    def guess_tokens(self) -> int:
        from gpt2study.text_data import expand_sources

        return sum(p.stat().st_size for p in expand_sources(list(self.settings["src"]))) // 4  # ~4 bytes a token


@dataclass
class WikiTextData(DataStep):
    wikitext: WikiText | None = None

    def title(self, meta) -> str:
        return self.wikitext.title

    def guess_tokens(self) -> int:
        return self.wikitext.train_tokens


@dataclass
class E2EData(DataStep):
    outputs: tuple[str, ...] = ("train.jsonl", "dev.jsonl", "test.jsonl", "meta.json")

    def what(self, study) -> str:
        c = self.meta()["counts"]
        return (f"E2E NLG: {c['train']['pairs']:,} training pairs, {c['dev']['pairs']:,} validation pairs, "
                f"{c['test']['mrs']:,} test MRs")


@dataclass
class TrainingStep(Step):
    """train.py or finetune.py: done when its last checkpoint is at the run's last step; an unfinished run
    is resumed."""

    @property
    def out(self) -> Path:
        return Path(self.settings["out_dir"])

    def progress(self) -> tuple[int, int] | None:
        """(step, total) of the run's last checkpoint, or None when it has none."""
        ckpt = find_checkpoint(self.out)
        if ckpt is None:
            return None
        info = run_info(ckpt)
        return info["step"], info["total_steps"]

    def done(self, study) -> bool:
        p = self.progress()
        return p is not None and p[0] >= p[1]

    def resume(self) -> list[str]:
        p = self.progress()
        if p is None:  # (an attempt that left no checkpoint: the trainer sets its logs aside)
            return []
        self.resumed_from = p[0]
        print(f"step {self.name}: resuming at step {p[0]} of {p[1]}", flush=True)
        return ["--init_from=resume"]

    def stopped_at(self) -> str:
        p = self.progress()
        return f" at step {p[0]} of {p[1]}" if p is not None else ""

    def records(self) -> list[dict]:
        from gpt2study.plots import read_metrics

        return read_metrics(self.out / "metrics.jsonl")

    def summary(self) -> dict | None:
        """What the finished run trained, on what, and how far it got."""
        ckpt = find_checkpoint(self.out)
        if ckpt is None:
            return None
        info = run_info(ckpt)
        train = info["train"]
        records = self.records()
        val = [r for r in records if r["split"] == "val"]
        train_recs = [r for r in records if r["split"] == "train"]
        batch = info.get("global_batch") or train["batch_size"] * train["grad_accum"] * info.get("processes", 1)
        summary = {"run": self.settings["out_dir"], "steps": info["step"], "total_steps": info["total_steps"],
                   "global_batch": batch, "epochs": train_recs[-1]["epoch"] if train_recs else None,
                   "model": info["model"], "final_val": val[-1] if val else None}
        return {**summary, **self.more(info, ckpt, train_recs, batch)}

    def more(self, info: dict, ckpt: Path, train_recs: list[dict], batch: int) -> dict:
        """What the summary says about this kind of run."""
        raise NotImplementedError


@dataclass
class Pretraining(TrainingStep):
    def more(self, info, ckpt, train_recs, batch) -> dict:
        from safetensors import safe_open

        with safe_open(str(ckpt / MODEL_FILE), framework="pt") as f:
            parameters = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118
        per_step = batch * info["model"]["block_size"]
        seen = (train_recs[-1].get("tokens_seen") if train_recs else None) or info["step"] * per_step
        return {"parameters": parameters, "tokens_per_step": per_step, "tokens_seen": seen,
                "init_from": info["init_from"], "data_dir": info["data_dir"]}

    def what(self, study) -> str:
        s = self.summary()
        m = s["model"]
        start = "from scratch" if s["init_from"] == "scratch" else f"from `{display(s['init_from'])}`"
        epochs = f", {s['epochs']:.2f} epochs" if s["epochs"] is not None else ""
        return (f"GPT-2 of {m['n_layer']} layers, {m['n_head']} heads, {m['n_embd']} dims, context {m['block_size']} "
                f"({s['parameters'] / 1e6:.1f}M parameters), {start}: {s['steps']:,} steps of {s['global_batch']} x "
                f"{m['block_size']} tokens ({count(s['tokens_seen'])} tokens{epochs}); {val_text(s['final_val'])}")

    def tokens_to_train(self, train_tokens: int) -> int:
        """The tokens the whole run reads, from the size of its training split."""
        c = self.parsed
        batch = c.batch_size * c.grad_accum
        steps = c.max_iters or math.ceil(c.epochs * max(1, (train_tokens - 1) // c.block_size // batch))
        return steps * batch * c.block_size


@dataclass
class LoRA(TrainingStep):
    def more(self, info, ckpt, train_recs, batch) -> dict:
        train = info["train"]
        return {"base": info["base"], "lora": info["lora"], "pairs_seen": info["step"] * batch,
                "train_subset": train.get("train_subset", 0), "train_refs": train.get("train_refs", "all"),
                "label_smoothing": train["label_smoothing"]}

    def adapter(self) -> Path:
        return (find_checkpoint(self.out) / ADAPTER_FILE).resolve()

    def what(self, study) -> str:
        s = self.summary()
        lora = s["lora"]
        subset = f" of a {s['train_subset']:,}-pair subset" if s["train_subset"] else ""
        if s["train_refs"] != "all":
            subset += f" of the pairs train_refs={s['train_refs']} keeps"
        epochs = f", {s['epochs']:.2f} epochs{subset}" if s["epochs"] is not None else ""
        return (f"LoRA r={lora['lora_r']}, alpha {lora['lora_alpha']:g} on {', '.join(lora['lora_targets'])} of "
                f"`{display(s['base'])}`: {s['steps']:,} steps of {s['global_batch']} pairs "
                f"({s['pairs_seen']:,} pairs{epochs}); E2E {val_text(s['final_val'])}")


@dataclass
class GPT2MediumLoRA(LoRA):
    """LoRA on OpenAI's GPT-2 medium: left out, with the reason and the command, when its weights cannot be had
    (unless gpt2m='on')."""

    def unavailable(self, study) -> tuple[str, str] | None:
        gpt2m = study.cfg.gpt2m
        why = "switched off (gpt2m='off')" if gpt2m == "off" else self.why_no_weights()
        if why and gpt2m == "on":
            raise UserError(f"step {self.name}: {why} (or --gpt2m=auto skips it when the weights cannot be had)")
        if why is None:
            return None
        if gpt2m == "off":
            without = [a for a in shlex.split(study.command) if not a.startswith("--gpt2m=")]
            how = shlex.join([*without, "--gpt2m=auto"])
        else:
            how = f"{self.shown()} (add --init_from=FOLDER for a local copy of the weights), then {study.command}"
        return ("off" if gpt2m == "off" else "skipped"), f"{why}; to run it: {how}"

    def why_no_weights(self) -> str | None:
        """Why the GPT-2 medium base cannot be had, or None (it is fetched into the Hub's cache if it can be)."""
        init_from = self.parsed.init_from
        if Path(init_from).exists():  # a local folder: finetune.py checks it
            return None
        from gpt2study.pretrained import gpt2_folder

        try:
            gpt2_folder(init_from)
        except UserError as e:
            return str(e)
        return None


@dataclass
class Samples(Step):
    """sample.py, appending to a file: done when its last block holds a continuation of every prompt."""

    def expected(self) -> int:
        prompts = Path(self.settings["prompts"]).read_text(encoding="utf-8").splitlines()
        return sum(1 for p in prompts if p.strip()) * self.parsed.num_samples

    def samples(self) -> tuple[str, list[str]] | None:
        """(settings, continuations) of the last complete block sample.py appended to the file, if any."""
        path = Path(self.settings["out"])
        if not path.is_file():
            return None
        text = path.read_text(encoding="utf-8")
        if not text.endswith("\n\n"):  # sample.py ends a finished block with a blank line
            return None
        lines = text.rstrip("\n").split("\n")
        headers = [i for i, line in enumerate(lines) if line.startswith("# ")]  # each run of sample.py starts one
        if not headers or len(lines) - headers[-1] - 1 != self.expected():
            return None
        date, time_, settings = lines[headers[-1]][2:].split(" ", 2)
        return settings, lines[headers[-1] + 1:]

    def done(self, study) -> bool:
        return self.samples() is not None

    def what(self, study) -> str:
        settings, lines = self.samples()
        return f"{len(lines)} continuations ({settings})"


def scores_file(step: Step) -> Path | None:
    """The newest scores*.json of the evaluation step's own decoding and MR count. Tables of other settings,
    made by hand in the same folder, lie beside it under their own names and are not the study's."""
    cfg = step.parsed

    def the_studys(path: Path) -> bool:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            return False
        of_mrs = record.get("of_mrs")
        mrs = min(cfg.max_mrs, of_mrs) if cfg.max_mrs and of_mrs else of_mrs
        return record.get("decoding") == cfg.decoding() and record.get("mrs") == mrs

    found = [p for p in Path(step.settings["out_dir"]).glob("scores*.json") if the_studys(p)]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


@dataclass
class Evaluation(Step):
    """e2e_eval.py on every LoRA run that finished: each gives a row before and one after."""

    def update(self, study) -> None:
        self.settings["configs"] = tuple(str(s.config) for s in study.finished(LoRA))

    def done(self, study) -> bool:
        # the table is current when it scored every finished adapter, and after it was made
        path = scores_file(self)
        if path is None:
            return False
        systems = json.loads(path.read_text())["systems"].values()
        scored = {Path(v["adapter"]).resolve() for v in systems if v.get("adapter")}
        return all(run.adapter() in scored and run.adapter().stat().st_mtime <= path.stat().st_mtime
                   for run in study.finished(LoRA))

    def what(self, study) -> str:
        return (f"{self.parsed.method} decoding of the E2E test MRs, {len(self.settings['configs'])} LoRA config(s), "
                "scored")


# ----------------------------------------------------------------------------- the plan

# Settings the study makes itself (where each run lives and what it starts from), per step.
PLACED = {"pretrain": {"out_dir", "data_dir"}, "pretrain_continue": {"out_dir", "data_dir", "init_from"},
          "samples": {"model", "prompts", "out"}, "lora_e2e": {"out_dir", "data_dir", "init_from"},
          "lora_e2e_gpt2m": {"out_dir", "data_dir"}, "e2e_eval": {"configs", "out_dir", "data_dir", "outputs", "refs"}}


def parse_overrides(step: str, field_name: str, cls, base: str, args: tuple[str, ...]):
    """The step's config as its script will see it, and the values its overrides set (checked now,
    before anything runs)."""
    for arg in args:
        if not arg.startswith("--"):
            raise UserError(f"{field_name}: {arg!r} is not a '--key=value' setting")
    keys = [arg[2:].partition("=")[0] for arg in args]
    placed = sorted(set(keys) & PLACED[step])
    if placed:
        raise UserError(f"{field_name} sets {placed[0]}, which the study sets itself for step {step}; drop it")
    try:
        cfg = load_config(cls, [*([base] if base else []), *args])
    except UserError as e:
        raise UserError(f"{field_name}: {e}") from None
    if getattr(cfg, "init_from", None) == "resume":
        raise UserError(f"{field_name} sets init_from=resume: the study resumes an interrupted run by itself")
    return cfg, {k: getattr(cfg, k) for k in keys}


def absolute(path: str) -> str | None:
    return os.path.abspath(path) if path else None


def data_steps(cfg: StudyConfig, cfgs: Path) -> tuple[DataStep, DataStep]:
    """The pretraining text (local files, or a WikiText release) and E2E."""
    from gpt2study.e2e_release import RELEASE as E2E_RELEASE
    from gpt2study.text_data import expand_sources

    out = Path(os.path.abspath(cfg.out_dir))
    if cfg.corpus:
        sources = tuple(os.path.abspath(s.strip()) for s in cfg.corpus.split(",") if s.strip())
        try:  # a missing file stops the study now, not after an hour
            expand_sources(list(sources))
        except UserError as e:
            raise UserError(f"corpus: {e}") from None
        data = absolute(cfg.pretrain_data) or str(out / "data" / "corpus")
        text = TextData("data_text", "data/text/prepare.py", cfgs / "data_text.py", {"src": sources, "out_dir": data})
    else:
        wikitext = RELEASES[cfg.wikitext]
        data = absolute(cfg.pretrain_data) or str(wikitext.default_out)
        text = WikiTextData("data_wikitext", f"data/wikitext{cfg.wikitext}/prepare.py", cfgs / "data_wikitext.py",
                            {"src": absolute(cfg.wikitext_src), "url": cfg.wikitext_url or None, "out_dir": data},
                            release=wikitext.release, local_flag="wikitext_src", wikitext=wikitext)
    e2e = E2EData("data_e2e", "data/e2e/prepare.py", cfgs / "data_e2e.py",
                  {"src": absolute(cfg.e2e_src), "url": cfg.e2e_url or None, "out_dir": os.path.abspath(cfg.e2e_data)},
                  release=E2E_RELEASE, local_flag="e2e_src")
    return text, e2e


def plan(cfg: StudyConfig) -> list[Step]:
    """The study's steps, every setting checked; nothing is written yet."""
    out = Path(os.path.abspath(cfg.out_dir))
    cfgs = out / "configs"
    text, e2e = data_steps(cfg, cfgs)
    data, e2e_dir = text.settings["out_dir"], e2e.settings["out_dir"]
    run1, run2 = out / "pretrain", out / "pretrain_continue"

    def training(kind, name, script, base, overrides_field, cls, **placed):
        parsed, values = parse_overrides(name, overrides_field, cls, base, getattr(cfg, overrides_field))
        placed = {k: str(v) for k, v in placed.items()}
        return kind(name, script, cfgs / f"{name}.py", {**placed, **values}, include=os.path.abspath(base),
                    parsed=parsed)

    steps = [text, e2e,
             training(Pretraining, "pretrain", "train.py", cfg.pretrain_config, "pretrain_overrides", PretrainConfig,
                      out_dir=run1, data_dir=data),
             training(Pretraining, "pretrain_continue", "train.py", cfg.continue_config, "continue_overrides",
                      PretrainConfig, out_dir=run2, data_dir=data, init_from=run1)]
    parsed, values = parse_overrides("samples", "sample_overrides", SampleConfig, "", cfg.sample_overrides)
    if not Path(cfg.prompts).is_file():
        raise UserError(f"prompt file {cfg.prompts} not found")
    steps.append(Samples("samples", "sample.py", cfgs / "samples.py",
                         {"model": str(run2), "prompts": os.path.abspath(cfg.prompts),
                          "out": str(out / "samples.txt"), **values}, parsed=parsed))
    steps.append(training(LoRA, "lora_e2e", "finetune.py", cfg.lora_config, "lora_overrides", FinetuneConfig,
                          out_dir=out / "lora_e2e", data_dir=e2e_dir, init_from=run2))
    if cfg.gpt2m_config:
        steps.append(training(GPT2MediumLoRA, "lora_e2e_gpt2m", "finetune.py", cfg.gpt2m_config, "gpt2m_overrides",
                              FinetuneConfig, out_dir=out / "lora_e2e_gpt2m", data_dir=e2e_dir))
    parsed, values = parse_overrides("e2e_eval", "eval_overrides", EvalConfig, "", cfg.eval_overrides)
    steps.append(Evaluation("e2e_eval", "e2e_eval.py", cfgs / "e2e_eval.py",
                            {"configs": (), "out_dir": str(out / "e2e_eval"), "data_dir": e2e_dir, **values},
                            parsed=parsed))
    return steps


class Times:
    """Each step's wall time, kept in OUT_DIR/logs/times.json: that of the attempt that made its output, plus
    those of the interrupted attempts it resumed."""

    def __init__(self, out: Path):
        self.path = out / "logs" / "times.json"
        self.seconds = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def add(self, name: str, seconds: float, resumed: bool) -> None:
        """An attempt started afresh replaces the step's time: nothing of the earlier attempts is in its output."""
        self.seconds[name] = (self.seconds.get(name, 0.0) if resumed else 0.0) + seconds
        write_atomic(self.path, json.dumps(self.seconds, indent=2) + "\n")


@dataclass
class Study:
    cfg: StudyConfig
    command: str  # the command line that runs (and continues) it
    steps: list[Step] = field(default_factory=list)

    def __post_init__(self):
        self.steps = self.steps or plan(self.cfg)
        self.times = Times(self.out)

    @property
    def out(self) -> Path:
        return Path(self.cfg.out_dir)

    def step(self, name: str) -> Step:
        return next(s for s in self.steps if s.name == name)

    def finished(self, kind: type) -> list:
        return [s for s in self.steps if isinstance(s, kind) and s.status == "done"]


# ----------------------------------------------------------------------------- how long it will take

LONG_S = 3 * 3600  # an estimate beyond this says which smaller preset to choose
PRESETS = ("config/study.py", "config/study_small.py", "config/study_tiny.py")  # largest first


def seconds_per_token(cfg: PretrainConfig) -> tuple[float, str]:
    """(seconds, device): the time of a forward and backward pass of run 1's model on its device, per token,
    the fastest of two after a first one."""
    import contextlib

    import torch

    from gpt2study.cli import pick, resolve_device
    from model import GPT, GPTConfig

    device = resolve_device(cfg.device)
    torch.manual_seed(0)
    model = GPT(pick(GPTConfig, cfg)).to(device)
    rows = cfg.batch_size if device.startswith("cuda") else 1  # a CPU's time grows with the rows anyway
    x = torch.randint(cfg.vocab_size, (rows, cfg.block_size), device=device)
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(cfg.dtype)
    cast = torch.autocast(device.split(":")[0], dtype=dtype) if dtype else contextlib.nullcontext()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        with cast:
            _, loss = model(x, x)
        loss.backward()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    del model, x, loss
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "this CPU"
    return min(times[1:]) / (rows * cfg.block_size), name


def duration(seconds: float) -> str:
    for unit, size in (("days", 86400), ("hours", 3600), ("min", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:.0f} {unit}" if seconds < 20 * size else f"{seconds / size:,.0f} {unit}"
    return f"{seconds:.0f} s"


def smaller_preset(argv: list[str]) -> str | None:
    """The next smaller preset than the one the study runs (config/study_small.py for a config of its own)."""
    given = [os.path.realpath(a) for a in argv if a.endswith(".py") and not a.startswith("-")]
    for i, preset in enumerate(PRESETS):
        if os.path.realpath(REPO / preset) in given:
            return PRESETS[i + 1] if i + 1 < len(PRESETS) else None
    return PRESETS[1]


def say_how_long(study: Study, smaller: str | None) -> None:
    """One line before the first step: how long pretraining will take here; when that is hours, which smaller
    preset to choose (the study goes on all the same)."""
    runs = [s for s in study.steps if isinstance(s, Pretraining) and not s.done(study)]
    if not runs:
        return
    data = study.steps[0]
    tokens = 0
    for run in runs:
        p = run.progress()
        tokens += run.tokens_to_train(data.train_tokens()) * (1 - p[0] / p[1] if p else 1)
    per_token, device = seconds_per_token(runs[0].parsed)
    seconds = tokens * per_token
    line = (f"study: pretraining ({', '.join(r.name for r in runs)}: {count(tokens)} tokens) will take about "
            f"{duration(seconds)} on {device} (from timed steps of its model)")
    if seconds > LONG_S and smaller:
        line += f"; that is long for this machine: a smaller study is python study.py {smaller}"
    print(line, flush=True)


# ----------------------------------------------------------------------------- running a step


def run_process(cmd: list[str], log_path: Path, echo: bool) -> tuple[int, bool, str]:
    """Run `cmd`, its output to the log (and the console); (exit status, interrupted, the output's tail).

    The step runs in its own session, so a Ctrl-C at the terminal reaches the study alone, which
    passes exactly one SIGINT on per Ctrl-C: the trainer's first saves and stops, its second stops now.
    SIGTERM and SIGHUP are passed on as they come, so that no step is left running without the study.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    interrupts = 0
    tail = b""
    with open(log_path, "ab") as log:
        log.write(f"\n$ {shlex.join(cmd)}   # {datetime.datetime.now():%Y-%m-%d %H:%M:%S}\n".encode())
        log.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})

        def forward(signum, frame):
            nonlocal interrupts
            interrupts += 1
            if proc.poll() is None:
                proc.send_signal(signum)
            if interrupts == 1 and signum == signal.SIGINT:
                print("\nstudy: stopping the running step (a training run saves first); Ctrl-C again stops it now",
                      file=sys.stderr, flush=True)

        signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        previous = {s: signal.signal(s, forward) for s in signals}
        try:
            while chunk := os.read(proc.stdout.fileno(), 1 << 16):
                log.write(chunk)
                log.flush()
                tail = (tail + chunk)[-(1 << 16):]
                if echo:
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.flush()
            rc = proc.wait()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            if proc.poll() is None:  # the study itself failed: do not leave the step running
                proc.send_signal(signal.SIGINT)
                proc.wait()
    return rc, interrupts > 0, tail.decode("utf-8", "replace")


def error_line(tail: str, rc: int) -> str:
    """The step's own one-line error, else the last line it printed."""
    lines = [line.strip() for line in tail.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    if errors:
        return errors[-1].removeprefix("error: ")
    return f"exit status {rc}" + (f": {lines[-1]}" if lines else "")


def write_config(step: Step, study_cmd: str) -> None:
    lines = [f"# Written by `{study_cmd}`, step {step.name}: edit the study's config, not this file.",
             f"# Run the step alone: {step.shown()}"]
    if step.include:
        lines.append(f"include({step.include!r})")
    lines += [f"{k} = {v!r}" for k, v in step.settings.items()]
    write_atomic(step.config, "\n".join(lines) + "\n")


def run_step(step: Step, study: Study) -> None:
    step.update(study)
    write_config(step, study.command)
    if step.done(study):
        step.status = "done"
        print(f"step {step.name}: skipped (done)", flush=True)
        return
    t0 = time.perf_counter()  # GPT-2 medium's download, if any, is part of its step
    left_out = step.unavailable(study)
    if left_out:
        step.status, step.note = left_out
        print(f"step {step.name}: skipped: {step.note}", flush=True)
        return
    extra = step.resume()
    log = study.out / "logs" / f"{step.name}.log"
    print(f"step {step.name}: {step.shown(extra)}  (log: {display(log)})", flush=True)
    rc, interrupted, tail = run_process(step.command(extra), log, study.cfg.echo)
    seconds = time.perf_counter() - t0
    study.times.add(step.name, seconds, resumed=bool(extra))
    done = rc == 0 and step.done(study)
    where = "" if done else step.stopped_at()
    if where:
        extra = ["--init_from=resume"]
    if interrupted:
        what = "done" if done else f"interrupted after {seconds:.0f} s{where}"
        print(f"step {step.name}: {what}; the study stops here, and {study.command} continues it", file=sys.stderr,
              flush=True)
        raise SystemExit(130)
    if not done:
        why = error_line(tail, rc) if rc else f"it ended without finishing{where}"
        raise UserError(step.failed(study, why, seconds, extra, log))
    step.status = "done"
    resumed = f" (resumed from step {step.resumed_from})" if step.resumed_from is not None else ""
    print(f"step {step.name}: done in {seconds:.0f} s{resumed}", flush=True)


# ----------------------------------------------------------------------------- the report


def count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n:,.0f}"


def val_text(val: dict | None) -> str:
    if not val:
        return "no evaluation yet"
    return (f"validation loss {val['loss']:.3f}, perplexity {val['perplexity']:,.1f}, "
            f"accuracy {val['accuracy']:.1%}")


def pretrain_curves(study: Study) -> Path | None:
    """Run 2 continues on the axis where run 1 ended, from its weights."""
    from gpt2study.plots import Curve, plot_curves

    curves = []
    for i, run in enumerate(study.finished(Pretraining)):
        before = curves[-1] if curves else None
        curves.append(Curve(f"run {i + 1} ({run.name})", run.records(), x_per_step=run.summary()["tokens_per_step"],
                            x_offset=before.end if before else 0.0,
                            start=before.split("val")[-1] if before and before.split("val") else None))
    if not curves:
        return None
    return plot_curves(curves, study.out / "curves_pretrain.png", x_label="tokens seen",
                       title="Pretraining: run 2 continues from run 1's weights (dotted line)")


def lora_curves(study: Study) -> Path | None:
    from gpt2study.plots import Curve, plot_curves

    curves = []
    for run in study.finished(LoRA):
        summary = run.summary()
        label = "GPT-2 medium" if summary["base"] == "gpt2-medium" else f"ours ({Path(summary['base']).name})"
        curves.append(Curve(f"{label} + LoRA", run.records(), x_per_step=summary["global_batch"],
                            train_perplexity=summary["label_smoothing"] == 0))
    if not curves:
        return None
    tokens = all(r.get("tokens_seen") is not None for c in curves for r in c.records)
    return plot_curves(curves, study.out / "curves_lora.png",
                       x_label="tokens seen" if tokens else "training pairs seen",
                       title="LoRA on E2E NLG (validation: the reference tokens of the dev set)")


def e2e_table(eval_step: Step, steps: list[Step]) -> tuple[str, dict]:
    """The E2E table (each base before and after LoRA), with a row for every system not evaluated,
    and our model's five worst outputs with their slot errors."""
    from gpt2study.e2e_table import markdown, worst_outputs

    path = scores_file(eval_step)
    record = json.loads(path.read_text()) if path else {"systems": {}}
    systems = dict(record["systems"])
    for s in steps:
        if s.name == "lora_e2e_gpt2m" and s.status in ("skipped", "off"):
            systems["GPT-2 medium"] = systems["GPT-2 medium + LoRA"] = {"missing": s.note}
    record = {**record, "systems": systems}
    text = markdown(record)
    ours = [sc for sc in systems.values() if sc.get("adapter") and sc.get("base") != "gpt2-medium" and sc.get("errors")]
    if ours and Path(ours[0]["errors"]).is_file():
        worst = worst_outputs(Path(ours[0]["errors"]))
        text += ("\n\nOur model + LoRA: its five outputs with the most slot errors (all of them in "
                 f"`{Path(ours[0]['errors']).name}`)\n\n" + worst) if worst else "\n\nOur model + LoRA: no slot errors."
    return text, {**record, "scores_file": str(path) if path else None}


def step_rows(study: Study) -> list[dict]:
    rows = []
    for s in study.steps:
        secs = study.times.seconds.get(s.name)
        summary = s.summary() if isinstance(s, TrainingStep) and s.status == "done" else None
        rows.append({"step": s.name, "command": s.shown(), "config": str(s.config), "status": s.status or "not run",
                     "what": s.describe(study), "seconds": round(secs, 1) if secs else None,
                     "log": str(study.out / "logs" / f"{s.name}.log"), "run": summary})
    return rows


def write_report(study: Study) -> list[Path]:
    out, steps = study.out, study.steps
    pictures = [p for p in (pretrain_curves(study), lora_curves(study)) if p]
    sample_step = study.step("samples")
    samples = sample_step.samples() if sample_step.status == "done" else None
    table, e2e = e2e_table(study.step("e2e_eval"), steps) if study.step("e2e_eval").status == "done" else (
        "The E2E table is not there yet.", None)
    rows = step_rows(study)
    total = sum(r["seconds"] or 0 for r in rows)
    now = f"{datetime.datetime.now():%Y-%m-%d %H:%M}"
    md = [f"# GPT-2 study: `{study.command}`", "",
          f"Finished {now}. Everything below is in this folder: each step's settings in `configs/`, its output in "
          f"`logs/`, its run in the folder of its name.", "",
          "## Steps", "", "| step | command | what | wall time |", "|---|---|---|---:|"]
    for r in rows:
        wall = f"{r['seconds']:,.0f} s" if r["seconds"] is not None else "–"
        md.append(f"| {r['step']} | `{r['command']}` | {r['what'].replace('|', '/')} | {wall} |")
    md += [f"| total | | | {total:,.0f} s |", "", "## E2E NLG: each base before and after LoRA", "", table, ""]
    if e2e and e2e.get("scores_file"):
        md += [f"Outputs and the scorer's table: `{os.path.relpath(Path(e2e['scores_file']).parent, out)}/`.", ""]
    md += ["## Training curves", ""]
    md += [f"![{p.stem}]({p.name})" for p in pictures] or ["No run has finished yet."]
    md += ["", "## The prompts, continued by run 2", ""]
    if samples:
        md += [f"{samples[0]}:", "", "```text", *samples[1], "```"]
    else:
        md.append("Not there yet.")
    write_atomic(out / "study.md", "\n".join(md) + "\n")
    record = {"command": study.command, "finished": now, "out_dir": str(out), "steps": rows,
              "total_seconds": round(total, 1), "e2e": e2e,
              "samples": {"settings": samples[0], "continuations": samples[1]} if samples else None,
              "pictures": [p.name for p in pictures]}
    write_atomic(out / "study.json", json.dumps(record, indent=2, default=str) + "\n")
    return [out / "study.md", out / "study.json", *pictures]


# ----------------------------------------------------------------------------- main


def chosen_preset(argv: list[str]) -> list[str]:
    """argv, with the preset that fits this machine in front when it names no config file; the first line
    says which and why."""
    rest = list(argv)
    while rest:
        arg = rest.pop(0)
        if arg in ("-h", "--help") or (arg.endswith(".py") and not arg.startswith("-")):
            return argv
        if arg.startswith("--") and "=" not in arg and arg != "--echo" and rest:
            rest.pop(0)  # the value of `--key value`
    import torch

    if torch.cuda.is_available():
        preset = PRESETS[0]
        print(f"study: no config file given; a GPU is here ({torch.cuda.get_device_name()}), so the full study: "
              f"{preset} (smaller: python study.py {PRESETS[1]})", flush=True)
    else:
        preset = PRESETS[1]
        print(f"study: no config file given and no GPU here, so the study sized for a CPU: {preset} (the full one, "
              f"for a GPU: python study.py {PRESETS[0]})", flush=True)
    return [display(REPO / preset), *argv]


def main():
    argv = chosen_preset(sys.argv[1:])
    cfg = load_config(StudyConfig, argv, doc=__doc__)
    with hold(cfg.out_dir, "study", STUDY_LOCK_FILE):  # its steps hold their own sub-folders
        run_study(Study(cfg, shlex.join(["python", "study.py", *sys.argv[1:]])), smaller_preset(argv))


def run_study(study: Study, smaller: str | None) -> None:
    print(f"study: {len(study.steps)} steps into {display(study.out)}/ (logs in {display(study.out / 'logs')}/)",
          flush=True)
    say_how_long(study, smaller)
    for step in study.steps:
        run_step(step, study)
    written = write_report(study)
    for s in study.steps:
        secs = study.times.seconds.get(s.name)
        print(f"  {s.name:<18} {s.status or 'not run':<8} {f'{secs:,.0f} s' if secs else '–':>10}")
    print(f"study written: {', '.join(display(p) for p in written)}")


if __name__ == "__main__":
    run_main(main)
