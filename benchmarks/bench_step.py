"""End-to-end step time against TRL's GRPOTrainer, on the same tiny model, prompts and work per step.

    python -m benchmarks.bench_step --json OUT.json        # one run, JSON rows
    python -m benchmarks.bench_step --save                 # also benchmarks/results/step_vs_trl.{json,md}

What both sides do (printed in full with every run, and stored in the JSON):
- model: the demo's tiny Qwen2 (`configs/demo_cpu.py`'s `sft_config()`: BPE vocabulary of 512 trained
  on the demo's SFT texts, hidden 128, 4 layers, 4 heads / 2 KV heads, intermediate 256), random
  initialisation from a fixed seed, written once to a local directory that both sides load; fp32.
- prompts: the demo's RL prompts (`oreal.demo.task`), rendered with the tokenizer's chat template.
- work per step: 16 prompts x 8 samples, at most 48 new tokens at temperature 1 (top-p 1, no top-k),
  stopping at the end-of-turn token; GRPO with group-normalised advantages, the DAPO token-level
  clipped surrogate (clip 0.2), one epoch, one minibatch (one optimizer update per step), no KL (no
  reference model); AdamW at 1e-4; rewards from this package's rule-based judge.
- this trainer, two layouts, each as a user runs it (engine, judge, packing and weight sync included),
  `configs/demo_cpu.py` switched to GRPO with the options above:
  - `oreal`: `torchrun --nproc_per_node 2 -m oreal.train` (the demo's layout: two FSDP2 ranks and a
    dedicated engine process);
  - `oreal_1p`: `python -m oreal.train --rollout.placement colocated` (one process, a group of one, the
    engine inside it: no launcher, no second interpreter, one copy of the libraries).
  Both with shared prompts (`train.share_prompts`, the default: each prompt of a micro-batch runs through the
  model once, its 8 answers attending to it; the same loss and gradients as TRL's 8 whole sequences).
  Step times from its metrics.jsonl (`time/step`, `time/rollout` + `time/judge`, `time/train`, `time/sync`).
- TRL: `trl.GRPOTrainer` in one process (its default for one CPU machine), `use_cpu`, fp32, torch's
  threads set by the rule this trainer's processes use (`oreal.runtime.budget.idle_cpus`: every core on
  an idle machine, as torch's default; fewer on a loaded one, where more would stall both sides alike),
  `per_device_train_batch_size=128` completions, `num_generations=8`, `steps_per_generation=1`,
  `num_iterations=1`, `beta=0`, `loss_type="dapo"`; the reward function calls the same judge. Step
  time from a callback around each optimizer step; its rollout time is `_generate_and_score_completions`
  (generation and rewards), the rest is training.

Both sides run `--steps` steps; the step time is the median of steps 3..steps (the first two warm up
allocators and caches). Sides alternate round by round (oreal, trl, oreal, trl, ...) so that the load
of a shared machine falls on both alike; the load average is recorded before and after every run.
Memory: the proportional set size (PSS, shared pages counted once across the tree) of the whole process
tree of a side (launcher, ranks, engine, judge workers), sampled every 0.2 s; the peak is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parent.parent
DEMO_CONFIG = REPO / "configs" / "demo_cpu.py"

PROMPTS_PER_STEP = 16
SAMPLES_PER_PROMPT = 8
MAX_NEW_TOKENS = 48
LEARNING_RATE = 1e-4
CLIP = 0.2
FIRST_TIMED_STEP = 3  # steps 1 and 2 warm up

OREAL_OPTIONS = [
    "--algorithm", "grpo", "--train.freeze_policy_steps", "0",
    "--data.prompts_per_step", str(PROMPTS_PER_STEP), "--data.samples_per_prompt", str(SAMPLES_PER_PROMPT),
    "--rollout.max_new_tokens", str(MAX_NEW_TOKENS), "--rollout.temperature", "1.0", "--rollout.top_p", "1.0",
    "--rollout.top_k", "0",
    "--ppo.epochs", "1", "--ppo.minibatches", "1", "--ppo.clip_low", str(CLIP), "--ppo.clip_high", str(CLIP),
    "--ppo.loss_agg", "token", "--ppo.kl_coef", "0.0", "--ppo.early_stop_ratio", "0.0",
    "--ppo.reward_correct", "1.0", "--ppo.reward_wrong", "-1.0",
    "--policy_optim.lr", str(LEARNING_RATE), "--policy_optim.min_lr", str(LEARNING_RATE),
    "--policy_optim.warmup_steps", "0", "--policy_optim.weight_decay", "0.0",
    "--eval.interval", "0", "--checkpoint.interval", "0", "--checkpoint.export_hf", "false",
    "--train.share_prompts", "true",  # the default, printed: each prompt runs once per micro-batch
]


# TRL's GRPOTrainer, configured for the same work per step as OREAL_OPTIONS (printed with every result).
TRL_OPTIONS = dict(
    use_cpu=True, bf16=False, fp16=False,
    per_device_train_batch_size=PROMPTS_PER_STEP * SAMPLES_PER_PROMPT, gradient_accumulation_steps=1,
    num_generations=SAMPLES_PER_PROMPT, steps_per_generation=1, num_iterations=1,
    max_completion_length=MAX_NEW_TOKENS, temperature=1.0, top_p=1.0, top_k=0, beta=0.0,
    epsilon=CLIP, loss_type="dapo", learning_rate=LEARNING_RATE, lr_scheduler_type="constant",
    weight_decay=0.0, warmup_steps=0, logging_steps=1, save_strategy="no",
    report_to="none", dataloader_num_workers=0, seed=0, disable_tqdm=True)


# ----- shared inputs ------------------------------------------------------------------------------
def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def prepare(workdir: Path) -> dict:
    """The demo's data files and its untrained tiny Qwen2 (random, seeded), written once under `workdir`."""
    from oreal.algorithms.sft import build_initial_model
    from oreal.demo.pipeline import load_config_module

    demo = load_config_module(DEMO_CONFIG)
    data = workdir / "data"
    paths = demo.task().write(data, seed=0)
    model_dir = workdir / "model"
    if not (model_dir / "config.json").exists():
        build_initial_model(demo.sft_config(), read_jsonl(paths["train"]), model_dir)
    return {"model": str(model_dir), "rl": str(paths["rl"]), "heldout": str(paths["heldout"])}


# ----- memory of a process tree -------------------------------------------------------------------
def process_role(cmdline: list[str]) -> str:
    """What a process of either side is, from its command line."""
    text = " ".join(cmdline)
    for needle, role in (("torch.distributed.run", "torchrun launcher"), ("oreal.rollout.server", "rollout engine"),
                         ("oreal.train", "trainer rank"), ("--side trl", "TRL trainer")):
        if needle in text:
            return role
    if len(cmdline) > 2 and cmdline[1] == "-c":
        return "judge worker"
    return os.path.basename(cmdline[0]) if cmdline else "?"


class TreePss:
    """Peak PSS (MiB) of a process and all its descendants, sampled in a background thread."""

    def __init__(self, pid: int, interval_s: float = 0.2):
        import psutil

        self.root = psutil.Process(pid)
        self.interval_s = interval_s
        self.peak_mib = 0.0
        self.peak_processes = 0
        self.peak_parts: list[tuple[str, float]] = []  # (role, PSS MiB) of every process at the peak
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        import psutil

        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return
        total, parts = 0, []
        for proc in procs:
            try:
                pss = proc.memory_full_info().pss
                parts.append((process_role(proc.cmdline()), pss / 2**20))
                total += pss
            except psutil.Error:
                pass
        self.samples += 1
        if total / 2**20 > self.peak_mib:
            self.peak_mib, self.peak_processes, self.peak_parts = total / 2**20, len(procs), parts

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval_s)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ----- this trainer ---------------------------------------------------------------------------------
def oreal_command(inputs: dict, out_dir: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
            "-m", "oreal.train", "--config", str(DEMO_CONFIG), "--output-dir", str(out_dir), "--overwrite",
            "--model.path", inputs["model"], "--data.train_files", inputs["rl"], "--eval.files", inputs["heldout"],
            "--steps", str(steps), *OREAL_OPTIONS]


def oreal_single_command(inputs: dict, out_dir: Path, steps: int) -> list[str]:
    """The same run in one process (no torchrun: a group of one) with the engine inside it (colocated)."""
    return [sys.executable, "-m", "oreal.train", "--config", str(DEMO_CONFIG), "--output-dir", str(out_dir),
            "--model.path", inputs["model"], "--data.train_files", inputs["rl"], "--eval.files", inputs["heldout"],
            "--steps", str(steps), *OREAL_OPTIONS, "--rollout.placement", "colocated"]


SIDES = {"oreal": oreal_command, "oreal_1p": oreal_single_command}


def oreal_steps(out_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = []
    for row in rows:
        if "time/step" not in row:
            continue
        rollout = row["time/rollout"] + row.get("time/judge", 0.0)
        steps.append({"step": row["step"], "step_s": row["time/step"], "rollout_s": rollout,
                      "train_s": row["time/train"], "sync_s": row.get("time/sync", 0.0),
                      "logprobs_s": row.get("time/logprobs", 0.0),
                      "response_length": row.get("response/length_mean")})
    return steps


# ----- TRL (runs in a child process: `--side trl`) ------------------------------------------------------
def trl_main(args) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from oreal.reward import judge
    from oreal.runtime.build import load_tokenizer

    from oreal.runtime.budget import idle_cpus

    # The same thread rule as this trainer's processes: the machine's idle cores (torch's default, all cores,
    # on an idle machine; on a loaded one, more threads than idle cores stall at every operator's barrier).
    torch.set_num_threads(idle_cpus(own_busy=1))
    inputs = json.loads(args.inputs)
    tokenizer = load_tokenizer(inputs["model"])
    records = read_jsonl(inputs["rl"])
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": r["problem"]}], tokenize=False,
                                             add_generation_prompt=True) for r in records]
    dataset = Dataset.from_dict({"prompt": prompts, "gold": [r["answer"] for r in records]})

    def reward(completions, gold, **_):
        return [1.0 if judge(text, g).correct else -1.0 for text, g in zip(completions, gold)]

    model = AutoModelForCausalLM.from_pretrained(inputs["model"], dtype=torch.float32)
    config = GRPOConfig(output_dir=str(Path(args.out).parent / "trl_output"), max_steps=args.steps, **TRL_OPTIONS)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=dataset,
                          processing_class=tokenizer)

    rollout = []
    inner = trainer._generate_and_score_completions

    def timed(*a, **k):
        start = time.perf_counter()
        try:
            return inner(*a, **k)
        finally:
            rollout.append(time.perf_counter() - start)

    trainer._generate_and_score_completions = timed
    steps = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.start = time.perf_counter()
            self.rollouts_before = len(rollout)

        def on_step_end(self, *_, **__):
            seconds = time.perf_counter() - self.start
            gen = sum(rollout[self.rollouts_before:])
            steps.append({"step": len(steps) + 1, "step_s": seconds, "rollout_s": gen, "train_s": seconds - gen})

    trainer.add_callback(StepTimer())
    trainer.train()
    import transformers
    import trl

    Path(args.out).write_text(json.dumps({"steps": steps, "versions": {"trl": trl.__version__,
                                                                       "transformers": transformers.__version__,
                                                                       "torch": torch.__version__},
                                          "torch_threads": torch.get_num_threads()}))



def trl_command(inputs: dict, out: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "benchmarks.bench_step", "--side", "trl", "--inputs", json.dumps(inputs),
            "--out", str(out), "--steps", str(steps)]


# ----- the driver -------------------------------------------------------------------------------------
def run_side(side: str, command: list[str], log: Path) -> tuple[float, float, list, float, float]:
    """Run one side to completion; (wall seconds, peak tree PSS MiB, (role, PSS MiB) of each process at the
    peak, load before, load after)."""
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open(log, "w") as f:
        proc = subprocess.Popen(command, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env)
        pss = TreePss(proc.pid)
        code = proc.wait()
        pss.stop()
    if code != 0:
        raise SystemExit(f"bench_step: the {side} run failed (exit {code}); see {log}:\n"
                         + "\n".join(log.read_text().splitlines()[-30:]))
    return (time.perf_counter() - start, pss.peak_mib, pss.peak_parts, load_before, os.getloadavg()[0])


def timed_steps(steps: list[dict]) -> list[dict]:
    return [s for s in steps if s["step"] >= FIRST_TIMED_STEP]


def median_of(steps: list[dict], key: str) -> float:
    return statistics.median(s[key] for s in steps)


def machine() -> dict:
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "processor": platform.processor() or platform.machine()}


def versions() -> dict:
    from importlib.metadata import version

    out = {}
    for name in ("torch", "transformers", "trl", "accelerate"):
        try:
            out[name] = version(name)
        except Exception:  # noqa: BLE001 - a missing package is recorded as such
            out[name] = None
    return out


def run(args) -> dict:
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_step_"))
    workdir.mkdir(parents=True, exist_ok=True)
    inputs = prepare(workdir)
    sides = args.sides.split(",")
    per_side: dict[str, dict] = {s: {"steps": [], "runs": []} for s in sides}
    for round_index in range(args.rounds):
        for side in sides:
            tag = f"{side}_r{round_index}"
            out_dir = workdir / tag
            if side in SIDES:
                command = SIDES[side](inputs, out_dir, args.steps)
            else:
                out_dir.mkdir(parents=True, exist_ok=True)
                command = trl_command(inputs, out_dir / "steps.json", args.steps)
            wall, peak, peak_parts, load0, load1 = run_side(side, command, workdir / f"{tag}.log")
            procs = len(peak_parts)
            if side in SIDES:
                steps = oreal_steps(out_dir)
            else:
                steps = json.loads((out_dir / "steps.json").read_text())["steps"]
            timed = timed_steps(steps)
            per_side[side]["steps"].extend(timed)
            per_side[side]["runs"].append({"round": round_index, "wall_s": wall, "peak_pss_mib": peak,
                                           "processes_at_peak": procs, "pss_at_peak_mib": peak_parts,
                                           "load_before": load0, "load_after": load1,
                                           "median_step_s": median_of(timed, "step_s")})
            print(f"[{tag}] median step {median_of(timed, 'step_s'):.3f} s (rollout "
                  f"{median_of(timed, 'rollout_s'):.3f}, train {median_of(timed, 'train_s'):.3f}), peak PSS "
                  f"{peak:.0f} MiB over {procs} processes, load {load0:.2f} -> {load1:.2f}", flush=True)
            print("    PSS at the peak: " + ", ".join(f"{role} {mib:.0f}" for role, mib in peak_parts), flush=True)
    rows = []
    for side in sides:
        steps, runs = per_side[side]["steps"], per_side[side]["runs"]
        rows.append({"side": side, "median_step_s": median_of(steps, "step_s"),
                     "median_rollout_s": median_of(steps, "rollout_s"), "median_train_s": median_of(steps, "train_s"),
                     "peak_pss_mib": max(r["peak_pss_mib"] for r in runs), "timed_steps": len(steps), "runs": runs,
                     "command": " ".join(SIDES[side](inputs, workdir / "OUT", args.steps) if side in SIDES
                                         else ["python -m benchmarks.bench_step --side trl"])})
    by_side = {r["side"]: r for r in rows}
    if "trl" in by_side:
        theirs = by_side["trl"]
        for row in rows:
            row["step_x_trl"] = row["median_step_s"] / theirs["median_step_s"]
            row["pss_x_trl"] = row["peak_pss_mib"] / theirs["peak_pss_mib"]
            if row["side"] in SIDES:
                row["meets_target"] = row["step_x_trl"] <= 0.7 and row["pss_x_trl"] <= 1.0
    work = {"prompts_per_step": PROMPTS_PER_STEP, "samples_per_prompt": SAMPLES_PER_PROMPT,
            "max_new_tokens": MAX_NEW_TOKENS, "dtype": "float32", "algorithm": "GRPO, DAPO token loss, clip 0.2",
            "epochs": 1, "minibatches": 1, "kl": 0.0, "lr": LEARNING_RATE, "steps": args.steps,
            "timed_steps": f"{FIRST_TIMED_STEP}..{args.steps}", "rounds": args.rounds,
            "model": "configs/demo_cpu.py sft_config(): Qwen2, vocab<=512, hidden 128, 4 layers, 4/2 heads, "
                     "intermediate 256, random init (seed 0)"}
    result = {"rows": rows, "work": work, "oreal_options": OREAL_OPTIONS, "trl_options": TRL_OPTIONS,
              "versions": versions(),
              "machine": machine(), "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "load_average_at_end": list(os.getloadavg())}
    return result


def markdown(result: dict) -> str:
    lines = ["# Step time against TRL's GRPOTrainer (CPU)", "",
             "`python -m benchmarks.bench_step --save` (see the module docstring for what both sides run).", "",
             f"Measured {result['when']}; {result['machine']['cpus']} CPUs; versions {result['versions']}.", "",
             "Work per step: " + ", ".join(f"{k} {v}" for k, v in result["work"].items()) + ".", "",
             "| side | median step s | x TRL | rollout s | train s | peak PSS MiB | x TRL | timed steps |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['side']} | {r['median_step_s']:.3f} | {r.get('step_x_trl', float('nan')):.2f} | "
                     f"{r['median_rollout_s']:.3f} | {r['median_train_s']:.3f} | {r['peak_pss_mib']:.0f} | "
                     f"{r.get('pss_x_trl', float('nan')):.2f} | {r['timed_steps']} |")
    verdicts = [f"{r['side']} {'meets it' if r['meets_target'] else 'does not'}" for r in result["rows"]
                if "meets_target" in r]
    if verdicts:
        lines += ["", "Target (median step <= 0.7x TRL's and peak PSS <= TRL's, in this one run): "
                  + "; ".join(verdicts) + "."]
    lines += ["", "Runs, in the order they ran (load average = 1-minute, before -> after):", "",
              "| side | round | median step s | peak PSS MiB | processes | load |", "|---|---|---|---|---|---|"]
    runs = sorted(((run["round"], r["side"], run) for r in result["rows"] for run in r["runs"]),
                  key=lambda t: (t[0], [x["side"] for x in result["rows"]].index(t[1])))
    for round_index, side, run in runs:
        lines.append(f"| {side} | {round_index} | {run['median_step_s']:.3f} | {run['peak_pss_mib']:.0f} | "
                     f"{run['processes_at_peak']} | {run['load_before']:.2f} -> {run['load_after']:.2f} |")
    lines += ["", "PSS of every process at each run's peak (MiB):", ""]
    for round_index, side, run in runs:
        parts = ", ".join(f"{role} {mib:.0f}" for role, mib in run.get("pss_at_peak_mib", []))
        lines.append(f"- {side} (round {round_index}): {parts}")
    lines += ["", "This trainer's options (on top of `configs/demo_cpu.py`): `"
              + " ".join(result["oreal_options"]) + "`"]
    if "trl_options" in result:
        lines += ["", "TRL's `GRPOConfig` (besides `output_dir` and `max_steps`): `"
                  + ", ".join(f"{k}={v!r}" for k, v in result["trl_options"].items()) + "`; torch threads: the "
                  "machine's idle cores (`oreal.runtime.budget.idle_cpus`)"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--sides", default="oreal,oreal_1p,trl",
                        help="comma-separated: oreal (torchrun, 2 ranks, engine process), oreal_1p (one process, "
                             "colocated engine), trl")
    parser.add_argument("--workdir", default="", help="where the model, data and runs go (default: a temp dir)")
    parser.add_argument("--json", default="", help="write the result here")
    parser.add_argument("--save", action="store_true", help="also write benchmarks/results/step_vs_trl.{json,md}")
    parser.add_argument("--side", default="", help=argparse.SUPPRESS)  # internal: run one side in this process
    parser.add_argument("--inputs", default="", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.side == "trl":
        trl_main(args)
        return
    if args.steps < FIRST_TIMED_STEP:
        parser.error(f"--steps must be at least {FIRST_TIMED_STEP} (steps 1-2 are warm-up)")
    result = run(args)
    text = json.dumps(result, indent=2)
    if args.json:
        Path(args.json).write_text(text)
    if args.save:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "step_vs_trl.json").write_text(text)
        (RESULTS / "step_vs_trl.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
