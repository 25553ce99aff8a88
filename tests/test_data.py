"""data/text and data/wikitext103 (their library modules and prepare scripts): round trips, splits, errors."""

import json
import zipfile

import numpy as np
import pytest
from conftest import REPO, assert_one_line_error, run_cli, shared_path

from gpt2study.text_data import prepare as prepare_text
from gpt2study.tokenizer import EOT, decode
from gpt2study.wikitext import prepare as prepare_wikitext
from gpt2study.wikitext import split_articles
from model import UserError


def documents_in(path) -> list[str]:
    ids = np.fromfile(path, dtype=np.uint16).tolist()
    assert ids and ids[-1] == EOT  # every document, the last one too, ends with EOT
    docs, start = [], 0
    for i, t in enumerate(ids):
        if t == EOT:
            docs.append(decode(ids[start:i]))
            start = i + 1
    return docs


def test_text_round_trip_by_document(tmp_path):
    docs = [f"Document {i}: {'some text ' * (i % 7 + 1)}\nwith a second line, ünïcödé." for i in range(60)]
    (tmp_path / "a.txt").write_text("\n\n".join(docs[:30]) + "\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("\n\n\n".join(docs[30:]), encoding="utf-8")
    meta = prepare_text([str(tmp_path / "*.txt")], tmp_path / "out", val_fraction=0.2)
    train, val = documents_in(tmp_path / "out" / "train.bin"), documents_in(tmp_path / "out" / "val.bin")
    assert sorted(train + val) == sorted(docs)  # no document lost, split or merged
    assert train == [d for d in docs if d in train] and val == [d for d in docs if d in val]  # order kept
    assert 0.1 < len(val) / len(docs) < 0.3
    assert meta["train_tokens"] == len(np.fromfile(tmp_path / "out" / "train.bin", dtype=np.uint16))
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["vocab_size"] == 50257
    # the same sources and seed give the same split
    prepare_text([str(tmp_path / "*.txt")], tmp_path / "again", val_fraction=0.2)
    assert (tmp_path / "again" / "val.bin").read_bytes() == (tmp_path / "out" / "val.bin").read_bytes()


def test_text_errors(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        prepare_text([str(tmp_path / "missing*.txt")], tmp_path / "out")
    (tmp_path / "empty.txt").write_text("  \n\n")
    with pytest.raises(UserError, match="empty.txt is empty"):
        prepare_text([str(tmp_path / "empty.txt")], tmp_path / "out")
    (tmp_path / "latin.txt").write_bytes("caf\xe9 au lait\n\nmore".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin.txt is not UTF-8 text \(byte 3\)"):
        prepare_text([str(tmp_path / "latin.txt")], tmp_path / "out")
    (tmp_path / "one.txt").write_text("only one document")
    with pytest.raises(UserError, match="single document"):
        prepare_text([str(tmp_path / "one.txt")], tmp_path / "out")
    r = run_cli("data/text/prepare.py", "--src", tmp_path / "latin.txt", "--out_dir", tmp_path / "out")
    assert_one_line_error(r, "not UTF-8")


def test_shared_corpus_prepares(tmp_path):
    corpus = shared_path("data", "corpus")
    meta = prepare_text([str(corpus / "inaugural.txt"), str(corpus / "webtext.txt")], tmp_path)
    assert meta["train_documents"] + meta["val_documents"] == 1515 + 3247
    assert meta["val_tokens"] > 0.005 * meta["train_tokens"]


WIKI = """ = Valkyria Chronicles = \n\n Senjō no Valkyria is a game . \n\n = = Gameplay = = \n\n It plays . \n
 = Tower Building = \n\n The tower is tall . \n"""


def fake_release(tmp_path):
    folder = tmp_path / "wikitext-103-raw"
    folder.mkdir()
    for name in ("wiki.train.raw", "wiki.valid.raw", "wiki.test.raw"):
        (folder / name).write_text(WIKI, encoding="utf-8")
    with zipfile.ZipFile(tmp_path / "wikitext-103-raw-v1.zip", "w") as z:
        for f in folder.iterdir():
            z.write(f, f"wikitext-103-raw/{f.name}")
    return folder, tmp_path / "wikitext-103-raw-v1.zip"


def test_wikitext_articles_and_sources(tmp_path):
    assert [a.splitlines()[0] for a in split_articles(WIKI)] == ["= Valkyria Chronicles = ", "= Tower Building = "]
    assert "= = Gameplay = =" in split_articles(WIKI)[0]  # sections stay inside their article
    folder, zip_path = fake_release(tmp_path)
    prepare_wikitext(zip_path, tmp_path / "from_zip")
    prepare_wikitext(folder, tmp_path / "from_dir")
    for split in ("train", "val", "test"):
        a, b = ((tmp_path / d / f"{split}.bin").read_bytes() for d in ("from_zip", "from_dir"))
        assert a == b
    assert documents_in(tmp_path / "from_zip" / "val.bin") == [a.strip() for a in split_articles(WIKI)]


@pytest.mark.parametrize("size", ["103", "2"])
def test_wikitext_offline_without_src_says_what_to_fetch(tmp_path, size):
    r = run_cli(f"data/wikitext{size}/prepare.py", "--out_dir", tmp_path,
                env={"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9", "GPT2STUDY_MIRRORS": ""})
    zip_name = f"wikitext-{size}-raw-v1.zip"
    assert_one_line_error(r, f"could not download {zip_name} from wikitext.smerity.com, huggingface.co")
    assert r.stderr.strip().splitlines()[-1] == (f"offline: fetch https://wikitext.smerity.com/{zip_name}, then: "
                                                 f"python data/wikitext{size}/prepare.py --src {zip_name}")
    assert not list(tmp_path.iterdir())  # no zip, no .part
    with pytest.raises(UserError, match="not a readable zip file"):
        (tmp_path / "bad.zip").write_text("no")
        prepare_wikitext(tmp_path / "bad.zip", tmp_path)


@pytest.mark.parametrize("script", ["data/text/prepare.py", "data/wikitext103/prepare.py", "data/wikitext2/prepare.py",
                                    "data/e2e/prepare.py"])
def test_prepare_scripts_help_and_bad_settings(script, tmp_path):
    r = run_cli(script, "--help")
    assert r.returncode == 0 and "--src" in r.stdout and "--url" in r.stdout and "--out_dir" in r.stdout
    assert_one_line_error(run_cli(script, "--no_such_key=1"), "unknown config key 'no_such_key'")
    if script != "data/text/prepare.py":
        assert_one_line_error(run_cli(script, "--src", tmp_path, "--url", "http://127.0.0.1:9/x.zip"), "not both")


def test_text_script_settings(tmp_path):
    (tmp_path / "a.txt").write_text("one\n\ntwo\n\nthree")
    (tmp_path / "b.txt").write_text("four\n\nfive")
    assert_one_line_error(run_cli("data/text/prepare.py", "--out_dir", tmp_path / "out"), "--src")
    assert_one_line_error(run_cli("data/text/prepare.py", "--src", tmp_path / "a.txt"), "--out_dir")
    assert_one_line_error(run_cli("data/text/prepare.py", "--src", tmp_path / "a.txt", "--out_dir", tmp_path / "o",
                                  "--val_fraction", "1.5"), "val_fraction")
    r = run_cli(REPO / "data/text/prepare.py", "--src", "a.txt,b.txt", "--out_dir", "o", "--doc_sep", "file",
                cwd=tmp_path)  # from another folder too
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "o" / "meta.json").read_text())
    assert meta["train_documents"] + meta["val_documents"] == 2  # two files, one document each
