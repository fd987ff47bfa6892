"""`oreal-eval`: score a saved model on math benchmarks and write a paper-style table.

    oreal-eval --model runs/7b/hf --data math500,aime24,amc23 --output evals/7b --samples 16 --temperature 1.0 \
        --top-p 0.95 --max-new-tokens 14000 [--engine vllm|hf] [--config configs/oreal_7b.py] [--section.option v]

Benchmarks are named (the sets shipped in `oreal/data/benchmarks/`, see `BENCHMARKS`) or given as a
path to any JSONL in a prompt format the trainer reads. Prompts are rendered, sampled and judged as
the trainer's own evaluation does (`oreal.runtime.heldout`: the same code scores the demo's models):
the `data`, `rollout` and `judge` sections of `--config` (default: the trainer's defaults, i.e. the
tokenizer's chat template plus the boxed-answer instruction) apply, and any of their options can
be overridden as `--data.instruction ""` or `--judge.verifier_hosts h1:8000,h2:8000`.

Generation runs in the rollout engines (`oreal.rollout`): one transformers engine on CPU, or one
vLLM engine per GPU (per `--tensor-parallel-size` GPUs) when several are visible, working through
fixed chunks of `--chunk-size` prompts. A chunk's sampling seed is `--seed` + its first prompt's
index, so a problem's samples do not depend on which engine drew them or on what ran before.

OUT holds `eval_config.json` (the settings), `<benchmark>.jsonl` (per problem: its samples, their
lengths, finish reasons and verdicts), `summary.json` (benchmark -> {"pass@1", and with n > 1
samples "avg@n" and "pass@n", problems, samples, response_length, truncated}) and `results.md` (the
table). A used OUT is refused unless `--resume` (finished chunks are kept, the rest is generated;
the settings must match) or `--overwrite`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import queue
import sys
import threading
import time
from pathlib import Path

from oreal.runtime.config import Config, ConfigError, set_option

BENCHMARK_DIR = Path(__file__).resolve().parent.parent / "data" / "benchmarks"
# name -> (file in BENCHMARK_DIR, the name the paper's table uses)
BENCHMARKS = {
    "math500": ("math500.jsonl", "MATH-500"),
    "aime24": ("aime24.jsonl", "AIME2024"),
    "amc23": ("amc23.jsonl", "AMC23"),
    "gsm8k": ("gsm8k.jsonl", "GSM8K"),
}
SETTINGS_FILE = "eval_config.json"
SUMMARY_FILE = "summary.json"
TABLE_FILE = "results.md"
DEFAULT_CHUNK = 256
EVAL_REQUEST_TIMEOUT_S = 6 * 3600.0


@dataclasses.dataclass(kw_only=True)
class EvalRequest:
    """What one `oreal-eval` run does (the command line, resolved)."""

    model: str
    benchmarks: list[tuple[str, str]]  # (name, JSONL path)
    output: str
    cfg: Config  # data / rollout / judge / eval sections decide rendering, sampling and judging
    seed: int = 0
    engine: str = "hf"
    gpus: list[str] = dataclasses.field(default_factory=list)
    tensor_parallel_size: int = 1
    threads: int = 0
    chunk_size: int = DEFAULT_CHUNK
    label: str = ""
    resume: bool = False
    overwrite: bool = False
    debug_kill_after_chunks: int = 0

    def settings(self) -> dict:
        """Everything that decides the numbers; a resumed run must match it exactly."""
        c = self.cfg
        return {"model": str(Path(self.model).resolve()),
                "benchmarks": {name: str(Path(path).resolve()) for name, path in self.benchmarks},
                "samples": c.eval.samples, "temperature": c.eval.temperature, "top_p": c.eval.top_p,
                "max_new_tokens": c.eval.max_new_tokens, "max_problems": c.eval.max_problems, "seed": self.seed,
                "chunk_size": self.chunk_size, "engine": self.engine,
                "data": {k: getattr(c.data, k) for k in ("template", "system_prompt", "instruction")},
                "stop_words": list(c.rollout.stop_words), "max_total_tokens": c.rollout.max_total_tokens,
                "judge": dataclasses.asdict(c.judge)}


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="oreal-eval", allow_abbrev=False,
        description="Score a saved model on math benchmarks (pass@1, avg@n, pass@n) with the rollout engines "
                    "and the trainer's judge; writes per-problem JSONL, summary.json and a Markdown table.",
        epilog="Any option of the trainer's data / rollout / judge sections can follow as --section.option VALUE "
               f"(e.g. --data.instruction ''). Shipped benchmarks: {', '.join(BENCHMARKS)}.")
    parser.add_argument("--model", required=True, help="a local Hugging Face model directory")
    parser.add_argument("--data", required=True,
                        help="comma-separated benchmark names or JSONL paths (e.g. math500,aime24,my_set.jsonl)")
    parser.add_argument("--output", required=True, help="the folder results go to")
    parser.add_argument("--config", help="a trainer config file whose data/rollout/judge/eval sections apply")
    parser.add_argument("--samples", type=int, help="samples per problem (default: the config's eval.samples)")
    parser.add_argument("--temperature", type=float, help="0 is greedy (default: the config's eval.temperature)")
    parser.add_argument("--top-p", type=float, help="(default: the config's eval.top_p)")
    parser.add_argument("--max-new-tokens", type=int, help="(default: the config's eval.max_new_tokens)")
    parser.add_argument("--max-problems", type=int, help="per benchmark; 0: all (default: the config's)")
    parser.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    parser.add_argument("--engine", choices=("vllm", "hf"),
                        help="vllm (GPU) or hf (transformers; CPU); default: vllm when a GPU is visible")
    parser.add_argument("--gpus", default="", help="GPUs for the vLLM engines, e.g. 0,1,2,3 (default: all visible)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs per vLLM engine")
    parser.add_argument("--threads", type=int, default=0, help="torch threads of the hf engine (0: torch's default)")
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK,
                        help="prompts per generate call, the unit of seeding and of --resume (default: %(default)s)")
    parser.add_argument("--label", default="", help="the model's name in the table (default: the model folder)")
    parser.add_argument("--resume", action="store_true", help="continue a run in --output, keeping finished chunks")
    parser.add_argument("--overwrite", action="store_true", help="delete what --output holds and start afresh")
    parser.add_argument("--debug-kill-after-chunks", type=int, default=0, help=argparse.SUPPRESS)
    return parser


def resolve_benchmarks(spec: str) -> list[tuple[str, str]]:
    """`math500,aime24,path/x.jsonl` -> [(name, path)]; a path's name is its file stem."""
    out: list[tuple[str, str]] = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        if item in BENCHMARKS:
            out.append((item, str(BENCHMARK_DIR / BENCHMARKS[item][0])))
        elif Path(item).is_file():
            out.append((Path(item).stem, item))
        else:
            raise ConfigError(f"--data: {item!r} is neither a shipped benchmark ({', '.join(BENCHMARKS)}) nor a file")
    if not out:
        raise ConfigError("--data: no benchmark given")
    names = [name for name, _ in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"--data: two benchmarks share the name {next(n for n in names if names.count(n) > 1)!r} "
                          "(files are named by their stem); rename one")
    return out


def parse_args(argv: list[str]) -> EvalRequest:
    args, rest = build_parser().parse_known_args(argv)
    from oreal.runtime.config import load_config_file

    cfg = load_config_file(args.config) if args.config else Config()
    i = 0
    while i < len(rest):  # --section.option VALUE overrides of the config
        name, has_value, value = rest[i].partition("=")
        if not name.startswith("--") or "." not in name:
            raise ConfigError(f"unexpected argument {rest[i]!r}; see oreal-eval --help")
        if not has_value:
            if i + 1 >= len(rest):
                raise ConfigError(f"{name} needs a value")
            value = rest[i + 1]
            i += 1
        set_option(cfg, name[2:], value)
        i += 1
    for option, value in (("eval.samples", args.samples), ("eval.temperature", args.temperature),
                          ("eval.top_p", args.top_p), ("eval.max_new_tokens", args.max_new_tokens),
                          ("eval.max_problems", args.max_problems)):
        if value is not None:
            section, field = option.split(".")
            setattr(getattr(cfg, section), field, value)
    e = cfg.eval
    checks = [(e.samples >= 1, "--samples", "must be >= 1"), (e.temperature >= 0, "--temperature", "must be >= 0"),
              (0 < e.top_p <= 1, "--top-p", "must be in (0, 1]"),
              (e.max_new_tokens >= 1, "--max-new-tokens", "must be >= 1"),
              (e.max_problems >= 0, "--max-problems", "must be >= 0 (0: all)"),
              (args.chunk_size >= 1, "--chunk-size", "must be >= 1"),
              (args.tensor_parallel_size >= 1, "--tensor-parallel-size", "must be >= 1"),
              (cfg.rollout.max_total_tokens > e.max_new_tokens, "--max-new-tokens",
               f"must be below rollout.max_total_tokens ({cfg.rollout.max_total_tokens}), which also holds the prompt"),
              (not (args.resume and args.overwrite), "--overwrite", "contradicts --resume")]
    for ok, option, message in checks:
        if not ok:
            raise ConfigError(f"{option}: {message}")
    if e.temperature == 0 and e.samples > 1:
        raise ConfigError("--samples: greedy decoding (--temperature 0) gives one answer per problem; use --samples 1")
    if not (Path(args.model) / "config.json").is_file():
        raise ConfigError(f"--model: {args.model!r} is not a Hugging Face model directory (no config.json)")
    engine = args.engine or _default_engine()
    gpus = [g for g in args.gpus.split(",") if g.strip()] if args.gpus else []
    return EvalRequest(model=args.model, benchmarks=resolve_benchmarks(args.data), output=args.output, cfg=cfg,
                       seed=args.seed, engine=engine, gpus=gpus, tensor_parallel_size=args.tensor_parallel_size,
                       threads=args.threads, chunk_size=args.chunk_size, label=args.label, resume=args.resume,
                       overwrite=args.overwrite, debug_kill_after_chunks=args.debug_kill_after_chunks)


def _default_engine() -> str:
    import torch

    return "vllm" if torch.cuda.is_available() else "hf"


# --------------------------------------------------------------------------------------------------
# Engines
# --------------------------------------------------------------------------------------------------

def engine_groups(request: EvalRequest) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES of each engine: one per `tensor_parallel_size` GPUs (vLLM), or [None] (hf)."""
    if request.engine == "hf":
        return [None]
    gpus = request.gpus
    if not gpus:
        import torch

        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        gpus = [g for g in visible.split(",") if g.strip()] if visible else \
            [str(i) for i in range(torch.cuda.device_count())]
    if not gpus:  # no GPU visible: one engine on what vLLM finds (its CPU build, README "Install vLLM on CPU")
        return [None]
    tp = request.tensor_parallel_size
    if len(gpus) < tp:
        raise ConfigError(f"--tensor-parallel-size {tp}: only {len(gpus)} GPU(s) are available ({','.join(gpus)})")
    return [",".join(gpus[i:i + tp]) for i in range(0, len(gpus) - tp + 1, tp)]


def start_engines(request: EvalRequest, out: Path) -> list:
    """Start every engine at once (vLLM takes minutes each); any failure closes those that started."""
    from oreal.rollout import build_engine

    groups = engine_groups(request)
    engines: list = [None] * len(groups)
    errors: list[BaseException] = []

    def start(i: int, gpus: str | None) -> None:
        try:
            # A chunk of 256 long-answer prompts x 16 samples can take hours on one GPU: the engine is judged hung
            # only after `rollout.timeout_s` or 6 h, whichever is longer.
            timeout_s = max(request.cfg.rollout.timeout_s, EVAL_REQUEST_TIMEOUT_S)
            if request.engine == "hf":
                engines[i] = build_engine("hf", request.model, dtype="float32", seed=request.seed,
                                          num_threads=request.threads or None, max_batch_rows=256,
                                          request_timeout_s=timeout_s, log_path=str(out / "engine-0.log"))
            else:
                engines[i] = build_engine(
                    "vllm", request.model, seed=request.seed, gpus=gpus, request_timeout_s=timeout_s,
                    tensor_parallel_size=request.tensor_parallel_size,
                    gpu_memory_utilization=request.cfg.rollout.gpu_memory_utilization,
                    max_model_len=request.cfg.rollout.max_total_tokens, log_path=str(out / f"engine-{i}.log"))
        except BaseException as exc:  # noqa: BLE001 - reported below, after every start has ended
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(i, g), daemon=True) for i, g in enumerate(groups)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        for engine in engines:
            if engine is not None:
                engine.close()
        raise RuntimeError(f"an engine failed to start ({type(errors[0]).__name__}: {errors[0]}); "
                           f"see {out}/engine-*.log") from errors[0]
    return engines


# --------------------------------------------------------------------------------------------------
# Per-problem records (what makes a run resumable)
# --------------------------------------------------------------------------------------------------

def read_records(path: Path) -> dict[int, dict]:
    """index -> record of a benchmark's JSONL; a line cut short by a kill is ignored."""
    found: dict[int, dict] = {}
    if not path.is_file():
        return found
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("index"), int):
            found[record["index"]] = record
    return found


def finished_chunks(records: dict[int, dict], count: int, chunk: int) -> set[int]:
    """Starts of the chunks whose every problem has a record."""
    from oreal.runtime.heldout import chunk_starts

    return {lo for lo in chunk_starts(count, chunk) if all(i in records for i in range(lo, min(lo + chunk, count)))}


def keep_only(path: Path, records: dict[int, dict], indices: set[int]) -> None:
    """Rewrite `path` (atomically) with the records of `indices`, in order: drops a half-written chunk."""
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        for i in sorted(indices):
            handle.write(json.dumps(records[i]) + "\n")
    os.replace(tmp, path)


def append_records(path: Path, problems: list) -> None:
    """One write per chunk, flushed to disk: a kill leaves whole chunks, plus at most one cut line."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write("".join(json.dumps(p.to_json()) + "\n" for p in problems))
        handle.flush()
        os.fsync(handle.fileno())


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------

def prepare_output(request: EvalRequest) -> Path:
    from oreal.runtime.output_folder import check_output_folder, prepare_output_folder

    out = Path(request.output)
    check_output_folder(out, resume=request.resume, overwrite=request.overwrite)
    settings = request.settings()
    saved_path = out / SETTINGS_FILE
    if request.resume and saved_path.is_file():
        saved = json.loads(saved_path.read_text())
        differ = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
        if differ:
            raise ConfigError(f"--resume: {out} was evaluated with other settings ({', '.join(differ)}); "
                              "run with those, or --overwrite to start afresh")
    prepare_output_folder(out, resume=request.resume, overwrite=request.overwrite)
    saved_path.write_text(json.dumps(settings, indent=2) + "\n")
    return out


def run(request: EvalRequest, echo=print) -> dict:
    """Evaluate, write OUT's files, return the summary (benchmark -> metrics)."""
    from oreal.runtime.build import Judge, load_tokenizer
    from oreal.runtime.heldout import chunk_sampling, chunk_starts, eval_sampling, judge_chunk, load_eval_prompts

    from oreal.runtime.output_folder import check_output_folder

    start_time = time.perf_counter()
    check_output_folder(request.output, resume=request.resume, overwrite=request.overwrite)  # before the slow parts
    cfg, n, chunk = request.cfg, request.cfg.eval.samples, request.chunk_size
    tokenizer = load_tokenizer(request.model)
    sampling = eval_sampling(cfg, tokenizer, greedy=False, seed=request.seed)
    prompts_of = {}
    for name, path in request.benchmarks:  # every input is checked before the output folder is touched
        try:
            prompts, skipped = load_eval_prompts(path, cfg, tokenizer)
        except ValueError as exc:
            raise ConfigError(f"--data {name}: {exc}") from None
        if not prompts:
            raise ConfigError(f"--data {name}: no problem's prompt fits in rollout.max_total_tokens - "
                              f"max_new_tokens = {cfg.rollout.max_total_tokens - cfg.eval.max_new_tokens} tokens")
        if skipped:
            echo(f"[{name}] {skipped} problem(s) left out: their prompt leaves no room for "
                 f"{cfg.eval.max_new_tokens} new tokens")
        prompts_of[name] = prompts
    out = prepare_output(request)
    work = []
    for name, prompts in prompts_of.items():
        path_out = out / f"{name}.jsonl"
        records = read_records(path_out)
        done = finished_chunks(records, len(prompts), chunk)
        kept = {i for lo in done for i in range(lo, min(lo + chunk, len(prompts)))}
        keep_only(path_out, records, kept)
        todo = [lo for lo in chunk_starts(len(prompts), chunk) if lo not in done]
        echo(f"[{name}] {len(prompts)} problems x {n} samples: {len(kept)} already scored, {len(todo)} chunk(s) to go")
        work += [(name, lo) for lo in todo]

    if work:
        judge = Judge(cfg)
        engines = start_engines(request, out)
        results: queue.Queue = queue.Queue()
        tasks: queue.Queue = queue.Queue()
        for item in work:
            tasks.put(item)

        def drive(engine) -> None:
            while True:
                try:
                    name, lo = tasks.get_nowait()
                except queue.Empty:
                    return
                prompts = prompts_of[name][lo:lo + chunk]
                try:
                    rollouts = engine.generate([p.input_ids for p in prompts], n=n,
                                               sampling=chunk_sampling(sampling, lo))
                    results.put((name, lo, prompts, rollouts, None))
                except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                    results.put((name, lo, prompts, None, exc))
                    return

        workers = [threading.Thread(target=drive, args=(e,), daemon=True) for e in engines]
        try:
            for w in workers:
                w.start()
            for done_count in range(1, len(work) + 1):
                name, lo, prompts, rollouts, error = results.get()
                if error is not None:
                    raise RuntimeError(f"generation failed on {name} problems {lo}..{lo + len(prompts) - 1}: "
                                       f"{type(error).__name__}: {error}") from error
                problems = judge_chunk(prompts, lo, rollouts, tokenizer=tokenizer, judge=judge, n=n)
                append_records(out / f"{name}.jsonl", problems)
                echo(f"[{name}] problems {lo}..{lo + len(prompts) - 1} scored ({done_count}/{len(work)} chunks, "
                     f"{time.perf_counter() - start_time:.0f}s)")
                if done_count == request.debug_kill_after_chunks:
                    import signal

                    os.kill(os.getpid(), signal.SIGKILL)  # a hard kill mid-run (resume tests)
        finally:
            for engine in engines:
                engine.close()

    summary = write_summary(request, out, prompts_of)
    table = format_table(summary, request.label or model_label(request.model))
    (out / TABLE_FILE).write_text(table)
    echo("")
    echo(table.rstrip())
    echo(f"\nresults: {out / SUMMARY_FILE}, {out / TABLE_FILE} ({time.perf_counter() - start_time:.0f}s)")
    return summary


def write_summary(request: EvalRequest, out: Path, prompts_of: dict) -> dict:
    from oreal.runtime.heldout import ScoredProblem, summarize

    summary = {}
    for name, _ in request.benchmarks:
        records = read_records(out / f"{name}.jsonl")
        missing = [i for i in range(len(prompts_of[name])) if i not in records]
        if missing:
            raise RuntimeError(f"{name}: {len(missing)} problem(s) have no record in {out / (name + '.jsonl')}")
        problems = [ScoredProblem(**records[i]) for i in range(len(prompts_of[name]))]
        summary[name] = summarize(problems)
    tmp = out / (SUMMARY_FILE + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, out / SUMMARY_FILE)
    return summary


def model_label(model: str) -> str:
    """A model's name in the table: its folder, or the run folder above an exported `hf/` (runs/7b/hf -> 7b)."""
    path = Path(model).resolve()
    return path.parent.name if path.name == "hf" and path.parent.name else path.name


def display_name(name: str) -> str:
    return BENCHMARKS[name][1] if name in BENCHMARKS else name


def format_table(summary: dict, label: str) -> str:
    """Two Markdown tables: the paper's layout (a row per model, a pass@1 column per benchmark, in %, and their
    average), then a row per benchmark with every number (problems, samples, pass@1, avg@n, pass@n, length)."""
    names = list(summary)
    lines = ["| Model | " + " | ".join(display_name(n) for n in names) + " | Average |",
             "|---" * (len(names) + 2) + "|",
             f"| {label} | " + " | ".join(f"{100 * summary[n]['pass@1']:.1f}" for n in names)
             + f" | {100 * sum(summary[n]['pass@1'] for n in names) / len(names):.1f} |", ""]
    lines += ["| Benchmark | Problems | Samples | pass@1 | avg@n | pass@n | Response tokens | Cut at limit |",
              "|---|---|---|---|---|---|---|---|"]
    for n_ in names:
        s = summary[n_]
        k = s["samples"]
        avg = f"{100 * s[f'avg@{k}']:.1f} (n={k})" if k > 1 else "–"
        passk = f"{100 * s[f'pass@{k}']:.1f} (n={k})" if k > 1 else "–"
        lines.append(f"| {display_name(n_)} | {s['problems']} | {k} | {100 * s['pass@1']:.1f} | {avg} | {passk} | "
                     f"{s['response_length']:.0f} | {100 * s['truncated']:.1f}% |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from oreal.runtime.setup_errors import SetupError

    argv = sys.argv[1:] if argv is None else argv
    try:
        request = parse_args(argv)
        run(request)
    except (ConfigError, SetupError) as exc:
        print(f"oreal-eval: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # an engine died or hung (oreal.rollout.EngineError): what is on disk stays
        print(f"oreal-eval: error: {exc}\nfinished chunks are kept; rerun with --resume to continue", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("oreal-eval: interrupted; rerun with --resume to continue", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
