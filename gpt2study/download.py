"""Downloads that survive the real world: mirrors in order, checked, never half-written.

    RELEASE = Release("x.zip", ("https://a.example/x.zip", "https://b.example/x.zip"), sha256="...", size=1234,
                      offline="python data/x/prepare.py --src x.zip")
    RELEASE.fetch(Path("data/x"))            # data/x/x.zip, downloaded unless it is there

Each URL is tried in turn with a descriptive User-Agent (some hosts refuse Python's default
with 403) and a timeout. The bytes go to `dest.part`; only when the transfer is complete and
the known size and sha256 agree is it renamed to `dest`. A mirror that fails is reported and the
next one tried; when all fail, the error says in two lines what each answered and how to do
without a network. Proxies come from the usual http_proxy / https_proxy variables; file:// URLs
work too (a copy on a shared disk).

Mirrors of your own: GPT2STUDY_MIRRORS names a JSON file that maps a release's file name to the
URLs to use instead of the public ones (a URL, a list of URLs, or {"urls": [...], "sha256": ...,
"size": ...} for a copy that differs from the published file):

    {"wikitext-2-raw-v1.zip": "http://intranet.example/data/wikitext-2-raw-v1.zip"}
"""

import hashlib
import http.client
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from model import UserError

# Hosts such as wikitext.smerity.com answer 403 to "Python-urllib/3.x"; a named client is let through.
USER_AGENT = "gpt2-study/0.1 (research code fetching its datasets)"
DOWNLOAD_FAILED = "could not download"  # how the error of a failed download begins
TIMEOUT_S = 30  # per connection attempt and per read: a dead mirror costs this, then the next is tried
CHUNK = 1 << 20


class _MirrorFailed(Exception):
    """What one mirror did wrong, in a few words for the final message."""


def _fetch(url: str, part: Path, size: int | None, timeout: float) -> tuple[int, str]:
    """Stream `url` into `part`; returns (bytes received, their sha256)."""
    from tqdm import tqdm

    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response, open(part, "wb") as f:
            announced = int(response.headers.get("Content-Length") or 0) or None
            if size is not None and announced is not None and announced != size:
                raise _MirrorFailed(f"offers {announced:,} bytes, not the {size:,} expected")
            digest, received = hashlib.sha256(), 0
            with tqdm(total=announced or size, unit="B", unit_scale=True, desc=part.name.removesuffix(".part"),
                      mininterval=1, leave=False) as bar:
                while chunk := response.read(CHUNK):
                    f.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as e:  # before URLError, its base class
        raise _MirrorFailed(f"HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise _MirrorFailed(str(e.reason)) from None
    except (http.client.HTTPException, OSError) as e:  # timeouts, resets, a connection closed early
        raise _MirrorFailed(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__) from None
    if announced is not None and received != announced:
        raise _MirrorFailed(f"the transfer stopped after {received:,} of {announced:,} bytes")
    return received, digest.hexdigest()


def download(urls: str | Sequence[str], dest, *, sha256: str | None = None, size: int | None = None,
             offline_hint: str, timeout: float = TIMEOUT_S) -> Path:
    """Fetch the first of `urls` that delivers the right file to `dest` (see the module docstring).
    When none does: a UserError of two lines, what each mirror answered, then `offline_hint`."""
    urls = [urls] if isinstance(urls, str) else list(urls)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    failures = []
    try:
        for url in urls:
            print(f"downloading {dest.name} from {url}")
            try:
                received, digest = _fetch(url, part, size, timeout)
                if size is not None and received != size:
                    raise _MirrorFailed(f"sent {received:,} bytes, not the {size:,} expected")
                if sha256 is not None and digest != sha256.lower():
                    raise _MirrorFailed(f"sent a file whose sha256 is {digest[:12]}..., not {sha256[:12]}...")
            except _MirrorFailed as e:
                part.unlink(missing_ok=True)
                failures.append(str(e))
                if url != urls[-1]:
                    print(f"  failed ({e}); trying the next mirror")
                continue
            os.replace(part, dest)
            verified = "sha256 verified" if sha256 else "size verified" if size else "not verified: no checksum known"
            print(f"  {dest.name}: {received:,} bytes from {url} ({verified})")
            return dest
    finally:
        part.unlink(missing_ok=True)  # an interrupted or failed transfer leaves nothing behind
    labels = mirror_labels(urls)
    if len(failures) > 1 and len(set(failures)) == 1:  # e.g. no network at all: say it once
        tried = f"{', '.join(labels)}: {failures[0]}"
    else:
        tried = "; ".join(f"{label}: {why}" for label, why in zip(labels, failures))
    raise UserError(f"{DOWNLOAD_FAILED} {dest.name} from {tried}\n{offline_hint}")


def mirror_labels(urls: Sequence[str]) -> list[str]:
    """Short names of mirrors for messages: the host, and as much of the path as tells apart two on one host."""
    parts = [urllib.parse.urlparse(u) for u in urls]
    labels = []
    for p in parts:
        same = [q.path.strip("/").split("/") for q in parts if q.netloc == p.netloc]
        mine = p.path.strip("/").split("/")
        depth = next((i for i in range(len(mine)) if any(len(o) <= i or o[i] != mine[i] for o in same)), -1)
        labels.append(p.netloc if len(same) == 1 else f"{p.netloc}/{'/'.join(mine[:depth + 1])}")
    return labels


MIRRORS_ENV = "GPT2STUDY_MIRRORS"


def own_mirrors(name: str) -> dict | None:
    """The entry for file `name` in the GPT2STUDY_MIRRORS file, as {"urls", "sha256", "size"}, or None."""
    path = os.environ.get(MIRRORS_ENV)
    if not path:
        return None
    try:
        table = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{MIRRORS_ENV}={path}: not a readable JSON file ({e})") from None
    entry = table.get(name) if isinstance(table, dict) else None
    if entry is None:
        return None
    if isinstance(entry, str | list):
        entry = {"urls": entry}
    urls = entry.get("urls") if isinstance(entry, dict) else None
    urls = [urls] if isinstance(urls, str) else urls
    if not urls or not all(isinstance(u, str) for u in urls) or set(entry) - {"urls", "sha256", "size"}:
        raise UserError(f'{MIRRORS_ENV}={path}: the entry for {name} must be a URL, a list of URLs, or '
                        f'{{"urls": [...], "sha256": "...", "size": N}}')
    return {"urls": urls, "sha256": entry.get("sha256"), "size": entry.get("size")}


@dataclass(frozen=True)
class Release:
    """A published file: its name, where it is served (a list, or a function that makes one), its checksums,
    and the command that takes a copy fetched elsewhere."""

    name: str
    urls: Sequence[str] | Callable[[], Sequence[str]]
    sha256: str
    size: int
    offline: str  # e.g. "python data/e2e/prepare.py --src e2e-dataset.zip"

    def mirrors(self) -> list[str]:
        return list(self.urls() if callable(self.urls) else self.urls)

    def offline_hint(self, command: str | None = None) -> str:
        """One line: the file to fetch where there is a network, and the command that takes it."""
        return f"offline: fetch {self.mirrors()[0]}, then: {command or self.offline}"

    def fetch(self, out_dir, url: str | None = None) -> Path:
        """The file in out_dir, downloaded first if it is not there: from `url` alone if given, else
        from the GPT2STUDY_MIRRORS entry for it if there is one, else from the public mirrors."""
        dest = Path(out_dir) / self.name
        if dest.is_file():
            return dest
        own = None if url else own_mirrors(self.name)
        urls = [url] if url else own["urls"] if own else self.mirrors()
        sha256 = (own or {}).get("sha256") or self.sha256
        size = (own or {}).get("size") or (None if own and own.get("sha256") else self.size)
        return download(urls, dest, sha256=sha256, size=size, offline_hint=self.offline_hint())


def make_out_dir(out_dir: Path) -> None:
    """Create an output folder, or fail in one line when the path is a file."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out_dir {out_dir} is a file, not a folder: name a folder for the prepared data")
    out_dir.mkdir(parents=True, exist_ok=True)
