"""The E2E table, one for e2e_eval.py's scores.md and the study's report: every system's five
metrics and its slot errors, from the record that scores.json holds.

A record: {"mrs", "of_mrs", "decoding", "systems": {name: scores or {"missing": why}}}, where the
scores are `e2e_metrics.score`'s, plus "SER" and, under "slot_errors", its parts and the share
of outputs without error (`e2e_slots.slot_errors`), and may name the system's "outputs" and
"errors" (the error report) files and a "note".
"""

import csv
from pathlib import Path

from gpt2study.e2e_metrics import FOOTNOTE, METRICS
from gpt2study.e2e_slots import SlotCheck

PARTS = ("missing", "wrong", "added", "repeated")
ERROR_COLUMNS = ("mr", "output", "errors", *PARTS)


def markdown(record: dict) -> str:
    """The table: a heading line (MRs, decoding), a row per system, the footnote and what is missing."""
    lines = []
    if "mrs" in record:
        settings = ", ".join(f"{k} {v}" for k, v in record["decoding"].items())
        of = f" (of {record['of_mrs']})" if record.get("of_mrs", record["mrs"]) != record["mrs"] else ""
        lines += [f"E2E test set, {record['mrs']} MRs{of}; decoding: {settings}", ""]
    head = [*METRICS, "SER", *PARTS, "no error"]
    lines += ["| system | " + " | ".join(head) + " |", "|---|" + "---:|" * len(head)]
    unofficial, missing = False, {}
    for name, sc in record["systems"].items():
        if "missing" in sc:
            lines.append(f"| {name} | " + " | ".join("–" for _ in head) + " |")
            missing.setdefault(sc["missing"], []).append(name)  # a base and its LoRA row often share the reason
            continue
        marks = ["*" if m in sc.get("unofficial", ()) else "" for m in METRICS]
        unofficial |= any(marks)
        cells = [f"{sc[m]:.4f}{k}" for m, k in zip(METRICS, marks)]
        if "SER" in sc:
            e = sc["slot_errors"]
            cells += [f"{100 * sc['SER']:.2f} %", *(str(e[p]) for p in PARTS), f"{100 * e['without_error']:.1f} %"]
        else:  # a record written before SER was counted
            cells += ["–"] * (len(head) - len(METRICS))
        note = f" ({sc['note']})" if sc.get("note") else ""
        lines.append(f"| {name}{note} | " + " | ".join(cells) + " |")
    lines += ["", "SER: slot error rate, (missing + wrong + added + repeated) / the MRs' slots; no error: the "
              "share of outputs with none."]
    if unofficial:
        lines += ["", FOOTNOTE]
    if missing:
        lines += ["", "Not evaluated:", *(f"- {', '.join(names)}: {why}" for why, names in missing.items())]
    return "\n".join(lines)


def write_error_report(path: Path, mrs: list[str], outputs: list[str], checks: list[SlotCheck]) -> None:
    """A TSV, one row per MR in test-set order: the MR, the output, its error count, and the slots
    missing, wrong, added and repeated (each a '; '-separated list)."""
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n", quoting=csv.QUOTE_NONE, quotechar=None)
        w.writerow(ERROR_COLUMNS)
        for mr, out, c in zip(mrs, outputs, checks, strict=True):
            row = [mr, out, c.errors, *("; ".join(getattr(c, p)) for p in PARTS)]
            w.writerow([" ".join(str(x).split()) for x in row])  # a plain TSV: no tab or line break in a cell


def read_error_report(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def worst_outputs(path: Path, n: int = 5) -> str:
    """The n outputs of an error report with the most slot errors (the first in test order among
    equals), as a markdown table; '' when none has an error."""
    rows = [r for r in read_error_report(path) if int(r["errors"])]
    rows = sorted(rows, key=lambda r: -int(r["errors"]))[:n]
    if not rows:
        return ""
    lines = ["| MR | output | errors |", "|---|---|---|"]
    for r in rows:
        said = "; ".join(f"{p}: {r[p]}" for p in PARTS if r[p])
        lines.append(" | ".join(["", *(x.replace("|", "/") for x in (r["mr"], r["output"], said)), ""]).strip())
    return "\n".join(lines)
