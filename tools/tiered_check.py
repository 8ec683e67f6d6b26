"""GPU check of the tiered store: the same prompt with every expert in RAM and with most on disk,
twice each; token lists compared, and every GPU slot compared with its expert's bytes on disk.
Usage: python3 tools/tiered_check.py CHECKPOINT RAM_GIB [--policy tide] [--cpu-threads N]"""

from __future__ import annotations

import argparse

import torch

from tidecli.decode.diffusion import DecodeSettings
from tidecli.engine import Engine, EngineOptions
from tidecli.experts.runtime import read_expert_packed
from tidecli.model.tensorio import ShardReader

PROMPT = "Explain why the sky is blue to a ten-year-old."


def run(path: str, ram: float | None, policy: str, threads: int, graphs: bool):
    eng = Engine(EngineOptions(model=path, policy=policy, experts_per_layer=64, ram_gib=ram,
                               cpu_threads=threads, graphs=graphs), quiet=True)
    try:
        dec = eng.decoder(eng.prompt_ids(PROMPT), DecodeSettings(gen_length=128))
        for _ in dec.steps():
            pass
        torch.cuda.synchronize()
        bad = 0
        with ShardReader() as reader:
            for layer, pool in eng.runtime.pools.pools.items():
                row = torch.empty(pool.buf.shape[1], dtype=pool.buf.dtype)
                for s, e in enumerate(pool.expert_of_slot.tolist()):
                    if e < 0:
                        continue
                    read_expert_packed(reader, eng.ckpt, layer, e, row, check=False)
                    bad += not torch.equal(pool.buf[s].cpu(), row)
        return dec.result.token_ids, bad, eng.runtime.run_stats.summary()
    finally:
        eng.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("path")
    ap.add_argument("ram", type=float)
    ap.add_argument("--policy", default="tide")
    ap.add_argument("--cpu-threads", type=int, default=0)
    ap.add_argument("--no-graphs", action="store_true")
    a = ap.parse_args()
    runs = {}
    for name, ram in (("ram", None), ("ram2", None), ("disk", a.ram), ("disk2", a.ram)):
        toks, bad, s = run(a.path, ram, a.policy, a.cpu_threads, not a.no_graphs)
        runs[name] = toks
        print(name, "slot mismatches", bad, "disk_reads", s["disk_reads"], "cpu_calls",
              s["cpu_calls"], "first diff vs ram",
              next((i for i, (x, y) in enumerate(zip(toks, runs["ram"], strict=False))
                    if x != y), None), flush=True)


if __name__ == "__main__":
    main()
