"""Downloads that survive the real world: mirrors in order, checked, never half-written.

    download(MIRRORS, Path("data/x.zip"), sha256="...", size=1234, offline_hint="offline? pass --src PATH")

Each URL is tried in turn with a descriptive User-Agent (some hosts refuse Python's default
with 403) and a timeout. The bytes go to `dest.part`; only when the transfer is complete and
the known size and sha256 agree is it renamed to `dest`. A mirror
that fails is reported and the next one tried; when all fail, one UserError line says what each
answered, then `offline_hint`. Proxies come from the usual http_proxy / https_proxy variables;
file:// URLs work too (a copy on a shared disk).
"""

import hashlib
import http.client
import os
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from model import UserError

# Hosts such as wikitext.smerity.com answer 403 to "Python-urllib/3.x"; a named client is let through.
USER_AGENT = "gpt2-study/0.1 (research code fetching its datasets)"
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
    """Fetch the first of `urls` that delivers the right file to `dest` (see the module docstring)."""
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
                    raise _MirrorFailed(f"sent a file whose sha256 is {digest}, not {sha256}")
            except _MirrorFailed as e:
                part.unlink(missing_ok=True)
                failures.append((url, str(e)))
                if url != urls[-1]:
                    print(f"  failed ({e}); trying the next mirror")
                continue
            os.replace(part, dest)
            verified = "sha256 verified" if sha256 else "size verified" if size else "not verified: no checksum known"
            print(f"  {dest.name}: {received:,} bytes from {url} ({verified})")
            return dest
    finally:
        part.unlink(missing_ok=True)  # an interrupted or failed transfer leaves nothing behind
    reasons = {why for _, why in failures}
    if len(failures) > 1 and len(reasons) == 1:  # e.g. no network at all: say it once
        raise UserError(f"could not download {dest.name} from {', '.join(urls)}: {reasons.pop()}; {offline_hint}")
    tried = "; ".join(f"{url}: {why}" for url, why in failures)
    raise UserError(f"could not download {dest.name}: {tried}; {offline_hint}")


def make_out_dir(out_dir: Path) -> None:
    """Create an output folder, or fail in one line when the path is a file."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out_dir {out_dir} is a file, not a folder: name a folder for the prepared data")
    out_dir.mkdir(parents=True, exist_ok=True)
