"""Shared fixtures: tiny synthetic checkpoints written once per session, isolated user dirs."""

from __future__ import annotations

import os

# Tiny models run fastest on one thread, and OpenMP threads that spin-wait make a shared 2-core
# machine crawl (a 1 s generation took 86 s beside another test process). Subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _isolated_session_dirs(tmp_path_factory):
    """Session-wide: the user's own cache and settings are never read or written, also by
    module- and session-scoped fixtures, which pytest sets up before any test's own fixtures
    (a module fixture that quantized experts once filled the real cache)."""
    mp = pytest.MonkeyPatch()
    base = tmp_path_factory.getbasetemp()
    mp.setenv("TIDE_CACHE_DIR", str(base / "cache"))
    mp.setenv("TIDE_CONFIG_DIR", str(base / "session-config"))
    mp.delenv("TIDE_MODEL", raising=False)
    mp.setenv("HF_HUB_OFFLINE", "1")
    yield
    mp.undo()


@pytest.fixture(autouse=True)
def _isolated_dirs(tmp_path_factory, monkeypatch):
    # the cache (quantized experts) is shared by the session; settings (profiles,
    # calibrations) are each test's own, so no test sees what another saved
    monkeypatch.setenv("TIDE_CONFIG_DIR", str(tmp_path_factory.mktemp("config")))


@pytest.fixture(autouse=True)
def _fp32_on_every_cpu(monkeypatch):
    """`--dtype auto` on the CPU follows the CPU's bf16 units; the tests' figures (bytes per
    expert, logits compared with fp32 references) must not depend on which CPU runs them, so
    in-process engines run fp32 (tests/test_hardware.py checks the choice itself)."""
    from tidecli.runtime import devices

    monkeypatch.setattr(devices, "cpu_computes_bf16", lambda: False)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """The demo-sized model (tiny preset, 4 layers, 32 experts)."""
    from tidecli.model.synth import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", preset="tiny", seed=0,
                            device="cpu")


@pytest.fixture(scope="session")
def tiny_ckpt_b(tmp_path_factory):
    """A second tiny model: 3 layers, 16 experts, top-4 of 4 groups, another seed."""
    from tidecli.model.synth import write_checkpoint

    return write_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "tiny_b", preset="tiny", seed=7, layers=3,
        overrides={"num_experts": 16, "n_group": 4, "topk_group": 2, "num_experts_per_tok": 4},
        device="cpu")


@pytest.fixture(scope="session")
def tiny22_ckpt(tmp_path_factory):
    """The tiny model with LLaDA2.2's keys: block routing (8 of 32 experts per 32-token routing
    block) and the DELETE / SPLIT edit tokens."""
    from tidecli.model.synth import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny22", preset="tiny22", seed=0,
                            device="cpu")
