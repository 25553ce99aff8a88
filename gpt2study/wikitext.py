"""WikiText (raw, v1: WikiText-103 or the small WikiText-2) tokenised into train.bin / val.bin / test.bin
for pretraining (the library of data/wikitext103/prepare.py and data/wikitext2/prepare.py).

Its own train / valid / test split is kept. Articles (the lines ` = Title = `) are the
documents: each is followed by the end-of-text token. The release zip is downloaded from the
first of its mirrors that serves it whole (its size and sha256 checked), or taken from --src.
"""

import hashlib
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

from gpt2study.download import Release
from gpt2study.text_data import write_dataset
from model import UserError

REPO = Path(__file__).resolve().parents[1]
SPLITS = {"train": "wiki.train.raw", "val": "wiki.valid.raw", "test": "wiki.test.raw"}
_TITLE = re.compile(r"^ = [^=].* = $")  # top-level headings only; sections are ' = = ... = = '


def _mirrors(zip_name: str, hub_copies: tuple[str, ...]):
    """The dataset author's host, then copies on the Hugging Face Hub (datasets repos, reached through
    HF_ENDPOINT if set), then the original S3 link (403 since 2024)."""
    def urls() -> list[str]:
        from huggingface_hub import hf_hub_url  # the Hub's own URL scheme, honouring HF_ENDPOINT

        hub = [hf_hub_url(repo, zip_name, repo_type="dataset") for repo in hub_copies]
        return [f"https://wikitext.smerity.com/{zip_name}", *hub,
                f"https://s3.amazonaws.com/research.metamind.io/wikitext/{zip_name}"]
    return urls


@dataclass(frozen=True)
class WikiText:
    title: str
    release: Release
    default_out: Path
    train_tokens: int  # about, in GPT-2 tokens: for time estimates before it is prepared

    def fetch(self, out_dir: Path, url: str | None = None) -> Path:
        return self.release.fetch(out_dir, url)


# The releases as Salesforce published them. WikiText-103: its sha256 is the one the Hub shows in the Git LFS
# details of both copies below, and the one a Julia DataDeps registration pins for the original S3 file.
# WikiText-2: the sha256 that EleutherAI's lm-evaluation-harness pinned for the original S3 file, and that other
# projects pin, with this size, for the copies below. (Neither file was downloadable where this was written, so
# neither checksum was recomputed here.)
WIKITEXT103 = WikiText("WikiText-103", Release(
    "wikitext-103-raw-v1.zip", _mirrors("wikitext-103-raw-v1.zip", ("mattdangerw/wikitext-103-raw",
                                                                    "segyges/wikitext-103")),
    sha256="91c00ae287f0d699e18605c84afc9e45c192bc6b7797ff8837e5474655a33794", size=191_984_949,
    offline="python data/wikitext103/prepare.py --src wikitext-103-raw-v1.zip"),
    REPO / "data" / "wikitext103", train_tokens=117_000_000)
WIKITEXT2 = WikiText("WikiText-2", Release(
    "wikitext-2-raw-v1.zip", _mirrors("wikitext-2-raw-v1.zip", ("ggml-org/ci",)),
    sha256="ef7edb566e3e2b2d31b29c1fdb0c89a4cc683597484c3dc2517919c615435a11", size=4_721_645,
    offline="python data/wikitext2/prepare.py --src wikitext-2-raw-v1.zip"),
    REPO / "data" / "wikitext2", train_tokens=2_400_000)
RELEASES = {"103": WIKITEXT103, "2": WIKITEXT2}
DEFAULT_OUT = WIKITEXT103.default_out


def split_articles(text: str) -> list[str]:
    articles, current = [], []
    for line in text.splitlines():
        if _TITLE.match(line) and any(part.strip() for part in current):
            articles.append("\n".join(current).strip())
            current = []
        current.append(line)
    if any(part.strip() for part in current):
        articles.append("\n".join(current).strip())
    return articles


def read_release(src: Path, title: str = "WikiText") -> dict[str, str]:
    """The three raw files' text from the release zip or from a folder holding them."""
    texts = {}
    if src.is_file():
        try:
            with zipfile.ZipFile(src) as z:
                for split, name in SPLITS.items():
                    member = next((m for m in z.namelist() if m.endswith("/" + name) or m == name), None)
                    if member is None:
                        raise UserError(f"{src} has no {name}: not the {title} raw release")
                    texts[split] = z.read(member).decode("utf-8")
        except zipfile.BadZipFile as e:
            raise UserError(f"{src} is not a readable zip file ({e}); pass the release zip or its unpacked folder"
                            ) from None
    elif src.is_dir():
        for split, name in SPLITS.items():
            found = sorted(src.rglob(name))
            if not found:
                raise UserError(f"{src} holds no {name}: not an unpacked {title} raw release")
            texts[split] = found[0].read_text(encoding="utf-8")
    else:
        raise UserError(f"--src {src} does not exist")
    return texts


def prepare(src: Path | None = None, out_dir: Path = DEFAULT_OUT, url: str | None = None,
            wikitext: WikiText = WIKITEXT103) -> dict:
    """Tokenise the release (`src`: the zip or its folder; else downloaded into out_dir) into out_dir."""
    src = Path(src) if src else wikitext.fetch(out_dir, url)
    texts = read_release(src, wikitext.title)
    splits = {split: split_articles(text) for split, text in texts.items()}
    digest = hashlib.sha256(b"".join(t.encode() for t in texts.values())).hexdigest()
    return write_dataset(splits, Path(out_dir), [str(src)], digest)


def ensure_prepared(data_dir) -> bool:
    """Prepare WikiText in data_dir if that is one of the default folders and holds no train.bin yet;
    True if it did. (A download needs the network: without it, the error says what to do.)"""
    data_dir = Path(data_dir)
    wikitext = next((w for w in RELEASES.values() if data_dir.resolve() == w.default_out), None)
    if (data_dir / "train.bin").exists() or wikitext is None:
        return False
    print(f"{data_dir}/train.bin not found: preparing {wikitext.title} (a {wikitext.release.size / 1e6:.0f} MB "
          f"download)")
    prepare(out_dir=data_dir, wikitext=wikitext)
    return True
