"""GPT-2's byte-level BPE, through tiktoken, from a vendored vocabulary file.

tiktoken normally downloads its vocabularies on first use; we ship the one file
GPT-2 needs (byte-identical to tiktoken's r50k_base, checked by sha256) so that
everything works on a machine with no network.
"""

from functools import lru_cache
from pathlib import Path

import tiktoken
from tiktoken.load import load_tiktoken_bpe

VOCAB_FILE = Path(__file__).resolve().parent / "gpt2.tiktoken"
VOCAB_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
EOT_TEXT = "<|endoftext|>"
EOT = 50256  # GPT-2's only special token: separates documents and ends generations
VOCAB_SIZE = 50257
# GPT-2's pre-tokenisation regex, in the faster but equivalent form tiktoken uses.
_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


@lru_cache(maxsize=1)
def get_encoding() -> tiktoken.Encoding:
    ranks = load_tiktoken_bpe(str(VOCAB_FILE), expected_hash=VOCAB_SHA256)
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={EOT_TEXT: EOT},
        explicit_n_vocab=VOCAB_SIZE,
    )


def encode(text: str) -> list[int]:
    """Token ids of `text`; "<|endoftext|>" in the text is ordinary text, never EOT."""
    return get_encoding().encode_ordinary(text)


def encode_batch(texts: list[str]) -> list[list[int]]:
    return get_encoding().encode_ordinary_batch(texts)


def decode(ids) -> str:
    return get_encoding().decode(list(ids))
