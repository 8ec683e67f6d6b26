"""One-line summaries of a generation for stderr."""

from __future__ import annotations

from tidecli.units import per


def generation_line(*, tokens: int, steps: int, wall: float, policy: str | None = None,
                    hit_rate: float | None = None, seed: int | None = None,
                    demo: bool = False) -> str:
    tps, per_step, sps = per(tokens, wall), per(tokens, steps), per(steps, wall)
    line = (f"{tokens} tokens, {steps} steps ({per_step:.2f} tokens/step), "
            f"{tps:.2f} tokens/s, {sps:.2f} steps/s, {wall:.2f} s")
    if policy:
        line += f" · {policy}"
    if hit_rate is not None:
        line += f" · expert hit {hit_rate * 100:.1f}%"
    if seed is not None:
        line += f" · seed {seed}"
    if demo:
        line += " · demo: random weights, for trying the tool"
    return line
