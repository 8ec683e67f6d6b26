"""The live diffusion view and its plain-text fallback.

`LiveState.apply(event)` folds step events into plain state; `render_frame(state)` is a pure
function of that state (snapshot-testable at a fixed width); `LiveView` shows frames on a
terminal from rich's own refresh thread, so drawing never adds work per token to the decoding
loop. Finished text scrolls above the frame line by line; the frame holds the open line, the
block being denoised and the status lines.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TextIO

from rich.cells import cell_len
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.text import Text

from tidecli.units import GIB, per

PLACEHOLDER = "░"
EDIT_HOLD_STEPS = 2  # an edited token stays highlighted for this many steps
REFRESH_HZ = 8
STYLES = {"mask": "dim", "new": "bold", "edit": "black on yellow", "text": "", "dead": "dim"}


class TokenText(Protocol):
    def decode(self, ids: list[int]) -> str: ...

    def token_text(self, tid: int) -> str: ...


@dataclass
class LiveState:
    tokens: TokenText
    gen_length: int
    eos_ids: frozenset[int] = frozenset()
    policy: str | None = None
    tau: int | None = None
    pcie_peak_gbps: float | None = None  # the link's peak, when a hardware profile knows it
    gpu: bool = True  # False on a CPU device: GPU hits and PCIe traffic mean nothing there
    vram_budget_bytes: int | None = None
    vram_used_bytes: int | None = None
    # folded from the events
    final_ids: list[int] = field(default_factory=list)  # finished blocks, cut at EOS/gen_length
    final_text: str = ""
    shown: int = 0  # characters of final_text already printed above the frame
    ended: bool = False
    block: int = -1
    step: int = 0
    global_step: int = 0
    elapsed_s: float = 0.0
    tokens_done: int = 0
    forward_ms: float = 0.0
    pieces: list[tuple[str, str]] = field(default_factory=list)  # (text, kind) of the block
    edited_at: dict[int, int] = field(default_factory=dict)  # position → step it was edited
    pairs: int = 0
    gpu_hits: int = 0
    cpu_calls: int = 0
    bytes_h2d: int = 0
    has_experts: bool = False
    _text_cache: dict[int, str] = field(default_factory=dict, repr=False)

    def _text(self, tid: int) -> str:
        t = self._text_cache.get(tid)
        if t is None:
            t = self._text_cache[tid] = self.tokens.token_text(tid)
        return t

    def apply(self, ev: Any, *, vram_used: int | None = None) -> None:
        """Fold one StepEvent in (cheap: one block of token texts from a cache)."""
        if ev.block != self.block:
            self.block = ev.block
            self.edited_at.clear()
        self.step, self.global_step = ev.step, ev.global_step
        # the last block may run past gen_length; those positions are cut from the output
        self.tokens_done = min(ev.tokens_done, self.gen_length)
        self.elapsed_s, self.forward_ms = ev.elapsed_s, ev.forward_ms
        if vram_used is not None:
            self.vram_used_bytes = vram_used
        c = ev.experts
        if c is not None:
            self.has_experts = True
            self.pairs += c.pairs
            self.gpu_hits += c.gpu_hits
            self.cpu_calls += c.cpu_calls
            self.bytes_h2d += c.bytes_h2d
        for pos, _tok in ev.edited:
            self.edited_at[pos] = ev.global_step
        fresh = {pos for pos, _tok in ev.committed}
        first = max(ev.gen_start, ev.block_start)
        limit = ev.gen_start + self.gen_length
        pieces: list[tuple[str, str]] = []
        gen_ids: list[int] = []
        after_eos = False
        for i, tok in enumerate(ev.block_tokens):
            pos = ev.block_start + i
            if pos < first or pos >= limit:
                continue
            gen_ids.append(tok)
            if tok == ev.mask_id:
                pieces.append((PLACEHOLDER, "mask"))
                continue
            if after_eos:
                kind = "dead"  # cut from the output at the first EOS
            elif pos in self.edited_at and \
                    ev.global_step - self.edited_at[pos] < EDIT_HOLD_STEPS:
                kind = "edit"
            else:
                kind = "new" if pos in fresh else "text"
            pieces.append((self._text(tok), kind))
            after_eos = after_eos or tok in self.eos_ids
        self.pieces = pieces
        if ev.block_done and not self.ended:
            for tok in gen_ids:
                if tok in self.eos_ids or len(self.final_ids) >= self.gen_length:
                    self.ended = True
                    break
                self.final_ids.append(tok)
            self.ended = self.ended or len(self.final_ids) >= self.gen_length
            self.final_text = self.tokens.decode(self.final_ids)
            self.pieces = []

    # ---- derived numbers ------------------------------------------------------------------------

    def rates(self) -> dict[str, float]:
        t = self.elapsed_s
        return {
            "tokens_per_s": per(self.tokens_done, t),
            "steps_per_s": per(self.global_step, t),
            "tokens_per_step": per(self.tokens_done, self.global_step),
            "hit_rate": self.gpu_hits / self.pairs if self.pairs else 1.0,
            "cpu_share": per(self.cpu_calls, self.pairs),
            "h2d_gbps": per(self.bytes_h2d, t) / 1e9,
        }


def status_lines(s: LiveState) -> list[str]:
    """The two status lines under the frame, as plain strings."""
    r = s.rates()
    if s.global_step == 0:
        return ["waiting for the first denoising step (prompt prefill)"] + \
            ([s.policy + (f" τ={s.tau}" if s.tau is not None else "")] if s.policy else [])
    first = (f"block {s.block} · step {s.step} · {s.tokens_done} tok · "
             f"{r['tokens_per_s']:.1f} tok/s · {r['steps_per_s']:.1f} steps/s · "
             f"{r['tokens_per_step']:.2f} tok/step · {s.elapsed_s:.1f} s")
    parts = []
    if s.policy:
        parts.append(s.policy + (f" τ={s.tau}" if s.tau is not None else ""))
    if s.has_experts and s.gpu:
        parts.append(f"hit {r['hit_rate'] * 100:.1f}%")
        parts.append(f"CPU {r['cpu_share'] * 100:.1f}%")
    if s.gpu and s.pcie_peak_gbps:
        pct = r["h2d_gbps"] / s.pcie_peak_gbps * 100
        parts.append(f"PCIe {r['h2d_gbps']:.2f}/{s.pcie_peak_gbps:g} GB/s ({pct:.0f}%)")
    elif s.gpu and s.bytes_h2d:
        parts.append(f"PCIe {r['h2d_gbps']:.2f} GB/s")
    if s.vram_used_bytes is not None:
        vram = f"VRAM {s.vram_used_bytes / GIB:.1f}"
        vram += f"/{s.vram_budget_bytes / GIB:.1f} GiB" if s.vram_budget_bytes else " GiB"
        parts.append(vram)
    return [first, " · ".join(parts)] if parts else [first]


def render_frame(s: LiveState) -> RenderableType:
    """Open text line + the current block (placeholders for masks) + the status lines."""
    body = Text(s.final_text[s.shown:])
    for text, kind in s.pieces:
        body.append(text, style=STYLES[kind])
    return Group(body, Text(""), *(Text(line, style="dim") for line in status_lines(s)))


def split_complete_lines(text: str, width: int) -> tuple[list[str], int]:
    """The lines at the front of `text` that are complete when wrapped at `width` cells, and
    how many characters they use; the last, still open line is left out."""
    lines: list[str] = []
    used = 0
    width = max(8, width)
    while True:
        rest = text[used:]
        nl = rest.find("\n")
        head = rest if nl < 0 else rest[:nl]
        if cell_len(head) <= width:
            if nl < 0:
                return lines, used
            lines.append(head)
            used += nl + 1
            continue
        cut, cells = 0, 0
        while cut < len(head) and cells + cell_len(head[cut]) <= width:
            cells += cell_len(head[cut])
            cut += 1
        space = head.rfind(" ", 1, cut + 1)
        if space > 0:  # word wrap; the space becomes the line break
            lines.append(head[:space])
            used += space + 1
        else:  # one word longer than the line
            lines.append(head[:cut])
            used += cut


# ---- views --------------------------------------------------------------------------------------


class LiveView:
    """Frames on a terminal at REFRESH_HZ. Use as a context manager; `update` per event,
    `finish(text)` once with the final text."""

    def __init__(self, state: LiveState, console: Console, *,
                 vram_used: Callable[[], int] | None = None,
                 refresh_per_second: float = REFRESH_HZ) -> None:
        self.state = state
        self.console = console
        self._vram_used = vram_used
        self._lock = threading.Lock()
        self._live = Live(console=console, get_renderable=self._frame, auto_refresh=True,
                          refresh_per_second=refresh_per_second, transient=True,
                          redirect_stdout=False, redirect_stderr=False)

    def _frame(self) -> RenderableType:
        with self._lock:
            return render_frame(self.state)

    def __enter__(self) -> LiveView:
        self._live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._live.stop()

    def update(self, ev: Any) -> None:
        used = self._vram_used() if self._vram_used else None
        lines: list[str] = []
        with self._lock:
            self.state.apply(ev, vram_used=used)
            if ev.block_done:
                s = self.state
                lines, n = split_complete_lines(s.final_text[s.shown:], self.console.width)
                s.shown += n
        if lines:
            # redraw first: printing above the frame re-emits the last frame drawn, which
            # would still hold these lines for a moment
            self._live.refresh()
        for line in lines:  # Live keeps its frame below whatever the console prints
            self.console.print(Text(line), soft_wrap=True)

    def finish(self, text: str) -> None:
        """Stop the frame and print the rest of `text` (the final or the partial reply)."""
        self._live.stop()
        s = self.state
        head = s.final_text[: s.shown]
        rest = text[len(head):] if text.startswith(head) else text[s.shown:]
        self.console.print(Text(rest), soft_wrap=True)


class PlainStream:
    """For a pipe or file: each block's text once it is final, no control codes."""

    def __init__(self, state: LiveState, file: TextIO | None = None) -> None:
        self.state = state
        self.file = file or sys.stdout
        self.written = ""

    def __enter__(self) -> PlainStream:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def _write(self, text: str) -> None:
        # diffusion fills positions out of order, so only finished blocks are written
        new = text[len(self.written):]
        if new:
            self.file.write(new)
            self.file.flush()
            self.written = text

    def update(self, ev: Any) -> None:
        self.state.apply(ev)
        if ev.block_done:
            self._write(self.state.final_text)

    def finish(self, text: str) -> None:
        self._write(text)
        self.file.write("\n")
        self.file.flush()


def make_console(file: TextIO | None = None, **kwargs: Any) -> Console:
    """A console for results (stdout unless `file`)."""
    return Console(file=file, highlight=False, **kwargs)
