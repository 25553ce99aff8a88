"""Decode the E2E test set with each model and score it with the five official E2E metrics.

    python e2e_eval.py                                   # the study's table (see below)
    python e2e_eval.py --configs config/lora_e2e_small.py --out_dir out/e2e_eval_small
    python e2e_eval.py --outputs FILE --refs testset_w_refs.csv [--json]   # score a file

Each fine-tuning config names a base model and the LoRA run made on it: both become a row,
the base alone ("before") and with its adapter ("after"). Every system decodes the 630 test
MRs with beam search (beam 10, length penalty 0.8, no repeated 4-gram, at most 64 tokens);
the outputs, the table (scores.md) and the scores (scores.json) go to --out_dir. A system
that does not exist yet is listed with the command that makes it.

Scores are on the official scorer's scale: BLEU, METEOR and ROUGE_L are fractions (the LoRA
paper shows them x100), NIST and CIDEr as they come.
"""

import argparse
import json
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from common import UserError, default_base, load_config, load_model, run_main
from data.e2e.prepare import DEFAULT_OUT, ensure_prepared, load_prepared
from e2e_metrics import FOOTNOTE, METRICS, format_scores, read_outputs, read_references, score
from tokenizer import decode as detokenize

STUDY_CONFIGS = ("config/lora_e2e.py", "config/lora_e2e_gpt2m.py")


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
    from finetune import ADAPTER_FILE, FinetuneConfig
    from trainer import find_checkpoint, load_train_state

    cfg = load_config(FinetuneConfig, [config])
    ckpt = find_checkpoint(cfg.out_dir)
    info = json.loads((ckpt / "config.json").read_text()) if ckpt else None
    try:  # an adapter that exists was trained on the base its run recorded (a local gpt2-medium folder, say)
        base = info["base"] if info else cfg.init_from or default_base()
    except UserError as e:
        base_row = System("our GPT-2 (no pretrained run yet)", None, missing=str(e))
        why = f"needs the base first; then python finetune.py {config}"
        return [base_row, System("our GPT-2 + LoRA", None, missing=why, lora_run=cfg.out_dir)]
    label = "GPT-2 medium" if base == "gpt2-medium" else f"GPT-2 {Path(base).name}"
    if base != "gpt2-medium" and not Path(base).exists():
        why = f"no model at {base}: " + (f"python train.py {made_by(base)}" if made_by(base) else "train it first")
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


def made_by(out_dir: str) -> str | None:
    """The pretraining config under config/ whose run writes out_dir."""
    from train import PretrainConfig

    for config in sorted(Path("config").glob("*.py")):
        try:
            if Path(load_config(PretrainConfig, [str(config)]).out_dir) == Path(out_dir):
                return str(config)
        except UserError:  # not a pretraining config
            continue
    return None


def build(system: System, device: str):
    from lora import load_adapter, merge_lora

    model = load_model(system.base)
    if system.adapter is not None:
        load_adapter(model, system.adapter)
        merge_lora(model)  # one matmul per layer instead of three while decoding
    return model.to(device).eval()


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def markdown_table(results: list[tuple[System, dict | None]]) -> str:
    lines = ["| system | " + " | ".join(METRICS) + " |", "|---|" + "---:|" * len(METRICS)]
    unofficial = False
    for system, scores in results:
        if scores is None:
            lines.append(f"| {system.name} | " + " | ".join("–" for _ in METRICS) + " |")
            continue
        cells = []
        for m in METRICS:
            mark = "*" if m in scores["unofficial"] else ""
            unofficial |= bool(mark)
            cells.append(f"{scores[m]:.4f}{mark}")
        lines.append(f"| {system.name}{f' ({system.note})' if system.note else ''} | " + " | ".join(cells) + " |")
    missing = [f"- {s.name}: {s.missing}" for s, sc in results if sc is None]
    return "\n".join(lines + ([FOOTNOTE] if unofficial else []) + (["", "Not evaluated:", *missing] if missing else []))


def evaluate_systems(args) -> None:
    data_dir = ensure_prepared(Path(args.data_dir))
    test = load_prepared(data_dir, "test")[:args.max_mrs or None]
    prompts, refs = [r["prompt"] for r in test], [r["refs"] for r in test]
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    systems = [s for config in args.configs for s in systems_from_config(config)]
    lora_names = Counter(s.name for s in systems if s.lora_run)
    for s in systems:
        if s.lora_run and lora_names[s.name] > 1:  # two LoRA runs on one base: say which is which
            s.name += f" ({s.lora_run})"
    seen, results = set(), []
    for system in systems:
        if (system.name, system.base) in seen:  # two configs on the same base: one base row
            continue
        seen.add((system.name, system.base))
        if system.missing:
            results.append((system, None))
            continue
        try:
            model = build(system, args.device)
        except UserError as e:  # e.g. gpt2-medium offline and not cached
            system.missing = str(e)
            results.append((system, None))
            continue
        from decoding import decode

        t0 = time.perf_counter()
        beam = {"beam_size": args.beam_size, "length_penalty": args.length_penalty,
                "no_repeat_ngram_size": args.no_repeat_ngram_size} if args.method == "beam" else {}
        ids = decode(model, prompts, method=args.method, batch_size=args.batch_size,
                     max_new_tokens=args.max_new_tokens, **beam)
        seconds = time.perf_counter() - t0
        outputs = [" ".join(detokenize(t).split()) for t in ids]  # one line each
        out_file = out_dir / f"{slug(system.name)}.txt"
        out_file.write_text("".join(o + "\n" for o in outputs), encoding="utf-8")
        scores = score(outputs, refs)
        scores["decode_seconds"] = round(seconds, 1)
        print(f"{system.name}: decoded {len(outputs)} MRs in {seconds:.0f} s -> {out_file}\n{format_scores(scores)}")
        results.append((system, scores))
        del model
    table = markdown_table(results)
    (out_dir / "scores.md").write_text(table + "\n")
    (out_dir / "scores.json").write_text(json.dumps(
        {s.name: ({"base": s.base, "adapter": str(s.adapter) if s.adapter else None, **sc} if sc else
                  {"missing": s.missing}) for s, sc in results}, indent=2) + "\n")
    print(f"\nE2E test set ({len(prompts)} MRs)\n\n{table}\n\nwritten to {out_dir}/scores.md and scores.json")


def score_file(args) -> None:
    if not args.refs:
        raise UserError("--outputs needs --refs: the test set CSV (testset_w_refs.csv) or the release zip")
    scores = score(read_outputs(args.outputs), read_references(args.refs))
    print(json.dumps({m: scores[m] for m in (*METRICS, "official")}) if args.json else format_scores(scores))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--outputs", type=Path, help="score this file of system outputs (one line per test MR)")
    p.add_argument("--refs", type=Path, help="with --outputs: testset_w_refs.csv (or the release zip)")
    p.add_argument("--json", action="store_true", help="with --outputs: print one JSON object")
    p.add_argument("--configs", nargs="+", default=list(STUDY_CONFIGS), help="fine-tuning configs to evaluate")
    p.add_argument("--out_dir", default="out/e2e_eval")
    p.add_argument("--data_dir", default=str(DEFAULT_OUT))
    p.add_argument("--max_mrs", type=int, default=0, help="only the first N test MRs (quick checks)")
    p.add_argument("--method", default="beam", choices=("beam", "greedy"))
    p.add_argument("--beam_size", type=int, default=10)
    p.add_argument("--length_penalty", type=float, default=0.8)
    p.add_argument("--no_repeat_ngram_size", type=int, default=4)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=None, help="MRs decoded side by side (default: by device)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    score_file(args) if args.outputs else evaluate_systems(args)


if __name__ == "__main__":
    run_main(main)
