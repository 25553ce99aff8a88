"""Prepare the E2E NLG restaurant dataset (official release v1.0.0) for LoRA fine-tuning.

    python data/e2e/prepare.py [--src PATH] [--out_dir DIR]

PATH is the release zip or its unpacked folder; without it the zip is downloaded into DIR
(once). DIR (default data/e2e/prepared) gets train.jsonl and dev.jsonl (one pair a line:
mr, ref, prompt ids, target ids), test.jsonl (one MR group a line: mr, refs, prompt ids)
and meta.json (counts, token statistics, checksums).
"""

import argparse
import csv
import hashlib
import io
import json
import re
import sys
import zipfile
from pathlib import Path

# Run as a script, Python puts data/e2e/ (not the repo root) on sys.path; the shared modules live at the root.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from common import UserError, download, run_main
from tokenizer import EOT, encode, encode_batch

URL = "https://github.com/tuetschek/e2e-dataset/releases/download/v1.0.0/e2e-dataset.zip"
ZIP_NAME = "e2e-dataset.zip"
SPLIT_FILES = {"train": "trainset.csv", "dev": "devset.csv", "test": "testset_w_refs.csv"}
DEFAULT_OUT = Path(__file__).resolve().parent / "prepared"
PREPARE_CMD = "python data/e2e/prepare.py --src ../shared/data/e2e/e2e-dataset.zip"

# One `key[value]` pair of an MR and the comma or end that follows it. Keys exclude ':' and values '|'
# so that the linearised form below can be parsed back unambiguously.
_MR_PAIR = re.compile(r"\s*([^\[\],:|]+?)\s*\[([^\[\]|]*)\]\s*(,|$)")


# ----------------------------------------------------------------------------- reading the release


def _read_source_file(src: Path, filename: str) -> tuple[bytes, str]:
    """Raw bytes of one CSV of the release, from the zip or the unpacked folder, and a name for messages."""
    if not src.exists():
        raise UserError(f"E2E source '{src}' not found; pass the release zip or its unpacked folder")
    if src.is_dir():
        for path in (src / filename, src / "e2e-dataset" / filename):
            if path.is_file():
                return path.read_bytes(), str(path)
        raise UserError(f"'{filename}' not found in folder '{src}' (nor in its e2e-dataset/ subfolder)")
    try:
        with zipfile.ZipFile(src) as zf:
            members = [n for n in zf.namelist() if n == filename or n.endswith("/" + filename)]
            if len(members) != 1:
                raise UserError(f"zip '{src}' has {len(members)} files named '{filename}', expected 1")
            return zf.read(members[0]), f"{src}:{members[0]}"
    except zipfile.BadZipFile as e:
        raise UserError(f"'{src}' is neither a folder nor a readable zip ({e})") from None


def _collapse(text: str) -> str:
    # A few references hold line breaks or doubled spaces; the official scorer's readers collapse
    # whitespace too, so this changes no score and keeps training targets clean.
    return " ".join(text.split())


def parse_pairs_csv(data: bytes, name: str) -> list[tuple[str, str]]:
    """(mr, ref) rows of an E2E CSV with header mr,ref; any malformed row is a UserError naming `name` and row."""
    # surrogateescape keeps undecodable bytes visible per field, so the error can name the row.
    text = data.decode("utf-8-sig", errors="surrogateescape")
    rows = csv.reader(io.StringIO(text, newline=""), strict=True)
    pairs = []
    try:
        for row_no, row in enumerate(rows, start=1):  # row 1 is the header, as in a spreadsheet
            where = f"{name} row {row_no} (line {rows.line_num})"
            if any(re.search(r"[\udc80-\udcff]", field) for field in row):
                raise UserError(f"{where}: not valid UTF-8")
            if row_no == 1:
                if [h.strip().lower() for h in row] != ["mr", "ref"]:
                    raise UserError(f"{where}: header is {row}, expected ['mr', 'ref']")
                continue
            if len(row) != 2:
                raise UserError(f"{where}: {len(row)} fields, expected 2 (mr, ref)")
            mr, ref = _collapse(row[0]), _collapse(row[1])
            if not mr or not ref:
                raise UserError(f"{where}: empty {'mr' if not mr else 'ref'}")
            pairs.append((mr, ref))
    except csv.Error as e:
        raise UserError(f"{name} line {rows.line_num}: malformed CSV ({e})") from None
    if not pairs:
        raise UserError(f"{name}: no data rows")
    return pairs


def read_split(src, split: str) -> list[tuple[str, str]]:
    """(mr, ref) pairs of `split` ('train', 'dev' or 'test' = testset_w_refs.csv) from the release zip or folder."""
    if split not in SPLIT_FILES:
        raise UserError(f"unknown E2E split '{split}'; choose one of {', '.join(SPLIT_FILES)}")
    return parse_pairs_csv(*_read_source_file(Path(src), SPLIT_FILES[split]))


def group_by_mr(pairs) -> list[tuple[str, list[str]]]:
    """Group consecutive rows with the same MR, in file order, exactly as the official scorer does."""
    groups: list[tuple[str, list[str]]] = []
    for mr, ref in pairs:
        if groups and groups[-1][0] == mr:
            groups[-1][1].append(ref)
        else:
            groups.append((mr, [ref]))
    return groups


# ----------------------------------------------------------------------------- model inputs


def parse_mr(mr: str) -> list[tuple[str, str]]:
    """[(attribute, value), ...] of an MR such as 'name[The Eagle], food[French]'; malformed MRs are a UserError."""
    pairs, pos = [], 0
    while pos < len(mr):
        m = _MR_PAIR.match(mr, pos)
        if not m or not m.group(2).strip() or (m.group(3) == "," and m.end() == len(mr)):
            raise UserError(f"malformed MR {mr!r} at character {pos}: expected 'attribute[value], ...'")
        pairs.append((m.group(1), m.group(2).strip()))
        pos = m.end()
    if not pairs:
        raise UserError(f"malformed MR {mr!r}: no attribute[value] pairs")
    return pairs


def linearize_mr(mr: str) -> str:
    """'name[The Eagle], food[French]' -> 'name : The Eagle | food : French' (order and names kept)."""
    return " | ".join(f"{key} : {value}" for key, value in parse_mr(mr))


def format_prompt(mr: str) -> str:
    return linearize_mr(mr) + " ||"


def tokenize_example(mr: str, ref: str) -> tuple[list[int], list[int]]:
    """Prompt ids and target ids; the target starts with a space (natural BPE words) and ends with EOT."""
    return encode(format_prompt(mr)), [*encode(" " + ref), EOT]


# ----------------------------------------------------------------------------- prepare


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_jsonl(path: Path, records) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def prepare(src: Path, out_dir: Path) -> dict:
    """Tokenise the three splits of `src` into out_dir; returns the metadata written to meta.json."""
    meta = {
        "source": str(src),
        "source_sha256": _sha256(src.read_bytes()) if src.is_file() else None,
        "csv_sha256": {},
        "prompt_format": "linearize_mr(mr) + ' ||' -> ' ' + ref + <|endoftext|>",
        "counts": {},
        "tokens": {},
        "max_len": {},
    }
    splits = {}
    for split, filename in SPLIT_FILES.items():
        data, name = _read_source_file(src, filename)
        meta["csv_sha256"][filename] = _sha256(data)
        splits[split] = parse_pairs_csv(data, name)

    out_dir.mkdir(parents=True, exist_ok=True)
    for split in ("train", "dev"):
        pairs = splits[split]
        prompts = encode_batch([format_prompt(mr) for mr, _ in pairs])
        targets = [[*ids, EOT] for ids in encode_batch([" " + ref for _, ref in pairs])]
        _write_jsonl(
            out_dir / f"{split}.jsonl",
            ({"mr": mr, "ref": ref, "prompt": p, "target": t} for (mr, ref), p, t in zip(pairs, prompts, targets)),
        )
        meta["counts"][split] = {"pairs": len(pairs), "mrs": len({mr for mr, _ in pairs})}
        meta["tokens"][split] = {"prompt": sum(map(len, prompts)), "target": sum(map(len, targets))}
        meta["max_len"][split] = max(len(p) + len(t) for p, t in zip(prompts, targets))

    groups = group_by_mr(splits["test"])
    prompts = encode_batch([format_prompt(mr) for mr, _ in groups])
    records = ({"mr": mr, "refs": refs, "prompt": p} for (mr, refs), p in zip(groups, prompts))
    _write_jsonl(out_dir / "test.jsonl", records)
    meta["counts"]["test"] = {"pairs": len(splits["test"]), "mrs": len(groups)}
    meta["tokens"]["test"] = {"prompt": sum(map(len, prompts))}
    meta["max_len"]["test"] = max(map(len, prompts))
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def fetch_release(out_dir: Path) -> Path:
    """The release zip in out_dir, downloaded on first use."""
    src = out_dir / ZIP_NAME
    if not src.is_file():
        hint = f"offline? pass --src ../shared/data/e2e/{ZIP_NAME} or another local copy of the zip or its folder"
        download(URL, src, hint)
    return src


def ensure_prepared(out_dir: Path) -> Path:
    """out_dir, prepared from the official release first if it is the default folder and empty."""
    if not (out_dir / "test.jsonl").exists() and out_dir.resolve() == DEFAULT_OUT:
        print(f"{out_dir} not prepared yet: preparing E2E from the official release")
        prepare(fetch_release(out_dir), out_dir)
    return out_dir


def load_prepared(out_dir, split: str) -> list[dict]:
    """Records of one prepared split (see the module docstring)."""
    path = Path(out_dir) / f"{split}.jsonl"
    if split not in SPLIT_FILES:
        raise UserError(f"unknown E2E split '{split}'; choose one of {', '.join(SPLIT_FILES)}")
    if not path.is_file():
        raise UserError(f"no prepared E2E data at '{path}'; run: {PREPARE_CMD} --out_dir {out_dir}")
    records = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UserError(f"{path} line {line_no}: not JSON ({e}); rerun: {PREPARE_CMD}") from None
    return records


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=Path, help="the release zip or its unpacked folder (default: download)")
    parser.add_argument("--out_dir", type=Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    args = parser.parse_args(argv)
    meta = prepare(args.src or fetch_release(args.out_dir), args.out_dir)
    for split in SPLIT_FILES:
        c, t = meta["counts"][split], meta["tokens"][split]
        tokens = ", ".join(f"{k} {v:,}" for k, v in t.items())
        max_len = meta["max_len"][split]
        print(f"{split:5s}: {c['pairs']:6,} pairs, {c['mrs']:5,} MRs; tokens: {tokens}; max length {max_len}")
    print(f"wrote {args.out_dir}/{{train,dev,test}}.jsonl and meta.json")


if __name__ == "__main__":
    run_main(main)
