"""`bitnet-rl export`: write a trained policy in the format the place it will run reads.

| format | for | what is written |
| --- | --- | --- |
| `packed` | transformers, `load_policy`, `PackedGenerator` | transformers' offline bitnet layout: 2-bit codes + one scale per tensor |
| `bf16` | resuming training anywhere | bf16 master weights + the online quantization config (`save_checkpoint`) |
| `gguf` | llama.cpp on CPUs | one GGUF file, ternary projections as TQ2_0 (or TQ1_0) |

Every format is written into a temporary sibling directory that is renamed into place when
complete, so a crash never leaves half an export. Scale layouts a format cannot hold are
refused with one line (`UserError`), never silently approximated.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from bitnet_rl.errors import UserError

FORMATS = ("packed", "bf16", "gguf")


@dataclass
class ExportResult:
    path: Path  # the export directory
    files: dict[str, int]  # file name (relative to path) -> bytes on disk
    source_bytes: int  # bytes of the checkpoint's weight files

    @property
    def total_bytes(self) -> int:
        return sum(self.files.values())

    def summary(self, fmt: str) -> str:
        lines = [f"exported {fmt} to {self.path}"]
        for name, size in sorted(self.files.items()):
            lines.append(f"  {name:<40} {human_bytes(size):>12}")
        ratio = f" ({self.source_bytes / self.total_bytes:.2f}x smaller than the checkpoint's weights, {human_bytes(self.source_bytes)})" if self.total_bytes and self.source_bytes else ""
        lines.append(f"  {'total':<40} {human_bytes(self.total_bytes):>12}{ratio}")
        return "\n".join(lines)


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1024
    raise AssertionError


def dir_sizes(path: Path) -> dict[str, int]:
    return {str(f.relative_to(path)): f.stat().st_size for f in sorted(path.rglob("*")) if f.is_file()}


def weight_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def stored_dtype(raw_config: dict) -> torch.dtype:
    """The dtype a checkpoint's weights were saved in (bf16 stays bf16: upcasting would only cost memory)."""
    name = raw_config.get("dtype") or raw_config.get("torch_dtype")
    return torch.bfloat16 if name == "bfloat16" else torch.float32


def writer(fmt: str) -> Callable:
    if fmt == "packed":
        from bitnet_rl.export.packed import write_packed

        return write_packed
    if fmt == "bf16":
        from bitnet_rl.export.bf16 import write_bf16

        return write_bf16
    if fmt == "gguf":
        from bitnet_rl.export.gguf import write_gguf

        return write_gguf
    raise UserError(f"--format: unknown value {fmt!r} (expected one of {', '.join(FORMATS)})")


def export_checkpoint(checkpoint: str | Path, fmt: str, out: str | Path, merge_lora: bool = False, **options) -> ExportResult:
    """Export `checkpoint` (any directory `load_policy` reads, or a run directory) as `fmt` into `out`.

    A checkpoint's `adapter/` is always merged (`load_policy` does it); `merge_lora` makes its absence an error. `options` go to the format's writer (gguf: `ternary_type="TQ2_0"|"TQ1_0"`).
    The model is exported at λ = 1: the fully ternary function the policy computes after warm-up.
    """
    from bitnet_rl.models.build import resolve_model_dir
    from bitnet_rl.models.io import load_policy, load_tokenizer, read_config
    from bitnet_rl.train.rundir import check_writable_dir

    write = writer(fmt)
    source = resolve_model_dir(checkpoint)
    raw = read_config(source)
    out = Path(out)
    if out.resolve() == source.resolve():
        raise UserError(f"--out {out} is the checkpoint itself; choose another directory")
    check_writable_dir(out)
    if merge_lora:
        from bitnet_rl.lora.merge import require_adapter

        require_adapter(source)
    policy = load_policy(source, dtype=stored_dtype(raw)).eval()  # merges an adapter/ it finds
    final = write(policy, load_tokenizer(source), out, **options)
    return ExportResult(final, dir_sizes(final), weight_bytes(source))


def write_atomically(out: str | Path, fill: Callable[[Path], None]) -> Path:
    """Run `fill(tmp_dir)` in a temporary sibling of `out`, then rename it to `out` (removed on failure)."""
    import shutil

    from bitnet_rl.models.io import atomic_dir, commit_dir

    tmp, final = atomic_dir(out)
    try:
        fill(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return commit_dir(tmp, final)


__all__ = ["FORMATS", "ExportResult", "export_checkpoint"]
