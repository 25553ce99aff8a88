"""E2E NLG examples for LoRA fine-tuning: the prompt format, tokenised pairs, the prepared folder.

A prepared folder (default data/e2e/prepared, written by data/e2e/prepare.py) holds
train.jsonl and dev.jsonl (one pair a line: mr, ref, prompt ids, target ids), test.jsonl (one MR
group a line: mr, refs, prompt ids) and meta.json (counts, token statistics, checksums).
"""

import hashlib
import json
import re
from pathlib import Path

from gpt2study.download import make_out_dir
from gpt2study.e2e_release import SPLIT_FILES, fetch_release, group_by_mr, parse_pairs_csv, read_source_file
from gpt2study.files import replacing
from gpt2study.tokenizer import EOT, VOCAB_SIZE, encode, encode_batch
from model import UserError

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "data" / "e2e" / "prepared"
PREPARE_CMD = "python data/e2e/prepare.py"  # it downloads the release; offline, add --src e2e-dataset.zip

# One `key[value]` pair of an MR and the comma or end that follows it. Keys exclude ':' and values '|'
# so that the linearised form below can be parsed back unambiguously.
_MR_PAIR = re.compile(r"\s*([^\[\],:|]+?)\s*\[([^\[\]|]*)\]\s*(,|$)")


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
    """Written under a temporary name, then renamed: test.jsonl, written last, marks a whole folder."""
    with replacing(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def prepare(src: Path, out_dir: Path) -> dict:
    """Tokenise the three splits of `src` into out_dir; returns the metadata written to meta.json."""
    src, out_dir = Path(src), Path(out_dir)
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
        data, name = read_source_file(src, filename)
        meta["csv_sha256"][filename] = _sha256(data)
        splits[split] = parse_pairs_csv(data, name)

    make_out_dir(out_dir)
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


def ensure_prepared(out_dir: Path) -> Path:
    """out_dir, prepared from the official release first if it is the default folder and empty."""
    out_dir = Path(out_dir)
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
        raise UserError(f"no prepared E2E data at '{path}'; run: {PREPARE_CMD} --out_dir {out_dir} (it downloads "
                        f"the release; offline, add --src e2e-dataset.zip)")
    records = []
    with open(path, "rb") as f:  # bytes, decoded a line at a time: an error names its line
        for line_no, line in enumerate(f, start=1):
            try:
                record = json.loads(line.decode("utf-8"))
                problem = _record_problem(record, split)
            except UnicodeDecodeError as e:
                problem = f"not UTF-8 text (byte {e.start})"
            except json.JSONDecodeError as e:
                problem = f"not JSON ({e})"
            if problem:
                raise UserError(f"{path} line {line_no}: {problem}; rerun: {PREPARE_CMD}")
            records.append(record)
    if not records:
        raise UserError(f"{path} holds no records; rerun: {PREPARE_CMD}")
    return records


# what each split's records hold: key -> (type, its items' type)
_FIELDS = {"train": {"mr": (str, None), "ref": (str, None), "prompt": (list, int), "target": (list, int)},
           "test": {"mr": (str, None), "refs": (list, str), "prompt": (list, int)}}
_FIELDS["dev"] = _FIELDS["train"]


def _record_problem(record, split: str) -> str | None:
    """What is wrong with one prepared record (a key missing, a wrong type, a token id that is no GPT-2
    token), or None."""
    if not isinstance(record, dict):
        return "not a record (a JSON object)"
    for key, (typ, item) in _FIELDS[split].items():
        if key not in record:
            return f"'{key}' is missing"
        value = record[key]
        if not isinstance(value, typ) or (item and not all(type(v) is item for v in value)):
            return f"'{key}' is not a {f'list of {item.__name__}' if item else typ.__name__}"
        if item and not value:
            return f"'{key}' is empty"
    bad = [t for key in ("prompt", "target") for t in record.get(key, ()) if not 0 <= t < VOCAB_SIZE]
    if bad:
        return f"token id {bad[0]} is not a GPT-2 token (0 to {VOCAB_SIZE - 1})"
    return None
