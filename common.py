"""Small pieces every entry point shares: user-facing errors and the config system."""

import ast
import dataclasses
import os
import sys
import types
import typing
from pathlib import Path


class UserError(Exception):
    """A problem the user can fix (bad input, missing data, ...): printed as one line, no traceback."""


def run_main(main) -> None:
    """Run an entry point, turning a UserError into `error: ...` on stderr and exit status 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


# ----------------------------------------------------------------------------- config
# A config is a dataclass of defaults. A config file is plain Python that assigns some
# of its fields (`lr = 3e-4`); `--key=value` on the command line overrides both.


def _field_types(cls) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(key: str, value, typ):
    """Check `value` against the field's type, allowing int for float and None for Optional."""
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        typ = next(a for a in args if a is not type(None))
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is tuple and isinstance(value, list):
        value = tuple(value)
    base = typing.get_origin(typ) or typ
    if not isinstance(value, base) or (base is int and isinstance(value, bool)):
        raise UserError(f"config key '{key}' wants a {getattr(base, '__name__', base)}, got {value!r}")
    return value


def _parse_value(text: str):
    """`--key=value` values are Python literals; anything else is a string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _run_config_file(path: Path, namespace: dict | None = None) -> dict:
    """The settings a config file makes. `include("other.py")` inside it runs another config
    file (relative to this one) first, so that a config can build on another."""
    if not path.is_file():
        raise UserError(f"config file '{path}' not found; pass a file from config/ or --key=value overrides")
    namespace = {} if namespace is None else namespace

    def include(name: str):
        _run_config_file(path.parent / name, namespace)
        namespace["include"] = include  # the included file bound its own

    namespace["include"] = include
    try:
        exec(compile(path.read_text(), str(path), "exec"), namespace)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"config file {path} failed: {type(e).__name__}: {e}") from None
    # imports, functions and _private names are the file's tools, not settings
    return {k: v for k, v in namespace.items()
            if not k.startswith("_") and not isinstance(v, type(sys)) and not callable(v)}


def load_config(cls, argv: list[str]):
    """Build a `cls` config from optional config files (positional) and --key=value overrides."""
    types = _field_types(cls)
    values: dict = {}

    def assign(key, value, origin):
        if key not in types:
            raise UserError(f"unknown config key '{key}' ({origin}); known keys: {', '.join(sorted(types))}")
        values[key] = _coerce(key, value, types[key])

    for arg in argv:
        if arg.startswith("--"):
            key, sep, text = arg[2:].partition("=")
            if not sep:
                raise UserError(f"override '{arg}' needs a value: write --{key}=VALUE")
            assign(key, _parse_value(text), "command line")
            continue
        for key, value in _run_config_file(Path(arg)).items():
            assign(key, value, arg)
    return cls(**values)


# ----------------------------------------------------------------------------- downloads

CACHE_DIR = Path(os.environ.get("GPT2_STUDY_CACHE", Path.home() / ".cache" / "gpt2-study"))
HF_GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def download(url: str, dest: Path, offline_hint: str) -> Path:
    """Fetch `url` to `dest` with a progress bar, written under a temporary name, then renamed.
    When that fails, the error says what failed and `offline_hint`: how to do without the network."""
    import urllib.error
    import urllib.request

    from tqdm import tqdm

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=30) as r, open(tmp, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {dest.name}") as bar:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError) as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"could not download {url} ({getattr(e, 'reason', e)}); {offline_hint}") from e
    os.replace(tmp, dest)
    return dest


def _hf_cached_snapshot(name: str) -> Path | None:
    """A copy of `name` in the Hugging Face hub cache (e.g. left by transformers), if any."""
    hub = Path(os.environ.get("HF_HUB_CACHE", Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
                              / "hub"))
    for repo in (f"models--openai-community--{name}", f"models--{name}"):
        for snap in sorted((hub / repo / "snapshots").glob("*")):
            if (snap / "config.json").exists() and any((snap / w).exists() for w in HF_WEIGHT_FILES):
                return snap
    return None


def hf_model_dir(name_or_dir: str) -> Path:
    """A folder with config.json and weights for a Hugging Face GPT-2: the given folder, a cached
    copy, or a fresh download of config.json and model.safetensors from huggingface.co."""
    path = Path(name_or_dir)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise UserError(f"{path} has no config.json: not a Hugging Face model folder")
        return path
    if name_or_dir not in HF_GPT2_NAMES:
        raise UserError(f"'{name_or_dir}' is neither a folder nor one of {', '.join(HF_GPT2_NAMES)}")
    cached = _hf_cached_snapshot(name_or_dir)
    if cached:
        return cached
    folder = CACHE_DIR / "hf" / name_or_dir
    hint = (f"offline: on a machine with internet, save config.json and model.safetensors from "
            f"https://huggingface.co/openai-community/{name_or_dir} into a folder, copy it here and pass "
            f"that folder instead of '{name_or_dir}'")
    for file in ("config.json", "model.safetensors"):
        if not (folder / file).exists():
            download(f"https://huggingface.co/openai-community/{name_or_dir}/resolve/main/{file}", folder / file, hint)
    return folder


# ----------------------------------------------------------------------------- models

# Where the study's pretraining runs leave their weights, latest first: a model to sample
# from or fine-tune defaults to the newest that exists.
STUDY_RUNS = ("out/pretrain_continue", "out/pretrain")


def default_base() -> str:
    for run in STUDY_RUNS:
        if (Path(run) / "checkpoint" / "model.safetensors").exists():
            return run
    raise UserError(f"no pretrained model found in {' or '.join(STUDY_RUNS)}: train one with "
                    f"python train.py config/pretrain.py, or pass another run folder or gpt2-medium")


def load_model(spec: str, **overrides):
    """A GPT from a run folder of ours (out_dir), a .safetensors file saved by GPT.save, or a
    Hugging Face GPT-2 (folder or hub name). `overrides` set runtime fields (dropout, attn_impl)."""
    from model import GPT

    path = Path(spec)
    if (path / "checkpoint" / "model.safetensors").exists():
        path = path / "checkpoint" / "model.safetensors"
    if path.is_dir() and (path / "model.safetensors").exists() and not (path / "config.json").exists():
        path = path / "model.safetensors"
    if path.suffix == ".safetensors" and path.is_file():
        return GPT.from_file(path, **overrides)
    if path.is_dir() and not (path / "config.json").exists():
        raise UserError(f"{spec} holds no model: expected a run folder with checkpoint/model.safetensors, "
                        f"or a Hugging Face folder with config.json")
    return GPT.from_pretrained(spec, **overrides)
