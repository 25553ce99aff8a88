"""study.py end to end on the tiny preset (config/study_tiny.py) on the CPU, on small made-up data:
a Ctrl-C during pretraining and the rerun that resumes it, every output, a rerun that skips every
step, a failing step, settings refused before any step; and plots.py's axes."""

import csv
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, assert_one_line_error, run_cli

from gpt2study.checkpoints import find_checkpoint, run_info
from gpt2study.e2e_table import read_error_report
from gpt2study.plots import Curve, plot_curves, read_metrics

STEPS = ("data_text", "data_e2e", "pretrain", "pretrain_continue", "samples", "lora_e2e", "lora_e2e_gpt2m",
         "e2e_eval")
OFFLINE = {"HF_HUB_OFFLINE": "1"}  # GPT-2 medium: not in the cache, and no network asked


NAMES = ("The Eagle", "Blue Spice", "Clowns", "Zizzi", "The Mill", "Aromi", "Cotto", "Giraffe")
FOODS = ("French", "Italian", "Chinese", "English", "Indian", "Japanese")
KINDS = ("coffee shop", "pub", "restaurant")
AREAS = ("riverside", "city centre")


def sources(root):
    """A text corpus and an E2E release folder (its three CSVs), small and made up, so that the
    test needs nothing beside the repo."""
    rng = random.Random(0)
    corpus = root / "src" / "corpus.txt"
    corpus.parent.mkdir(parents=True, exist_ok=True)
    words = ("the", "a", "of", "city", "river", "food", "people", "time", "year", "house", "music", "night",
             "water", "story", "small", "old", "new")
    docs = [" ".join(" ".join(rng.choice(words) for _ in range(rng.randint(5, 15))).capitalize() + "."
                     for _ in range(rng.randint(3, 8))) for _ in range(400)]
    corpus.write_text("\n\n".join(docs) + "\n")
    e2e = root / "src" / "e2e"
    e2e.mkdir()
    pairs = [(f"name[{n}], eatType[{k}], food[{f}], area[{a}]", f"{n} is a {f} {k} in the {a}.")
             for n in NAMES for f in FOODS for k in KINDS for a in AREAS]
    rng.shuffle(pairs)
    for name, rows in (("trainset.csv", pairs[:200]), ("devset.csv", pairs[200:240]),
                       ("testset_w_refs.csv", [p for p in pairs[240:246] for _ in range(2)])):
        with open(e2e / name, "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([("mr", "ref"), *rows])
    return corpus, e2e


def preset(root, name="study", **settings) -> str:
    """A config file: the tiny preset on `sources(root)`, its data and outputs under `root`, GPT-2 medium looked
    for (and, offline, skipped)."""
    corpus, e2e = root / "src" / "corpus.txt", root / "src" / "e2e"
    if not corpus.exists():
        sources(root)
    values = {"out_dir": str(root / name), "pretrain_data": str(root / "data" / "corpus"),
              "e2e_data": str(root / "data" / "e2e"), "corpus": str(corpus), "e2e_src": str(e2e), "gpt2m": "auto",
              **settings}
    path = root / f"{name}.py"
    path.write_text(f"include({str(REPO / 'config' / 'study_tiny.py')!r})\n"
                    + "".join(f"{k} = {v!r}\n" for k, v in values.items()))
    return str(path)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The tiny study, stopped by a Ctrl-C once pretraining has begun, then run again to the end."""
    root = tmp_path_factory.mktemp("study")
    config = preset(root)
    out = root / "study"
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "study.py", config], cwd=REPO, env={**os.environ, **OFFLINE},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "pretrain" / "metrics.jsonl"
    while proc.poll() is None and not (metrics.exists() and metrics.read_text().count('"train"') >= 1):
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)  # as a Ctrl-C would: the study passes it to the running step
    stdout, stderr = proc.communicate(timeout=300)
    stopped = (proc.returncode, stdout, stderr, run_info(find_checkpoint(out / "pretrain")))
    finished = run_cli("study.py", config, env=OFFLINE)
    seconds = time.perf_counter() - t0
    return {"root": root, "config": config, "out": out, "stopped": stopped, "finished": finished, "seconds": seconds}


def test_ctrl_c_stops_the_study_and_the_rerun_resumes(study):
    rc, stdout, stderr, ckpt = study["stopped"]
    assert rc == 130, stderr
    assert "step pretrain: interrupted after" in stderr and "the study stops here" in stderr, stderr
    assert ckpt["step"] < ckpt["total_steps"] == 30  # the trainer saved where it stopped, before the end
    r = study["finished"]
    assert r.returncode == 0, r.stderr
    assert f"step pretrain: resuming at step {ckpt['step']} of 30" in r.stdout
    assert "step pretrain: done in" in r.stdout and f"(resumed from step {ckpt['step']})" in r.stdout
    # the resumed run's records continue the first attempt's: every step once
    records = read_metrics(study["out"] / "pretrain" / "metrics.jsonl")
    steps = [rec["step"] for rec in records if rec["split"] == "train"]
    assert steps == list(range(1, 31))
    run2 = run_info(find_checkpoint(study["out"] / "pretrain_continue"))
    assert run2["init_from"] == str(study["out"] / "pretrain") and run2["step"] == run2["total_steps"] == 10


def test_every_step_reports_its_wall_time_and_the_outputs_are_there(study):
    r, out = study["finished"], study["out"]
    for name in STEPS:
        if name == "lora_e2e_gpt2m":  # offline, not cached: skipped with the reason and the command
            line = next(x for x in r.stdout.splitlines() if x.startswith("step lora_e2e_gpt2m: skipped: "))
            assert "HF_HUB_OFFLINE" in line and f"to run it: python finetune.py {out / 'configs'}" in line
        elif name != "pretrain":  # pretrain was the interrupted one (checked above)
            assert f"step {name}: done in " in r.stdout or f"step {name}: skipped (done)" in r.stdout, name
    for name in ("study.md", "study.json", "curves_pretrain.png", "curves_lora.png", "samples.txt"):
        assert (out / name).is_file(), name
    for png in ("curves_pretrain.png", "curves_lora.png"):
        import matplotlib.image

        assert matplotlib.image.imread(out / png).shape[:2] == (484, 1650)  # a real PNG, three panels wide
    assert sorted(p.name for p in (out / "logs").glob("*.log")) == sorted(f"{s}.log" for s in STEPS
                                                                          if s != "lora_e2e_gpt2m")
    record = json.loads((out / "study.json").read_text())
    assert [s["step"] for s in record["steps"]] == list(STEPS)
    times = {s["step"]: s["seconds"] for s in record["steps"]}
    assert all(times[s] and times[s] > 0 for s in STEPS if s != "lora_e2e_gpt2m")
    assert sum(times[s] for s in STEPS if times[s]) < study["seconds"]  # wall times, not invented ones
    assert record["pictures"] == ["curves_pretrain.png", "curves_lora.png"]


def test_the_table_has_each_base_before_and_after_lora(study):
    out = study["out"]
    md = (out / "study.md").read_text()
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in md.splitlines()
            if line.startswith("| GPT-2")}
    assert list(rows) == ["GPT-2 pretrain_continue", "GPT-2 pretrain_continue + LoRA", "GPT-2 medium",
                          "GPT-2 medium + LoRA"]
    for name in ("GPT-2 pretrain_continue", "GPT-2 pretrain_continue + LoRA"):  # the five metrics, SER, its parts
        assert all(math.isfinite(float(c.strip().rstrip("*% "))) for c in rows[name]), rows[name]
    assert all(c.strip() == "–" for c in rows["GPT-2 medium"] + rows["GPT-2 medium + LoRA"])
    missing = md.split("Not evaluated:\n")[1].splitlines()[0]
    assert missing.startswith("- GPT-2 medium, GPT-2 medium + LoRA: ") and "HF_HUB_OFFLINE" in missing
    assert "to run it: python finetune.py" in missing
    # the numbers are the scorer's: the same as e2e_eval.py's own scores file
    scores = json.loads(next((out / "e2e_eval").glob("scores*.json")).read_text())
    ours = scores["systems"]["GPT-2 pretrain_continue + LoRA"]
    assert [f"{ours[m]:.4f}" for m in ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")] == \
        [c.strip().rstrip("*") for c in rows["GPT-2 pretrain_continue + LoRA"][:5]]
    assert rows["GPT-2 pretrain_continue + LoRA"][5].strip() == f"{100 * ours['SER']:.2f} %"
    if any(int(row["errors"]) for row in read_error_report(Path(ours["errors"]))):
        assert "five outputs with the most slot errors" in md
    assert scores["mrs"] == 5 and "5 MRs" in md
    # the ten prompts, each with its continuation
    prompts = [p for p in (REPO / "prompts.txt").read_text().splitlines() if p.strip()]
    block = md.split("```text\n")[1].split("```")[0].splitlines()
    assert len(block) == 10 and all(line.startswith(p) for line, p in zip(block, prompts))
    assert "![curves_pretrain](curves_pretrain.png)" in md and "![curves_lora](curves_lora.png)" in md


def test_a_rerun_skips_every_step(study):
    out = study["out"]
    scores = next((out / "e2e_eval").glob("scores*.json"))
    before = scores.stat().st_mtime_ns
    t0 = time.perf_counter()
    r = run_cli("study.py", study["config"], env=OFFLINE)
    assert r.returncode == 0, r.stderr
    for name in STEPS:
        if name != "lora_e2e_gpt2m":
            assert f"step {name}: skipped (done)" in r.stdout, r.stdout
    assert "done in" not in r.stdout
    assert scores.stat().st_mtime_ns == before
    assert time.perf_counter() - t0 < 60
    # switched off, GPT-2 medium is not even looked for, and still listed with its command
    r = run_cli("study.py", study["config"], "--gpt2m=off", env=OFFLINE)
    assert r.returncode == 0, r.stderr
    assert ("step lora_e2e_gpt2m: skipped: switched off (gpt2m='off'); to run it: python study.py "
            f"{study['config']} --gpt2m=auto") in r.stdout
    # required, it stops the study with the reason
    assert_one_line_error(run_cli("study.py", study["config"], "--gpt2m=on", env=OFFLINE), "lora_e2e_gpt2m",
                          "HF_HUB_OFFLINE")


def test_a_failing_step_stops_the_study_with_its_error_and_command(study):
    root = study["root"]
    # the data is the study's above (skipped); run 1 asks for a batch larger than the corpus
    config = preset(root, "failing", pretrain_overrides=("--n_layer=2", "--n_head=2", "--n_embd=32",
                                                         "--block_size=64", "--batch_size=100000"))
    r = run_cli("study.py", config, env=OFFLINE)
    line = assert_one_line_error(r, "step pretrain failed", "fewer than one optimizer step needs",
                                 f"rerun it alone: python train.py {root / 'failing' / 'configs' / 'pretrain.py'}",
                                 "python study.py")
    assert "step data_text: skipped (done)" in r.stdout and "step pretrain_continue" not in r.stdout
    # the command it names is the step, as the study ran it
    rerun = line.split("rerun it alone: ")[1].split(" (log:")[0].split()
    again = run_cli(*rerun[1:])
    assert_one_line_error(again, "fewer than one optimizer step needs")


def test_prepared_tokens_of_another_corpus_are_not_reused(study):
    root = study["root"]
    other = root / "src" / "other.txt"
    other.write_text("Another text.\n\nWith two documents.\n")
    r = run_cli("study.py", preset(root, "other", corpus=str(other)), env=OFFLINE)
    assert_one_line_error(r, "holds the tokens of other files", "set pretrain_data to another folder")
    assert json.loads((root / "data" / "corpus" / "meta.json").read_text())["sources"] == [
        str(root / "src" / "corpus.txt")]  # left as it was


def test_bad_settings_stop_the_study_before_any_step(tmp_path):
    config = preset(tmp_path)
    r = run_cli("study.py", config, "--lora_overrides=--lora_rank=4")
    assert_one_line_error(r, "lora_overrides", "unknown config key 'lora_rank'")
    r = run_cli("study.py", config, "--pretrain_overrides=--out_dir=elsewhere")
    assert_one_line_error(r, "pretrain_overrides sets out_dir")
    r = run_cli("study.py", config, "--corpus=/nonexistent/*.txt")
    assert_one_line_error(r, "/nonexistent/*.txt")
    assert not (tmp_path / "study").exists()


# ----------------------------------------------------------------------------- plots.py


def test_curves_place_a_continued_run_after_the_first(tmp_path):
    run1 = [{"step": s, "split": "train", "loss": 10 - s} for s in (1, 2, 3, 4)] + \
        [{"step": 4, "split": "val", "loss": 6.5, "perplexity": math.exp(6.5), "accuracy": 0.1}]
    run2 = [{"step": 1, "split": "train", "loss": 5.5}, {"step": 2, "split": "val", "loss": 5.0,
                                                         "perplexity": math.exp(5.0), "accuracy": 0.2}]
    first = Curve("run 1", run1, x_per_step=512)
    second = Curve("run 2", run2, x_per_step=512, x_offset=first.end, start=run1[-1])
    assert first.end == 4 * 512
    assert [second.x(r) for r in run2] == [5 * 512, 6 * 512]
    logged = Curve("run", [{"step": 3, "split": "val", "loss": 1.0, "tokens_seen": 1000}], x_per_step=512,
                   x_offset=10)
    assert logged.x(logged.records[0]) == 1010  # what the trainer logged wins over step x batch
    path = plot_curves([first, second], tmp_path / "c.png", x_label="tokens seen", title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not (tmp_path / "c.png.tmp").exists()


def test_read_metrics_leaves_out_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "split": "train", "loss": 2.0}\n{"step": 2, "spl')
    assert read_metrics(path) == [{"step": 1, "split": "train", "loss": 2.0}]
    assert read_metrics(tmp_path / "none.jsonl") == []


def test_a_step_run_again_from_nothing_keeps_only_its_new_time(tmp_path):
    from study import Times

    times = Times(tmp_path)
    times.add("pretrain", 50.0, resumed=False)
    times.add("pretrain", 30.0, resumed=True)  # interrupted, then continued from its checkpoint
    times.add("e2e_eval", 400.0, resumed=False)
    times.add("e2e_eval", 600.0, resumed=False)  # its output moved aside and made again
    assert Times(tmp_path).seconds == {"pretrain": 80.0, "e2e_eval": 600.0}


def test_the_report_takes_the_studys_own_table_not_a_newer_one_made_by_hand(tmp_path):
    from gpt2study.settings import EvalConfig
    from study import Evaluation, scores_file

    def table(name: str, cfg: EvalConfig, mrs: int = 630, age: int = 0) -> Path:
        path = tmp_path / name
        path.write_text(json.dumps({"mrs": mrs, "of_mrs": 630, "decoding": cfg.decoding(), "systems": {}}))
        os.utime(path, (time.time() - age, time.time() - age))
        return path

    def step(cfg: EvalConfig) -> Evaluation:
        return Evaluation("e2e_eval", "e2e_eval.py", tmp_path / "e2e_eval.py", {"out_dir": str(tmp_path)}, parsed=cfg)

    assert scores_file(step(EvalConfig())) is None
    ours = table("scores.json", EvalConfig(), age=60)
    table("scores.beam_size_20.json", EvalConfig(beam_size=20))  # newer, other decoding
    first3 = table("scores.first3.json", EvalConfig(), mrs=3)  # newer, fewer MRs
    (tmp_path / "scores.torn.json").write_text('{"mrs": 6')
    assert scores_file(step(EvalConfig())) == ours
    assert scores_file(step(EvalConfig(max_mrs=3))) == first3
    assert scores_file(step(EvalConfig(widen_beam=0))) is None  # a table of an older decoder is not current
