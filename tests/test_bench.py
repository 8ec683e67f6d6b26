"""tide bench: the oracle against brute force, routing statistics, the synthetic workload, the
harness on a tiny model, ratios and the JSON schema."""

import json
import random

import numpy as np
import pytest
import torch

from tidecli.bench.harness import Bench
from tidecli.bench.oracle import belady_loads, best_hit_rate, brute_force_loads, routing_stats
from tidecli.bench.report import add_ratios
from tidecli.bench.spec import BenchSpec, run_points

from helpers import bench_runs


@pytest.mark.parametrize("seed", range(12))
def test_belady_matches_brute_force_on_small_traces(seed):
    rng = random.Random(seed)
    experts, steps, slots = rng.randint(3, 6), rng.randint(3, 7), rng.randint(1, 3)
    used = [set(rng.sample(range(experts), rng.randint(1, experts))) for _ in range(steps)]
    assert belady_loads(used, slots) == brute_force_loads(used, slots)


def test_belady_simple_cases():
    assert belady_loads([{1, 2}, {1, 2}, {1, 2}], 2) == 2  # loaded once, kept
    assert belady_loads([{1, 2}, {1, 2}], 1) == 3  # one stays, the other is fetched again
    assert belady_loads([{1}, {2}, {1}], 1) == 2  # 2 streams through, 1 stays
    assert belady_loads([{1}, {2}, {1}], 2) == 2


def test_best_hit_rate():
    c = np.zeros((2, 1, 4))
    c[0, 0] = [5, 3, 1, 1]
    c[1, 0] = [0, 0, 6, 4]
    assert best_hit_rate(c, [1]) == pytest.approx((5 + 6) / 20)
    assert best_hit_rate(c, [4]) == 1.0


def test_routing_stats_on_a_known_trace():
    c = np.zeros((4, 1, 8))
    c[:, 0, :3] = [4, 2, 2]
    c[3, 0] = [0, 0, 0, 0, 4, 2, 2, 0]  # a new block with other experts
    s = routing_stats(c, [0, 0, 0, 1])
    assert s["distinct_per_layer_step"] == 3
    assert s["similarity_lag1"] == pytest.approx(1.0)  # across blocks not compared
    assert s["steps"] == 4


def test_synthetic_routing_has_the_published_statistics():
    from tidecli.bench.synthetic import SyntheticRouting
    from tidecli.model.config import config_from_dict
    from tidecli.model.moe import ForwardInfo
    from tidecli.model.presets import preset_config

    cfg = config_from_dict(preset_config("mini"))
    counts, blocks = [], []
    r = SyntheticRouting(cfg, device=torch.device("cpu"))
    for b in range(6):
        for step in range(12):
            r.begin(ForwardInfo("step", block=b, step=step), 32)
            ids = np.stack([r.ids(j, 32).numpy() for j in range(cfg.num_moe_layers)])
            assert all(len(set(row)) == 8 for layer in ids for row in layer)
            counts.append(np.stack([np.bincount(x.ravel(), minlength=256) for x in ids]))
            blocks.append(b)
    s = routing_stats(np.stack(counts), blocks)
    assert 62 <= s["distinct_per_layer_step"] <= 80
    assert 0.975 <= s["similarity_lag1"] <= 0.995
    assert 0.93 <= s["similarity_lag5"] <= 0.975
    # the same (block, step) gives the same routing, whatever happened in between
    r2 = SyntheticRouting(cfg, device=torch.device("cpu"))
    r2.begin(ForwardInfo("step", block=5, step=11), 32)
    assert torch.equal(r2.ids(0, 32), r.ids(0, 32))


def test_run_points_cover_every_policy_budget_and_tau():
    spec = BenchSpec(policies=["resident", "lru", "tide"], vram=[10.0], experts=[8],
                     workloads=["model", "synthetic"], taus=[2, 4])
    pts = run_points(spec)
    assert len(pts) == 2 * (1 + 2 * (1 + 2))
    assert {p.budget for p in pts} == {"all", "10 GiB", "B=8"}


def test_ratios_against_the_best_baseline_and_resident():
    runs = [
        {"workload": "m", "policy": "resident", "budget": "all", "steps_per_s": 20.0},
        {"workload": "m", "policy": "lru", "budget": "B=4", "steps_per_s": 2.0},
        {"workload": "m", "policy": "static", "budget": "B=4", "steps_per_s": 4.0},
        {"workload": "m", "policy": "tide", "budget": "B=4", "steps_per_s": 10.0},
        {"workload": "m", "policy": "tide", "budget": "B=8", "skipped": "x"},
    ]
    add_ratios(runs)
    assert runs[3]["vs_best_baseline"] == 2.5 and runs[3]["vs_resident"] == 0.5
    assert runs[1]["vs_best_baseline"] == 0.5
    assert runs[0]["vs_best_baseline"] is None and runs[0]["vs_resident"] == 1.0
    assert "vs_resident" not in runs[4]


RUN_KEYS = {"workload", "policy", "budget", "vram_gib", "tau", "misses", "misses_used",
            "experts_per_layer", "tokens",
            "steps", "wall_s", "tokens_per_s", "steps_per_s", "tokens_per_step", "step_ms",
            "denoise_step_ms", "first_step_s", "prefill_ms", "outside_steps_ms", "hit_rate",
            "cpu_share", "cpu_calls", "fetched_calls", "h2d_gb",
            "promotions",
            "stall_ms", "measured_parts_ms", "step_hit_rate", "step_cpu_calls",
            "step_promotions", "prefetch", "guess_accuracy", "guess_misses", "prefetched",
            "prefetch_accuracy",
            "wasted_h2d_gb", "prefetch_off_forwards",
            "peak_vram_gib", "vram_at_start_gib", "identical", "exact_expected",
            "token_agreement",
            "vs_best_baseline", "vs_resident"}
BOUND_KEYS = {"workload", "budget", "tau", "oracle_h2d_gb", "tide_h2d_gb", "tide_over_oracle",
              "best_hit_rate", "tide_hit_rate"}


def test_harness_runs_every_policy_with_identical_tokens(tiny_ckpt):
    from tidecli.runtime.engine import Engine
    from tidecli.runtime.options import engine_options

    eng = Engine(engine_options(model=str(tiny_ckpt), device="cpu"), build_runtime=False,
                 quiet=True)
    spec = BenchSpec(policies=["resident", "lru", "static", "tide"], experts=[6],
                     workloads=["model", "synthetic"], taus=[2, 4],
                     prompts=["Hello there"], gen_length=40, warmup_tokens=8)
    eng.host_store()
    report = Bench(eng, spec).run()
    eng.close()
    assert report["schema"] == "tide-bench/1"
    assert len(report["runs"]) == 2 * 5
    for r in report["runs"]:
        assert set(r) == RUN_KEYS, r
        assert r["identical"], r
        assert r["tokens"] > 0 and r["steps"] > 0
        # a denoising step alone leaves out the prompt's prefill and the commit passes
        assert 0 < r["denoise_step_ms"] <= r["step_ms"]
        # per prompt: the prefill (and set-up) before the first step, then that step; the
        # commit passes and the decoder's own work outside the steps: the wall, split
        assert 0 < r["prefill_ms"] < 1000 * r["first_step_s"]
        assert r["outside_steps_ms"] >= -0.01
        assert abs(r["prefill_ms"] + r["outside_steps_ms"] + r["denoise_step_ms"] * r["steps"]
                   - 1000 * r["wall_s"]) < 1.0  # one prompt, so the split adds up to the wall
        parts = r["measured_parts_ms"]
        assert set(parts) == {"copy_ms", "cpu_ms", "stall_ms", "disk_wait_ms"}
        assert all(v >= 0 for v in parts.values())
        # the parts and step_* counters are the denoising steps' alone: within the run's
        assert 0 <= r["step_hit_rate"] <= 1
        assert r["step_cpu_calls"] * r["steps"] <= r["cpu_calls"] + 1e-6
        assert r["step_promotions"] * r["steps"] <= r["promotions"] + 1e-6
        if r["step_cpu_calls"]:  # misses computed on the CPU during the steps were timed
            assert parts["cpu_ms"] > 0
        if r["policy"] == "resident":
            assert not any(parts.values())
    tide = [r for r in report["runs"] if r["policy"] == "tide"]
    assert all(r["vs_best_baseline"] is not None for r in tide)
    assert any(r["measured_parts_ms"]["cpu_ms"] > 0 for r in tide)  # CPU misses on this device
    assert len(report["bounds"]) == 4
    for b in report["bounds"]:
        assert BOUND_KEYS <= set(b)
        assert b["oracle_h2d_gb"] > 0 and 0 < b["best_hit_rate"] <= 1
        assert b["tide_hit_rate"] <= b["best_hit_rate"] + 1e-9
    for w in ("model", "synthetic"):
        assert report["workloads"][w]["routing"]["steps"] > 0
    assert "synthetic" in report["workloads"]["synthetic"]["label"]


def test_bench_cli_writes_json_and_table(tiny_ckpt, tmp_path):
    from typer.testing import CliRunner

    from tidecli.cli import app

    out = tmp_path / "bench.json"
    res = CliRunner().invoke(app, ["bench", "--model", str(tiny_ckpt), "--device", "cpu",
                                   "--policies", "lru,tide", "--experts-per-layer", "8",
                                   "--workloads", "model", "--gen-length", "32",
                                   "-o", str(out), "--traces", str(tmp_path)])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert [r["policy"] for r in data["runs"]] == ["lru", "tide"]
    assert "tide bench" in res.output
    # the workload's routing trace, as the bench recorded it, plans with `tide plan --trace`
    from tidecli.experts.trace import RoutingTrace

    trace = RoutingTrace.load(tmp_path / "model.npz")
    assert len(trace.steps_only()) == data["workloads"]["model"]["routing"]["steps"]
    res = CliRunner().invoke(app, ["plan", "--model", str(tiny_ckpt), "--profile", "rtx4090",
                                   "--trace", str(tmp_path / "model.npz"), "--json"])
    assert res.exit_code == 0, res.output


def test_bench_cli_refuses_bad_options(tiny_ckpt, capsys):
    from tidecli.cli import main

    for args, msg in ((["--policies", "fast"], "unknown policy"),
                      (["--vram", "ten"], "not a number"),
                      (["--experts-per-layer", "4", "--tau", "0"], "at least 1"),
                      # budgets the model cannot run fail before any run (it has 32 experts)
                      (["--experts-per-layer", "64"], "the model has 32 experts per layer"),
                      (["--vram", "0.0001"], "cannot hold the dense part")):
        with pytest.raises(SystemExit) as exc:
            main(["bench", "--model", str(tiny_ckpt), *args])
        err = capsys.readouterr().err
        assert exc.value.code == 1
        assert err.startswith("error: ") and msg in err, (args, err)
        assert "Traceback" not in err


def test_bench_without_budgets_runs_at_the_models_defaults(tiny_ckpt, capsys, tmp_path):
    """`tide bench` with no budget used to fail ("offload policies need a budget")."""
    from tidecli.cli import main

    prompts = tmp_path / "p.txt"
    prompts.write_text("Hello there\n")
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--model", str(tiny_ckpt), "--device", "cpu", "--policies", "lru,tide",
              "--workloads", "model", "--gen-length", "16", "--prompts", str(prompts),
              "--json"])
    cap = capsys.readouterr()
    assert exc.value.code == 0, cap.err
    runs = json.loads(cap.out)["runs"]
    assert {r["budget"] for r in runs} == {"B=8", "B=16"}  # a quarter and a half of 32
    assert not any(r.get("skipped") for r in runs)
    assert "no budget given" in cap.err


def test_bench_fails_when_every_run_was_skipped(tiny_ckpt, capsys, monkeypatch):
    from tidecli.bench.harness import Bench
    from tidecli.cli import main
    from tidecli.errors import TideError

    def refuse(self, pt):
        raise TideError("does not fit")

    monkeypatch.setattr(Bench, "_measure", refuse)
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--model", str(tiny_ckpt), "--device", "cpu", "--policies", "lru",
              "--experts-per-layer", "8", "--workloads", "model", "--gen-length", "8"])
    err = capsys.readouterr().err
    assert exc.value.code == 1
    assert "error: every run was skipped (does not fit)" in err


def test_bench_tables_fit_120_columns():
    from rich.console import Console

    from tidecli.ui.bench_view import bounds_table, routing_table, runs_table

    run = {"workload": "synthetic", "policy": "resident", "budget": "12.5 GiB", "tau": 4,
           "planned": True, "misses": "auto", "misses_used": "stream", "tokens_per_s": 1234.5,
           "steps_per_s": 456.78, "hit_rate": 0.987, "h2d_gb": 12.345,
           "vs_best_baseline": 1.23, "identical": False, "exact_expected": False,
           "token_agreement": 0.97}
    bound = {"workload": "synthetic", "budget": "12.5 GiB", "tau": 4, "misses": "stream",
             "tide_hit_rate": 0.9, "best_hit_rate": 0.95, "tide_over_oracle": 1.5,
             "lower_bound_ms": 12.3, "tide_step_ms": 20.1, "tide_over_bound": 1.63}
    report = {"runs": [run], "bounds": [bound], "workloads": {"synthetic": {
        "label": "synthetic (published LLaDA2.0-mini statistics)",
        "routing": {"distinct_per_layer_step": 70.2, "similarity_lag1": 0.98,
                    "similarity_lag5": 0.95, "steps": 1234}}}}
    console = Console(width=120, record=True)
    for table in (runs_table(report), bounds_table(report), routing_table(report)):
        console.print(table)
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 120
    assert "…" not in text.replace("× resident …", "")  # no cell cut short


def test_drifting_routing_has_the_published_statistics_and_foreseeable_entries():
    """The drifting workload: the same three figures as the published one, but the experts
    that enter a step were mostly ranked just below the top-k the step before (a predictor can
    read them early); on the published workload they come at random."""
    from tidecli.bench.drift import DriftingScores
    from tidecli.bench.synthetic import DriftingRouting
    from tidecli.model.config import config_from_dict
    from tidecli.model.moe import ForwardInfo
    from tidecli.model.presets import preset_config

    gen = DriftingScores(num_experts=256, experts_per_token=8, num_layers=4)
    steps = [(b, s) for b in range(4) for s in range(24)]
    counts = np.stack([gen.counts(b, s) for b, s in steps])
    got = routing_stats(counts, [b for b, _ in steps])
    assert got["distinct_per_layer_step"] == pytest.approx(70, abs=3)
    assert got["similarity_lag1"] == pytest.approx(0.985, abs=0.005)
    assert got["similarity_lag5"] == pytest.approx(0.95, abs=0.01)

    def entered_within(n: int) -> float:
        """Of the (token, expert) pairs new at step s+1, the share ranked within n at step s."""
        hit = total = 0
        for b in range(2):
            for s in range(16):
                ranked = gen.ranked(b, s, n)
                nxt = gen.step(b, s + 1)
                now = gen.step(b, s)
                for j in range(4):
                    for t in range(32):
                        new = set(nxt[j, t]) - set(now[j, t])
                        total += len(new)
                        hit += len(new & set(ranked[j, t]))
        return hit / total

    assert entered_within(8) == 0.0  # the top-k itself holds none of the new ones
    assert entered_within(12) > 0.6  # the next four ranks foresee most of them
    # the same (block, step) gives the same routing whatever came before; experts distinct
    a = DriftingScores(num_experts=256, experts_per_token=8, num_layers=4)
    assert np.array_equal(a.step(2, 5), gen.step(2, 5)) and np.array_equal(a.step(0, 1),
                                                                            gen.step(0, 1))
    assert all(len(set(row)) == 8 for layer in a.step(1, 3) for row in layer)
    # as the model's router in a bench: block-length forwards take the drifting choice
    cfg = config_from_dict(preset_config("mini"))
    r = DriftingRouting(cfg, device=torch.device("cpu"))
    r.begin(ForwardInfo("step", block=1, step=3), 32)
    ids = r.ids(0, 32).numpy()
    ref = DriftingScores(num_experts=cfg.num_experts, experts_per_token=cfg.num_experts_per_tok,
                         num_layers=cfg.num_moe_layers).step(1, 3)[0]
    assert np.array_equal(ids, ref) and r.describe()["workload"] == "drifting"


def test_read_ahead_is_swept_only_where_misses_may_stream():
    spec = BenchSpec(policies=["resident", "lru", "tide"], vram=[10.0], workloads=["model"],
                     taus=[1], misses=["stream", "gpu"], prefetch=["off", "layer"])
    spec.validate()
    pts = [(p.policy, p.misses, p.prefetch) for p in run_points(spec)]
    assert pts == [("resident", None, "off"), ("lru", None, "off"), ("tide", "stream", "off"),
                   ("tide", "stream", "layer"), ("tide", "gpu", "off")]


@pytest.mark.parametrize("workload", ["synthetic", "drifting"])
def test_a_set_guess_accuracy_guesses_with_the_workloads_own_routing(workload):
    """--guess-accuracy A: each guessed expert is the token's real choice with probability A,
    otherwise one the token did not choose; the guess is distinct per token and a pure function
    of (seed, block, step); None leaves the guess to the model's router."""
    from tidecli.bench.synthetic import DriftingRouting, SyntheticRouting
    from tidecli.model.config import config_from_dict
    from tidecli.model.moe import ForwardInfo, Router
    from tidecli.model.presets import preset_config

    cls = {"synthetic": SyntheticRouting, "drifting": DriftingRouting}[workload]
    cfg = config_from_dict(preset_config("mini"))
    x = torch.zeros(32, cfg.hidden_size)

    def guesses(accuracy, block=1, step=2, tokens=32):
        r = cls(cfg, device=torch.device("cpu"))
        r.guess_accuracy = accuracy
        r.begin(ForwardInfo("step" if tokens == 32 else "prefill", block=block, step=step),
                tokens)
        ids = np.stack([r.ids(j, tokens).numpy() for j in range(cfg.num_moe_layers)])
        g = np.stack([r.guess(j, x[:tokens], None, cfg, static=False).numpy()
                      for j in range(cfg.num_moe_layers)])
        if tokens == 32:  # the captured step's buffer holds the same guess
            assert np.array_equal(g[3], r.guess(3, x, None, cfg, static=True).numpy())
        return ids, g

    ids, g = guesses(1.0)
    assert np.array_equal(ids, g)
    ids, g = guesses(0.0)
    assert not any(set(a) & set(b) for a, b in zip(ids.reshape(-1, 8), g.reshape(-1, 8),
                                                   strict=True))
    ids, g = guesses(0.8)
    right = np.mean([len(set(a) & set(b)) / 8 for a, b in zip(ids.reshape(-1, 8),
                                                                g.reshape(-1, 8), strict=True)])
    assert right == pytest.approx(0.8, abs=0.02)
    assert all(len(set(row)) == 8 for row in g.reshape(-1, 8))
    assert np.array_equal(guesses(0.8)[1], g)  # the same (seed, block, step): the same guess
    assert not np.array_equal(guesses(0.8, step=3)[1], g)
    ids, g = guesses(0.5, tokens=5)  # a prefill's guess too
    assert g.shape == (cfg.num_moe_layers, 5, 8) and (ids == g).mean() < 0.9
    r = cls(cfg, device=torch.device("cpu"))  # None: the model's router guesses, as before
    assert type(r).guess is not Router.guess and r.guess_accuracy is None


@pytest.mark.parametrize("accuracy", [None, 0.8])
def test_prepared_steps_are_the_steps_drawn_when_they_come(accuracy):
    """SyntheticRouting.prepare draws the steps ahead (a timed step then only copies them): the
    choices and guesses are those drawn step by step, commit passes and prefills included, and
    a prepared step draws nothing."""
    from tidecli.bench.synthetic import DriftingRouting
    from tidecli.model.config import config_from_dict
    from tidecli.model.moe import ForwardInfo
    from tidecli.model.presets import preset_config

    cfg = config_from_dict(preset_config("mini"))
    forwards = [("prefill", 0, 0, 32), ("step", 1, 0, 32), ("step", 1, 1, 32),
                ("step", 1, 2, 32), ("commit", 1, 3, 32), ("prefill", 2, 0, 9),
                ("step", 2, 0, 32), ("step", 1, 1, 32), ("commit", 1, 2, 32)]

    def replay(r):
        out = []
        for kind, block, step, tokens in forwards:
            r.begin(ForwardInfo(kind, block=block, step=step), tokens)
            out.append(r._current.clone())
        return out

    fresh = DriftingRouting(cfg, device=torch.device("cpu"))
    fresh.guess_accuracy = accuracy
    ahead = DriftingRouting(cfg, device=torch.device("cpu"))
    ahead.guess_accuracy = accuracy
    ahead.prepare(blocks=3, steps=4)

    def no_draw(*a, **k):
        raise AssertionError("a prepared step was drawn again")

    ahead.step = no_draw  # the choices come from what prepare drew
    got = replay(ahead)
    assert all(torch.equal(a, b) for a, b in zip(replay(fresh), got, strict=True))
    assert not torch.equal(got[1], got[2])  # the steps do differ


def test_ranked_misses_are_the_experts_ranked_just_below_the_choice():
    """--guess-misses ranked (drifting): a wrong guess is the token's expert ranked just below
    its choice at that step, in rank order; a right one is its choice."""
    from tidecli.bench.synthetic import DriftingRouting
    from tidecli.model.config import config_from_dict
    from tidecli.model.moe import ForwardInfo
    from tidecli.model.presets import preset_config

    cfg = config_from_dict(preset_config("mini"))
    x = torch.zeros(32, cfg.hidden_size)

    def guess(accuracy):
        r = DriftingRouting(cfg, device=torch.device("cpu"))
        r.guess_accuracy, r.guess_misses = accuracy, "ranked"
        r.begin(ForwardInfo("step", block=1, step=2), 32)
        return np.stack([r.guess(j, x, None, cfg).numpy() for j in range(cfg.num_moe_layers)])

    ranked = DriftingRouting(cfg, device=torch.device("cpu")).ranked(1, 2, 16)
    assert np.array_equal(guess(0.0), ranked[..., 8:])
    choice = DriftingRouting(cfg, device=torch.device("cpu")).step(1, 2)
    assert np.array_equal(np.sort(guess(1.0), -1), np.sort(choice, -1))
    g = guess(0.7)
    right = g == choice
    assert np.array_equal(g[~right], ranked[..., 8:][~right])
    assert 0.65 < right.mean() < 0.75


def test_guess_accuracy_is_swept_on_synthetic_read_ahead_runs_only():
    from tidecli.commands.bench import bench_spec
    from tidecli.errors import TideError

    spec = BenchSpec(policies=["tide"], vram=[10.0], workloads=["model", "drifting"], taus=[1],
                     misses=["stream"], prefetch=["off", "layer"], guesses=[1.0, 0.5])
    spec.validate()
    pts = [(p.workload, p.prefetch, p.guess) for p in run_points(spec)]
    assert pts == [("model", "off", None), ("model", "layer", None), ("drifting", "off", None),
                   ("drifting", "layer", 1.0), ("drifting", "layer", 0.5)]
    common = dict(policies="tide", vram="10", experts_per_layer=None, tau="1", misses="stream",
                  prompts=None, gen_length=8, threshold=None, repeat=1)
    with pytest.raises(TideError, match="synthetic workloads"):
        bench_spec(workloads="model", prefetch="layer", guess_accuracy="0.9", **common)
    with pytest.raises(TideError, match="synthetic workloads"):
        bench_spec(workloads="drifting", prefetch="off", guess_accuracy="0.9", **common)
    with pytest.raises(TideError, match="from 0 to 1"):
        bench_spec(workloads="drifting", prefetch="layer", guess_accuracy="1.5", **common)
    with pytest.raises(TideError, match="from 0 to 1"):
        bench_spec(workloads="drifting", prefetch="layer", guess_accuracy="high", **common)
    with pytest.raises(TideError, match="--guess-misses takes random, ranked"):
        bench_spec(workloads="drifting", prefetch="layer", guess_accuracy="0.9",
                   guess_misses="near", **common)
    with pytest.raises(TideError, match="drifting workload's scores"):
        bench_spec(workloads="synthetic,drifting", prefetch="layer", guess_accuracy="0.9",
                   guess_misses="ranked", **common)
    assert bench_spec(workloads="drifting", prefetch="layer", guess_accuracy="1,0.5",
                      **common).guesses == [1.0, 0.5]


def test_the_harness_sets_each_runs_guess_and_keeps_the_tokens(tiny_ckpt):
    """--guess-accuracy through the harness on the CPU (streamed misses run there too): each
    read-ahead run gets its own guess, a right one is always used, and the tokens stay the
    workload's resident ones."""
    runs = bench_runs(tiny_ckpt, BenchSpec(
        policies=["resident", "tide"], experts=[4], workloads=["drifting"], taus=[1],
        misses=["stream"], prefetch=["off", "layer"], guesses=[1.0, 0.0],
        prompts=["Hello there"], gen_length=16, warmup_tokens=4))
    assert [(r["prefetch"], r["guess_accuracy"]) for r in runs] == [
        (None, None), ("off", None), ("layer", 1.0), ("layer", 0.0)]
    assert all(r["identical"] for r in runs[1:]), runs
    assert runs[2]["prefetched"] > 0 and runs[2]["prefetch_accuracy"] == 1.0


def test_bench_refuses_an_unknown_read_ahead():
    from tidecli.commands.bench import bench_spec
    from tidecli.errors import TideError

    with pytest.raises(TideError, match="--prefetch"):
        bench_spec(policies="tide", vram="10", experts_per_layer=None, workloads="model",
                   tau="plan", misses="stream", prompts=None, gen_length=8, threshold=None,
                   repeat=1, prefetch="next")


def test_a_read_ahead_run_that_cannot_read_ahead_is_skipped_with_why(tiny_ckpt):
    """On a CPU device misses do not stream: the read-ahead point would repeat the run without
    it, so it is skipped and says why."""
    runs = bench_runs(tiny_ckpt, BenchSpec(
        policies=["tide"], experts=[8], workloads=["model"], taus=[1], prefetch=["off", "layer"],
        prompts=["Hello there"], gen_length=8, warmup_tokens=4))
    assert [r.get("skipped") is None for r in runs] == [True, False]
    assert runs[1]["skipped"] == "read-ahead needs streamed misses; these run cpu"
    assert runs[1]["prefetch"] == "layer"


def test_the_token_reference_is_the_first_run_the_gpu_kernel_computes_whole():
    """A bench of host-driven misses may start with CPU misses (not exact): the gpu-miss runs
    after it are held to the first run that computes every expert with the GPU kernel, and the
    CPU run is compared with that one too, once it exists."""
    from types import SimpleNamespace

    b = SimpleNamespace(expected={}, pending={})
    gpu_tokens, cpu_tokens = [[1, 2, 3, 4]], [[1, 2, 9, 9]]
    key = ("model", "bf16", "off")
    cpu = {"exact_expected": False}
    gpu = {"exact_expected": True}
    gpu2 = {"exact_expected": True}
    Bench._compare(b, cpu, key, cpu_tokens)
    assert "identical" not in cpu  # waits for a reference
    Bench._compare(b, gpu, key, gpu_tokens)
    Bench._compare(b, gpu2, key, gpu_tokens)
    Bench._settle(b, key)
    assert gpu["identical"] and gpu2["identical"] and gpu2["token_agreement"] == 1.0
    assert not cpu["identical"] and cpu["token_agreement"] == 0.5
    # a group with no exact run: its first run is the reference
    only = [{"exact_expected": False}, {"exact_expected": False}]
    Bench._compare(b, only[0], ("x",), cpu_tokens)
    Bench._compare(b, only[1], ("x",), gpu_tokens)
    Bench._settle(b, ("x",))
    assert only[0]["identical"] and not only[1]["identical"]
    assert b.pending == {}
