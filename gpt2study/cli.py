"""What every command shares: the one configurator, and user errors printed as one line.

A command's settings are a dataclass whose fields are declared with `model.setting(default, help,
...)`: the help text, the allowed range or choices, all in one place. `load_config(cls, argv)`
builds it from config files (plain Python that assigns some fields: `lr = 3e-4`; the files
under config/) and command-line overrides, in order, later ones winning:

    python train.py config/pretrain.py --lr=1e-3 --batch_size 16 --compile
    python export.py out/pretrain --out hf/        # a script may take positional settings
    python sample.py --help                        # every key, its default and what it does

Every value is checked against its field's type and range before any work starts; a bad one
stops with one line naming the key, the value and what is allowed.
"""

import ast
import dataclasses
import os
import sys
import types
import typing
from pathlib import Path

from model import UserError


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
    except BrokenPipeError:  # output piped into `head`, say: nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    except OSError as e:  # the machine said no (a full disk, a path under a file, a symlink loop): say which file
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        sys.exit(2)


DEVICE_HELP = "'auto' (cuda if present), 'cpu', 'cuda', 'cuda:1', ..."


def resolve_device(name: str) -> str:
    """A device setting made concrete: 'auto' is cuda when PyTorch sees a GPU."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device '{name}' asked for, but PyTorch sees no CUDA GPU; use --device=cpu")
    return name


# ----------------------------------------------------------------------------- checking settings


def field_types(cls) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _base_type(typ):
    """(type, optional): the type a field holds, unwrapping `X | None`."""
    if typing.get_origin(typ) in (typing.Union, types.UnionType):
        args = typing.get_args(typ)
        return next(a for a in args if a is not type(None)), type(None) in args
    return typing.get_origin(typ) or typ, False


def coerce(key: str, value, typ):
    """Check `value` against the field's type, allowing int for float and None for Optional."""
    base, optional = _base_type(typ)
    if value is None and optional:
        return None
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is tuple and isinstance(value, list | str):
        value = tuple(value) if isinstance(value, list) else (value,)
    if not isinstance(value, base) or (base is int and isinstance(value, bool)):
        raise UserError(f"config key '{key}' wants a {base.__name__}, got {value!r}")
    return value


def _parse_value(text: str, typ):
    """A command-line value: text for a str field, a Python literal otherwise (a comma list for a tuple)."""
    base, optional = _base_type(typ)
    if optional and text == "None":
        return None
    if base is str:
        return text
    if base is bool and text.lower() in ("true", "false", "yes", "no", "1", "0"):
        return text.lower() in ("true", "yes", "1")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    if base is tuple and isinstance(value, str):
        value = tuple(part.strip() for part in value.split(",") if part.strip())
    return value


def check_settings(cfg) -> None:
    """Every field within its declared range or choices, then the `check()` of each config class."""
    for f in dataclasses.fields(cfg):
        value, meta = getattr(cfg, f.name), f.metadata
        if value is None:
            continue
        values = value if isinstance(value, tuple) else (value,)
        if "choices" in meta:
            bad = [v for v in values if v not in meta["choices"]]
            if bad:
                allowed = ", ".join(map(repr, meta["choices"]))
                raise UserError(f"config key '{f.name}' is {bad[0]!r}; choose from {allowed}")
        for rule, ok, words in (("at_least", lambda v, b: v >= b, "at least"), ("above", lambda v, b: v > b, "above"),
                                ("at_most", lambda v, b: v <= b, "at most"), ("below", lambda v, b: v < b, "below")):
            if rule in meta and not all(ok(v, meta[rule]) for v in values):
                raise UserError(f"config key '{f.name}' is {value!r}; it must be {words} {meta[rule]}")
    for klass in reversed(type(cfg).__mro__):  # each config class a settings class is made of checks its own
        if "check" in vars(klass):
            vars(klass)["check"](cfg)


def pick(cls, cfg):
    """A `cls` config of the same-named fields of `cfg` (a config made of several, for one of its parts)."""
    return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})


# ----------------------------------------------------------------------------- config files


def _run_config_file(path: Path, namespace: dict | None = None) -> dict:
    """The settings a config file makes. `include("other.py")` inside it runs another config
    file (relative to this one) first, so that a config can build on another."""
    if not path.is_file():
        raise UserError(f"config file '{path}' not found; pass a file from config/ or --key=value overrides")
    namespace = {} if namespace is None else namespace
    chain = [*namespace.get("__including__", ()), path.resolve()]
    if path.resolve() in chain[:-1]:
        raise UserError(f"config file {path} includes itself: {' -> '.join(p.name for p in chain)}")

    def include(name: str):
        namespace["__including__"] = chain
        _run_config_file(path.parent / name, namespace)
        namespace["include"] = include  # the included file bound its own

    namespace["include"] = include
    try:
        source = path.read_text(encoding="utf-8")
        _check_assigned_once(source, path)
        exec(compile(source, str(path), "exec"), namespace)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"config file {path} failed: {type(e).__name__}: {e}") from None
    # imports, functions and _private names are the file's tools, not settings
    return {k: v for k, v in namespace.items()
            if not k.startswith("_") and not isinstance(v, type(sys)) and not callable(v)}


def _check_assigned_once(source: str, path: Path) -> None:
    """A setting assigned twice at the top of one file is a slip (the first value silently lost):
    refused, naming both lines. (A later file or --key=value overriding it is how configs build.)"""
    seen: dict[str, int] = {}
    for node in ast.parse(source, str(path)).body:
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets = [node.target]
        else:
            continue
        for name in (t.id for t in targets if isinstance(t, ast.Name) and not t.id.startswith("_")):
            if name in seen:
                raise UserError(f"config file {path} sets '{name}' twice (lines {seen[name]} and {node.lineno}); "
                                f"keep one")
            seen[name] = node.lineno


def usage(cls, doc: str | None = None) -> str:
    """--help: the script's docstring, then every key with its default and description."""
    lines = [doc.strip(), ""] if doc else []
    fields = dataclasses.fields(cls)
    pos = [f.name.upper() for f in fields if f.metadata.get("positional")]
    script = os.path.relpath(sys.argv[0]) if sys.argv and sys.argv[0] else "script.py"
    lines.append(f"usage: python {script} {' '.join(pos) + ' ' if pos else ''}[CONFIG.py ...] [--key=value ...]")
    lines.append("settings (default; what it does):")
    for f in fields:
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        allowed = f.metadata.get("choices")
        extra = f" [{'|'.join(map(str, allowed))}]" if allowed else ""
        lines.append(f"  --{f.name}={default!r}{extra}".ljust(40) + f" {f.metadata.get('help', '')}")
    return "\n".join(lines)


def load_config(cls, argv: list[str], doc: str | None = None):
    """Build a `cls` config from config files (`*.py`), positional settings and `--key=value` /
    `--key value` overrides (a bare `--flag` sets a bool to True), then check it. `--help` prints
    `usage` and exits. The keys that were set are kept in the config's `given` attribute."""
    types_ = field_types(cls)
    positional = [f.name for f in dataclasses.fields(cls) if f.metadata.get("positional")]
    values: dict = {}

    def known(key, origin):
        if key not in types_:
            raise UserError(f"unknown config key '{key}' ({origin}); known keys: {', '.join(sorted(types_))}")

    def assign(key, value, origin):
        known(key, origin)
        values[key] = coerce(key, value, types_[key])

    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg in ("-h", "--help"):
            print(usage(cls, doc))
            sys.exit(0)
        if arg.startswith("--"):
            key, sep, text = arg[2:].partition("=")
            if not sep:
                if key in types_ and _base_type(types_[key])[0] is bool:
                    text = "True"
                elif not args:
                    raise UserError(f"override '{arg}' needs a value: write --{key}=VALUE")
                else:
                    text = args.pop(0)
            known(key, "command line")
            assign(key, _parse_value(text, types_[key]), "command line")
        elif arg.endswith(".py"):
            for key, value in _run_config_file(Path(arg)).items():
                assign(key, value, arg)
        elif positional:
            key = positional.pop(0)
            assign(key, _parse_value(arg, types_[key]), "command line")
        else:
            raise UserError(f"unexpected argument '{arg}': config files end in .py, settings are --key=value")
    cfg = cls(**values)
    cfg.given = frozenset(values)
    check_settings(cfg)
    return cfg
