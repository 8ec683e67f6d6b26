"""Options shared by the commands, declared once (typer `Annotated` aliases): one flag, one help
text, everywhere; and the groups of them the commands take whole (the model, the runtime, the
decoding), so every command that loads a model offers the same flags. Imported at start-up, so
nothing heavy here."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, get_type_hints

import typer

GEN_LENGTH = 512  # tokens a reply may have at most, unless --gen-length says
DEMO_GEN_LENGTH = 64  # on the demo model: its words are random, a short reply shows the tool

ModelOpt = Annotated[str | None, typer.Option(
    "--model", "-m", metavar="FOLDER|HUB_ID|demo",
    help="Checkpoint folder, Hub id (e.g. inclusionAI/LLaDA2.0-mini) or 'demo'. Default: demo "
         "(a miniature LLaDA2 written on first use, no download), or $TIDE_MODEL.")]
DeviceOpt = Annotated[str, typer.Option(metavar="[auto|cuda|cpu]",
                                        help="auto: the GPU when there is one (cuda:N picks one).")]
DtypeOpt = Annotated[str, typer.Option(
    metavar="[auto|bf16|fp32|fp16]",
    help="auto: bf16 on a GPU and on CPUs with bf16 units (AVX-512 BF16, AMX), else fp32. "
         "fp16: for GPUs without bf16 (slow on the CPU).")]
GraphsOpt = Annotated[bool, typer.Option("--graphs/--no-graphs",
                                         help="CUDA: replay each step as captured CUDA graphs.")]
CompileOpt = Annotated[str | None, typer.Option(
    "--compile", metavar="[auto|off|on]", show_default=False,
    help="CUDA: on fuses each step's norms, RoPE, routing and residuals into a few kernels "
         "with torch.compile (needs Triton and a C compiler; the first step compiles for a "
         "while, later runs reuse the cache). Logits change in the last bits; every policy "
         "still gives the resident run's tokens. auto: on where it can run, eager if "
         "compiling fails. Default: auto in chat and serve (long sessions repay the "
         "compile), off in generate and bench. bench: off, on or a comma list to compare.")]
ExpertsDtypeOpt = Annotated[str, typer.Option(
    "--experts-dtype",
    help="Format of the routed experts: bf16 (exact, default), or int8, fp8, int4 (lossy: "
         "2×, 2× and 3.8× smaller; quantized once, cached). bench: a comma list to compare.")]

# ---- residency ----------------------------------------------------------------------------------
PolicyOpt = Annotated[str, typer.Option(
    metavar="[auto|resident|lru|static|tide]",
    help="Expert residency: auto (resident when every expert fits, else tide), resident, lru, "
         "static or tide (without --tau or --experts-per-layer, tide follows the planner's plan "
         "for this machine).")]
TauOpt = Annotated[int | None, typer.Option(help="tide: refresh every TAU steps of a block.")]
MissesOpt = Annotated[str, typer.Option(
    metavar="[auto|stream|split|cpu|gpu]",
    help="static/tide: where experts missing from the GPU run: stream (the GPU places them or "
         "reads them from pinned RAM inside the step, no host round trip), split (CPU and GPU "
         "scratch slots by measured cost), cpu, or gpu (scratch slots); auto = stream on a GPU "
         "when the experts fit pinned RAM, else cpu. stream and gpu give bitwise the resident "
         "run's tokens.")]
PrefetchOpt = Annotated[str, typer.Option(
    metavar="[off|layer|step]",
    help="Streamed misses: layer reads each MoE layer's likely experts ahead, guessed by its "
         "router from the layer before, while that layer computes; step copies each step's "
         "likely experts (those ranked best at the step before) before it runs. A wrong guess "
         "costs copies, never different tokens; either pauses itself while under half of its "
         "guesses are used. off places only what the routing asks for.")]
ProfileOpt = Annotated[str | None, typer.Option(
    "--profile", "-p", metavar="NAME|FILE",
    help="Hardware profile to plan with: a reference name (e.g. rtx4090) or a profile JSON. "
         "Default: this machine's saved profile, measured once when missing.")]
CpuThreadsOpt = Annotated[int, typer.Option(
    help="CPU threads: the whole model on a CPU device, missed experts on a GPU (0: the plan's "
         "for misses, else the cores other processes leave free, or OMP_NUM_THREADS).")]

# ---- budgets ------------------------------------------------------------------------------------
VramOpt = Annotated[float | None, typer.Option(
    metavar="GIB",
    help="GPU memory budget in GiB for tide's allocations (dense + KV + expert slots).")]
RamOpt = Annotated[float | None, typer.Option(
    metavar="GIB",
    help="Host RAM budget in GiB for the experts (those kept in RAM + staging buffers); experts "
         "beyond it are read from disk when used (slower, same tokens). Default: the available "
         "RAM minus 2 GiB.")]
ExpertsPerLayerOpt = Annotated[int | None, typer.Option(help="Force a uniform expert budget.")]

# ---- decoding -----------------------------------------------------------------------------------
GenLengthOpt = Annotated[int, typer.Option(help="Tokens to generate at most.")]
ReplyLengthOpt = Annotated[int | None, typer.Option(
    "--gen-length", metavar="<int>",
    help=f"Tokens to generate at most [default: {GEN_LENGTH}; {DEMO_GEN_LENGTH} on the demo].",
    show_default=False)]
BlockLengthOpt = Annotated[int, typer.Option(help="Diffusion block length.")]
ThresholdOpt = Annotated[float | None, typer.Option(
    help="Commit a masked position above this confidence (default 0.95; 0.5 with Levenshtein "
         "decoding).")]
EditingThresholdOpt = Annotated[float | None, typer.Option(
    help="LLaDA2.1 token editing: rewrite generated tokens above this confidence (0.5 quality, "
         "0.0 speed). Off when not given (2.0/2.1); 0.0 with Levenshtein decoding.")]
MaxPostStepsOpt = Annotated[int, typer.Option(
    help="Editing (2.1, 2.2): extra steps once no mask is left.")]
DecodingOpt = Annotated[str | None, typer.Option(
    help="threshold (LLaDA2.0), editing (2.1 token editing) or levenshtein (2.2: edits that "
         "delete and insert). Default: levenshtein for a checkpoint with edit tokens, editing "
         "when --editing-threshold is given, else threshold.")]
TemperatureOpt = Annotated[float, typer.Option(help="0 is greedy.")]
TopPOpt = Annotated[float | None, typer.Option(help="Nucleus sampling (temperature > 0).")]
TopKOpt = Annotated[int | None, typer.Option(help="Top-k sampling (temperature > 0).")]
SeedOpt = Annotated[int | None, typer.Option(help="Seed for sampling.")]
SystemOpt = Annotated[str | None, typer.Option(help="System prompt.")]
LiveOpt = Annotated[bool, typer.Option(
    "--live/--no-live", help="Draw the denoising live on a terminal (plain text when off or "
                             "when stdout is not a terminal).")]
TracePathOpt = Annotated[Path | None, typer.Option(
    help="Routing trace (.npz from `tide generate --trace`).")]
StallRefreshOpt = Annotated[bool, typer.Option(
    "--stall-refresh", help="tide ablation: promote before computing (paper).")]
ColdStartOpt = Annotated[bool, typer.Option(
    "--cold-start", help="tide ablation: empty the slots at each block.")]
RefreshLastStepOpt = Annotated[bool, typer.Option(
    "--refresh-last-step", help="tide ablation: refresh on a block's last step.")]
PopularityTraceOpt = Annotated[Path | None, typer.Option(
    help="static: expert popularity from this routing trace (.npz from --trace).")]


# ---- option groups: commands take them whole (`with_options`) -----------------------------------


def model_options(model: ModelOpt = None, device: DeviceOpt = "auto", dtype: DtypeOpt = "auto",
                  graphs: GraphsOpt = True, compile: CompileOpt = None,
                  experts_dtype: ExpertsDtypeOpt = "bf16") -> None:
    """Which model, on which device, in which dtype."""


def runtime_options(policy: PolicyOpt = "auto", vram: VramOpt = None, ram: RamOpt = None,
                    experts_per_layer: ExpertsPerLayerOpt = None, tau: TauOpt = None,
                    misses: MissesOpt = "auto", prefetch: PrefetchOpt = "off",
                    profile: ProfileOpt = None,
                    cpu_threads: CpuThreadsOpt = 0,
                    popularity_trace: PopularityTraceOpt = None,
                    stall_refresh: StallRefreshOpt = False, cold_start: ColdStartOpt = False,
                    refresh_last_step: RefreshLastStepOpt = False) -> None:
    """Where the routed experts live and run, and within which budgets."""


def decoding_options(gen_length: ReplyLengthOpt = None, block_length: BlockLengthOpt = 32,
                     threshold: ThresholdOpt = None, decoding: DecodingOpt = None,
                     editing_threshold: EditingThresholdOpt = None,
                     max_post_steps: MaxPostStepsOpt = 16, temperature: TemperatureOpt = 0.0,
                     top_p: TopPOpt = None, top_k: TopKOpt = None, seed: SeedOpt = None) -> None:
    """How a reply is denoised and sampled."""


def with_options(*groups: Callable[..., None]) -> Callable[[Callable], Callable]:
    """Give a command the options of `groups` after its own: typer reads the merged signature,
    and the command receives them in its `**options`."""

    def wrap(command: Callable) -> Callable:
        own = inspect.signature(command, eval_str=True)
        params = [p for p in own.parameters.values() if p.kind is not p.VAR_KEYWORD]
        hints = get_type_hints(command, include_extras=True)
        for group in groups:
            params += inspect.signature(group, eval_str=True).parameters.values()
            hints.update(get_type_hints(group, include_extras=True))
        command.__signature__ = own.replace(parameters=params)  # type: ignore[attr-defined]
        command.__annotations__ = hints
        return command

    return wrap


def engine_options_of(o: dict[str, Any], *, compile_default: str = "off"):
    """EngineOptions from the model, runtime and decoding groups' values; `compile_default`
    where --compile is not given (auto for the long-lived commands, chat and serve)."""
    from tidecli.runtime.options import engine_options

    trace = o.get("popularity_trace")
    return engine_options(
        model=o["model"], device=o["device"], dtype=o["dtype"], graphs=o["graphs"],
        policy=o["policy"], tau=o["tau"], stall_refresh=o["stall_refresh"],
        warm_start=not o["cold_start"], skip_last_step=not o["refresh_last_step"],
        misses=o["misses"], prefetch=o.get("prefetch", "off"), cpu_threads=o["cpu_threads"],
        popularity_trace=str(trace) if trace else None, profile=o["profile"],
        vram_gib=o["vram"], ram_gib=o["ram"], experts_per_layer=o["experts_per_layer"],
        block_length=o["block_length"], threshold=o["threshold"],
        experts_dtype=o.get("experts_dtype", "bf16"),
        compile=o.get("compile") or compile_default)


def gib_list(text: str, option: str = "--vram") -> list[float]:
    """A comma list of positive amounts of GiB (plan and bench compare several budgets)."""
    from tidecli.errors import TideError

    out: list[float] = []
    for part in (p.strip() for p in text.split(",")):
        try:
            value = float(part)
        except ValueError:
            raise TideError(f"{option}: {part!r} is not a number of GiB",
                            f"e.g. {option} 12, or {option} 8,12,16 to compare") from None
        if not 0 < value < float("inf"):  # also refuses nan
            raise TideError(f"{option} must be a positive number of GiB, got {value:g}",
                            f"e.g. {option} 12")
        out.append(value)
    return out


def reply_length(gen_length: int | None, model: str | None) -> int:
    """--gen-length as given, else the default: short on the demo (its words are random)."""
    if gen_length is not None:
        return gen_length
    from tidecli.model.resolve import DEMO, default_model

    return DEMO_GEN_LENGTH if (model or default_model()) == DEMO else GEN_LENGTH


def decode_settings_of(o: dict[str, Any], **extra: Any):
    """DecodeSettings from the decoding group's values."""
    from tidecli.decode.settings import DecodeSettings

    return DecodeSettings(
        gen_length=reply_length(o["gen_length"], o.get("model")),
        block_length=o["block_length"], threshold=o["threshold"],
        editing_threshold=o["editing_threshold"], max_post_steps=o["max_post_steps"],
        temperature=o["temperature"], top_p=o["top_p"], top_k=o["top_k"], seed=o["seed"],
        decoding=o["decoding"], **extra)


def given(ctx: typer.Context, options: dict[str, Any]) -> frozenset[str]:
    """The option names typed on the command line (not left at their defaults)."""
    def typed(name: str) -> bool:
        source = ctx.get_parameter_source(name)
        return source is not None and source.name == "COMMANDLINE"

    return frozenset(name for name in options if typed(name))
