"""The official E2E NLG release (v1.0.0): downloading it, reading its CSVs, grouping the test set.

The library that data/e2e/prepare.py and the scorer (e2e_metrics.py) share; it needs no
tokenizer. A source is the release zip or its unpacked folder.
"""

import csv
import io
import re
import zipfile
from pathlib import Path

from gpt2study.download import Release
from model import UserError

URL = "https://github.com/tuetschek/e2e-dataset/releases/download/v1.0.0/e2e-dataset.zip"
ZIP_NAME = "e2e-dataset.zip"
# The size and sha256 of the file at URL, as downloaded from there.
RELEASE = Release(ZIP_NAME, (URL,), size=1_528_421,
                  sha256="1261064c01907af27e8cc39e0a29a81541f6ab69208c1cbfc1be95afbb49dfac",
                  offline=f"python data/e2e/prepare.py --src {ZIP_NAME}")
SPLIT_FILES = {"train": "trainset.csv", "dev": "devset.csv", "test": "testset_w_refs.csv"}


# ----------------------------------------------------------------------------- reading the release


def read_source_file(src: Path, filename: str) -> tuple[bytes, str]:
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
    return parse_pairs_csv(*read_source_file(Path(src), SPLIT_FILES[split]))


def group_by_mr(pairs) -> list[tuple[str, list[str]]]:
    """Group consecutive rows with the same MR, in file order, exactly as the official scorer does."""
    groups: list[tuple[str, list[str]]] = []
    for mr, ref in pairs:
        if groups and groups[-1][0] == mr:
            groups[-1][1].append(ref)
        else:
            groups.append((mr, [ref]))
    return groups


def fetch_release(out_dir: Path, url: str | None = None) -> Path:
    """The release zip in out_dir, downloaded first (from `url` alone if given, else GitHub) if it is not there."""
    return RELEASE.fetch(out_dir, url)
