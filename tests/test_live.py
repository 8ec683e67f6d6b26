"""The live view from scripted step events: frame snapshots at a fixed width, streaming text."""

from __future__ import annotations

import io
from types import SimpleNamespace

from rich.console import Console

from tidecli.model.counters import LayerCounters
from tidecli.ui.live import (
    LiveState,
    LiveView,
    PlainStream,
    render_frame,
    split_complete_lines,
    status_lines,
)
from tidecli.ui.panels import layer_table, startup_rows

MASK, EOS = 99, 98
WORDS = {1: " the", 2: " tide", 3: " turns", 4: " slowly", 5: " and", 6: " then", 7: " fast",
         8: " again", 9: ".", 10: "\n", EOS: ""}


class FakeTok:
    def token_text(self, tid: int) -> str:
        return WORDS.get(tid, f" w{tid}")

    def decode(self, ids: list[int]) -> str:
        return "".join(self.token_text(t) for t in ids)


def event(*, block, step, gstep, block_start, tokens, committed=(), edited=(), gen_start=5,
          done=False, stats=None, elapsed=None):
    gen = sum(1 for i, t in enumerate(tokens) if block_start + i >= gen_start and t != MASK)
    return SimpleNamespace(
        block=block, step=step, global_step=gstep, block_start=block_start, gen_start=gen_start,
        committed=list(committed), edited=list(edited), block_tokens=list(tokens), mask_id=MASK,
        forward_ms=50.0, elapsed_s=elapsed if elapsed is not None else gstep * 0.5,
        tokens_done=max(0, block_start - gen_start) + gen, block_done=done, experts=stats)


STATS = LayerCounters(gpu_hits=90, cpu_calls=10, bytes_h2d=2_000_000_000)  # 100 pairs


def script() -> list[SimpleNamespace]:
    """Prompt of 5 tokens, blocks of 8: block 0 holds 3 generated positions, block 1 eight."""
    p = [7] * 5  # prompt tokens inside block 0 are never shown
    return [
        event(block=0, step=0, gstep=1, block_start=0, tokens=p + [1, MASK, 3],
              committed=[(5, 1), (7, 3)], stats=STATS),
        event(block=0, step=1, gstep=2, block_start=0, tokens=p + [1, 2, 3], committed=[(6, 2)],
              done=True, stats=STATS),
        event(block=1, step=0, gstep=3, block_start=8,
              tokens=[4, MASK, MASK, 6, MASK, MASK, MASK, MASK], committed=[(8, 4), (11, 6)],
              stats=STATS),
    ]


def state(**kw) -> LiveState:
    base = dict(tokens=FakeTok(), gen_length=64, eos_ids=frozenset({EOS}), policy="tide", tau=4,
                pcie_peak_gbps=25.0, vram_budget_bytes=12 << 30, vram_used_bytes=5 << 30)
    base.update(kw)
    return LiveState(**base)


def frame_text(s: LiveState, width: int = 80) -> str:
    con = Console(width=width, record=True, color_system=None, file=io.StringIO())
    con.print(render_frame(s))
    return con.export_text()


def test_mid_generation_frame_snapshot():
    s = state()
    for ev in script():
        s.apply(ev)
    assert frame_text(s) == (
        " the tide turns slowly░░ then░░░░\n"
        "\n"
        "block 1 · step 0 · 5 tok · 3.3 tok/s · 2.0 steps/s · 1.67 tok/step · 1.5 s\n"
        "tide τ=4 · hit 90.0% · CPU 10.0% · PCIe 4.00/25 GB/s (16%) · VRAM 5.0/12.0 GiB\n")


def test_frame_before_the_first_step_and_without_experts():
    s = state(policy="resident", tau=None, vram_used_bytes=None, pcie_peak_gbps=None)
    assert frame_text(s).splitlines()[-2:] == [
        "waiting for the first denoising step (prompt prefill)", "resident"]
    s.apply(script()[0].__class__(**{**vars(script()[0]), "experts": None}))
    lines = status_lines(s)
    assert lines[-1] == "resident" and "hit" not in lines[-1]


def test_committed_bold_and_edits_highlighted_for_two_steps():
    s = state()
    evs = script()
    for ev in evs[:2]:
        s.apply(ev)
    s.apply(evs[2])
    assert [k for _, k in s.pieces] == ["new", "mask", "mask", "new", "mask", "mask", "mask",
                                        "mask"]
    # 2.1 editing: position 8 rewritten at step 4, still highlighted at step 5, plain at 6
    blk = [5, 1, 1, 6, 1, 1, 1, 1]
    s.apply(event(block=1, step=1, gstep=4, block_start=8, tokens=blk, edited=[(8, 5)],
                  committed=[(9, 1), (10, 1), (12, 1), (13, 1), (14, 1), (15, 1)]))
    assert s.pieces[0] == (" and", "edit") and s.pieces[1][1] == "new"
    s.apply(event(block=1, step=2, gstep=5, block_start=8, tokens=blk))
    assert s.pieces[0][1] == "edit" and s.pieces[1][1] == "text"
    s.apply(event(block=1, step=3, gstep=6, block_start=8, tokens=blk))
    assert s.pieces[0][1] == "text"
    con = Console(width=80, record=True, color_system="truecolor", file=io.StringIO())
    s.apply(event(block=1, step=4, gstep=7, block_start=8, tokens=blk, edited=[(9, 2)]))
    con.print(render_frame(s))
    assert "\x1b[" in con.export_text(styles=True)


def test_eos_and_gen_length_cut_the_final_text():
    s = state()
    s.apply(event(block=0, step=0, gstep=1, block_start=0, tokens=[7] * 5 + [1, EOS, 3],
                  done=True))
    assert s.final_ids == [1] and s.ended and s.final_text == " the"
    s = state(gen_length=2)
    s.apply(event(block=0, step=0, gstep=1, block_start=0, tokens=[7] * 5 + [1, 2, MASK]))
    assert len(s.pieces) == 2 and s.tokens_done == 2  # positions past gen_length are not drawn
    s.apply(event(block=0, step=1, gstep=2, block_start=0, tokens=[7] * 5 + [1, 2, 3],
                  done=True))
    assert s.final_text == " the tide" and s.ended


def test_after_eos_tokens_are_dimmed_in_the_block():
    s = state()
    s.apply(event(block=1, step=0, gstep=1, block_start=8, tokens=[1, EOS, 2, MASK] + [1] * 4,
                  gen_start=5))
    kinds = [k for _, k in s.pieces]
    assert kinds[:4] == ["text", "text", "dead", "mask"]


def test_split_complete_lines():
    assert split_complete_lines("short", 20) == ([], 0)
    assert split_complete_lines("one\ntwo", 20) == (["one"], 4)
    lines, used = split_complete_lines("aaaa bbbb cccc dddd eeee", 10)
    assert lines == ["aaaa bbbb", "cccc dddd"] and "aaaa bbbb cccc dddd eeee"[used:] == "eeee"
    lines, used = split_complete_lines("x" * 25, 10)
    assert lines == ["x" * 10, "x" * 10] and used == 20


def test_plain_stream_writes_finished_blocks_without_control_codes():
    out = io.StringIO()
    view = PlainStream(state(), out)
    with view:
        evs = script()
        view.update(evs[0])
        assert out.getvalue() == ""  # block 0 is not final yet: positions fill out of order
        view.update(evs[1])
        assert out.getvalue() == " the tide turns"
        view.update(evs[2])
        view.finish(" the tide turns slowly")
    assert out.getvalue() == " the tide turns slowly\n"
    assert "\x1b" not in out.getvalue()


def test_live_view_on_a_terminal_prints_the_final_text():
    buf = io.StringIO()
    con = Console(file=buf, width=40, force_terminal=True, color_system=None)
    s = state()
    with LiveView(s, con, vram_used=lambda: 3 << 30, refresh_per_second=20) as view:
        for ev in script():
            view.update(ev)
        view.finish(" the tide turns slowly and then")
    assert s.vram_used_bytes == 3 << 30
    assert buf.getvalue().rstrip().endswith("the tide turns slowly and then")


def test_generate_on_a_pipe_has_no_control_codes(tiny_ckpt, capsys):
    from tidecli.cli import main

    try:
        main(["generate", "Hello", "-m", str(tiny_ckpt), "--gen-length", "40"])
    except SystemExit as e:
        assert e.code == 0
    cap = capsys.readouterr()
    assert cap.out.strip() and cap.out.endswith("\n")
    assert "\x1b" not in cap.out and "\x1b" not in cap.err


def test_startup_rows_print_what_is_present():
    from tidecli.experts.info import RuntimeInfo
    from tidecli.memory import DeviceMemory
    from tidecli.planner.plan import PlanSummary
    from tidecli.runtime.engine import EngineInfo

    plan = PlanSummary(profile="", tau=4, misses="stream", experts_per_layer={},
                       predicted_step_ms=1.0, predicted_steps_per_s=12.0,
                       predicted_tokens_per_s=41.5, calibrated=False)
    rows = dict(startup_rows(EngineInfo(
        model="/m/demo", device="cuda", dtype="bfloat16",
        runtime=RuntimeInfo(policy="tide", kernel="grouped_mm", tau=4,
                            experts_per_layer={1: 64, 2: 64}),
        memory=DeviceMemory(budget=12 << 30, dense=2 << 30, kv_cache=1 << 30, workspace=0,
                            expert_bytes=6 << 20, num_experts=256, num_moe_layers=2),
        plan=plan)))
    assert rows["experts resident"] == "64 per MoE layer" and rows["τ"] == "4"
    assert rows["predicted"] == "41.5 tok/s, 12.0 steps/s"
    assert rows["VRAM budget"].startswith("12.00 GiB")
    assert dict(startup_rows(EngineInfo(runtime=RuntimeInfo(policy="resident")))) == \
        {"policy": "resident"}
    rows = dict(startup_rows(EngineInfo(model="/m/demo", device="cpu", dtype="bfloat16",
                                        cpu_threads=3, demo=True,
                                        runtime=RuntimeInfo(policy="resident"))))
    assert rows["device"] == "cpu · bfloat16 · 3 threads"
    one = EngineInfo(device="cpu", dtype="float32", cpu_threads=1,
                     runtime=RuntimeInfo(policy="resident"))
    assert dict(startup_rows(one))["device"] == "cpu · float32 · 1 thread"
    assert rows["demo"].startswith("random weights, for trying the tool")


def test_layer_table_renders_hit_and_cpu_share():
    con = Console(width=100, record=True, color_system=None, file=io.StringIO())
    con.print(layer_table({"2": {"gpu_hits": 30, "fetched_calls": 0, "cpu_calls": 10,
                                 "promotions": 3, "bytes_h2d": 3 << 20, "stall_ms": 1.5}}))
    text = con.export_text()
    assert "75.0%" in text and "25.0%" in text and "███████" in text


def test_generate_ctrl_c_prints_the_prefix_and_exits_130(tiny_ckpt, capsys, monkeypatch):
    import tidecli.commands.generate as gen
    from tidecli.cli import main

    class Pressed(gen.SoftInterrupt):  # Ctrl-C already pressed: stop after the first step
        def is_set(self) -> bool:
            return True

    monkeypatch.setattr(gen, "SoftInterrupt", Pressed)
    try:
        main(["generate", "Hello", "-m", str(tiny_ckpt), "--gen-length", "64"])
    except SystemExit as e:
        assert e.code == 130
    cap = capsys.readouterr()
    assert "interrupted" in cap.err and "\x1b" not in cap.out
