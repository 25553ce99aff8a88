"""A newcomer's first try, offline: `python study.py config/study_tiny.py` downloads what it needs through
its own download code from an HTTP server on 127.0.0.1 (GPT2STUDY_MIRRORS points there: the real E2E release,
and a small WikiText-2-shaped zip of the test's own with its checksum); without a network, the study says
how long it would take and what to fetch; and no file a user sees names our development folders."""

import hashlib
import io
import json
import random
import subprocess
import threading
import time
import zipfile
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from conftest import REPO, run_cli, shared_path

NO_PROXY = {"no_proxy": "127.0.0.1,localhost", "NO_PROXY": "127.0.0.1,localhost"}
DEAD_PROXY = {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
              "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}


def small_wikitext_zip() -> bytes:
    """A zip laid out as wikitext-2-raw-v1.zip is, of made-up articles: enough tokens for the tiny runs."""
    rng = random.Random(0)
    words = ("the", "a", "of", "city", "river", "game", "people", "year", "album", "song", "team", "war", "was",
             "is", "in", "and", "first", "new", "old", "released", "called")
    articles = []
    for i in range(300):
        body = " . ".join(" ".join(rng.choice(words) for _ in range(rng.randint(6, 14))) for _ in range(6))
        articles.append(f" = Article {i} = \n\n {body} . \n\n = = Section = = \n\n {body} . \n")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for name, part in (("wiki.train.raw", articles[:240]), ("wiki.valid.raw", articles[240:270]),
                           ("wiki.test.raw", articles[270:])):
            z.writestr(f"wikitext-2-raw/{name}", "\n".join(part))
    return buffer.getvalue()


@pytest.fixture
def mirror(tmp_path):
    """A folder served over HTTP on 127.0.0.1, and a GPT2STUDY_MIRRORS file that points the study's
    downloads at it; `requests` lists the paths asked for."""
    served = tmp_path / "served"
    served.mkdir()
    requests = []

    class Handler(SimpleHTTPRequestHandler):
        def log_message(self, fmt, *args):
            requests.append(self.path)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(served)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield served, f"http://127.0.0.1:{httpd.server_port}", requests
    httpd.shutdown()
    httpd.server_close()


def test_the_tiny_study_downloads_what_it_needs_and_runs_every_step(mirror, tmp_path):
    served, url, requests = mirror
    (served / "e2e-dataset.zip").write_bytes(shared_path("data", "e2e", "e2e-dataset.zip").read_bytes())
    corpus = small_wikitext_zip()
    (served / "wikitext-2-raw-v1.zip").write_bytes(corpus)
    mirrors = tmp_path / "mirrors.json"
    mirrors.write_text(json.dumps({  # ours is not the published WikiText-2: its own checksum; E2E's is the official
        "wikitext-2-raw-v1.zip": {"urls": [f"{url}/wikitext-2-raw-v1.zip"], "size": len(corpus),
                                  "sha256": hashlib.sha256(corpus).hexdigest()},
        "e2e-dataset.zip": f"{url}/e2e-dataset.zip"}))
    out, data = tmp_path / "study", tmp_path / "data"
    t0 = time.perf_counter()
    r = run_cli("study.py", "config/study_tiny.py", f"--out_dir={out}", f"--pretrain_data={data / 'wikitext2'}",
                f"--e2e_data={data / 'e2e'}",
                env={"GPT2STUDY_MIRRORS": str(mirrors), "HF_HUB_OFFLINE": "1", **NO_PROXY})
    seconds = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr + r.stdout[-3000:]
    print(f"the tiny study, end to end: {seconds:.0f} s")
    assert sorted(requests) == ["/e2e-dataset.zip", "/wikitext-2-raw-v1.zip"]  # each once
    assert (data / "wikitext2" / "wikitext-2-raw-v1.zip").read_bytes() == corpus
    assert "(sha256 verified)" in r.stdout
    estimate = next(line for line in r.stdout.splitlines() if line.startswith("study: pretraining"))
    assert "will take about" in estimate and "smaller study" not in estimate
    record = json.loads((out / "study.json").read_text())
    status = {s["step"]: s["status"] for s in record["steps"]}
    assert status == {"data_wikitext": "done", "data_e2e": "done", "pretrain": "done", "pretrain_continue": "done",
                      "samples": "done", "lora_e2e": "done", "lora_e2e_gpt2m": "off", "e2e_eval": "done"}
    steps = {s["step"]: s for s in record["steps"]}
    assert steps["data_wikitext"]["what"].startswith("WikiText-2: ")
    assert steps["data_e2e"]["what"].startswith("E2E NLG: 42,061 training pairs")
    assert "GPT-2 pretrain_continue + LoRA" in (out / "study.md").read_text()


def test_without_a_network_it_says_how_long_and_what_to_fetch(tmp_path):
    """No config file: the preset for this device; a run far too long for it says so (and goes on); the
    download fails in two short lines that name the file and the flag that takes it."""
    out = tmp_path / "study"
    r = run_cli("study.py", f"--out_dir={out}", f"--pretrain_data={out / 'wikitext'}", f"--e2e_data={out / 'e2e'}",
                "--pretrain_overrides=--max_iters=100000000", env={**DEAD_PROXY, "GPT2STUDY_MIRRORS": ""},
                timeout=300)
    gpu = torch.cuda.is_available()
    preset, zip_name = ("config/study.py", "wikitext-103-raw-v1.zip") if gpu else \
        ("config/study_small.py", "wikitext-2-raw-v1.zip")
    lines = r.stdout.splitlines()
    assert lines[0].startswith("study: no config file given") and preset in lines[0]
    estimate = next(line for line in lines if line.startswith("study: pretraining"))
    smaller = "config/study_small.py" if gpu else "config/study_tiny.py"
    assert f"that is long for this machine: a smaller study is python study.py {smaller}" in estimate
    assert r.returncode == 2 and "Traceback" not in r.stderr
    error = r.stderr.strip().splitlines()
    assert len(error) == 2 and len(error[0]) < 200, r.stderr  # (the second holds the command as given)
    assert error[0].startswith(f"error: step data_wikitext: could not download {zip_name} from wikitext.smerity.com, ")
    assert error[0].count("127.0.0.1:9") == 0 and error[0].count("Connection refused") == 1  # said once
    assert error[1] == (f"offline: fetch https://wikitext.smerity.com/{zip_name}, then: python study.py "
                        f"--out_dir={out} --pretrain_data={out / 'wikitext'} --e2e_data={out / 'e2e'} "
                        f"--pretrain_overrides=--max_iters=100000000 --wikitext_src={zip_name}")
    assert not list((out / "wikitext").glob("*.zip*"))


def test_no_file_outside_the_tests_names_our_development_folders():
    """A user's clone has no ../shared beside it: no message, docstring, config or README may point there."""
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split()
    if not files:
        pytest.skip("not a git checkout")
    found = [f for f in files if not f.startswith("tests/") and (REPO / f).is_file()
             and "../shared" in (REPO / f).read_text(errors="replace")]
    assert found == []
