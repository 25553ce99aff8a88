"""Decode the E2E test set with each model and score it with the five official E2E metrics.

    python e2e_eval.py                                   # the study's table (see below)
    python e2e_eval.py --configs config/lora_e2e_small.py --out_dir out/e2e_eval_small
    python e2e_eval.py --outputs FILE --refs testset_w_refs.csv [--json]   # score a file

Each fine-tuning config names a base model and the LoRA run made on it: both become a row,
the base alone ("before") and with its adapter ("after"). Every system decodes the 630 test
MRs with beam search (beam 10, length penalty 0.8, no repeated 4-gram, at most 64 tokens);
the outputs, an error report per system (SYSTEM.errors.tsv: each MR's slots the output missed,
got wrong, added or repeated), the table (scores.md) and the scores (scores.json) go to
--out_dir, with the MR count and the decoding settings. A table of fewer MRs or other decoding
settings is written beside it under its own name, never over it. A system that does not exist
yet is listed with the command that makes it.

The decoder checks what it says (gpt2study/e2e_slots.py): a hypothesis loses --slot_penalty (1.0)
of its score per slot error against its MR as it finishes, so the search goes on for one that says
the MR, and of the final beam the one with the fewest slot errors is taken (--rerank_slots; ties:
the better scored). An output still one or two slots short is searched again with --widen_beam (40)
beams and replaced if that says more. Without the three, the best scored hypothesis, as generate()
gives it:

    python e2e_eval.py --configs config/lora_e2e_small.py --max_mrs 60 \
        --slot_penalty=0 --rerank_slots=False --widen_beam=0

(--max_mrs decodes only the first MRs, to try fast).

Scores are on the official scorer's scale: BLEU, METEOR and ROUGE_L are fractions (the LoRA
paper shows them x100), NIST and CIDEr as they come. SER, the slot error rate (gpt2study/
e2e_slots.py), is a fraction too: (missing + wrong + added + repeated slots) / the MRs' slots.
"""

import json
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, fields
from pathlib import Path

from gpt2study.checkpoints import ADAPTER_FILE, find_checkpoint, load_train_state, run_info
from gpt2study.cli import load_config, resolve_device, run_main
from gpt2study.e2e_data import ensure_prepared, load_prepared
from gpt2study.e2e_metrics import METRICS, format_scores, read_outputs, read_test_set, score
from gpt2study.e2e_slots import check, fewest_errors, parse_mr, slot_errors
from gpt2study.e2e_table import markdown, write_error_report
from gpt2study.folder_lock import hold
from gpt2study.loading import STUDY_RUNS, load_adapter_into, load_base, resolve
from gpt2study.settings import DecodeConfig, EvalConfig, FinetuneConfig
from gpt2study.tokenizer import decode
from model import UserError


@dataclass
class System:
    name: str
    base: str | None  # None: the base itself is missing
    adapter: Path | None = None
    missing: str = ""  # why it cannot be evaluated, and the command that makes it
    note: str = ""
    lora_run: str | None = None  # for a LoRA row: the fine-tuning run's out_dir


def systems_from_config(config: str) -> list[System]:
    """The base of a fine-tuning config and its LoRA run: two rows of the table."""
    cfg = load_config(FinetuneConfig, [config])
    ckpt = find_checkpoint(cfg.out_dir)
    info = run_info(ckpt) if ckpt else None
    try:  # an adapter that exists was trained on the base its run recorded (a local gpt2-medium folder, say)
        base = info["base"] if info else resolve(cfg.init_from)
    except UserError as e:
        base_row = System("our GPT-2 (no pretrained run yet)", None, missing=str(e))
        why = f"needs the base first; then python finetune.py {config}"
        return [base_row, System("our GPT-2 + LoRA", None, missing=why, lora_run=cfg.out_dir)]
    label = "GPT-2 medium" if base == "gpt2-medium" else f"GPT-2 {Path(base).name}"
    if base != "gpt2-medium" and not Path(base).exists():
        made_by = STUDY_RUNS.get(base)
        why = f"no model at {base}: " + (f"python train.py {made_by}" if made_by else "train it first")
        return [System(label, None, missing=why), System(f"{label} + LoRA", None, missing=why, lora_run=cfg.out_dir)]
    rows = [System(label, base)]
    if ckpt is None:
        why = f"no adapter in {cfg.out_dir}: python finetune.py {config}"
        rows.append(System(f"{label} + LoRA", base, missing=why, lora_run=cfg.out_dir))
    else:
        step, total = load_train_state(ckpt)["step"], info["total_steps"]
        note = "" if step >= total else f"adapter at step {step} of {total}"
        rows.append(System(f"{label} + LoRA", base, ckpt / ADAPTER_FILE, note=note, lora_run=cfg.out_dir))
    return rows


def build(system: System, device: str):
    from lora import merge_lora

    model = load_base(system.base)
    if system.adapter is not None:
        load_adapter_into(model, system.adapter)
        merge_lora(model)  # one matmul per layer instead of three while decoding
    return model.to(device).eval()


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def variant(cfg: EvalConfig, n_mrs: int, total: int) -> str:
    """'' for the study's table (every MR, the default decoding); else a name for the files of this one."""
    default = DecodeConfig().decoding()
    parts = [f"first{n_mrs}"] if n_mrs < total else []
    mine = cfg.decoding()  # a setting greedy decoding does not use is left out
    parts += [f"{f.name}={mine[f.name]}" for f in fields(DecodeConfig)
              if f.name in mine and mine[f.name] != default.get(f.name)]
    return slug("_".join(parts))


def score_with_slots(mrs: list[str], outputs: list[str], refs: list[list[str]]) -> tuple[dict, list]:
    """The five metrics and SER (one dict; SER's parts under "slot_errors"), and each output's slot check."""
    scores = score(outputs, refs)
    ser, checks = slot_errors(mrs, outputs)
    return {**scores, "SER": ser.pop("SER"), "slot_errors": ser}, checks


def output_line(tokens: list[int]) -> str:
    """An output as its file holds it: one line, single spaces."""
    return " ".join(decode(tokens).split())


# An output with more slot errors than this is not a near miss: its model has not learned to say the MR (the base
# models before LoRA), and a wider search of it costs minutes for nothing.
WIDEN_MAX_ERRORS = 2


def decode_outputs(model, test: list[dict], cfg: EvalConfig) -> list[str]:
    """One output line per test MR, as cfg's decoding gives it."""
    from gpt2study.decoding import continuations

    prompts = [r["prompt"] for r in test]
    if cfg.method == "greedy":
        ids = continuations(model, prompts, method="greedy", batch_size=cfg.batch_size,
                            max_new_tokens=cfg.max_new_tokens)
        return [output_line(t) for t in ids]
    slots = [parse_mr(r["mr"]) for r in test]
    outputs = beam_outputs(model, prompts, slots, cfg, cfg.beam_size)
    if cfg.widen_beam <= cfg.beam_size:
        return outputs
    errors = [check(mr, o).errors for mr, o in zip(slots, outputs)]
    again = [i for i, e in enumerate(errors) if 0 < e <= WIDEN_MAX_ERRORS]
    wider = beam_outputs(model, [prompts[i] for i in again], [slots[i] for i in again], cfg, cfg.widen_beam)
    for i, o in zip(again, wider):
        if check(slots[i], o).errors < errors[i]:
            outputs[i] = o
    return outputs


def beam_outputs(model, prompts: list[str], slots: list[dict], cfg: DecodeConfig, beam_size: int) -> list[str]:
    """Beam search of `beam_size` with cfg's slot checks (`slots`: each prompt's parsed MR)."""
    from gpt2study.decoding import continuations

    if not prompts:
        return []
    skip = ("method", "rerank_slots", "slot_penalty", "widen_beam")
    beam = {k: v for k, v in cfg.decoding().items() if k not in skip} | {"beam_size": beam_size}
    if cfg.slot_penalty:
        beam["finish_penalty"] = lambda i, tokens: cfg.slot_penalty * check(slots[i], output_line(tokens)).errors
    if not cfg.rerank_slots:
        return [output_line(t) for t in continuations(model, prompts, batch_size=cfg.batch_size, **beam)]
    beams = continuations(model, prompts, batch_size=cfg.batch_size, all_hypotheses=True, **beam)
    outputs = []
    for mr, hyps in zip(slots, beams):
        texts = [output_line(t) for t, _ in hyps]
        outputs.append(texts[fewest_errors(mr, texts)])
    return outputs


def evaluate_systems(cfg: EvalConfig) -> Path:
    """Decode and score every system of cfg.configs; returns the scores.json written."""
    device = resolve_device(cfg.device)
    data_dir = ensure_prepared(Path(cfg.data_dir))
    test = load_prepared(data_dir, "test")
    total = len(test)
    test = test[:cfg.max_mrs or None]
    mrs, refs = [r["mr"] for r in test], [r["refs"] for r in test]
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = variant(cfg, len(test), total)
    suffix = f".{tag}" if tag else ""
    systems = [s for config in cfg.configs for s in systems_from_config(config)]
    lora_names = Counter(s.name for s in systems if s.lora_run)
    for s in systems:
        if s.lora_run and lora_names[s.name] > 1:  # two LoRA runs on one base: say which is which
            s.name += f" ({s.lora_run})"
    seen, rows = set(), {}
    for system in systems:
        if (system.name, system.base) in seen:  # two configs on the same base: one base row
            continue
        seen.add((system.name, system.base))
        if not system.missing:
            try:
                model = build(system, device)
            except UserError as e:  # e.g. gpt2-medium offline and not cached
                system.missing = str(e)
        if system.missing:
            rows[system.name] = {"missing": system.missing}
            continue
        t0 = time.perf_counter()
        outputs = decode_outputs(model, test, cfg)
        seconds = time.perf_counter() - t0
        del model
        out_file = out_dir / f"{slug(system.name)}{suffix}.txt"
        out_file.write_text("".join(o + "\n" for o in outputs), encoding="utf-8")
        scores, checks = score_with_slots(mrs, outputs, refs)
        errors_file = out_file.with_suffix(".errors.tsv")
        write_error_report(errors_file, mrs, outputs, checks)
        print(f"{system.name}: decoded {len(outputs)} MRs in {seconds:.0f} s -> {out_file}\n{format_scores(scores)}"
              f"\nSER: {scores['SER']:.4f} (error report: {errors_file})")
        rows[system.name] = {"base": system.base, "adapter": str(system.adapter) if system.adapter else None,
                             **({"note": system.note} if system.note else {}), **scores,
                             "decode_seconds": round(seconds, 1), "outputs": str(out_file),
                             "errors": str(errors_file)}
    record = {"mrs": len(test), "of_mrs": total, "decoding": cfg.decoding(), "systems": rows}
    table = markdown(record)
    (out_dir / f"scores{suffix}.md").write_text(table + "\n")
    path = out_dir / f"scores{suffix}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\n{table}\n\nwritten to {out_dir}/scores{suffix}.md and scores{suffix}.json")
    return path


def score_file(cfg: EvalConfig) -> None:
    if not cfg.refs:
        raise UserError("--outputs needs --refs: the test set CSV (testset_w_refs.csv) or the release zip")
    test = read_test_set(cfg.refs)
    scores, _ = score_with_slots([mr for mr, _ in test], read_outputs(cfg.outputs), [refs for _, refs in test])
    if cfg.json:
        print(json.dumps({k: scores[k] for k in (*METRICS, "SER", "slot_errors", "official")}))
    else:
        e = scores["slot_errors"]
        print(format_scores(scores) + f"\nSER: {scores['SER']:.4f} ({e['missing']} missing, {e['wrong']} wrong, "
              f"{e['added']} added, {e['repeated']} repeated of {e['slots']} slots)")


def main():
    cfg = load_config(EvalConfig, sys.argv[1:], doc=__doc__)
    if cfg.outputs:
        score_file(cfg)
        return
    with hold(cfg.out_dir, "run"):
        evaluate_systems(cfg)


if __name__ == "__main__":
    run_main(main)
