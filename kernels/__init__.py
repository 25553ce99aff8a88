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


# Tests set this False: a launcher then runs the first config that fits instead of benchmarking every candidate
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
        except Exception:  # an older/other driver API: ask torch, else assume the smallest sm_80+ GPU
            props = torch.cuda.get_device_properties(index)
            _smem_limits[index] = int(getattr(props, "shared_memory_per_block_optin", _SMEM_FALLBACK))
    return _smem_limits[index]


def _fit_configs(configs, needs, smem_limit, fallback=None, reg_budget=224):
    """The configs to autotune over: those whose estimated (shared memory bytes, 32-bit registers per thread),
    `needs(config)`, fit both limits; else the small `fallback` config, if it fits shared memory; else those that
    fit shared memory, fewest registers first (they may spill, but run); else the one needing the least shared
    memory (the launcher drops it if it fails after all)."""
    sized = [(c, *needs(c)) for c in configs]
    fits = [c for c, smem, regs in sized if c is not fallback and smem <= smem_limit and regs <= reg_budget]
    if fits:
        return fits
    if fallback is not None and needs(fallback)[0] <= smem_limit:
        return [fallback]
    smem_ok = sorted((s for s in sized if s[1] <= smem_limit), key=lambda s: s[2])
    if smem_ok:
        return [c for c, _, _ in smem_ok[:2]]
    return [min(sized, key=lambda s: s[1])[0]]


class _Launcher:
    """`launcher[grid](*args)` runs `kernel` autotuned over `configs` (keyed on `key`) when compiled, and with the
    single `interpreter_config` under the interpreter, where autotuning would run every config, slowly.

    `needs(config, args)` (args: the launch arguments by name) estimates a config's shared memory in bytes and its
    registers per thread; configs that do not fit the device are never tried, and the last config, a small one that
    fits anything, only when no other does (benchmarking it would only cost tuning time). As a guarantee on top of
    that estimate, a config that still raises OutOfResources when launched is dropped for that launch signature and
    the launch retried with the next best: triton's autotuner already scores configs that fail while it benchmarks
    as infinitely slow, but runs a lone surviving config (or the best of all-failing ones) unchecked."""

    def __init__(self, kernel, configs, key, interpreter_config, needs=None, **autotune_kwargs):
        import triton  # only ever constructed by kernels.attention / kernels.lora_linear, which import triton

        self.kernel, self.config, self.needs, self.key = kernel, interpreter_config, needs, key
        self.tuned, self.fallback = None, configs[-1]
        self._failed = {}  # launch signature -> configs that raised OutOfResources
        if not interpreting():
            prune = {"early_config_prune": self._prune} if needs is not None else None
            self.tuned = triton.autotune(configs, key=key, prune_configs_by=prune, **autotune_kwargs)(kernel)

    def _signature(self, args):
        """What a compiled variant depends on, as far as fitting goes: the tuning key and the tensor dtypes."""
        return tuple(args.get(k) for k in self.key) + tuple(
            str(v.dtype) for v in args.values() if isinstance(v, torch.Tensor))

    def _prune(self, configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        failed = self._failed.get(self._signature(args), ())
        configs = [c for c in configs if not any(c is f for f in failed)]
        if not configs:
            raise RuntimeError(f"{self.kernel.__name__}: every config ran out of GPU resources")
        device = next(v.device for v in args.values() if isinstance(v, torch.Tensor))
        fits = _fit_configs(configs, lambda c: self.needs(c, args), _smem_limit(device), self.fallback)
        return fits if _AUTOTUNE else fits[:1]

    def __getitem__(self, grid):
        if self.tuned is None:
            cfg = self.config
            launch = self.kernel[grid(cfg.kwargs) if callable(grid) else grid]
            return lambda *args, **kwargs: launch(
                *args, **kwargs, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages
            )
        return lambda *args, **kwargs: self._run(grid, args, kwargs)

    def _run(self, grid, args, kwargs):
        from triton.runtime.errors import OutOfResources

        while True:
            try:
                return self.tuned[grid](*args, **kwargs)
            except OutOfResources:
                bad = getattr(self.tuned, "best_config", None)  # set just before the failing launch
                failed = self._failed.setdefault(
                    self._signature({**dict(zip(self.kernel.arg_names, args)), **kwargs}), [])
                if bad is None or any(bad is f for f in failed):
                    raise
                failed.append(bad)
                if all(any(c is f for f in failed) for c in self.tuned.configs):
                    raise
                self.tuned.cache.clear()  # re-tune without it (other signatures re-tune too: rare, cheap)


def __getattr__(name):
    # `from kernels import causal_attention` without importing triton at `import kernels` (see the docstring).
    # lora_linear has no such alias: the name is its submodule's (`from kernels.lora_linear import lora_linear`).
    if name in ("causal_attention", "causal_attention_reference"):
        from . import attention

        return getattr(attention, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
