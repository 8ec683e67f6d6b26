"""Formats of the routed experts' bytes (`--experts-dtype`): bf16 as in the checkpoint, or one of
three compressed (lossy) formats, and where each part of a compressed expert row lies.

A row is still one expert, so one copy moves one expert; a compressed row is plain bytes
(`uint8`). Both matrices of an expert are quantized as a kernel reads them, [N outputs, K inputs]
with K contiguous: gate_up [2I, H] (gate rows, then up rows) and down [H, I]. Each part starts at
a fixed, aligned byte offset, so a GPU kernel reads a part of any row in place:

    [gate_up.q | down.q | gate_up.scale | down.scale | gate_up.min | down.min]

- int8: symmetric, one fp32 scale per output channel: w ≈ q · s[n].
- fp8: e4m3 values with one fp32 scale per 128×128 block (the published FP8 checkpoints'
  `weight_scale_inv` layout): w ≈ q · s[n // 128, k // 128].
- int4: groups of 128 inputs (the whole input when it is shorter), fp16 scale and minimum per
  group: w ≈ q · s + m, q in 0..15. Two values per byte: within a group, byte j holds input j
  (low nibble) and input j + 64 (high nibble), so a kernel's two halves of a group are two
  contiguous slices.

No torch here: the planner and the commands size things with it.
"""

from __future__ import annotations

from dataclasses import dataclass

from tidecli.errors import TideError

FORMATS = ("bf16", "int8", "fp8", "int4")
COMPRESSED = ("int8", "fp8", "int4")
# bump when a layout or the quantization changes: compressed caches are keyed by it
FORMAT_VERSION = 1
INT4_GROUP = 128
FP8_BLOCK = 128
ALIGN = 64  # bytes: every part (and the row) starts on a 64-byte boundary
FP8_MAX = 448.0  # largest finite e4m3 value

_ITEMSIZE = {"int8": 1, "uint8": 1, "float8_e4m3fn": 1, "float16": 2, "float32": 4}


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass(frozen=True)
class Part:
    """One tensor inside a row: its byte offset, shape (per expert) and element type."""

    offset: int
    shape: tuple[int, ...]
    dtype: str  # a torch dtype name

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * _ITEMSIZE[self.dtype]


@dataclass(frozen=True)
class MatrixLayout:
    """One quantized matrix [n, k] of an expert: its values, scales and (int4) minima."""

    n: int
    k: int
    group: int  # int4: inputs per group; fp8: the block edge; int8: k (one scale per row)
    q: Part
    scale: Part
    minimum: Part | None = None


@dataclass(frozen=True)
class ExpertFormat:
    """The byte layout of one routed expert in format `name` for a model's sizes."""

    name: str
    hidden: int
    inter: int
    row_bytes: int  # one expert; for bf16 the checkpoint's 2 bytes per weight
    gate_up: MatrixLayout | None = None  # None for bf16
    down: MatrixLayout | None = None

    @property
    def compressed(self) -> bool:
        return self.name != "bf16"

    @property
    def ratio(self) -> float:
        """How many of these rows fit in the bytes of one bf16 expert."""
        return 6 * self.hidden * self.inter / self.row_bytes

    def label(self) -> str:
        """How the format is shown to the user: compressed formats say they are lossy."""
        if not self.compressed:
            return "bf16"
        return f"{self.name} (lossy, {self.ratio:.1f}× smaller)"


def _group(fmt: str, k: int) -> int:
    """int4: inputs per group; fp8: the block edge; int8: the whole row (one scale per row)."""
    if fmt == "int8":
        return k
    if fmt == "fp8":
        return FP8_BLOCK
    if k % INT4_GROUP == 0:
        return INT4_GROUP
    if k in (32, 64):  # small models: one group per row (a kernel's tile is a power of 2)
        return k
    raise TideError(f"int4 needs the expert's input sizes to be multiples of {INT4_GROUP} "
                    f"(or 32 or 64), got {k}",
                    "use --experts-dtype int8 or fp8 for this model")


_Q_DTYPE = {"int8": "int8", "fp8": "float8_e4m3fn", "int4": "uint8"}
_SCALE_DTYPE = {"int8": "float32", "fp8": "float32", "int4": "float16"}


def _scale_shape(fmt: str, n: int, k: int, group: int) -> tuple[int, ...]:
    if fmt == "int8":
        return (n,)
    if fmt == "fp8":
        return (-(-n // group), -(-k // group))
    return (n, k // group)


def expert_format(name: str, *, hidden: int, inter: int) -> ExpertFormat:
    """The layout of format `name` for experts of these sizes (TideError for an unknown name)."""
    name = parse_format(name)
    if name == "bf16":
        return ExpertFormat(name, hidden, inter, 3 * hidden * inter * 2)
    shapes = {"gate_up": (2 * inter, hidden), "down": (hidden, inter)}
    groups = {m: _group(name, k) for m, (_n, k) in shapes.items()}
    at = 0

    def part(shape: tuple[int, ...], dtype: str) -> Part:
        nonlocal at
        p = Part(at, shape, dtype)
        at = _align(at + p.nbytes)
        return p

    q = {m: part((n, k // 2 if name == "int4" else k), _Q_DTYPE[name])
         for m, (n, k) in shapes.items()}
    scale = {m: part(_scale_shape(name, n, k, groups[m]), _SCALE_DTYPE[name])
             for m, (n, k) in shapes.items()}
    minimum = {m: part((n, k // groups[m]), "float16") for m, (n, k) in shapes.items()} \
        if name == "int4" else {}
    layouts = {m: MatrixLayout(n=n, k=k, group=groups[m], q=q[m], scale=scale[m],
                               minimum=minimum.get(m)) for m, (n, k) in shapes.items()}
    return ExpertFormat(name, hidden, inter, _align(at), layouts["gate_up"], layouts["down"])


LEAST_LOSSY_FIRST = ("int8", "int4")  # fp8 holds as many experts as int8, with more error


def ram_hint(*, hidden: int, inter: int, experts: int, budget: int) -> str:
    """When bf16 experts do not fit `budget` bytes of RAM: the least lossy format whose
    `experts` would, as a clause for the disk tier's note ("" when none would)."""
    for name in LEAST_LOSSY_FIRST:
        try:
            row = expert_format(name, hidden=hidden, inter=inter).row_bytes
        except TideError:  # int4 needs sizes this model does not have
            continue
        if experts * row <= budget:
            return (f"; --experts-dtype {name} would keep every expert in RAM (lossy: README, "
                    "\"Fitting bigger models\")")
    return ""


def parse_format(name: str) -> str:
    value = (name or "").strip().lower()
    if value == "bfloat16":
        value = "bf16"
    if value not in FORMATS:
        raise TideError(f"unknown --experts-dtype {name!r}", f"use {', '.join(FORMATS)}")
    return value


def parse_formats(text: str) -> list[str]:
    """A comma list of formats (tide bench), in the order given, without repeats."""
    out: list[str] = []
    for part in text.split(","):
        if part.strip():
            f = parse_format(part)
            if f not in out:
                out.append(f)
    if not out:
        raise TideError("--experts-dtype names no format", "e.g. --experts-dtype bf16,int4")
    return out


def is_compressed(fmt: ExpertFormat | None) -> bool:
    """A compressed format (None stands for the checkpoint's own rows)."""
    return fmt is not None and fmt.compressed


def compressed_name(fmt: ExpertFormat | None) -> str | None:
    """The format's name when it is a compressed one, else None (what runtimes report)."""
    return fmt.name if is_compressed(fmt) else None


def expert_row_bytes(name: str, *, hidden: int, inter: int, dtype_bytes: int = 2) -> int:
    """Bytes of one expert in format `name`; bf16 experts take `dtype_bytes` per weight (a CPU
    device computing in fp32 holds them as 4)."""
    if parse_format(name) == "bf16":
        return 3 * hidden * inter * dtype_bytes
    return expert_format(name, hidden=hidden, inter=inter).row_bytes
