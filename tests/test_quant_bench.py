"""tide bench with several formats of the routed experts: every run once per format, the
exactness check within a format, and each format's figures against bf16 (tokens, logits on the
same inputs, expert outputs)."""

import json

import pytest
import torch

from tidecli.bench.harness import Bench
from tidecli.bench.quality import compare_logits, probe_inputs
from tidecli.bench.spec import BenchSpec, run_points

from helpers import user_error


def test_run_points_repeat_for_each_format():
    spec = BenchSpec(policies=["resident", "tide"], experts=[8], workloads=["model"],
                     taus=[4], formats=["bf16", "int4"])
    pts = run_points(spec)
    assert [(p.fmt, p.policy) for p in pts] == [("bf16", "resident"), ("bf16", "tide"),
                                                ("int4", "resident"), ("int4", "tide")]
    assert not BenchSpec().compares_formats and spec.compares_formats


def test_logit_comparison_by_hand():
    a = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    same = compare_logits([a], [a.clone()])
    assert same == {"logits_kl": 0.0, "logits_top1": 1.0}
    b = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    got = compare_logits([a], [b])
    p = torch.softmax(a[1], 0)
    kl = float((p * (torch.log_softmax(a[1], 0) - torch.log_softmax(b[1], 0))).sum())
    assert got["logits_top1"] == 0.5 and got["logits_kl"] == pytest.approx(kl / 2)
    inputs = probe_inputs([[1, 2]], [[5, 6, 7]], block=2, mask_id=9)
    assert inputs == [([1, 2, 5, 9, 9], [3, 4])]


def test_harness_compares_formats_with_bf16(tiny_ckpt):
    from tidecli.runtime.engine import Engine
    from tidecli.runtime.options import engine_options

    eng = Engine(engine_options(model=str(tiny_ckpt), device="cpu"), build_runtime=False,
                 quiet=True)
    spec = BenchSpec(policies=["resident", "tide"], experts=[6], workloads=["model"],
                     taus=[2], prompts=["Hello there"], gen_length=32, warmup_tokens=8,
                     formats=["bf16", "int8", "int4"])
    report = Bench(eng, spec).run()
    eng.close()
    runs = report["runs"]
    assert [r["experts_dtype"] for r in runs] == ["bf16", "bf16", "int8", "int8", "int4", "int4"]
    assert all(r["identical"] for r in runs)  # within each format
    assert all(r["token_agreement_bf16"] == 1.0 for r in runs[:2])
    f = report["formats"]
    assert list(f) == ["bf16", "int8", "int4"]
    assert f["bf16"]["logits_kl"] == 0.0 and f["bf16"]["expert_rel_error"] == 0.0
    assert 0 < f["int8"]["logits_kl"] < 1e-3 and f["int8"]["logits_top1"] > 0.9
    assert 0 < f["int8"]["expert_rel_error"] < 0.02 < f["int4"]["expert_rel_error"] < 0.3
    assert f["int4"]["routed_expert_bytes"] * 3 < f["bf16"]["routed_expert_bytes"]
    tide = [r for r in runs if r["policy"] == "tide"]
    # copies move the format's bytes: int4 moves fewer than bf16 for the same promotions
    assert all(b["experts_dtype"] == r["experts_dtype"]
               for b, r in zip(report["bounds"], tide, strict=True))
    json.dumps(report)


def test_bench_cli_takes_a_format_list(tiny_ckpt, tmp_path, capsys):
    from typer.testing import CliRunner

    from tidecli.cli import app

    out = tmp_path / "bench.json"
    res = CliRunner().invoke(app, ["bench", "--model", str(tiny_ckpt), "--device", "cpu",
                                   "--policies", "resident", "--workloads", "model",
                                   "--gen-length", "16", "--experts-dtype", "fp8,bf16",
                                   "-o", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert [r["experts_dtype"] for r in data["runs"]] == ["bf16", "fp8"]  # bf16 first
    assert "against bf16" in res.output and "not accuracy" in res.output
    for cmd in (["bench"], ["generate", "Hi"], ["plan"]):
        user_error([*cmd, "--model", str(tiny_ckpt), "--experts-dtype", "bf16,int2"], capsys,
                   "unknown --experts-dtype", hint="bf16, int8, fp8, int4")
