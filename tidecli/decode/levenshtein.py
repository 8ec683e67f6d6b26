"""LLaDA2.2 Levenshtein decoding: mask-to-token, token-to-token and the DELETE / SPLIT edits.

One block at a time, on the logits of its generated positions (mask logit suppressed, so the mask
id is never a candidate; confidence = softmax probability of the chosen token):
1. M2T: commit the masks above the threshold, or the `needed` most confident of them, where
   `needed` follows the schedule of the block's N original masks over S steps
   (N // S, +1 while t < N % S) plus one for each mask the previous step's edits created; after
   the schedule, and on the final round, commit every mask.
2. T2T: a generated non-mask position whose choice differs from its token with confidence above
   the editing threshold is rewritten (decided on the block before this step's writes).
3. Edit scan of the written generated positions, left to right: DELETE drops the position,
   SPLIT becomes [mask, the token there before this step's writes]; then truncate or pad with
   masks to the block length. Prompt positions never move. Masks made here are new: they
   neither restart the schedule nor the post-step budget.
4. Bounds: once the original masks are gone (or the schedule has ended) each step counts
   against `max_post_steps`; the step that reaches it, or the hard cap of steps, is the final
   round (commit every mask, DELETE / SPLIT suppressed). A block state seen before is left by
   giving the least confident position written this step its next-best token, a few times at
   most; the bounds, not this escape, guarantee the end.
5. A block is final after its final round or after a step that changes nothing with no mask
   left; one more forward pass over its final tokens writes its K/V, and only then is it
   committed and shown. EOS counts only in committed generated positions.

`BlockRun` is the pure state machine of one block (tested with scripted logits);
`LevenshteinDecoder` drives the model with it and yields the same `StepEvent`s as the other
decodings. The edit tokens never reach the events, the output or the K/V of a finished block.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from tidecli.decode.diffusion import BlockDiffusionDecoder, DecodeSettings, IdStage, StepEvent
from tidecli.decode.sampling import choose
from tidecli.model.moe import ForwardInfo

MAX_BLOCK_STEPS = 1000  # the hard cap of denoising steps per block
MAX_ESCAPES = 3  # loop escapes per block


@dataclass(frozen=True)
class EditTokens:
    mask: int
    delete: int
    split: int


@dataclass(frozen=True)
class Rule:
    threshold: float  # M2T: commit a mask above this confidence
    editing: float  # T2T: rewrite a token above this confidence
    steps: int  # S of the M2T schedule
    max_post_steps: int
    max_steps: int = MAX_BLOCK_STEPS
    max_escapes: int = MAX_ESCAPES


@dataclass(frozen=True)
class StepOutcome:
    tokens: list[int]  # the block after the step
    committed: list[int]  # block offsets: a mask before the step, a token now
    edited: list[int]  # block offsets: a token before the step, another token now
    final: bool  # the step was the final round
    done: bool  # the block is final
    escaped: bool  # a repeated state was left by the loop escape


# ---- the parts of a step (pure) -----------------------------------------------------------------


def quota(n: int, steps: int, t: int) -> int:
    """The schedule's commits at step t for n original masks over `steps` steps."""
    return n // steps + (1 if t < n % steps else 0)


def suppress(logits: torch.Tensor, ids: list[int]) -> torch.Tensor:
    out = logits.clone()
    out[:, ids] = float("-inf")
    return out


def write_block(pre: list[int], gen: int, tokens: list[int], conf: list[float], *, mask: int,
                threshold: float, editing: float, needed: int, commit_all: bool
                ) -> tuple[list[int], list[int], list[int]]:
    """M2T and T2T on the block `pre` (offsets from `gen` on are generated; `tokens` / `conf`
    are the choices there). Returns (written block, M2T offsets, T2T offsets)."""
    masks = [p for p in range(gen, len(pre)) if pre[p] == mask]
    if commit_all:
        m2t = masks
    else:
        m2t = [p for p in masks if conf[p - gen] > threshold]
        if len(m2t) < needed:  # too few confident: the most confident `needed`
            ranked = sorted(masks, key=lambda p: (-conf[p - gen], p))
            m2t = sorted(ranked[: min(needed, len(masks))])
    t2t = [p for p in range(gen, len(pre)) if pre[p] != mask and tokens[p - gen] != pre[p]
           and conf[p - gen] > editing]
    written = list(pre)
    for p in m2t + t2t:
        written[p] = tokens[p - gen]
    return written, m2t, t2t


def edit_scan(pre: list[int], written: list[int], orig: list[bool], gen: int,
              edit: EditTokens) -> tuple[list[int], list[bool], int]:
    """DELETE / SPLIT over the generated positions, then truncate or pad with masks to the
    block length. Returns (block, original-mask flags, masks created here that survived)."""
    n = len(pre)
    out, flags, fresh = list(written[:gen]), list(orig[:gen]), [False] * gen
    for p in range(gen, n):
        t = written[p]
        if t == edit.delete:
            continue
        if t == edit.split:  # a new mask before the token that was there before the write
            out += [edit.mask, pre[p]]
            flags += [False, orig[p] and pre[p] == edit.mask]
            fresh += [True, False]
        else:
            out.append(t)
            flags.append(orig[p] and t == edit.mask)
            fresh.append(False)
    out, flags, fresh = out[:n], flags[:n], fresh[:n]
    pad = n - len(out)
    out += [edit.mask] * pad
    flags += [False] * pad
    fresh += [True] * pad
    return out, flags, sum(fresh)


def next_best(logits: torch.Tensor, token: int) -> int:
    """The best token of a row other than `token` (the row's suppressed ids stay out)."""
    row = logits.clone()
    row[token] = float("-inf")
    return int(row.argmax())


# ---- one block ----------------------------------------------------------------------------------

Choose = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def greedy(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return choose(logits, temperature=0.0)


class BlockRun:
    """One block's Levenshtein decoding: feed it the logits of its generated positions, step by
    step, until `done`. `tokens` holds the prompt tail (offsets < `gen`) and masks."""

    def __init__(self, tokens: list[int], gen: int, edit: EditTokens, rule: Rule) -> None:
        self.tokens = list(tokens)
        self.gen = gen
        self.edit = edit
        self.rule = rule
        self.orig = [p >= gen and t == edit.mask for p, t in enumerate(tokens)]
        self.n0 = sum(self.orig)
        self.step = 0  # steps run
        self.post = 0  # steps run once the original masks were gone
        self.created = 0  # masks the previous step's edits created
        self.escapes = 0
        self.seen = {tuple(self.tokens)}
        self.done = False

    def _originals_gone(self) -> bool:
        return not any(self.orig) or self.step >= self.rule.steps

    def next_is_final(self) -> bool:
        """Will the coming step be the final round (known before its forward pass)?"""
        post = self.post + (1 if self._originals_gone() else 0)
        return (self._originals_gone() and post >= self.rule.max_post_steps) or \
            self.step + 1 >= self.rule.max_steps

    def needed(self) -> int:
        return quota(self.n0, self.rule.steps, self.step) + self.created

    def advance(self, logits: torch.Tensor, choose_fn: Choose = greedy) -> StepOutcome:
        """One step on the logits [generated positions, V]."""
        if self.done:
            raise RuntimeError("the block is already final")
        e, r, gen = self.edit, self.rule, self.gen
        final = self.next_is_final()
        if self._originals_gone():
            self.post += 1
        commit_all = final or self.step >= r.steps
        logits = suppress(logits, [e.mask, e.delete, e.split] if final else [e.mask])
        tok_t, conf_t = choose_fn(logits)
        tokens, conf = tok_t.tolist(), conf_t.tolist()
        pre = self.tokens
        written, m2t, t2t = write_block(pre, gen, tokens, conf, mask=e.mask,
                                        threshold=r.threshold, editing=r.editing,
                                        needed=self.needed(), commit_all=commit_all)
        new, orig, created = edit_scan(pre, written, self.orig, gen, e)
        escaped = False
        if not final and new != pre and tuple(new) in self.seen and m2t + t2t and \
                self.escapes < r.max_escapes:
            p = min(m2t + t2t, key=lambda q: (conf[q - gen], q))
            written[p] = next_best(logits[p - gen], written[p])
            new, orig, created = edit_scan(pre, written, self.orig, gen, e)
            self.escapes += 1
            escaped = True
        self.seen.add(tuple(new))
        changed = new != pre
        self.tokens, self.orig, self.created = new, orig, created
        self.step += 1
        masks_left = any(t == e.mask for t in new[gen:])
        self.done = final or (not masks_left and not changed)
        committed = [p for p in range(gen, len(new)) if pre[p] == e.mask and new[p] != e.mask]
        edited = [p for p in range(gen, len(new))
                  if pre[p] != e.mask and new[p] != e.mask and new[p] != pre[p]]
        return StepOutcome(tokens=new, committed=committed, edited=edited, final=final,
                           done=self.done, escaped=escaped)


# ---- the decoder --------------------------------------------------------------------------------


class LevenshteinDecoder(BlockDiffusionDecoder):
    """Block diffusion with Levenshtein editing (LLaDA2.2); the same events and result as the
    other decodings, and a block is shown only once it is final."""

    decodings = ("levenshtein",)

    def __init__(self, model, prompt_ids: list[int], settings: DecodeSettings, *, mask_id: int,
                 eos_ids: set[int], edit_ids: tuple[int, int], device: torch.device) -> None:
        super().__init__(model, prompt_ids, settings, mask_id=mask_id, eos_ids=eos_ids,
                         device=device)
        self.edit = EditTokens(mask=mask_id, delete=edit_ids[0], split=edit_ids[1])
        s = self.s
        self.rule = Rule(threshold=s.threshold, editing=s.editing_threshold,
                         steps=s.block_length, max_post_steps=s.max_post_steps)
        self._final_end = self.prompt_len  # positions before it belong to final blocks

    def _choose(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.s
        return choose(logits, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                      generator=self.generator)

    def steps(self) -> Iterator[StepEvent]:
        bl = self.s.block_length
        t0 = time.perf_counter()
        cache, first_block, forwards = self._prefill()
        global_step = 0
        stopped_at_eos = False
        stage = IdStage(bl, self.device)  # each step's tokens to the device
        for b in range(first_block, self.num_blocks):
            start = b * bl
            gen = max(0, self.prompt_len - start)
            rows = torch.arange(gen, bl, device=self.device)
            run = BlockRun(self.x[start: start + bl].tolist(), gen, self.edit, self.rule)
            while not run.done:
                ts = time.perf_counter()
                info = ForwardInfo("step", block=b, step=run.step, last_step=run.next_is_final())
                logits = self._logits(cache, start, info, rows, run.tokens)
                forwards += 1
                global_step += 1
                self.progress = (global_step, forwards, t0)
                out = run.advance(logits, self._choose)
                stage.put(out.tokens, out=self.x[start: start + bl])
                now = time.perf_counter()
                runtime = getattr(self.model, "experts", None)
                stats = runtime.forward_stats.total() if runtime is not None else None
                done_tokens = max(0, start - self.prompt_len) + sum(
                    1 for t in out.tokens[gen:] if t != self.mask_id)
                yield StepEvent(
                    block=b, step=run.step - 1, global_step=global_step, block_start=start,
                    gen_start=self.prompt_len,
                    committed=[(start + p, out.tokens[p]) for p in out.committed],
                    edited=[(start + p, out.tokens[p]) for p in out.edited],
                    block_tokens=list(out.tokens), mask_id=self.mask_id,
                    forward_ms=(now - ts) * 1000.0, elapsed_s=now - t0,
                    tokens_done=done_tokens, block_done=out.done, experts=stats)
            self._final_end = start + bl
            if any(t in self.eos_ids for t in run.tokens[gen:]):
                stopped_at_eos = True
                break
            if cache is not None and b + 1 < self.num_blocks:
                # the finished block's clean K/V, from a pass over its final tokens
                self.model.block_forward(self.x[start: start + bl], start, cache,
                                         ForwardInfo("commit", block=b, step=run.step),
                                         logits=False, ids_host=run.tokens)
                forwards += 1
        self.result = self._finish(global_step, forwards, time.perf_counter() - t0, stopped_at_eos)

    def stop_early(self):
        """The result so far: the final blocks only (an open block may still shift)."""
        self.x[self._final_end:] = self.mask_id
        return super().stop_early()
