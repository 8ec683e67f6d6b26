"""`tide bench` results as rich tables: the runs, the planner against the measurement, the
bounds and the routing of each workload."""

from __future__ import annotations

from rich.table import Table

from tidecli.units import size_text


def _f(x, fmt: str = "{:.2f}", none: str = "—") -> str:
    return none if x is None else fmt.format(x)


QUALITY_CAVEAT = ("formats against bf16 on the same inputs: KL and top-1 of the logits at masked "
                  "positions, relative error of expert outputs. On a synthetic checkpoint the "
                  "weights are random, not a trained model's: numerical figures, not accuracy.")


def runs_table(report: dict) -> Table:
    """The columns a person compares (fits 120 columns); the rest are in the JSON."""
    formats = "formats" in report
    t = Table(title="tide bench", title_justify="left", header_style="bold")
    cols = ["workload", "policy", "budget", "τ", "misses", "tok/s", "steps/s", "hit %",
            "H2D GB", "× best base", "same tokens"]
    if formats:  # which format, and how much of bf16's output it kept
        cols[1:1] = ["experts"]
        cols.append("= bf16")
    for col in cols:
        t.add_column(col, justify="left" if col in ("workload", "policy", "experts") else "right")
    for r in report["runs"]:
        lead = [r["workload"]] + ([r.get("experts_dtype", "bf16")] if formats else [])
        if r.get("skipped"):
            ahead = _ahead(r)
            t.add_row(*lead, _policy(r), r["budget"], _f(r["tau"], "{}"),
                      _f(r["misses"], "{}") + ahead, "skipped", *[""] * (len(cols) - len(lead) - 5))
            continue
        tau = _f(r["tau"], "{}") + (" plan" if r.get("planned") else "")
        extra = [_f(r.get("token_agreement_bf16"), "{:.1%}")] if formats else []
        misses = _f(r.get("misses_used") or r["misses"], "{}")
        acc = r.get("prefetch_accuracy")  # read ahead: how many of its guesses were used
        misses += _ahead(r) + (f" {acc:.0%} used" if acc is not None else "")
        t.add_row(*lead, _policy(r), r["budget"], tau, misses,
                  _f(r["tokens_per_s"], "{:.1f}"), _f(r["steps_per_s"], "{:.2f}"),
                  _f(100 * r["hit_rate"], "{:.1f}"), _f(r["h2d_gb"], "{:.3f}"),
                  _f(r.get("vs_best_baseline"), "{:.2f}×"), _same(r), *extra)
    t.caption = "more per run (CPU calls, stall, peak VRAM, × resident …): --json or -o FILE"
    return t


def _workload(r: dict) -> str:
    return r["workload"] + (", compiled" if r.get("compiled") else "")


def _policy(r: dict) -> str:
    return r["policy"] + (" compiled" if r.get("compiled") else "")


def quality_table(report: dict) -> Table | None:
    """Each format against bf16: its size, its logits and expert outputs, its tokens."""
    figures = report.get("formats")
    if not figures:
        return None
    t = Table(title="experts' formats against bf16", title_justify="left", header_style="bold")
    for col in ("format", "routed experts", "× smaller", "logits KL", "top-1 same",
                "expert rel. error", "tokens = bf16"):
        t.add_column(col, justify="left" if col == "format" else "right")
    for fmt, q in figures.items():
        runs = [r for r in report["runs"] if r.get("experts_dtype") == fmt
                and r.get("token_agreement_bf16") is not None]
        tokens = min((r["token_agreement_bf16"] for r in runs), default=None)
        t.add_row(q["label"], size_text(q["routed_expert_bytes"]), _f(q["ratio"], "{:.2f}×"),
                  _f(q.get("logits_kl"), "{:.2e}"), _f(q.get("logits_top1"), "{:.1%}"),
                  _f(q["expert_rel_error"], "{:.2e}"), _f(tokens, "{:.1%}"))
    return t


def _same(r: dict) -> str:
    if r["identical"]:
        return "yes"
    share = f"{100 * r['token_agreement']:.0f}% same"
    # CPU-computed experts round differently in bf16; only the GPU-kernel runs promise bits
    return f"[red]NO[/red] ({share})" if r["exact_expected"] else f"no, {share} (CPU bf16)"


def bounds_table(report: dict) -> Table | None:
    if not report["bounds"]:
        return None
    t = Table(title="bounds (tide runs)", title_justify="left", header_style="bold")
    timed = any(b.get("lower_bound_ms") is not None for b in report["bounds"])  # a profile
    formats = "formats" in report
    cols = ["workload", *(("experts",) if formats else ()), "budget", "τ", "misses",
            "tide hit %", "best hit %", "H2D × oracle"]
    for col in cols + (["bound ms", "tide step ms", "× bound"] if timed else []):
        t.add_column(col, justify="left" if col in ("workload", "experts") else "right")
    for b in report["bounds"]:
        lead = [_workload(b)] + ([b.get("experts_dtype", "bf16")] if formats else [])
        row = [*lead, b["budget"], _f(b["tau"], "{}"), _f(b["misses"], "{}"),
               _f(100 * b["tide_hit_rate"], "{:.1f}"), _f(100 * b["best_hit_rate"], "{:.1f}"),
               _f(b["tide_over_oracle"])]
        if timed:
            row += [_f(b.get("lower_bound_ms")), _f(b.get("tide_step_ms")),
                    _f(b.get("tide_over_bound"))]
        t.add_row(*row)
    return t


def _error(ratio: float | None) -> str:
    """measured / predicted → the prediction's error against the measurement."""
    return _f(None if ratio is None else 100 * (1 / ratio - 1), "{:+.0f} %")


def plan_table(report: dict) -> Table | None:
    """Planned tide runs: the plan's predicted step time against the measured one, with the
    published routing statistics it was made with and with the workload's own (which leaves
    the cost model's error alone)."""
    rows = [r for r in report["runs"] if r.get("planned")]
    if not rows:
        return None
    t = Table(title="the planner against the measurement (denoising steps)", title_justify="left",
              header_style="bold")
    for col in ("workload", "budget", "τ", "misses", "calibrated", "measured ms",
                "predicted ms", "error", "own routing ms", "error "):
        t.add_column(col, justify="left" if col == "workload" else "right")
    for r in rows:
        t.add_row(_workload(r), r["budget"], _f(r["tau"], "{}"), _f(r.get("misses_used"), "{}"),
                  "yes" if r.get("plan_calibrated") else "no",
                  _f(r.get("denoise_step_ms")), _f(r["predicted_step_ms"]),
                  _error(r.get("measured_over_predicted")), _f(r.get("predicted_own_routing_ms")),
                  _error(r.get("measured_over_predicted_own_routing")))
    profiles = ", ".join(dict.fromkeys(r.get("plan_profile", "") for r in rows))
    t.caption = (f"profile {profiles}; predicted with the published routing statistics the plan "
                 "was made with, and with this workload's own routing (same B_ℓ and τ)")
    return t


def routing_table(report: dict) -> Table:
    t = Table(title="routing of each workload (per MoE layer and denoising step)",
              title_justify="left", header_style="bold")
    for col in ("workload", "distinct experts", "max", "similarity 1 step",
                "similarity 5 steps", "steps"):
        t.add_column(col, justify="left" if col == "workload" else "right")
    labels = []
    for name, w in report["workloads"].items():
        s = w["routing"]
        labels.append(f"{name}: {w['label']}")
        t.add_row(name, _f(s.get("distinct_per_layer_step"), "{:.1f}"),
                  _f(s.get("distinct_max_per_layer_step"), "{}"),
                  _f(s.get("similarity_lag1"), "{:.3f}"), _f(s.get("similarity_lag5"), "{:.3f}"),
                  str(s.get("steps", 0)))
    t.caption = "; ".join(labels)
    return t


def skipped_lines(report: dict) -> list[str]:
    return [f"skipped {r['workload']} · {r['policy']} · {r['budget']}"
            + (f" · prefetch {r['prefetch']}" if r.get("prefetch") not in (None, "off") else "")
            + f": {r['skipped']}"
            for r in report["runs"] if r.get("skipped")]


def _ahead(r: dict) -> str:
    """A run's read-ahead, and @ the accuracy its guess was set to on a synthetic workload."""
    if r.get("prefetch") not in ("layer", "step"):
        return ""
    g = r.get("guess_accuracy")
    return (" +ahead" if r["prefetch"] == "layer" else " +step") + \
        (f"@{g:.0%}" if g is not None else "")
