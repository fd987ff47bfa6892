"""`oreal-demo`: the whole job on a CPU, in minutes: SFT, then OREAL RL, on a synthetic math task.

    oreal-demo [--output-dir outputs/demo] [--seed 0]

Stages (each a real entry point; the settings are all in `configs/demo_cpu.py`):

1. data      multi-step arithmetic word problems (`oreal.demo.task`): SFT data, RL prompts and a
             held-out set, disjoint by arithmetic chain;
2. sft       `torchrun --nproc_per_node 2 -m oreal.algorithms.sft`: a tokenizer trained in-process and a tiny Qwen2,
             fine-tuned with FSDP2 over gloo on a mix of worked solutions and bare answers, so the SFT
             model often answers without working the problem out;
3. eval      held-out pass@1 of the SFT model (`oreal.runtime.heldout`, scored as the trainer scores: greedy in
             the demo config), and sampled at the rollout temperature;
4. oreal     `torchrun --nproc_per_node 2 -m oreal.train`: the real trainer (transformers rollout engine,
             judger, RLOO, filtering, token RM, fused OREAL loss, weight sync), then held-out pass@1;
5. grpo      the same budget with the GRPO recipe (`grpo_options()` in the config file; None skips it
             and `grpo_pass1` is null);
6. report    a before/after table, `results.json` (`sft_pass1`, `oreal_pass1`, `grpo_pass1`, `seconds`,
             `seed`, and more) and `curves.png` (reward, held-out pass@1, response length per step).

Every stage logs to `<output-dir>/<stage>.log`; a failed stage ends the demo with its log's tail.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo_cpu.py"  # the repository's configs/
NPROC = 2
STAGE_TIMEOUT_S = 3600.0


class DemoError(RuntimeError):
    """A stage failed; the message says which and where its log is."""


def load_config_module(path: str | Path):
    """The demo's config file as a module (it defines task(), sft_config(), config() and grpo_options())."""
    import importlib.util

    path = Path(path)
    if not path.is_file():
        raise DemoError(f"--config: {str(path)!r} does not exist; run oreal-demo from a clone of the repository "
                        "(pip install -e .) or pass --config path/to/demo_cpu.py")
    spec = importlib.util.spec_from_file_location(f"_oreal_demo_config_{abs(hash(str(path.resolve())))}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise DemoError(f"--config {path}: the file failed to run: {type(exc).__name__}: {exc}") from exc
    for name in ("task", "sft_config", "config"):
        if not callable(getattr(module, name, None)):
            raise DemoError(f"--config {path}: the file must define {name}()")
    return module


def run_stage(name: str, command: list[str], log_path: Path, *, timeout_s: float = STAGE_TIMEOUT_S) -> float:
    """Run `command` in its own process group with output to `log_path`; returns its seconds.

    On failure or timeout the whole group is ended (torchrun's workers and the rollout engine included),
    and a `DemoError` carries the last lines of the log.
    """
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # one thread per process: 2 ranks (+ the engine) on 2 cores
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"
    start = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            code = process.wait(timeout=timeout_s)
        except (subprocess.TimeoutExpired, KeyboardInterrupt) as exc:
            _end_group(process)
            if isinstance(exc, KeyboardInterrupt):
                raise
            raise DemoError(f"stage {name} ran past {timeout_s:.0f}s and was stopped; see {log_path}") from None
    if code != 0:
        tail = "".join(log_path.read_text(encoding="utf-8", errors="replace").splitlines(True)[-25:])
        raise DemoError(f"stage {name} failed (exit code {code}); last lines of {log_path}:\n{tail}")
    return time.perf_counter() - start


def _end_group(process: subprocess.Popen) -> None:
    """Stop the process group this demo started (TERM, then KILL after 10 s)."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()


def torchrun(module: str, args: list[str]) -> list[str]:
    """A `torchrun --standalone` command (a free rendezvous port, so demos and tests may run side by side)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(NPROC),
            "-m", module, *args]


def rl_args(config_path: Path, out: Path, run: str, paths: dict, seed: int, sft_dir: Path,
            extra: list[str]) -> list[str]:
    # --overwrite: a rerun of the demo into the same folder starts each run afresh, knowingly.
    return ["--config", str(config_path), "--output-dir", str(out / run), "--overwrite", "--model.path", str(sft_dir),
            "--data.train_files", str(paths["rl"]), "--eval.files", str(paths["heldout"]),
            "--train.seed", str(seed), "--data.seed", str(seed), *extra]


def options(pairs: list[str]) -> list[str]:
    """`KEY=VALUE` pairs from the command line as `--KEY VALUE` options."""
    out = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise DemoError(f"expected KEY=VALUE, got {pair!r}")
        out += [f"--{key.lstrip('-')}", value]
    return out


def eval_kind(cfg) -> str:
    return "greedy" if cfg.eval.temperature == 0 else f"T={cfg.eval.temperature:g}"


def describe_eval(cfg, result: dict) -> str:
    return f"{eval_kind(cfg)}, {result['problems']} problems x {result['samples']}"


def last_eval(run_dir: Path) -> dict:
    from oreal.demo.plotting import EVAL_FILE, read_records

    records = read_records(run_dir / EVAL_FILE)
    return records[-1] if records else {}


def format_table(rows: list[tuple[str, float | None, str]], sft: float, *, metric: str = "held-out pass@1") -> str:
    lines = [f"{'model':<28}{metric:>16}{'vs SFT':>10}", "-" * 54]
    for name, value, note in rows:
        if value is None:
            lines.append(f"{name:<28}{'n/a':>16}{'':>10}  {note}".rstrip())
        else:
            delta = "" if name.startswith("SFT") else f"{100 * (value - sft):+.1f}"
            lines.append(f"{name:<28}{100 * value:>15.1f}%{delta:>10}  {note}".rstrip())
    return "\n".join(lines)


SAMPLED_SAMPLES = 4  # samples per problem for the second score, drawn at the rollout temperature


def score_model(model_dir: Path, cfg, seed: int) -> dict:
    """Held-out pass@1 as the RL config's `eval` section scores it (the demo's headline: greedy), and the
    same problems sampled at the rollout temperature (`sampled_pass@1`, the policy RL actually trained)."""
    from oreal.runtime.heldout import at_rollout_temperature, evaluate_model

    headline = evaluate_model(model_dir, cfg, seed=seed, num_threads=NPROC)
    sampled = evaluate_model(model_dir, at_rollout_temperature(cfg, SAMPLED_SAMPLES), seed=seed, num_threads=NPROC)
    return {**headline, "sampled_pass@1": sampled["pass@1"], "sampled_response_length": sampled["response_length"]}


def resolve_rl_config(args: list[str]):
    """The trainer's resolved `Config` for these command-line arguments (what `oreal.train` will run)."""
    from oreal.runtime.config import ConfigError, parse_args

    try:
        return parse_args(args).config
    except ConfigError as exc:
        raise DemoError(f"the RL options are invalid: {exc}") from None


def run_demo(output_dir: str | Path, seed: int = 0, *, config_path: str | Path = DEFAULT_CONFIG,
             sft_options: list[str] = (), rl_options: list[str] = (), skip_grpo: bool = False,
             echo=print) -> dict:
    """The whole demo; returns what it writes to `<output_dir>/results.json`."""
    from oreal.demo.task import SyntheticTask
    from oreal.demo.plotting import plot_runs

    start = time.perf_counter()
    config_path = Path(config_path).resolve()
    module = load_config_module(config_path)
    out = Path(output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    # 1. Data.
    t = time.perf_counter()
    task = module.task()
    if not isinstance(task, SyntheticTask):
        raise DemoError(f"--config {config_path}: task() must return an oreal.demo.task.SyntheticTask")
    paths = task.write(out / "data", seed=seed)
    timings["data"] = time.perf_counter() - t
    echo(f"[data] {task.train_size} SFT problems, {task.rl_size} RL prompts, {task.heldout_size} held-out "
         f"problems (seed {seed}) in {out / 'data'}")

    # 2. SFT.
    sft_dir = out / "sft"
    # --overwrite: a rerun of the demo into the same folder starts its SFT afresh (oreal.runtime.output_folder).
    sft_cmd = torchrun("oreal.algorithms.sft", ["--config", str(config_path), "--output-dir", str(sft_dir),
                                                "--overwrite", "--data.train_file", str(paths["train"]),
                                                "--train.seed", str(seed), *options(list(sft_options))])
    echo(f"[sft] torchrun x{NPROC}: fine-tuning a tiny Qwen2 (log: {out / 'sft.log'})")
    timings["sft"] = run_stage("sft", sft_cmd, out / "sft.log")
    model_dir = sft_dir / "hf"
    echo(f"[sft] done in {timings['sft']:.0f}s -> {model_dir}")

    # 3. Held-out evaluation of the SFT model, scored exactly as the RL runs score (their config).
    oreal_args = rl_args(config_path, out, "oreal", paths, seed, model_dir, options(list(rl_options)))
    rl_cfg = resolve_rl_config(oreal_args)
    t = time.perf_counter()
    sft_eval = score_model(model_dir, rl_cfg, seed)
    timings["eval_sft"] = time.perf_counter() - t
    echo(f"[eval] SFT held-out pass@1 = {sft_eval['pass@1']:.3f} ({describe_eval(rl_cfg, sft_eval)}; sampled at "
         f"T={rl_cfg.rollout.temperature:g}: {sft_eval['sampled_pass@1']:.3f}; {timings['eval_sft']:.0f}s)")

    # 4. OREAL.
    runs = {"OREAL": out / "oreal"}
    echo(f"[oreal] torchrun x{NPROC}: {rl_cfg.train.steps} OREAL steps (log: {out / 'oreal.log'})")
    timings["oreal"] = run_stage("oreal", torchrun("oreal.train", oreal_args), out / "oreal.log")
    t = time.perf_counter()
    oreal_eval = score_model(out / "oreal" / "hf", rl_cfg, seed)
    timings["eval_oreal"] = time.perf_counter() - t
    echo(f"[oreal] done in {timings['oreal']:.0f}s; held-out pass@1 = {oreal_eval['pass@1']:.3f} "
         f"(sampled: {oreal_eval['sampled_pass@1']:.3f})")

    # 5. GRPO at the same budget, when the trainer has it.
    grpo_eval, grpo_note = None, ""
    grpo_extra = getattr(module, "grpo_options", lambda: None)()
    if skip_grpo:
        grpo_note = "skipped (--skip-grpo)"
    elif grpo_extra is None:
        grpo_note = "not run: grpo_options() in the config returned None"
    else:
        grpo_args = rl_args(config_path, out, "grpo", paths, seed, model_dir,
                            list(grpo_extra) + options(list(rl_options)))
        grpo_cfg = resolve_rl_config(grpo_args)
        echo(f"[grpo] torchrun x{NPROC}: {grpo_cfg.train.steps} GRPO steps (log: {out / 'grpo.log'})")
        timings["grpo"] = run_stage("grpo", torchrun("oreal.train", grpo_args), out / "grpo.log")
        t = time.perf_counter()
        grpo_eval = score_model(out / "grpo" / "hf", grpo_cfg, seed)
        timings["eval_grpo"] = time.perf_counter() - t
        runs["GRPO"] = out / "grpo"
        echo(f"[grpo] done in {timings['grpo']:.0f}s; held-out pass@1 = {grpo_eval['pass@1']:.3f} "
             f"(sampled: {grpo_eval['sampled_pass@1']:.3f})")
    if grpo_note:
        echo(f"[grpo] {grpo_note}")

    # 6. Report.
    sft_pass1 = sft_eval["pass@1"]
    plot_path = plot_runs(runs, out / "curves.png", start_pass1=sft_pass1,
                          title=f"OREAL demo on synthetic arithmetic (seed {seed}; held-out pass@1 "
                                f"{eval_kind(rl_cfg)}, SFT {sft_pass1:.2f})")
    seconds = time.perf_counter() - start
    results = {
        "sft_pass1": sft_pass1,
        "oreal_pass1": oreal_eval["pass@1"],
        "grpo_pass1": grpo_eval["pass@1"] if grpo_eval else None,
        "seconds": seconds,
        "seed": seed,
        "oreal_gain": oreal_eval["pass@1"] - sft_pass1,
        "grpo_note": grpo_note or None,
        "heldout": {"problems": sft_eval["problems"], "samples_per_problem": sft_eval["samples"],
                    "temperature": rl_cfg.eval.temperature, "top_p": rl_cfg.eval.top_p},
        "sampled_pass1": {"sft": sft_eval["sampled_pass@1"], "oreal": oreal_eval["sampled_pass@1"],
                          "grpo": grpo_eval["sampled_pass@1"] if grpo_eval else None,
                          "temperature": rl_cfg.rollout.temperature, "top_p": rl_cfg.rollout.top_p,
                          "samples_per_problem": SAMPLED_SAMPLES},
        "response_length": {"sft": sft_eval["response_length"], "oreal": oreal_eval["response_length"],
                            "grpo": grpo_eval["response_length"] if grpo_eval else None},
        "rl_steps": rl_cfg.train.steps,
        "last_trainer_eval": {name: last_eval(path).get("eval/mean_pass@1") for name, path in runs.items()},
        "stage_seconds": {k: round(v, 1) for k, v in timings.items()},
        "cpu_seconds": _cpu_seconds(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "versions": _versions(),
        "plot": str(plot_path),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    for key, metric in (("pass@1", describe_eval(rl_cfg, sft_eval)),
                        ("sampled_pass@1", f"sampled, T={rl_cfg.rollout.temperature:g} x{SAMPLED_SAMPLES}")):
        rows = [("SFT", sft_eval[key], ""), (f"OREAL ({rl_cfg.train.steps} steps)", oreal_eval[key], "")]
        rows.append(("GRPO", grpo_eval[key], "") if grpo_eval else ("GRPO", None, grpo_note))
        echo("")
        echo(f"held-out pass@1, {metric}:")
        echo(format_table(rows, sft_eval[key]))
    echo("")
    echo(f"total {seconds:.0f}s; results: {out / 'results.json'}; curves: {plot_path}")
    return results


def _versions() -> dict:
    from importlib import metadata

    out = {}
    for name in ("oreal", "torch", "transformers", "tokenizers"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _cpu_seconds() -> float:
    """CPU time of this process and every finished child (user + system), the cost on a shared machine."""
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return round(own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime, 1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="oreal-demo",
        description="SFT -> held-out eval -> OREAL RL (torchrun, 2 processes, gloo) -> held-out eval on a "
                    "synthetic math task, on CPU. Writes results.json and curves.png to --output-dir.")
    parser.add_argument("--output-dir", default="outputs/demo", help="where everything goes (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the data, the model and RL (default: 0)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="the demo's config file (default: %(default)s)")
    parser.add_argument("--sft", action="append", default=[], metavar="KEY=VALUE",
                        help="override an SFT option, e.g. --sft train.steps=50 (repeatable)")
    parser.add_argument("--rl", action="append", default=[], metavar="KEY=VALUE",
                        help="override an RL option for OREAL and GRPO, e.g. --rl train.steps=10 (repeatable)")
    parser.add_argument("--skip-grpo", action="store_true", help="run OREAL only")
    parser.add_argument("--data-only", action="store_true",
                        help="write the data files (OUTPUT/data/train.jsonl, rl.jsonl, heldout.jsonl) and stop: the "
                             "first step of running the stages by hand (oreal-sft, oreal-train, oreal-eval)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the in-process evaluations load models; keep the console to the stages
    try:
        if args.data_only:
            paths = load_config_module(args.config).task().write(Path(args.output_dir) / "data", seed=args.seed)
            print("\n".join(f"[data] {split}: {path}" for split, path in paths.items()))
            return 0
        run_demo(args.output_dir, args.seed, config_path=args.config, sft_options=args.sft, rl_options=args.rl,
                 skip_grpo=args.skip_grpo)
    except DemoError as exc:
        print(f"oreal-demo: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("oreal-demo: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
