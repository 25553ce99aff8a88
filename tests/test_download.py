"""download.py, hub.py and the prepare scripts' downloads, against HTTP servers on 127.0.0.1 (no internet)."""

import dataclasses
import hashlib
import io
import json
import os
import socket
import threading
import urllib.error
import urllib.request
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import SHARED, assert_one_line_error, run_cli

from gpt2study import download as download_module
from gpt2study import e2e_release as release
from gpt2study import wikitext
from gpt2study.download import USER_AGENT, Release, download, mirror_labels
from gpt2study.pretrained import gpt2_folder
from gpt2study.text_data import fetch_sources
from model import UserError

# Local servers are reached directly, whatever proxy the machine running the tests has set.
NO_PROXY = {"no_proxy": "127.0.0.1,localhost", "NO_PROXY": "127.0.0.1,localhost"}


@pytest.fixture(autouse=True)
def _direct_to_localhost(monkeypatch):
    for key, value in NO_PROXY.items():
        monkeypatch.setenv(key, value)


def _send(handler, status: int, data: bytes = b"", headers=None, send_body=True, cut=None):
    handler.send_response(status)
    for key, value in {"Content-Length": str(len(data)), **(headers or {})}.items():
        handler.send_header(key, value)
    handler.end_headers()
    if send_body:
        handler.wfile.write(data[:cut])


def serves(data: bytes, *, picky=False, cut=None, announce=None, headers=None):
    """A route that sends `data` (or its first `cut` bytes, announcing all of them); a picky one
    refuses Python's default User-Agent with 403, as wikitext.smerity.com is reported to."""
    def route(handler, send_body):
        if picky and handler.headers.get("User-Agent", "").startswith("Python-urllib"):
            return _send(handler, 403, b"forbidden", send_body=send_body)
        extra = {**(headers or {}), **({"Content-Length": str(announce)} if announce else {})}
        _send(handler, 200, data, extra, send_body, cut)
    return route


def fails(status: int):
    return lambda handler, send_body: _send(handler, status, b"no", send_body=send_body)


@pytest.fixture
def server():
    """An HTTP server on 127.0.0.1: `routes` maps a path to route(handler, send_body); `log` lists
    (method, path, headers) of every request; `url(path)` is its address."""
    routes, log = {}, []

    class Handler(BaseHTTPRequestHandler):
        def handle_one(self, send_body):
            log.append((self.command, self.path, self.headers))  # case-insensitive .get
            route = routes.get(self.path.split("?")[0])
            if route is None:
                return _send(self, 404, b"not found", {"X-Error-Code": "EntryNotFound"}, send_body)
            route(self, send_body)

        def do_GET(self):
            self.handle_one(True)

        def do_HEAD(self):
            self.handle_one(False)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield SimpleNamespace(routes=routes, log=log, url=lambda path: f"http://127.0.0.1:{httpd.server_port}{path}")
    httpd.shutdown()
    httpd.server_close()


def closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens: the connection is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/file.zip"


DATA = bytes(range(256)) * 4000  # ~1 MB: more than one read chunk
SHA = hashlib.sha256(DATA).hexdigest()


def hint_after(r) -> str:
    """The line after a command's error line: a failed download's offline hint."""
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    return lines[next(i for i, line in enumerate(lines) if line.startswith("error: ")) + 1]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ----------------------------------------------------------------------------- download()


def test_a_host_refusing_pythons_user_agent_serves_ours(server, tmp_path, capsys):
    server.routes["/x.zip"] = serves(DATA, picky=True)
    with pytest.raises(urllib.error.HTTPError) as refused:  # the server really refuses Python's default
        urllib.request.urlopen(server.url("/x.zip"))
    assert refused.value.code == 403
    dest = download([server.url("/x.zip")], tmp_path / "x.zip", sha256=SHA, size=len(DATA), offline_hint="hint")
    assert dest.read_bytes() == DATA and leftovers(tmp_path) == ["x.zip"]
    assert server.log[-1][2]["User-Agent"] == USER_AGENT
    assert f"from {server.url('/x.zip')} (sha256 verified)" in capsys.readouterr().out  # says which mirror served


def test_failing_mirrors_are_skipped_in_order(server, tmp_path, capsys):
    server.routes |= {"/down.zip": fails(503), "/good.zip": serves(DATA), "/later.zip": serves(DATA)}
    urls = [server.url("/down.zip"), closed_port_url(), server.url("/missing.zip"), server.url("/good.zip"),
            server.url("/later.zip")]
    download(urls, tmp_path / "x.zip", sha256=SHA, offline_hint="hint")
    assert (tmp_path / "x.zip").read_bytes() == DATA
    assert [path for _, path, _ in server.log] == ["/down.zip", "/missing.zip", "/good.zip"]  # never /later.zip
    out = capsys.readouterr().out
    assert "HTTP 503" in out and "HTTP 404" in out and "Connection refused" in out
    assert f"from {server.url('/good.zip')}" in out


@pytest.mark.parametrize(("route", "why"), [
    (serves(DATA, cut=len(DATA) // 2), f"stopped after {len(DATA) // 2:,} of {len(DATA):,} bytes"),
    (serves(DATA[:-1] + b"!"), "sha256"),
    (serves(DATA + b"tail"), f"offers {len(DATA) + 4:,} bytes, not the {len(DATA):,} expected"),
], ids=["truncated", "checksum-mismatch", "wrong-size"])
def test_a_bad_transfer_is_one_line_keeps_nothing_and_the_next_mirror_is_used(server, tmp_path, route, why):
    server.routes |= {"/bad.zip": route, "/good.zip": serves(DATA)}
    with pytest.raises(UserError) as info:
        download(server.url("/bad.zip"), tmp_path / "x.zip", sha256=SHA, size=len(DATA), offline_hint="use --src")
    message = str(info.value).splitlines()
    assert len(message) == 2 and why in message[0] and message[1] == "use --src"  # what failed, then what to do
    assert leftovers(tmp_path) == []  # neither x.zip nor x.zip.part
    download([server.url("/bad.zip"), server.url("/good.zip")], tmp_path / "x.zip", sha256=SHA, size=len(DATA),
             offline_hint="use --src")
    assert (tmp_path / "x.zip").read_bytes() == DATA and leftovers(tmp_path) == ["x.zip"]


def test_redirects_are_followed_with_our_user_agent(server, tmp_path):
    # The Hub's /resolve/ URLs answer with a redirect to their file store.
    def moved(handler, send_body):
        _send(handler, 302, b"", {"Location": "/store/x.zip"}, send_body)

    server.routes |= {"/resolve/x.zip": moved, "/store/x.zip": serves(DATA, picky=True)}
    download(server.url("/resolve/x.zip"), tmp_path / "x.zip", sha256=SHA, offline_hint="hint")
    assert (tmp_path / "x.zip").read_bytes() == DATA
    assert [(path, headers["User-Agent"]) for _, path, headers in server.log] == [
        ("/resolve/x.zip", USER_AGENT), ("/store/x.zip", USER_AGENT)]


def test_no_network_says_it_once_and_an_interrupt_keeps_nothing(server, tmp_path, monkeypatch):
    urls = [closed_port_url(), closed_port_url()]
    with pytest.raises(UserError) as info:
        download(urls, tmp_path / "x.zip", offline_hint="offline? --src")
    hosts = [u.split("/")[2] for u in urls]
    assert str(info.value) == f"could not download x.zip from {', '.join(hosts)}: [Errno 111] Connection refused\n" \
        "offline? --src"

    server.routes["/x.zip"] = serves(DATA)
    fetch = download_module._fetch

    def interrupted(url, part, *args):  # Ctrl-C once the bytes are in, before they are checked
        fetch(url, part, *args)
        assert part.read_bytes() == DATA
        raise KeyboardInterrupt

    monkeypatch.setattr(download_module, "_fetch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        download(server.url("/x.zip"), tmp_path / "x.zip", sha256=SHA, offline_hint="hint")
    assert leftovers(tmp_path) == []


def test_a_local_mirror_by_file_url(tmp_path):
    (tmp_path / "share").mkdir()
    (tmp_path / "share" / "x.zip").write_bytes(DATA)
    download((tmp_path / "share" / "x.zip").as_uri(), tmp_path / "out" / "x.zip", sha256=SHA, offline_hint="hint")
    assert (tmp_path / "out" / "x.zip").read_bytes() == DATA


# ----------------------------------------------------------------------------- the prepare scripts' downloads


def fake_wikitext_zip() -> bytes:
    text = " = Valkyria Chronicles = \n\n It is a game . \n\n = Tower Building = \n\n The tower is tall . \n"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for name in wikitext.SPLITS.values():
            z.writestr(f"wikitext-103-raw/{name}", text)
    return buffer.getvalue()


def test_wikitext_mirrors_in_order_through_hf_endpoint(server, tmp_path):
    """No --url: smerity first, then the Hub copies at HF_ENDPOINT, then S3. Internet hosts go through a
    proxy that refuses, the Hub copy at our endpoint is not the release (size): each mirror once with its
    answer, then the file to fetch and the command that takes it; nothing kept."""
    hub_path = "/datasets/mattdangerw/wikitext-103-raw/resolve/main/wikitext-103-raw-v1.zip"
    server.routes[hub_path] = serves(fake_wikitext_zip())
    endpoint = server.url("").split("/")[2]
    dead_proxy = "http://127.0.0.1:9"
    r = run_cli("data/wikitext103/prepare.py", "--out_dir", tmp_path, timeout=120,
                env={"HF_ENDPOINT": server.url(""), "http_proxy": dead_proxy, "https_proxy": dead_proxy, **NO_PROXY})
    line = assert_one_line_error(r, "could not download wikitext-103-raw-v1.zip from ")
    assert line.removeprefix("error: could not download wikitext-103-raw-v1.zip from ").split("; ") == [
        "wikitext.smerity.com: [Errno 111] Connection refused",
        f"{endpoint}/datasets/mattdangerw: offers 701 bytes, not the 191,984,949 expected",  # size known up front
        f"{endpoint}/datasets/segyges: HTTP 404 Not Found",
        "s3.amazonaws.com: [Errno 111] Connection refused"]
    assert hint_after(r) == ("offline: fetch https://wikitext.smerity.com/wikitext-103-raw-v1.zip, then: "
                             "python data/wikitext103/prepare.py --src wikitext-103-raw-v1.zip")
    assert leftovers(tmp_path) == []


def test_wikitext_from_a_users_mirror(server, tmp_path):
    """--url alone, checked like any mirror; here against the fake release's own size and sha256."""
    data = fake_wikitext_zip()
    server.routes["/mirror/w.zip"] = serves(data)
    (tmp_path / "src.zip").write_bytes(data)
    fake = dataclasses.replace(wikitext.WIKITEXT103, release=dataclasses.replace(
        wikitext.WIKITEXT103.release, sha256=hashlib.sha256(data).hexdigest(), size=len(data)))
    wikitext.prepare(out_dir=tmp_path / "dl", url=server.url("/mirror/w.zip"), wikitext=fake)
    wikitext.prepare(tmp_path / "src.zip", tmp_path / "local")
    assert (tmp_path / "dl" / "wikitext-103-raw-v1.zip").read_bytes() == data
    for split in ("train", "val", "test"):
        assert (tmp_path / "dl" / f"{split}.bin").read_bytes() == (tmp_path / "local" / f"{split}.bin").read_bytes()
    assert [path for _, path, _ in server.log] == ["/mirror/w.zip"]


def test_e2e_release_from_a_users_mirror_is_checked_by_sha256(server, tmp_path):
    official = SHARED / "data" / "e2e" / "e2e-dataset.zip"
    if not official.is_file():
        pytest.skip(f"{official} not found")
    assert hashlib.sha256(official.read_bytes()).hexdigest() == release.RELEASE.sha256
    tampered = bytearray(official.read_bytes())
    tampered[len(tampered) // 2] ^= 1  # the right size, one bit off
    server.routes |= {"/e2e-dataset.zip": serves(official.read_bytes(), picky=True), "/other.zip": serves(tampered)}
    got = release.fetch_release(tmp_path / "ok", server.url("/e2e-dataset.zip"))
    assert got.read_bytes() == official.read_bytes()
    assert len(release.read_split(got, "test")) == 4_693
    r = run_cli("data/e2e/prepare.py", "--url", server.url("/other.zip"), "--out_dir", tmp_path / "bad",
                env=NO_PROXY, timeout=120)
    assert_one_line_error(r, "127.0.0.1", "sha256")
    assert hint_after(r).endswith("then: python data/e2e/prepare.py --src e2e-dataset.zip")
    assert leftovers(tmp_path / "bad") == []
    assert server.log[-1][1] == "/other.zip" and len(server.log) == 2  # the user's mirror alone, not GitHub


def test_mirrors_of_ones_own_by_environment(server, tmp_path, monkeypatch):
    """GPT2STUDY_MIRRORS: its URLs instead of the public ones, in order, checked against the published checksums
    unless the entry gives its own; --url still wins; a malformed entry is one line naming the variable."""
    other = DATA[::-1]
    server.routes |= {"/a/x.zip": fails(404), "/b/x.zip": serves(DATA), "/c/x.zip": serves(other),
                      "/d/x.zip": serves(DATA)}
    public = Release("x.zip", (closed_port_url(),), sha256=SHA, size=len(DATA), offline="python get.py --src x.zip")
    table = tmp_path / "mirrors.json"
    monkeypatch.setenv("GPT2STUDY_MIRRORS", str(table))
    table.write_text(json.dumps({"x.zip": [server.url("/a/x.zip"), server.url("/b/x.zip")]}))
    assert public.fetch(tmp_path / "one").read_bytes() == DATA
    assert [path for _, path, _ in server.log] == ["/a/x.zip", "/b/x.zip"]  # never the public mirror
    assert public.fetch(tmp_path / "one") == tmp_path / "one" / "x.zip" and len(server.log) == 2  # there: kept
    table.write_text(json.dumps({"x.zip": server.url("/c/x.zip")}))  # another file, the published checksum
    with pytest.raises(UserError, match="sha256"):
        public.fetch(tmp_path / "two")
    own = {"urls": server.url("/c/x.zip"), "sha256": hashlib.sha256(other).hexdigest()}
    table.write_text(json.dumps({"x.zip": own}))
    assert public.fetch(tmp_path / "three").read_bytes() == other  # its own checksum (and no size) for its own copy
    assert public.fetch(tmp_path / "four", url=server.url("/d/x.zip")).read_bytes() == DATA  # --url first
    assert Release("y.zip", (server.url("/d/x.zip"),), sha256=SHA, size=len(DATA), offline="").fetch(
        tmp_path / "five").read_bytes() == DATA  # a file the table does not name: the public mirrors
    for bad in ('{"x.zip": {"url": "http://h/x.zip"}}', '{"x.zip": 3}', "not json"):
        table.write_text(bad)
        with pytest.raises(UserError, match="GPT2STUDY_MIRRORS=") as info:
            public.fetch(tmp_path / "six")
        assert "\n" not in str(info.value)


def test_mirror_labels_are_short_and_tell_mirrors_apart():
    assert mirror_labels(["https://wikitext.smerity.com/w.zip", "https://huggingface.co/datasets/a/w/resolve/main/w.zip",
                          "https://huggingface.co/datasets/b/w/resolve/main/w.zip", "http://10.0.0.1:8080/w.zip"]) == [
        "wikitext.smerity.com", "huggingface.co/datasets/a", "huggingface.co/datasets/b", "10.0.0.1:8080"]


def test_text_from_urls(server, tmp_path, capsys):
    docs = ["First document.\nTwo lines.", "Second document.", "Third one, ünïcödé.", "Fourth."]
    server.routes |= {"/a/books.txt": serves("\n\n".join(docs[:2]).encode()),
                      "/b/books.txt": serves("\n\n".join(docs[2:]).encode()),
                      "/latin.txt": serves("caf\xe9\n\nau lait".encode("latin-1"))}
    paths = fetch_sources([server.url("/a/books.txt"), server.url("/b/books.txt")], tmp_path)
    assert [Path(p).relative_to(tmp_path).as_posix() for p in paths] == ["sources/books.txt", "sources/1-books.txt"]
    r = run_cli("data/text/prepare.py", "--url", f"{server.url('/a/books.txt')},{server.url('/b/books.txt')}",
                "--out_dir", tmp_path / "out", "--val_fraction", "0.3", env=NO_PROXY, timeout=120)
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["train_documents"] + meta["val_documents"] == 4
    ids = np.fromfile(tmp_path / "out" / "train.bin", dtype=np.uint16)
    assert len(ids) == meta["train_tokens"]
    r = run_cli("data/text/prepare.py", "--url", server.url("/latin.txt"), "--out_dir", tmp_path / "latin",
                env=NO_PROXY, timeout=120)
    assert_one_line_error(r, "latin.txt is not UTF-8")


# ----------------------------------------------------------------------------- hub.py

COMMIT = "a" * 40
OLD_COMMIT = "b" * 40
CONFIG = json.dumps({"model_type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 32, "vocab_size": 64}).encode()
WEIGHTS = b"not really safetensors, but hub.py only finds the files" * 10


def lay_cache(cache: Path, repo_dir="models--openai-community--gpt2") -> Path:
    """A Hub cache as huggingface_hub lays it: blobs named by hash, snapshots/<commit>/ of relative
    symlinks to them, refs/main naming the current commit; plus an older snapshot that main has left."""
    repo = cache / repo_dir
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    for commit, config in ((COMMIT, CONFIG), (OLD_COMMIT, CONFIG + b" ")):
        snapshot = repo / "snapshots" / commit
        snapshot.mkdir(parents=True)
        for name, data in (("config.json", config), ("model.safetensors", WEIGHTS)):
            blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
            blob.write_bytes(data)
            (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    return repo / "snapshots" / COMMIT


def hub_env(tmp_path, **extra) -> dict:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "HUGGING"))}
    return {**env, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_CACHE": str(tmp_path / "cache"),
            "HF_HUB_DISABLE_TELEMETRY": "1", **NO_PROXY, **extra}


def run_gpt2_folder(name: str, env: dict):
    """gpt2_folder(name) in a fresh process, so that huggingface_hub reads the environment as a user's run would."""
    code = ("import sys; from gpt2study import cli, pretrained; "
            "cli.run_main(lambda: print(pretrained.gpt2_folder(sys.argv[1])))")
    return run_cli("-c", code, name, env=env, timeout=120)


def test_local_folders_are_used_as_they_are(tmp_path):
    folder = tmp_path / "gpt2-medium"
    folder.mkdir()
    with pytest.raises(UserError, match="has no config.json"):
        gpt2_folder(folder)
    (folder / "config.json").write_bytes(CONFIG)
    with pytest.raises(UserError, match=r"no weights \(model.safetensors or pytorch_model.bin\)"):
        gpt2_folder(str(folder))
    (folder / "model.safetensors").write_bytes(WEIGHTS)
    assert gpt2_folder(str(folder)) == folder
    with pytest.raises(UserError, match="neither a folder nor one of gpt2, gpt2-medium, gpt2-large, gpt2-xl"):
        gpt2_folder(str(tmp_path / "gpt3"))


def test_offline_hub_cache_is_found_by_the_library(tmp_path):
    snapshot = lay_cache(tmp_path / "cache")
    env = hub_env(tmp_path, HF_HUB_OFFLINE="1")
    for name in ("gpt2", "openai-community/gpt2"):
        r = run_gpt2_folder(name, env)
        assert r.returncode == 0, r.stderr
        assert Path(r.stdout.strip()) == snapshot  # the commit refs/main names, not the older one
    r = run_gpt2_folder("gpt2-medium", env)
    line = assert_one_line_error(r, "openai-community/gpt2-medium is not in the Hugging Face cache", "HF_HUB_OFFLINE",
                                 "save config.json and model.safetensors", "pass that folder", "HF_ENDPOINT")
    assert str(tmp_path / "cache") in line


def test_offline_cache_under_the_old_repo_id(tmp_path):
    snapshot = lay_cache(tmp_path / "cache", "models--gpt2")
    r = run_gpt2_folder("gpt2", hub_env(tmp_path, HF_HUB_OFFLINE="1"))
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()) == snapshot


def test_hf_endpoint_mirror_with_token_then_offline_from_its_cache(server, tmp_path):
    for revision in ("main", COMMIT):
        for name, data in (("config.json", CONFIG), ("model.safetensors", WEIGHTS)):
            headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}
            server.routes[f"/openai-community/gpt2/resolve/{revision}/{name}"] = serves(data, headers=headers)
    token = {"HF_TOKEN": "hf_local_test_token"}  # a dummy, for the local server
    r = run_gpt2_folder("gpt2", hub_env(tmp_path, HF_ENDPOINT=server.url(""), **token))
    assert r.returncode == 0, r.stderr
    folder = Path(r.stdout.strip())
    assert folder == tmp_path / "cache" / "models--openai-community--gpt2" / "snapshots" / COMMIT
    assert (folder / "config.json").read_bytes() == CONFIG and (folder / "model.safetensors").read_bytes() == WEIGHTS
    requested = {(method, path) for method, path, _ in server.log}
    assert ("GET", f"/openai-community/gpt2/resolve/{COMMIT}/model.safetensors") in requested  # pinned to the config's
    assert all(headers.get("Authorization") == f"Bearer {token['HF_TOKEN']}" for _, _, headers in server.log)
    seen = len(server.log)
    r = run_gpt2_folder("gpt2", hub_env(tmp_path, HF_HUB_OFFLINE="1"))
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()) == folder and len(server.log) == seen  # from the cache, no request

    r = run_gpt2_folder("gpt2-xl", hub_env(tmp_path, HF_ENDPOINT=server.url("")))
    assert_one_line_error(r, server.url(""), "openai-community/gpt2-xl", "HF_ENDPOINT")


def test_an_endpoint_that_is_no_hub_is_one_line(server, tmp_path):
    # e.g. a proxy's login page; (a refused connection ends the same way, after the library's ~20 s of retries)
    server.routes["/openai-community/gpt2/resolve/main/config.json"] = serves(b"<html>log in first</html>")
    r = run_gpt2_folder("gpt2", hub_env(tmp_path, HF_ENDPOINT=server.url("")))
    assert_one_line_error(r, f"could not get openai-community/gpt2 from {server.url('')}", "X-Repo-Commit",
                          "not in the Hugging Face cache", "pass that folder")

