"""Triton kernels for the GPT-2 study: fused causal attention (`kernels.attention`) and fused LoRA linear
(`kernels.lora_linear`).

Importing this package does not import triton. Triton decides when a kernel is defined (its own library kernels
when triton is imported, ours when `kernels.attention` / `kernels.lora_linear` are) whether it runs compiled or
in the CPU interpreter (TRITON_INTERPRET=1), so whoever wants the interpreter must set that variable before
anything imports triton.
"""

import importlib.util
import os

import torch

__all__ = ["causal_attention", "causal_attention_reference", "triton_available", "wins"]

# Where each kernel was measured faster than the PyTorch path it replaces, by GPU generation: CUDA compute capability
# -> {kind: the result file that shows it}. H100 and H200 are both (9, 0). A generation not listed runs PyTorch by
# default (attn_impl='triton', lora_impl='triton' still turn a kernel on anywhere). bench/gpu_session.py prints
# the entry its measurements support. Kinds:
#   attention        training: forward + backward against SDPA (flash), and not slower in the whole training step
#   attention_fwd    without autograd (a prompt's first decoding step): forward against SDPA
#   lora_linear      training: forward + backward against the PyTorch LoRA CUDA runs without it (lora_impl concat)
#   lora_linear_fwd  without autograd: forward against that same PyTorch path
# Empty: the reworked kernels have not run on a GPU yet.
MEASURED_WINS: dict[tuple[int, int], dict[str, str]] = {}
KINDS = ("attention", "attention_fwd", "lora_linear", "lora_linear_fwd")
_capabilities: dict = {}


def _capability(device: torch.device) -> tuple[int, int]:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _capabilities:
        _capabilities[index] = tuple(torch.cuda.get_device_capability(index))
    return _capabilities[index]


def wins(kind: str, device) -> bool:
    """Whether our kernel of this kind was measured faster than PyTorch on `device`'s GPU generation, i.e. whether
    'auto' should pick it there (MEASURED_WINS). False on anything but CUDA."""
    if kind not in KINDS:
        raise ValueError(f"unknown kernel kind {kind!r}; kinds: {', '.join(KINDS)}")
    device = torch.device(device)
    if device.type != "cuda" or not MEASURED_WINS:
        return False
    return kind in MEASURED_WINS.get(_capability(device), {})


# Tests set this: every output buffer a kernel is meant to fill completely is then NaN-filled first,
# so an element the kernel forgot to write cannot pass by luck.
_POISON = False


def interpreting() -> bool:
    """Whether triton runs in interpreter mode (parsed like triton's own boolean knobs)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on")


def triton_available(t: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on `t`: a CUDA tensor with triton installed, or interpreter mode."""
    if importlib.util.find_spec("triton") is None:
        return False
    return interpreting() or t.is_cuda


def _fresh(t: torch.Tensor) -> torch.Tensor:
    """Hook applied to every freshly allocated output buffer (see _POISON)."""
    return t.fill_(float("nan")) if _POISON else t


def _autocast(*tensors):
    """Cast floating tensors to the autocast dtype when autocast is on, as torch does for matmul/SDPA."""
    device = next(t for t in tensors if t is not None).device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)


def _dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision, moot for 16-bit inputs. float32: plain TF32 only where torch allows it for matmuls,
    else 3 TF32 products (about float32 accuracy on tensor cores; "ieee" FMA dots spill registers badly)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "tf32x3"
    return "tf32"


def _check_dtype(*tensors) -> None:
    dtypes = {t.dtype for t in tensors if t is not None}
    if len(dtypes) != 1 or not dtypes <= {torch.float32, torch.float16, torch.bfloat16}:
        names = ", ".join(str(d).removeprefix("torch.") for d in sorted(dtypes, key=str))
        raise TypeError(f"Triton kernels want float32, float16 or bfloat16 inputs of one dtype, got {names}")


# Tests set this False: autotuned kernels then run the first config that fits instead of benchmarking every one
# (compiling them all for every shape and dtype the tests try would take minutes).
_AUTOTUNE = True

# Opt-in shared memory per block when the device cannot be asked: the smallest of sm_80+ GPUs (sm_86/89).
_SMEM_FALLBACK = 101376
_smem_limits: dict = {}


def _smem_limit(device: torch.device) -> int:
    """Shared memory (bytes) one program may use on `device` (227 KiB on H100/H200, 163 KiB on A100)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _smem_limits:
        try:
            from triton.runtime import driver

            _smem_limits[index] = int(driver.active.utils.get_device_properties(index)["max_shared_mem"])
        except Exception:  # another driver API: ask torch, else assume the smallest sm_80+ GPU
            props = torch.cuda.get_device_properties(index)
            _smem_limits[index] = int(getattr(props, "shared_memory_per_block_optin", _SMEM_FALLBACK))
    return _smem_limits[index]


def fitting(configs, smem, limit: int) -> list:
    """The configs whose estimated shared memory `smem(config)` is at most `limit`, in their order; if none is,
    the one that needs the least (a kernel must run with something; triton raises if even that does not fit)."""
    fits = [c for c in configs if smem(c) <= limit]
    return fits or [min(configs, key=smem)]


def pruner(smem):
    """triton.autotune's early_config_prune: the configs whose estimated shared memory `smem(config, args)` fits the
    device of the launch's tensors (`fitting`); only the first of them when tests turn autotuning off."""
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        device = next(v.device for v in args.values() if isinstance(v, torch.Tensor))
        fits = fitting(configs, lambda c: smem(c, args), _smem_limit(device))
        return fits if _AUTOTUNE else fits[:1]

    return prune


def autotuned(kernel, configs, key, smem, interpreter_config):
    """`kernel` under plain triton.autotune over `configs`, keyed on the `key` arguments (triton adds the tensor
    dtypes) and pruned by `pruner(smem)`, `smem` being a documented estimate from block sizes, stages and dtype (exact
    numbers exist only after compiling). A config that fails anyway is timed as infinitely slow by the autotuner.
    Under the interpreter: `interpreter_config` alone, untuned (tuning would run every config, slowly); its small
    tiles let the tests cover several blocks and tails."""
    import triton  # only called by kernels.attention / kernels.lora_linear, which import triton

    if interpreting():
        return triton.autotune([interpreter_config], key=key)(kernel)
    return triton.autotune(configs, key=key, prune_configs_by={"early_config_prune": pruner(smem)})(kernel)


def __getattr__(name):
    # `from kernels import causal_attention` without importing triton at `import kernels` (see the docstring).
    # lora_linear has no such alias: the name is its submodule's (`from kernels.lora_linear import lora_linear`).
    if name in ("causal_attention", "causal_attention_reference"):
        from . import attention

        return getattr(attention, name)
    if name[:1].isupper() or name in ("get_kernel", "kernelize", "use_kernelized_func"):
        # Hugging Face's `kernels` package (which transformers >= 5.25 imports) has our name; Python found ours
        # first because it runs from this repository's folder.
        raise ImportError(f"cannot import {name!r} from {__file__}: this repository's kernels/ folder hides Hugging "
                          "Face's `kernels` package, which transformers >= 5.25 needs; run transformers code from "
                          "another folder, or use transformers < 5.25 (requirements-dev.txt pins it)")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
