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

__all__ = ["causal_attention", "causal_attention_reference", "triton_available"]

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


class _Launcher:
    """`launcher[grid](*args)` runs `kernel` autotuned over `configs` (keyed on `key`) when compiled, and with the
    single `interpreter_config` under the interpreter, where autotuning would run every config, slowly."""

    def __init__(self, kernel, configs, key, interpreter_config, **autotune_kwargs):
        import triton  # only ever constructed by kernels.attention / kernels.lora_linear, which import triton

        self.kernel, self.config = kernel, interpreter_config
        self.tuned = None
        if not interpreting():
            self.tuned = triton.autotune(configs, key=key, **autotune_kwargs)(kernel)

    def __getitem__(self, grid):
        if self.tuned is not None:
            return self.tuned[grid]
        cfg = self.config
        launch = self.kernel[grid(cfg.kwargs) if callable(grid) else grid]
        return lambda *args, **kwargs: launch(
            *args, **kwargs, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages
        )


def __getattr__(name):
    # `from kernels import causal_attention` without importing triton at `import kernels` (see the docstring).
    # lora_linear has no such alias: the name is its submodule's (`from kernels.lora_linear import lora_linear`).
    if name in ("causal_attention", "causal_attention_reference"):
        from . import attention

        return getattr(attention, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
