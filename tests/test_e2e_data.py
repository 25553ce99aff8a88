"""data/e2e: reading the official E2E release, MR linearisation, tokenised examples, the prepare CLI."""

import re
import subprocess
import sys
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest
from conftest import REPO, SHARED, load_script

from gpt2study import e2e_data as dataset
from gpt2study.cli import run_main
from gpt2study.e2e_data import format_prompt, linearize_mr, load_prepared, parse_mr, tokenize_example
from gpt2study.e2e_release import URL, group_by_mr, read_split
from gpt2study.tokenizer import EOT, decode
from model import UserError

prepare = load_script("data/e2e/prepare.py")
ZIP = SHARED / "data" / "e2e" / "e2e-dataset.zip"


@pytest.fixture(scope="module")
def release_zip():
    if not ZIP.is_file():
        pytest.skip(f"shared E2E release not found at {ZIP}")
    return ZIP


@pytest.fixture(scope="module")
def test_pairs(release_zip):
    return read_split(release_zip, "test")


def test_zip_and_unpacked_folder_read_identically(release_zip, tmp_path):
    with zipfile.ZipFile(release_zip) as zf:
        zf.extractall(tmp_path)
    for split in ("train", "dev", "test"):
        from_zip = read_split(release_zip, split)
        assert read_split(tmp_path / "e2e-dataset", split) == from_zip
        assert read_split(tmp_path, split) == from_zip  # the folder above e2e-dataset/ works too
        if split == "train":
            assert len(from_zip) == 42_061


def test_test_set_groups(test_pairs):
    groups = group_by_mr(test_pairs)
    assert len(groups) == 630
    assert sum(len(refs) for _, refs in groups) == len(test_pairs) == 4_693
    assert groups[0][0] == "name[Blue Spice], eatType[coffee shop], area[city centre]"
    assert groups[0][1][0] == "A coffee shop in the city centre area called Blue Spice."


def test_group_by_mr_groups_consecutive_rows_only():
    pairs = [("a[1]", "x"), ("a[1]", "y"), ("b[2]", "z"), ("a[1]", "w")]
    assert group_by_mr(pairs) == [("a[1]", ["x", "y"]), ("b[2]", ["z"]), ("a[1]", ["w"])]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'"meaning","text"\n"name[A]","A is."\n', r"row 1 .*header"),
        (b'mr,ref\n"name[A]","A is."\n"name[B]"\n', r"row 3 .*1 fields"),
        (b'mr,ref\n"name[A]","A is."\n"name[B]","B","extra"\n', r"row 3 .*3 fields"),
        (b'mr,ref\n"name[A]","A is."\n"name[B]","  "\n', r"row 3 .*empty ref"),
        (b'mr,ref\n"name[A]","A is."\n"","B is."\n', r"row 3 .*empty mr"),
        (b'mr,ref\n"name[A]","A is."\n"name[B]","B \xe9\xff is."\n', r"row 3 .*not valid UTF-8"),
    ],
    ids=["header", "missing-field", "extra-field", "empty-ref", "empty-mr", "bad-utf8"],
)
def test_malformed_csv_names_file_and_row(tmp_path, content, message):
    (tmp_path / "testset_w_refs.csv").write_bytes(content)
    with pytest.raises(UserError, match=message) as info:
        read_split(tmp_path, "test")
    assert "testset_w_refs.csv" in str(info.value) and "\n" not in str(info.value)


def test_missing_source_and_split(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_split(tmp_path / "nowhere.zip", "train")
    with pytest.raises(UserError, match=r"trainset\.csv"):
        read_split(tmp_path, "train")
    with pytest.raises(UserError, match="unknown E2E split"):
        read_split(tmp_path, "valid")


def test_linearize_round_trips_every_test_mr(test_pairs):
    for mr, _ in group_by_mr(test_pairs):
        # an independent reading of the MR: every `key[value]`
        expected = [(k.strip(), v) for k, v in re.findall(r"([^,\[\]]+)\[([^\]]*)\]", mr)]
        linear = linearize_mr(mr)
        assert [tuple(item.split(" : ", 1)) for item in linear.split(" | ")] == expected
        assert parse_mr(mr) == expected


def test_linearize_example_and_spacing():
    assert linearize_mr("name[The Eagle], eatType[coffee shop], food[French]") == (
        "name : The Eagle | eatType : coffee shop | food : French"
    )
    assert linearize_mr(" name[The Eagle] ,priceRange[£20-25],customer rating[5 out of 5] ") == (
        "name : The Eagle | priceRange : £20-25 | customer rating : 5 out of 5"
    )


@pytest.mark.parametrize("mr", ["", "name[The Eagle", "name[The Eagle] food[French]", "name[]", "name[A],", "[A]"])
def test_malformed_mr_is_an_error_naming_it(mr):
    with pytest.raises(UserError, match="malformed MR") as info:
        linearize_mr(mr)
    assert repr(mr) in str(info.value)


def test_tokenize_example():
    mr, ref = "name[The Eagle], food[French]", "The Eagle serves French food."
    prompt, target = tokenize_example(mr, ref)
    assert format_prompt(mr) == "name : The Eagle | food : French ||"
    assert decode(prompt) == format_prompt(mr)
    assert target[-1] == EOT and EOT not in target[:-1]
    assert decode(target[:-1]) == " " + ref


def _small_release(path: Path) -> Path:
    rows = {
        "trainset.csv": [("name[A], food[French]", "A serves French food."), ("name[B]", "B  is\r\n a place.")],
        "devset.csv": [("name[C]", "C is here.")],
        "testset_w_refs.csv": [("name[D]", "D one."), ("name[D]", "D two."), ("name[E]", "E.")],
    }
    with zipfile.ZipFile(path, "w") as zf:
        for name, pairs in rows.items():
            lines = ['"mr","ref"'] + [f'"{mr}","{ref}"' for mr, ref in pairs]
            zf.writestr(f"e2e-dataset/{name}", "\n".join(lines) + "\n")
    return path


def test_prepare_writes_and_loads(tmp_path, capsys):
    src, out = _small_release(tmp_path / "small.zip"), tmp_path / "prepared"
    prepare.main(["--src", str(src), "--out_dir", str(out)])
    assert "train:" in capsys.readouterr().out
    train = load_prepared(out, "train")
    assert [r["ref"] for r in train] == ["A serves French food.", "B is a place."]  # whitespace collapsed
    assert (train[0]["prompt"], train[0]["target"]) == tuple(tokenize_example(train[0]["mr"], train[0]["ref"]))
    assert load_prepared(out, "dev")[0]["target"][-1] == EOT
    test = load_prepared(out, "test")
    assert [(r["mr"], r["refs"]) for r in test] == [("name[D]", ["D one.", "D two."]), ("name[E]", ["E."])]
    meta = (out / "meta.json").read_text()
    assert '"pairs": 3' in meta and dataset._sha256(src.read_bytes()) in meta


def test_load_prepared_missing_names_the_command(tmp_path):
    with pytest.raises(UserError, match=r"run: python data/e2e/prepare\.py --out_dir .*offline, add --src e2e-dataset"):
        load_prepared(tmp_path, "train")


def test_offline_download_is_one_line_error(tmp_path, monkeypatch, capsys):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.setattr(sys, "argv", ["prepare.py", "--out_dir", str(tmp_path)])
    monkeypatch.delenv("GPT2STUDY_MIRRORS", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        run_main(prepare.main)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: could not download e2e-dataset.zip from github.com: Name or service not known\n")
    lines = err.strip().splitlines()
    assert lines[1:] == [f"offline: fetch {URL}, then: python data/e2e/prepare.py --src e2e-dataset.zip"]
    assert not list(tmp_path.glob("*.zip*"))  # no partial download left behind


def test_script_runs_from_anywhere(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "data" / "e2e" / "prepare.py"), "--src", str(tmp_path / "missing.zip")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
