"""How big an export is: bits per quantized parameter and bytes against the same model in bf16."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

BF16_BYTES = 2


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@dataclass
class SizeReport:
    kind: str                       # "packed" or "fake"
    formats: list[str]              # weight formats of the quantized tensors
    quantized_tensors: int
    quantized_params: int
    quantized_bytes: int            # codes + block scales + per-tensor scales (packed) or dequantized values (fake)
    other_params: int               # everything else, kept in high precision (tied tensors once)
    other_bytes: int
    folder_bytes: int = 0           # every file of the export (configs, tokenizer, other pipeline components)
    dense_fallbacks: list[str] = field(default_factory=list)   # quantized weights stored unpacked

    @property
    def bits_per_param(self) -> float:
        return 8 * self.quantized_bytes / max(self.quantized_params, 1)

    @property
    def quantized_ratio(self) -> float:
        """Quantized tensors' bytes over the same tensors in bf16."""
        return self.quantized_bytes / max(BF16_BYTES * self.quantized_params, 1)

    @property
    def tensor_bytes(self) -> int:
        return self.quantized_bytes + self.other_bytes

    @property
    def bf16_bytes(self) -> int:
        return BF16_BYTES * (self.quantized_params + self.other_params)

    @property
    def total_ratio(self) -> float:
        """All tensors' bytes over the whole model in bf16."""
        return self.tensor_bytes / max(self.bf16_bytes, 1)

    def to_dict(self) -> dict:
        return {**asdict(self), "bits_per_param": self.bits_per_param, "quantized_ratio": self.quantized_ratio,
                "total_ratio": self.total_ratio, "bf16_bytes": self.bf16_bytes}

    def text(self) -> str:
        mb = lambda n: f"{n / 1e6:,.2f} MB"
        lines = [
            "| | params | bytes | bits/param | vs bf16 |",
            "|---|---:|---:|---:|---:|",
            f"| quantized weights ({', '.join(self.formats) or 'none'}, {self.quantized_tensors} tensors) "
            f"| {self.quantized_params:,} | {mb(self.quantized_bytes)} | {self.bits_per_param:.3f} "
            f"| {100 * self.quantized_ratio:.1f} % |",
            f"| high-precision tensors | {self.other_params:,} | {mb(self.other_bytes)} "
            f"| {8 * self.other_bytes / max(self.other_params, 1):.3f} "
            f"| {100 * self.other_bytes / max(BF16_BYTES * self.other_params, 1):.1f} % |",
            f"| all tensors | {self.quantized_params + self.other_params:,} | {mb(self.tensor_bytes)} "
            f"| {8 * self.tensor_bytes / max(self.quantized_params + self.other_params, 1):.3f} "
            f"| {100 * self.total_ratio:.1f} % |",
            "",
            f"Folder on disk: {mb(self.folder_bytes)} (bf16 tensors alone would be {mb(self.bf16_bytes)}).",
        ]
        if self.dense_fallbacks:
            lines.append(f"Stored unpacked (no exact encoding found): {', '.join(self.dense_fallbacks)}.")
        return "\n".join(lines)
