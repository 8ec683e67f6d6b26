"""--compile: the step's layer functions through torch.compile.

On the CPU the functions are traced whole with the aot_eager backend (the same aten ops run, so
the step must give the eager step's logits bitwise, and tracing must depend on shapes, not on
layers); on a GPU with Inductor every policy must give the compiled resident run's tokens."""

import pytest
import torch

from tidecli.model.moe import ForwardInfo
from tidecli.model.parts import EAGER, compiled
from tidecli.model.program import StepProgram, StepPrograms
from tidecli.runtime.devices import compile_missing

from helpers import cuda_model, decode_cuda, load_model, tide, user_error


def _step(model, fns, ids, start=0):
    cache = model.cache_for(start + 64)
    prog = StepProgram(model, cache, 32, capture=False, fns=fns)
    return [prog.run(ids, start, ForwardInfo("step")).clone() for _ in range(2)]


@pytest.mark.parametrize("fixture", ["tiny_ckpt", "tiny22_ckpt"])
def test_traced_step_gives_the_eager_logits_bitwise(fixture, request):
    from torch._dynamo.utils import counters

    model, _ = load_model(request.getfixturevalue(fixture))
    ids = list(range(5, 37))
    with torch.inference_mode():
        eager = _step(model, EAGER, ids)
        torch._dynamo.reset()
        counters.clear()
        fns = compiled("aot_eager")
        first = _step(model, fns, ids)
        graphs = counters["stats"]["unique_graphs"]
        later = _step(model, fns, list(range(40, 72)), start=32)  # another block, same shapes
    assert torch.equal(eager[0], first[0]) and torch.equal(first[0], first[1])
    # one graph per function and shape (attention in/out, routing, the dense and the shared
    # FFN, the two residuals), whatever the number of layers; a later block adds none
    assert 0 < graphs <= 8, graphs
    assert counters["stats"]["unique_graphs"] == graphs
    assert later[0].shape == first[0].shape


def test_compile_needs_a_gpu_and_says_so():
    assert "CUDA" in compile_missing(torch.device("cpu"))


def test_compile_on_the_cpu_is_one_note_and_the_step_runs(tiny_ckpt, capsys):
    rc, out, err = tide(["generate", "hi", "-m", str(tiny_ckpt), "--device", "cpu",
                         "--compile", "on", "--gen-length", "8"], capsys)
    assert rc == 0, err
    assert "--compile on: compiling the step needs a CUDA device; the step runs uncompiled" \
        in err
    assert "Traceback" not in err


def test_bad_compile_value_is_one_line(tiny_ckpt, capsys):
    user_error(["generate", "hi", "-m", str(tiny_ckpt), "--compile", "max"], capsys,
               "unknown --compile 'max'", hint="use auto, on or off")


def test_bench_compile_axis_on_the_cpu_skips_with_why(tiny_ckpt, capsys, tmp_path):
    out = tmp_path / "b.json"
    rc, _, err = tide(["bench", "-m", str(tiny_ckpt), "--device", "cpu", "--policies",
                       "resident", "--workloads", "model", "--gen-length", "8",
                       "--compile", "off,on", "-o", str(out)], capsys)
    assert rc == 0, err
    import json

    runs = json.loads(out.read_text())["runs"]
    assert [r.get("compiled", False) for r in runs] == [False, True]
    assert not runs[0].get("skipped")
    assert "needs a CUDA device" in runs[1]["skipped"]


def test_bench_compile_values_are_checked(tiny_ckpt, capsys):
    user_error(["bench", "-m", str(tiny_ckpt), "--compile", "off,fast"], capsys,
               "unknown --compile 'fast'", hint="use on or off")
    user_error(["plan", "-m", str(tiny_ckpt), "--compile", "fast"], capsys,
               "unknown --compile 'fast'", hint="use on or off")


@pytest.mark.gpu
def test_compiled_steps_every_policy_gives_the_compiled_resident_tokens(tiny_ckpt):
    """Inductor's kernels inside the captured step; lru, tide with streamed and with gpu
    misses give the compiled resident run's tokens, replayed twice."""
    if compile_missing(torch.device("cuda")):
        pytest.skip(compile_missing(torch.device("cuda")))
    from tidecli.experts.offload import OffloadRuntime
    from tidecli.experts.policies import LruPolicy, TideOptions, TidePolicy
    from tidecli.experts.store import HostExpertStore
    from tidecli.experts.stream import StreamRuntime

    fns = compiled()
    prompt = list(range(2000, 2045))

    def tokens(runtime=None):
        m = StepPrograms(cuda_model(tiny_ckpt, runtime), capture=True, fns=fns)
        out = [decode_cuda(m, prompt, gen_length=96).token_ids for _ in range(2)]
        assert out[0] == out[1]
        assert all(p.graphs for p in m._programs.values())
        if hasattr(m.experts, "close"):
            m.experts.close()
        return out[0]

    ref = tokens()
    for policy in (LruPolicy, lambda: TidePolicy(TideOptions(tau=1))):
        def make(ckpt, policy=policy):
            return StreamRuntime(ckpt.config, HostExpertStore(ckpt, pin=True),
                                 {layer: 6 for layer in ckpt.config.moe_layers}, policy(),
                                 device=torch.device("cuda"), dtype=torch.bfloat16)
        assert tokens(make) == ref

    def gpu_misses(ckpt):  # host phases between the device segments: one graph per segment
        return OffloadRuntime(ckpt.config, HostExpertStore(ckpt, pin=True),
                              {layer: 6 for layer in ckpt.config.moe_layers},
                              TidePolicy(TideOptions(tau=1)), device=torch.device("cuda"),
                              dtype=torch.bfloat16, misses="gpu")
    assert tokens(gpu_misses) == ref


def test_bench_keeps_compiled_runs_apart(tiny_ckpt, capsys, tmp_path, monkeypatch):
    """Where the step compiles, each mode has its own reference tokens, routing trace, bounds
    and ratios. (The CPU engine runs its steps eager whatever the set: this checks the bench's
    bookkeeping, the GPU test above the compiled step.)"""
    import json

    from tidecli.runtime import engine as engine_mod

    monkeypatch.setattr(engine_mod, "compile_missing", lambda device: None)
    monkeypatch.setattr(engine_mod, "compiled", lambda: compiled("aot_eager"))
    out = tmp_path / "b.json"
    rc, _, err = tide(["bench", "-m", str(tiny_ckpt), "--device", "cpu", "--policies",
                       "resident,tide", "--experts-per-layer", "8", "--tau", "2",
                       "--workloads", "model", "--gen-length", "8", "--compile", "off,on",
                       "-o", str(out)], capsys)
    assert rc == 0, err
    report = json.loads(out.read_text())
    runs = report["runs"]
    assert [(r["policy"], r.get("compiled", False)) for r in runs] == [
        ("resident", False), ("tide", False), ("resident", True), ("tide", True)]
    assert all(r["identical"] and r["vs_resident"] is not None for r in runs)
    assert all(r["eager_over_compiled_step"] > 0 for r in runs if r.get("compiled"))
    assert all("eager_over_compiled_step" not in r for r in runs if not r.get("compiled"))
    assert set(report["workloads"]) == {"model", "model, compiled"}
    assert [b.get("compiled", False) for b in report["bounds"]] == [False, True]
    assert "compiled" in err  # the tables mark the compiled rows


def test_a_compile_that_fails_is_one_line_with_what_to_do(tiny_ckpt):
    """Inductor can fail on a user's machine (a Triton or compiler error): the step says so in
    one line and how to run without it, instead of an engine crash."""
    from tidecli.errors import TideError

    def broken(gm, example_inputs):
        raise RuntimeError("no working C compiler")

    model, _ = load_model(tiny_ckpt)
    torch._dynamo.reset()
    runner = StepPrograms(model, capture=False, fns=compiled(broken))
    cache = model.cache_for(64)
    ids = torch.arange(5, 37)
    with pytest.raises(TideError, match="compiling the step failed") as exc:
        runner.block_forward(ids, 0, cache, ForwardInfo("step"), ids_host=ids.tolist())
    assert "--compile off" in exc.value.hint
    assert "no working C compiler" in exc.value.message
    assert not runner._programs  # nothing half-made is kept
    torch._dynamo.reset()
    # eager programs raise what they raise: only compile failures become this line
    runner = StepPrograms(model, capture=False, fns=EAGER)
    out = runner.block_forward(ids, 0, cache, ForwardInfo("step"), ids_host=ids.tolist())
    assert out.shape[0] == 32


def test_a_compile_that_fails_under_auto_runs_eager_with_a_note(tiny_ckpt):
    """--compile auto (chat and serve): a failing compile turns the programs eager, says so
    once, and the step gives the eager step's logits."""
    def broken(gm, example_inputs):
        raise RuntimeError("no working C compiler")

    model, _ = load_model(tiny_ckpt)
    cache = model.cache_for(64)
    ids = torch.arange(5, 37)
    info = ForwardInfo("step")
    eager = StepPrograms(model, capture=False, fns=EAGER).block_forward(
        ids, 0, cache, info, ids_host=ids.tolist()).clone()
    torch._dynamo.reset()
    notes: list[str] = []
    runner = StepPrograms(model, capture=False, fns=compiled(broken), fallback=EAGER,
                          notices=notes)
    out = runner.block_forward(ids, 0, cache, info, ids_host=ids.tolist())
    torch._dynamo.reset()
    assert torch.equal(out, eager)
    assert runner.fns is EAGER and runner.fallback is None
    assert len(notes) == 1 and "no working C compiler" in notes[0] and "uncompiled" in notes[0]


def test_compile_auto_where_it_cannot_run_is_silent_and_eager(tiny_ckpt):
    from tidecli.runtime.engine import Engine
    from tidecli.runtime.options import engine_options

    engine = Engine(engine_options(model=str(tiny_ckpt), device="cpu", compile="auto"),
                    quiet=True)
    assert not engine.compiled and engine.opts.load.compile == "off"
    assert not any("compile" in n for n in engine.notices)


def test_compile_defaults_chat_and_serve_auto_generate_and_bench_off():
    from tidecli.commands.options import engine_options_of

    base = {"model": None, "device": "auto", "dtype": "auto", "graphs": True, "policy": "auto",
            "tau": None, "stall_refresh": False, "cold_start": False,
            "refresh_last_step": False, "misses": "auto", "cpu_threads": 0,
            "popularity_trace": None, "profile": None, "vram": None, "ram": None,
            "experts_per_layer": None, "block_length": 32, "threshold": None, "compile": None}
    assert engine_options_of(base).load.compile == "off"
    assert engine_options_of(base, compile_default="auto").load.compile == "auto"
    assert engine_options_of(dict(base, compile="on"),
                             compile_default="auto").load.compile == "on"


def test_bench_and_plan_take_no_compile_auto(tiny_ckpt, capsys):
    user_error(["bench", "-m", str(tiny_ckpt), "--compile", "auto"], capsys,
               "bench compares the modes it is given: --compile auto is not one")
    user_error(["plan", "-m", str(tiny_ckpt), "--compile", "auto"], capsys,
               "a plan is for compiled steps or eager ones: --compile auto is neither")


def test_compile_ahead_runs_one_step_then_starts_the_counters_afresh(capsys):
    """chat and serve compile at start-up (one step of a short prompt), not in the first
    reply; an engine whose steps run eager skips it."""
    from types import SimpleNamespace

    from tidecli.commands.setup import compile_ahead
    from tidecli.decode.settings import DecodeSettings

    calls: dict = {"resets": 0}

    class Dec:
        def steps(self):
            for i in range(3):
                calls["steps"] = i + 1
                yield i

    def decoder(ids, settings):
        calls["settings"] = settings
        return Dec()

    def reset():
        calls["resets"] += 1

    eng = SimpleNamespace(compiled=True, prompt_ids=lambda text: [1, 2], decoder=decoder,
                          runtime=SimpleNamespace(reset_stats=reset), notices=["a note"])
    compile_ahead(eng, DecodeSettings(gen_length=512, block_length=32, temperature=0.7))
    s = calls["settings"]
    assert calls["steps"] == 1  # one step compiles; the rest of the block is not decoded
    assert s.gen_length == 32 and s.temperature == 0.0
    assert calls["resets"] == 1 and eng.notices == []
    err = capsys.readouterr().err
    assert "note: a note" in err and "step compiled in" in err
    calls.clear()
    compile_ahead(SimpleNamespace(compiled=False), DecodeSettings())
    assert not calls


def test_inductors_tf32_advice_is_not_shown():
    """Compiled steps keep fp32 matmuls in fp32; Inductor's advice to turn TF32 on is not a
    line the user can act on."""
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        compiled("aot_eager")  # its filter goes in front of the one above
        warnings.warn("TensorFloat32 tensor cores for float32 matrix multiplication available",
                      stacklevel=1)
        warnings.warn("another warning", stacklevel=1)
    assert [str(w.message) for w in seen] == ["another warning"]
