"""Run the whole study in order, into one folder, and write its report.

    python study.py config/study.py          # the original study at full size, for a GPU
    python study.py config/study_small.py    # the offline proof on a CPU, from ../shared
    python study.py config/study_tiny.py     # every step in about a minute (what the test runs)

The steps: prepare the pretraining text (WikiText-103, or local files) and E2E; pretraining run 1;
run 2, continued from run 1's weights; the prompts continued by run 2; LoRA on run 2; LoRA on
GPT-2 medium (skipped, with the reason and its command, when its weights cannot be had); beam
decoding and official scoring of each base before and after LoRA.

Each step is one of the README's commands (train.py, sample.py, finetune.py, e2e_eval.py, a
data/*/prepare.py), run as its own process on a config file the study writes into
OUT_DIR/configs/: the step's config file, the study's paths, then its `*_overrides`. So each step
can be rerun alone with the command the study prints. Its output goes to OUT_DIR/logs/STEP.log.

A finished step is skipped; an interrupted training run is resumed (--init_from=resume); a failed
step stops the study with its one-line error and the command that reruns it. Ctrl-C stops the
running step the way it stops on its own (a training run saves a checkpoint first), then the study.
At the end: OUT_DIR/study.md and study.json (the steps and their wall times, what was trained on
what, the E2E table, the continuations) and curves_pretrain.png, curves_lora.png.
"""

import datetime
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from gpt2study.checkpoints import ADAPTER_FILE, MODEL_FILE, find_checkpoint, run_info
from gpt2study.cli import load_config, run_main
from gpt2study.settings import EvalConfig, FinetuneConfig, PretrainConfig, SampleConfig, StudyConfig
from model import UserError

REPO = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------- the steps


@dataclass
class Step:
    name: str
    script: str  # the entry script, relative to the repo
    kind: str  # text, wikitext, e2e, train, lora, sample, eval
    config: Path  # the config file the study writes for it
    settings: dict  # what that file sets
    include: str = ""  # the config file it builds on
    parsed: object = None  # the script's config from its config file and overrides (before the study's paths)
    hint: str = ""  # what the study's own settings offer when the step fails
    status: str = ""  # done, skipped, off (after the study ran it or looked at it)
    note: str = ""
    resumed_from: int | None = None


def display(path) -> str:
    """A path as a user would type it here: relative below the current folder, absolute elsewhere."""
    rel = os.path.relpath(path)
    return str(path) if rel.startswith("..") else rel


def command(step: Step, extra=()) -> list[str]:
    return [sys.executable, str(REPO / step.script), str(step.config), *extra]


def shown(step: Step, extra=()) -> str:
    return shlex.join(["python", display(REPO / step.script), display(step.config), *extra])


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


def plan(cfg: StudyConfig) -> list[Step]:
    """The study's steps, every setting checked; nothing is written yet."""
    from gpt2study.text_data import expand_sources

    out = Path(os.path.abspath(cfg.out_dir))
    cfgs = out / "configs"
    data = os.path.abspath(cfg.pretrain_data or (out / "data" / "corpus" if cfg.corpus else "data/wikitext103"))
    e2e = os.path.abspath(cfg.e2e_data)
    run1, run2 = out / "pretrain", out / "pretrain_continue"
    steps = []
    if cfg.corpus:
        sources = tuple(os.path.abspath(s.strip()) for s in cfg.corpus.split(",") if s.strip())
        try:  # a missing file stops the study now, not after an hour
            expand_sources(list(sources))
        except UserError as e:
            raise UserError(f"corpus: {e}") from None
        steps.append(Step("data_text", "data/text/prepare.py", "text", cfgs / "data_text.py",
                          {"src": sources, "out_dir": data}))
    else:
        src = os.path.abspath(cfg.wikitext_src) if cfg.wikitext_src else None
        steps.append(Step("data_wikitext", "data/wikitext103/prepare.py", "wikitext", cfgs / "data_wikitext.py",
                          {"src": src, "out_dir": data}, hint="offline, the study takes "
                          "--wikitext_src=wikitext-103-raw-v1.zip (or its folder), or --corpus='FILES'"))
    steps.append(Step("data_e2e", "data/e2e/prepare.py", "e2e", cfgs / "data_e2e.py",
                      {"src": os.path.abspath(cfg.e2e_src) if cfg.e2e_src else None, "out_dir": e2e},
                      hint="offline, the study takes --e2e_src=e2e-dataset.zip (or its folder)"))

    def training(name, script, kind, base, overrides_field, cls, **placed):
        parsed, values = parse_overrides(name, overrides_field, cls, base, getattr(cfg, overrides_field))
        placed = {k: str(v) for k, v in placed.items()}
        return Step(name, script, kind, cfgs / f"{name}.py", {**placed, **values}, include=os.path.abspath(base),
                    parsed=parsed)

    steps.append(training("pretrain", "train.py", "train", cfg.pretrain_config, "pretrain_overrides",
                          PretrainConfig, out_dir=run1, data_dir=data))
    steps.append(training("pretrain_continue", "train.py", "train", cfg.continue_config, "continue_overrides",
                          PretrainConfig, out_dir=run2, data_dir=data, init_from=run1))
    parsed, values = parse_overrides("samples", "sample_overrides", SampleConfig, "", cfg.sample_overrides)
    if not Path(cfg.prompts).is_file():
        raise UserError(f"prompt file {cfg.prompts} not found")
    steps.append(Step("samples", "sample.py", "sample", cfgs / "samples.py",
                      {"model": str(run2), "prompts": os.path.abspath(cfg.prompts), "out": str(out / "samples.txt"),
                       **values}, parsed=parsed))
    steps.append(training("lora_e2e", "finetune.py", "lora", cfg.lora_config, "lora_overrides", FinetuneConfig,
                          out_dir=out / "lora_e2e", data_dir=e2e, init_from=run2))
    if cfg.gpt2m_config:
        steps.append(training("lora_e2e_gpt2m", "finetune.py", "lora", cfg.gpt2m_config, "gpt2m_overrides",
                              FinetuneConfig, out_dir=out / "lora_e2e_gpt2m", data_dir=e2e))
    parsed, values = parse_overrides("e2e_eval", "eval_overrides", EvalConfig, "", cfg.eval_overrides)
    steps.append(Step("e2e_eval", "e2e_eval.py", "eval", cfgs / "e2e_eval.py",
                      {"configs": (), "out_dir": str(out / "e2e_eval"), "data_dir": e2e, **values}, parsed=parsed))
    return steps


def write_config(step: Step, study_cmd: str) -> None:
    lines = [f"# Written by `{study_cmd}`, step {step.name}: edit the study's config, not this file.",
             f"# Run the step alone: {shown(step)}"]
    if step.include:
        lines.append(f"include({step.include!r})")
    lines += [f"{k} = {v!r}" for k, v in step.settings.items()]
    atomic_write(step.config, "\n".join(lines) + "\n")


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- is a step done?


def progress(run_dir) -> tuple[int, int] | None:
    """(step, total) of a run's last checkpoint, or None when it has none."""
    ckpt = find_checkpoint(run_dir)
    if ckpt is None:
        return None
    info = run_info(ckpt)
    return info["step"], info["total_steps"]


def last_samples(path: Path, expected: int) -> tuple[str, list[str]] | None:
    """(settings, continuations) of the last complete block sample.py appended to `path`, if any."""
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8")
    if not text.endswith("\n\n"):  # sample.py ends a finished block with a blank line
        return None
    lines = text.rstrip("\n").split("\n")
    headers = [i for i, line in enumerate(lines) if line.startswith("# ")]  # each run of sample.py starts one
    if not headers or len(lines) - headers[-1] - 1 != expected:
        return None
    date, time_, settings = lines[headers[-1]][2:].split(" ", 2)
    return settings, lines[headers[-1] + 1:]


def scores_file(eval_dir) -> Path | None:
    found = sorted(Path(eval_dir).glob("scores*.json"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def is_done(step: Step, steps: list[Step]) -> bool:
    s = step.settings
    if step.kind in ("text", "wikitext"):
        done = all((Path(s["out_dir"]) / f).is_file() for f in ("train.bin", "val.bin", "meta.json"))
        if done and step.kind == "text":
            check_sources(step)
        return done
    if step.kind == "e2e":
        return all((Path(s["out_dir"]) / f).is_file() for f in ("train.jsonl", "dev.jsonl", "test.jsonl", "meta.json"))
    if step.kind in ("train", "lora"):
        p = progress(s["out_dir"])
        return p is not None and p[0] >= p[1]
    if step.kind == "sample":
        return last_samples(Path(s["out"]), n_continuations(step)) is not None
    # the table is current when it scored every finished adapter, and after it was made
    path = scores_file(s["out_dir"])
    if path is None:
        return False
    systems = json.loads(path.read_text())["systems"].values()
    scored = {Path(v["adapter"]).resolve() for v in systems if v.get("adapter")}
    for lora in (x for x in steps if x.kind == "lora" and x.status == "done"):
        adapter = (find_checkpoint(lora.settings["out_dir"]) / ADAPTER_FILE).resolve()
        if adapter not in scored or adapter.stat().st_mtime > path.stat().st_mtime:
            return False
    return True


def check_sources(step: Step) -> None:
    """Prepared tokens are reused only if they are of the corpus the study names."""
    from gpt2study.text_data import expand_sources

    out = step.settings["out_dir"]
    made = {Path(p).resolve() for p in json.loads((Path(out) / "meta.json").read_text()).get("sources", [])}
    wanted = {p.resolve() for p in expand_sources(list(step.settings["src"]))}
    if made != wanted:
        raise UserError(f"{display(out)} holds the tokens of other files ({len(made)}, e.g. "
                        f"{display(min(made)) if made else 'none'}) than the study's corpus ({len(wanted)} file(s)); "
                        f"set pretrain_data to another folder, or delete that one to prepare it again")


def n_continuations(step: Step) -> int:
    prompts = Path(step.settings["prompts"]).read_text(encoding="utf-8").splitlines()
    return sum(1 for p in prompts if p.strip()) * step.parsed.num_samples


def gpt2m_unavailable(step: Step) -> str | None:
    """Why the GPT-2 medium base cannot be had, or None (it is fetched into the Hub's cache if it can be)."""
    init_from = step.parsed.init_from
    if Path(init_from).exists():  # a local folder: finetune.py checks it
        return None
    from gpt2study.pretrained import gpt2_folder

    try:
        gpt2_folder(init_from)
    except UserError as e:
        return str(e)
    return None


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


class Times:
    """Each step's wall time, summed over the study's runs of it (an interrupted step and its
    resumption), kept in OUT_DIR/logs/times.json."""

    def __init__(self, out: Path):
        self.path = out / "logs" / "times.json"
        self.seconds = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        atomic_write(self.path, json.dumps(self.seconds, indent=2) + "\n")


def run_step(step: Step, steps: list[Step], cfg: StudyConfig, times: Times, study_cmd: str) -> None:
    out = Path(cfg.out_dir)
    if step.kind == "eval":  # every LoRA run that exists: each gives a row before and one after
        step.settings["configs"] = tuple(str(s.config) for s in steps if s.kind == "lora" and s.status == "done")
    write_config(step, study_cmd)
    if is_done(step, steps):
        step.status = "done"
        print(f"step {step.name}: skipped (done)", flush=True)
        return
    t0 = time.perf_counter()  # GPT-2 medium's download, if any, is part of its step
    if step.name == "lora_e2e_gpt2m":
        why = "switched off (gpt2m='off')" if cfg.gpt2m == "off" else gpt2m_unavailable(step)
        if why and cfg.gpt2m == "on":
            raise UserError(f"step {step.name}: {why} (or --gpt2m=auto skips it when the weights cannot be had)")
        if why:
            without = [a for a in shlex.split(study_cmd) if not a.startswith("--gpt2m=")]
            how = shlex.join([*without, "--gpt2m=auto"]) if cfg.gpt2m == "off" else \
                f"{shown(step)} (add --init_from=FOLDER for a local copy of the weights), then {study_cmd}"
            step.status, step.note = ("off" if cfg.gpt2m == "off" else "skipped"), f"{why}; to run it: {how}"
            print(f"step {step.name}: skipped: {step.note}", flush=True)
            return
    extra = []
    if step.kind in ("train", "lora"):
        run_dir = Path(step.settings["out_dir"])
        p = progress(run_dir)
        if p is not None:  # (an attempt that left no checkpoint: the trainer sets its logs aside)
            step.resumed_from, extra = p[0], ["--init_from=resume"]
            print(f"step {step.name}: resuming at step {p[0]} of {p[1]}", flush=True)
    log = out / "logs" / f"{step.name}.log"
    print(f"step {step.name}: {shown(step, extra)}  (log: {display(log)})", flush=True)
    rc, interrupted, tail = run_process(command(step, extra), log, cfg.echo)
    seconds = time.perf_counter() - t0
    times.add(step.name, seconds)
    done = rc == 0 and is_done(step, steps)
    where = ""
    if step.kind in ("train", "lora") and (p := progress(step.settings["out_dir"])) is not None and not done:
        where, extra = f" at step {p[0]} of {p[1]}", ["--init_from=resume"]
    if interrupted:
        what = "done" if done else f"interrupted after {seconds:.0f} s{where}"
        print(f"step {step.name}: {what}; the study stops here, and {study_cmd} continues it", file=sys.stderr,
              flush=True)
        raise SystemExit(130)
    if not done:
        why = error_line(tail, rc) if rc else f"it ended without finishing{where}"
        hint = f"; {step.hint}" if step.hint else ""
        raise UserError(f"step {step.name} failed after {seconds:.0f} s: {why} -- rerun it alone: {shown(step, extra)} "
                        f"(log: {display(log)}), or continue the study: {study_cmd}{hint}")
    step.status = "done"
    resumed = f" (resumed from step {step.resumed_from})" if step.resumed_from is not None else ""
    print(f"step {step.name}: done in {seconds:.0f} s{resumed}", flush=True)


# ----------------------------------------------------------------------------- the report


def run_summary(step: Step) -> dict | None:
    """What a finished training run trained, on what, and how far it got."""
    from gpt2study.plots import read_metrics

    ckpt = find_checkpoint(step.settings["out_dir"])
    if ckpt is None:
        return None
    info = run_info(ckpt)
    train = info["train"]
    records = read_metrics(Path(step.settings["out_dir"]) / "metrics.jsonl")
    val = [r for r in records if r["split"] == "val"]
    train_recs = [r for r in records if r["split"] == "train"]
    batch = info.get("global_batch") or train["batch_size"] * train["grad_accum"] * info.get("processes", 1)
    summary = {"run": step.settings["out_dir"], "steps": info["step"], "total_steps": info["total_steps"],
               "global_batch": batch, "epochs": train_recs[-1]["epoch"] if train_recs else None,
               "model": info["model"], "final_val": val[-1] if val else None}
    if step.kind == "train":
        from safetensors import safe_open

        with safe_open(str(ckpt / MODEL_FILE), framework="pt") as f:
            summary["parameters"] = sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118
        summary["tokens_per_step"] = batch * info["model"]["block_size"]
        summary["tokens_seen"] = (train_recs[-1].get("tokens_seen") if train_recs else None) or \
            info["step"] * summary["tokens_per_step"]
        summary["init_from"], summary["data_dir"] = info["init_from"], info["data_dir"]
    else:
        summary.update(base=info["base"], lora=info["lora"], pairs_seen=info["step"] * batch,
                       train_subset=train.get("train_subset", 0), label_smoothing=train["label_smoothing"])
    return summary


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def data_summary(step: Step) -> str:
    meta = json.loads((Path(step.settings["out_dir"]) / "meta.json").read_text())
    if step.kind == "e2e":
        c = meta["counts"]
        return (f"E2E NLG: {c['train']['pairs']:,} training pairs, {c['dev']['pairs']:,} validation pairs, "
                f"{c['test']['mrs']:,} test MRs")
    name = "WikiText-103" if step.kind == "wikitext" else f"{len(meta['sources'])} text file(s)"
    return f"{name}: {meta['train_tokens']:,} training and {meta['val_tokens']:,} validation tokens"


def count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n:,.0f}"


def val_text(val: dict | None) -> str:
    if not val:
        return "no evaluation yet"
    return (f"validation loss {val['loss']:.3f}, perplexity {val['perplexity']:,.1f}, "
            f"accuracy {val['accuracy']:.1%}")


def describe(step: Step, summary: dict | None, samples) -> str:
    if step.status != "done":
        return f"not run: {step.note}" if step.note else "not run"
    if step.kind in ("text", "wikitext", "e2e"):
        return data_summary(step)
    if step.kind == "train":
        m, s = summary["model"], summary
        start = "from scratch" if s["init_from"] == "scratch" else f"from `{display(s['init_from'])}`"
        epochs = f", {s['epochs']:.2f} epochs" if s["epochs"] is not None else ""
        return (f"GPT-2 of {m['n_layer']} layers, {m['n_head']} heads, {m['n_embd']} dims, context {m['block_size']} "
                f"({s['parameters'] / 1e6:.1f}M parameters), {start}: {s['steps']:,} steps of {s['global_batch']} x "
                f"{m['block_size']} tokens ({count(s['tokens_seen'])} tokens{epochs}); {val_text(s['final_val'])}")
    if step.kind == "lora":
        s, lora = summary, summary["lora"]
        subset = f" of a {s['train_subset']:,}-pair subset" if s["train_subset"] else ""
        epochs = f", {s['epochs']:.2f} epochs{subset}" if s["epochs"] is not None else ""
        return (f"LoRA r={lora['lora_r']}, alpha {lora['lora_alpha']:g} on {', '.join(lora['lora_targets'])} of "
                f"`{display(s['base'])}`: {s['steps']:,} steps of {s['global_batch']} pairs "
                f"({s['pairs_seen']:,} pairs{epochs}); E2E {val_text(s['final_val'])}")
    if step.kind == "sample":
        settings, lines = samples
        return f"{len(lines)} continuations ({settings})"
    return f"{step.parsed.method} decoding of the E2E test MRs, {len(step.settings['configs'])} LoRA config(s), scored"


def e2e_table(eval_step: Step, steps: list[Step]) -> tuple[str, dict]:
    """The E2E table (each base before and after LoRA), with a row for every system not evaluated,
    and our model's five worst outputs with their slot errors."""
    from gpt2study.e2e_table import markdown, worst_outputs

    path = scores_file(eval_step.settings["out_dir"])
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


def write_report(cfg: StudyConfig, steps: list[Step], times: Times, study_cmd: str) -> list[Path]:
    from gpt2study.plots import Curve, plot_curves, read_metrics

    out = Path(cfg.out_dir)
    by_name = {s.name: s for s in steps}
    summaries = {s.name: run_summary(s) for s in steps if s.kind in ("train", "lora") and s.status == "done"}
    sample_step = by_name["samples"]
    samples = last_samples(Path(sample_step.settings["out"]), n_continuations(sample_step)) \
        if sample_step.status == "done" else None

    pictures = []
    pre = [s for s in ("pretrain", "pretrain_continue") if s in summaries]
    curves = []
    for i, name in enumerate(pre):
        records = read_metrics(Path(by_name[name].settings["out_dir"]) / "metrics.jsonl")
        before = curves[-1] if curves else None  # run 2 continues on the axis where run 1 ended, from its weights
        curves.append(Curve(f"run {i + 1} ({name})", records, x_per_step=summaries[name]["tokens_per_step"],
                            x_offset=before.end if before else 0.0,
                            start=before.split("val")[-1] if before and before.split("val") else None))
    if curves:
        pictures.append(plot_curves(curves, out / "curves_pretrain.png", x_label="tokens seen",
                                    title="Pretraining: run 2 continues from run 1's weights (dotted line)"))
    loras = [s for s in ("lora_e2e", "lora_e2e_gpt2m") if s in summaries]
    curves = []
    for name in loras:
        records = read_metrics(Path(by_name[name].settings["out_dir"]) / "metrics.jsonl")
        base = summaries[name]["base"]
        label = "GPT-2 medium" if base == "gpt2-medium" else f"ours ({Path(base).name})"
        curves.append(Curve(f"{label} + LoRA", records, x_per_step=summaries[name]["global_batch"],
                            train_perplexity=summaries[name]["label_smoothing"] == 0))
    if curves:
        tokens = all(r.get("tokens_seen") is not None for c in curves for r in c.records)
        pictures.append(plot_curves(curves, out / "curves_lora.png",
                                    x_label="tokens seen" if tokens else "training pairs seen",
                                    title="LoRA on E2E NLG (validation: the reference tokens of the dev set)"))

    table, e2e = e2e_table(by_name["e2e_eval"], steps) if by_name["e2e_eval"].status == "done" else (
        "The E2E table is not there yet.", None)
    rows = []
    for s in steps:
        secs = times.seconds.get(s.name)
        rows.append({"step": s.name, "command": shown(s), "config": str(s.config), "status": s.status or "not run",
                     "what": describe(s, summaries.get(s.name), samples), "seconds": round(secs, 1) if secs else None,
                     "log": str(out / "logs" / f"{s.name}.log"), "run": summaries.get(s.name)})
    total = sum(r["seconds"] or 0 for r in rows)
    now = f"{datetime.datetime.now():%Y-%m-%d %H:%M}"
    md = [f"# GPT-2 study: `{study_cmd}`", "",
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
    atomic_write(out / "study.md", "\n".join(md) + "\n")
    record = {"command": study_cmd, "finished": now, "out_dir": str(out), "steps": rows,
              "total_seconds": round(total, 1), "e2e": e2e,
              "samples": {"settings": samples[0], "continuations": samples[1]} if samples else None,
              "pictures": [p.name for p in pictures]}
    atomic_write(out / "study.json", json.dumps(record, indent=2, default=str) + "\n")
    return [out / "study.md", out / "study.json", *pictures]


# ----------------------------------------------------------------------------- main


def main():
    cfg = load_config(StudyConfig, sys.argv[1:], doc=__doc__)
    study_cmd = shlex.join(["python", "study.py", *sys.argv[1:]])
    steps = plan(cfg)
    out = Path(cfg.out_dir)
    times = Times(out)
    print(f"study: {len(steps)} steps into {display(out)}/ (logs in {display(out / 'logs')}/)", flush=True)
    for step in steps:
        run_step(step, steps, cfg, times, study_cmd)
    written = write_report(cfg, steps, times, study_cmd)
    for s in steps:
        secs = times.seconds.get(s.name)
        print(f"  {s.name:<18} {s.status or 'not run':<8} {f'{secs:,.0f} s' if secs else '–':>10}")
    print(f"study written: {', '.join(display(p) for p in written)}")


if __name__ == "__main__":
    run_main(main)
