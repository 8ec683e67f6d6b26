"""Block-diffusion decoding for LLaDA2.x with one plain event per denoising step.

LLaDA2.0 ("low confidence"): per step, commit every masked position of the current block whose
confidence exceeds the threshold; when fewer than the step's quota pass, commit the quota's most
confident instead. LLaDA2.1 (editing, when `editing_threshold` is set): the same unmasking, plus
re-writing already generated positions of the block whose argmax changed with confidence above
the editing threshold; once no mask is left, up to `max_post_steps` more steps, and the block ends
at the first step that changes nothing. Generation stops after a block holding EOS and the output
is cut at the first EOS. LLaDA2.2's Levenshtein editing runs in decode/levenshtein.py; which
decoding runs, and with which preset, is decided by `DecodeSettings.resolved` (decode/settings.py).
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from tidecli.decode.sampling import choose
from tidecli.decode.settings import DecodeSettings
from tidecli.errors import TideError
from tidecli.model.counters import LayerCounters
from tidecli.model.llada2 import KVCache
from tidecli.model.moe import ForwardInfo
from tidecli.units import per


@dataclass
class StepEvent:
    """One denoising step, as the UI and benchmarks see it."""

    block: int  # absolute block index (position // block_length)
    step: int  # step inside the block
    global_step: int  # denoising steps so far in this generation (1-based)
    block_start: int  # absolute position of the block's first token
    gen_start: int  # absolute position of the first generated token (= prompt length)
    committed: list[tuple[int, int]]  # (position, token) unmasked this step
    edited: list[tuple[int, int]]  # (position, new token) rewritten this step (2.1)
    block_tokens: list[int]  # the block after this step (mask id where still masked)
    mask_id: int
    forward_ms: float  # wall time of this step's forward pass and decision
    elapsed_s: float  # since generation started
    tokens_done: int  # generated positions no longer masked
    block_done: bool
    experts: LayerCounters | None = None  # the expert runtime's counters of this step


@dataclass
class GenerationResult:
    token_ids: list[int]  # generated tokens, cut at the first EOS (EOS excluded)
    steps: int  # denoising forward passes (prefill and commit passes not counted)
    forwards: int  # every forward pass including prefill and commits
    wall_seconds: float
    prompt_tokens: int
    stopped_at_eos: bool
    finished: bool = True  # False when stopped early (Ctrl-C)
    events: list[StepEvent] = field(default_factory=list)
    seed: int | None = None  # the sampling seed (given, or drawn fresh); None when greedy

    @property
    def tokens_per_step(self) -> float:
        return per(len(self.token_ids), self.steps)

    @property
    def tokens_per_second(self) -> float:
        return per(len(self.token_ids), self.wall_seconds)

    @property
    def steps_per_second(self) -> float:
        return per(self.steps, self.wall_seconds)


def fresh_seed() -> int:
    """A new random seed when none was given: sampling without a seed is not repeatable."""
    return secrets.randbits(63)


def quota_schedule(block_length: int, steps: int) -> list[int]:
    """How many tokens each step must commit at least: block_length spread over `steps`."""
    base, extra = divmod(block_length, steps)
    return [base + (1 if i < extra else 0) for i in range(steps)]


def want_rows(host_block: list[int], mask_id: int, start: int, prompt_len: int,
              editing: bool) -> list[int]:
    """The block offsets a step looks at: the masked positions, and with editing every
    generated one, ascending."""
    return [p for p, t in enumerate(host_block)
            if t == mask_id or (editing and start + p >= prompt_len)]


class IdStage:
    """Lists of ids to the device through one pinned buffer, without blocking the host (a
    blocking copy also waits for the copy engine, which the refresh's copies may hold).

    The buffer is rewritten only after the decoder's next host sync (its step's tokens read
    back), which the stream orders after the last copy out of it, so no copy reads a buffer
    the host is writing."""

    def __init__(self, n: int, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.host = torch.empty(n, dtype=torch.long, pin_memory=self.cuda)
        self._host_np = self.host.numpy()  # written in place: no tensor made per step

    def put(self, ids: list[int], out: torch.Tensor | None = None) -> torch.Tensor:
        """`ids` on the device: written into `out` when given, else a new tensor."""
        self._host_np[: len(ids)] = ids
        host = self.host[: len(ids)]
        if out is not None:
            return out.copy_(host, non_blocking=True)
        return host.to(self.device, non_blocking=True) if self.cuda else host.clone()


class BlockDiffusionDecoder:
    """Runs one generation; iterate `steps()` for events, then read `result`."""

    decodings = ("threshold", "editing")

    def __init__(self, model, prompt_ids: list[int], settings: DecodeSettings, *, mask_id: int,
                 eos_ids: set[int], device: torch.device,
                 output_vocab: int | None = None) -> None:
        if not prompt_ids:
            raise TideError("the prompt is empty", "give a prompt with at least one token")
        settings = settings.resolved()
        if settings.decoding not in self.decodings:
            raise ValueError(f"{type(self).__name__} does not run {settings.decoding} decoding")
        self.model = model
        self.s = settings
        self.mask_id = mask_id
        self.eos_ids = eos_ids
        self.device = device
        bl = settings.block_length
        self.prompt_len = len(prompt_ids)
        self.num_blocks = math.ceil((self.prompt_len + settings.gen_length) / bl)
        self.total = self.num_blocks * bl
        self.x = torch.full((self.total,), mask_id, dtype=torch.long, device=device)
        self.x[: self.prompt_len] = torch.tensor(prompt_ids, dtype=torch.long, device=device)
        # ids the decoder never commits: the mask itself, and rows of the head past the
        # tokenizer's vocabulary (`output_vocab`): no logits can keep a position masked
        self.output_vocab = output_vocab
        self._banned: torch.Tensor | None = None
        self.generator = None
        self.seed: int | None = None  # the seed sampling used (None at temperature 0)
        if settings.temperature > 0:
            self.seed = settings.seed if settings.seed is not None else fresh_seed()
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(self.seed)
        self.result: GenerationResult | None = None
        self.progress = (0, 0, time.perf_counter())  # steps, forwards, start time

    def _logits(self, cache: KVCache | None, start: int, info: ForwardInfo,
                rows: torch.Tensor, host_block: list[int]) -> torch.Tensor:
        """Logits [len(rows), V] for block rows `rows` (offsets inside the block), with the ids
        the decoder never commits at -inf."""
        bl = self.s.block_length
        if cache is None:
            out = self.model.reference_logits(self.x[: start + bl], rows + start, info,
                                              block_length=bl)
        else:
            out = self.model.block_forward(self.x[start: start + bl], start, cache, info,
                                           rows=rows, ids_host=host_block)
        if self._banned is None or self._banned.shape[0] != out.shape[1]:
            banned = torch.zeros(out.shape[1], dtype=torch.bool, device=out.device)
            banned[self.mask_id] = True
            if self.output_vocab is not None:
                banned[self.output_vocab:] = True
            self._banned = banned
        return out.masked_fill(self._banned, float("-inf"))

    def block_bound(self) -> int:
        """The most denoising steps a block may take: its quota schedule, plus the post-steps
        of 2.1 editing. At the last one every masked position is committed."""
        s = self.s
        return s.block_length + (s.max_post_steps if s.editing_threshold is not None else 0)

    def _prefill(self) -> tuple[KVCache | None, int, int]:
        """The KV cache (None on the reference path) holding the prompt's whole blocks, the
        first block to denoise, and the forwards that took (0 or 1)."""
        bl = self.s.block_length
        first_block = self.prompt_len // bl
        if not self.s.use_cache:
            return None, first_block, 0
        cache = self.model.cache_for(self.total) if hasattr(self.model, "cache_for") else \
            KVCache(self.model.cfg, self.total, device=self.device, dtype=self.model.dtype)
        if not first_block:
            return cache, first_block, 0
        self.model.prefill(self.x[: first_block * bl], cache, ForwardInfo("prefill"),
                           block_length=bl)
        return cache, first_block, 1

    def steps(self) -> Iterator[StepEvent]:
        s, bl = self.s, self.s.block_length
        t0 = time.perf_counter()
        cache, first_block, forwards = self._prefill()
        quotas = quota_schedule(bl, bl)  # one step per position: at least one commit a step
        bound = self.block_bound()
        global_step = 0
        stopped_at_eos = False
        positions = torch.arange(bl, device=self.device)
        editing = s.editing_threshold is not None  # 2.1's post-steps: every generated row is read
        stage = IdStage(bl, self.device)
        for b in range(first_block, self.num_blocks):
            start = b * bl
            # prompt positions inside the block are never predicted or edited
            generated = (positions + start) >= self.prompt_len
            host_block = self.x[start: start + bl].tolist()
            step = 0
            post_steps = 0
            while True:
                ts = time.perf_counter()
                n_masked = sum(1 for t in host_block if t == self.mask_id)
                final = step + 1 >= bound  # the block's last allowed step: commit every mask
                quota = n_masked if final else min(quotas[min(step, len(quotas) - 1)], n_masked)
                last = 0 < n_masked <= quota and not editing
                info = ForwardInfo("step", block=b, step=step, last_step=last)
                # Only masked positions matter without editing; with editing, every generated one.
                block = self.x[start: start + bl]
                rows = stage.put(want_rows(host_block, self.mask_id, start, self.prompt_len,
                                           editing))
                logits = self._logits(cache, start, info, rows, host_block)
                forwards += 1
                global_step += 1
                self.progress = (global_step, forwards, t0)
                tok_rows, conf_rows = choose(logits, temperature=s.temperature, top_k=s.top_k,
                                             top_p=s.top_p, generator=self.generator)
                tokens = block.clone().index_copy_(0, rows, tok_rows)
                conf = torch.full((bl,), -1.0, device=self.device).index_copy_(0, rows, conf_rows)
                masked = block == self.mask_id
                commit = masked & (conf > s.threshold)
                if quota:  # too few confident: the quota's most confident masked positions
                    cand = torch.where(masked, conf, torch.full_like(conf, -1.0))
                    top = torch.zeros_like(commit).scatter_(0, cand.topk(quota).indices, True)
                    commit = torch.where(commit.sum() >= quota, commit, top)
                changed = commit
                if editing:
                    edit = (~masked) & generated & (tokens != block) & \
                        (conf > s.editing_threshold)
                    changed = commit | edit
                new_block = torch.where(changed, tokens, block)
                self.x[start: start + bl] = new_block
                block_list = new_block.tolist()  # the one host sync of the step
                commit_list = commit.tolist()
                committed = [(start + p, block_list[p]) for p in range(bl) if commit_list[p]]
                edited = [(start + p, block_list[p]) for p in range(bl)
                          if block_list[p] != host_block[p] and not commit_list[p]]
                host_block = block_list
                remaining = n_masked - len(committed)
                if final:
                    done = True
                elif s.editing_threshold is None:
                    done = remaining == 0
                else:
                    if n_masked == 0:
                        post_steps += 1
                    done = remaining == 0 and (not (committed or edited) or
                                               post_steps >= s.max_post_steps)
                now = time.perf_counter()
                runtime = getattr(self.model, "experts", None)
                stats = runtime.forward_stats.total() if runtime is not None else None
                done_tokens = max(0, start - self.prompt_len) + sum(
                    1 for p in range(bl) if start + p >= self.prompt_len
                    and block_list[p] != self.mask_id)
                yield StepEvent(
                    block=b, step=step, global_step=global_step, block_start=start,
                    gen_start=self.prompt_len, committed=committed, edited=edited,
                    block_tokens=block_list, mask_id=self.mask_id,
                    forward_ms=(now - ts) * 1000.0, elapsed_s=now - t0,
                    tokens_done=done_tokens, block_done=done, experts=stats)
                step += 1
                if done:
                    break
            gen_part = host_block[max(0, self.prompt_len - start):]
            if any(t in self.eos_ids for t in gen_part):
                stopped_at_eos = True
                break
            if cache is not None and b + 1 < self.num_blocks:
                # the finished block's clean K/V for every later block
                self.model.block_forward(self.x[start: start + bl], start, cache,
                                         ForwardInfo("commit", block=b, step=step), logits=False,
                                         ids_host=host_block)
                forwards += 1
        self.result = self._finish(global_step, forwards, time.perf_counter() - t0, stopped_at_eos)

    def _finish(self, steps: int, forwards: int, wall: float, eos: bool,
                finished: bool = True) -> GenerationResult:
        out = self.x[self.prompt_len:].tolist()
        cut = []
        for t in out:
            if t in self.eos_ids:
                break
            if t == self.mask_id:  # only possible when stopped early
                break
            cut.append(t)
        cut = cut[: self.s.gen_length]
        return GenerationResult(token_ids=cut, steps=steps, forwards=forwards, wall_seconds=wall,
                                prompt_tokens=self.prompt_len, stopped_at_eos=eos, seed=self.seed,
                                finished=finished)

    def stop_early(self) -> GenerationResult:
        """The result so far, after the caller stopped iterating (Ctrl-C): the committed prefix
        of the generated text, up to the first position still masked."""
        steps, forwards, t0 = self.progress
        self.result = self._finish(steps, forwards, time.perf_counter() - t0, False,
                                   finished=False)
        return self.result
