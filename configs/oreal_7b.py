"""OREAL-7B: the paper's RL recipe (arXiv 2502.06781, section 4.1; InternLM/OREAL's released config).

From the SFT model OREAL-7B-SFT: 64 prompts per step, 16 samples each, sampled at temperature 1.0
and top-p 0.9 with 16k total length; RLOO advantages; one correct and one wrong sample kept per
prompt; policy AdamW lr 5e-7 cosine to 1e-7, token-level RM lr 2e-6 cosine to 4e-7, 10 warm-up
steps, weight decay 0.01, gradient clip 1.0; the policy frozen for the first 10 steps while the token
RM learns (its warm-up runs during them, so its first update is at 5e-7, then cosine over 80 steps);
KL 0.01 against the frozen initial policy; positive / negative loss factors 1.0 / 0.5; 90 steps.
Every element against the original: configs/README.md.

The judge is OREAL's: the rules, then the LLM verifier (Qwen2.5-72B-Instruct, OpenAI-compatible) on
every finished response the rules reject. Give its servers with `--judge.verifier_hosts HOST:PORT,...`
or `OREAL_VERIFIER_HOSTS`; without one the run warns that its rewards differ from the paper's.

The paper's cluster: 4 nodes of 8 GPUs. This file places the rollouts on dedicated GPUs: on every node,
GPUs 0-3 hold 4 trainer ranks (16 FSDP2 ranks in all) and GPUs 4-7 two vLLM engines of tensor-parallel
size 2, started and fed by the node's local rank 0 (8 data-parallel engines in all):

    torchrun --nnodes 4 --nproc_per_node 4 --rdzv-endpoint HOST:PORT -m oreal.train \
        --config configs/oreal_7b.py --output-dir runs/oreal_7b

`configs/oreal_7b_colocated.py` is the other placement: 8 ranks per node, all 32 GPUs train and generate
(16 engines of tensor-parallel size 2 made of trainer ranks, asleep while the policy trains). README.md,
"Rollout placements", says when to choose which.

Point `--model.path` at a local copy of internlm/OREAL-7B-SFT and `--data.train_files` at a local
copy of internlm/OREAL-RL-Prompts (nothing is downloaded at run time).
"""

import os

from oreal.runtime.config import (CheckpointConfig, Config, DataConfig, EvalConfig, JudgeConfig, LossConfig, ModelConfig,
                                  OptimConfig, RolloutConfig, TrainConfig, verifier_hosts_from_env)

# OREAL's system prompt (its chat template's default system message), verbatim.
OREAL_SYSTEM_PROMPT = (
    "You are an expert mathematician with extensive experience in mathematical competitions. You approach "
    "problems through systematic thinking and rigorous reasoning. When solving problems, follow these thought "
    "processes:\n\n## Deep Understanding\nTake time to fully comprehend the problem before attempting a solution. "
    "Consider:\n- What is the real question being asked?\n- What are the given conditions and what do they tell "
    "us?\n- Are there any special restrictions or assumptions?\n- Which information is crucial and which is "
    "supplementary?\n\n## Multi-angle Analysis\nBefore solving, conduct thorough analysis:\n- What mathematical "
    "concepts and properties are involved?\n- Can you recall similar classic problems or solution methods?\n- Would "
    "diagrams or tables help visualize the problem?\n- Are there special cases that need separate consideration?"
    "\n\n## Systematic Thinking\nPlan your solution path:\n- Propose multiple possible approaches\n- Analyze the "
    "feasibility and merits of each method\n- Choose the most appropriate method and explain why\n- Break complex "
    "problems into smaller, manageable steps\n\n## Rigorous Proof\nDuring the solution process:\n- Provide solid "
    "justification for each step\n- Include detailed proofs for key conclusions\n- Pay attention to logical "
    "connections\n- Be vigilant about potential oversights\n\n## Repeated Verification\nAfter completing your "
    "solution:\n- Verify your results satisfy all conditions\n- Check for overlooked special cases\n- Consider if "
    "the solution can be optimized or simplified\n- Review your reasoning process\n\nRemember:\n1. Take time to "
    "think thoroughly rather than rushing to an answer\n2. Rigorously prove each key conclusion\n3. Keep an open "
    "mind and try different approaches\n4. Summarize valuable problem-solving methods\n5. Maintain healthy "
    "skepticism and verify multiple times\n\nYour response should reflect deep mathematical understanding and "
    "precise logical thinking, making your solution path and reasoning clear to others.\n\nWhen you're ready, "
    "present your complete solution with:\n- Clear problem understanding\n- Detailed solution process\n- Key "
    "insights\n- Thorough verification\n\nFocus on clear, logical progression of ideas and thorough explanation of "
    "your mathematical reasoning. Provide answers in the same language as the user asking the question, repeat "
    "the final answer using a '\\\\boxed{}' without any units, you have [[8192]] tokens to complete the answer."
)

STOP_WORD = "<|im_end|>"

# Where the rollouts run on 4 nodes x 8 GPUs (torchrun --nproc_per_node 4: GPUs 0-3 train on every node).
# TP 2 rather than 1: a step's rollout time is set by its longest (14k-token) response, and TP 2 halves the
# per-token latency of that tail (benchmarks/results/rollout.md, paper model). The colocated placement of the
# same cluster is configs/oreal_7b_colocated.py.
DEDICATED_ROLLOUT = dict(placement="dedicated", num_engines=8, tensor_parallel_size=2, gpus="4,5,6,7",
                         gpu_memory_utilization=0.85)


def config() -> Config:
    return Config(
        output_dir="outputs/oreal_7b",
        model=ModelConfig(path="models/OREAL-7B-SFT", param_dtype="bfloat16", gradient_checkpointing=True,
                          liger=True),
        data=DataConfig(
            train_files=["data/OREAL-RL-Prompts/train.jsonl"],
            format="oreal",
            prompts_per_step=64,
            samples_per_prompt=16,
            system_prompt=OREAL_SYSTEM_PROMPT,
            instruction="",  # the system prompt already asks for \boxed{}
            template="chat",
            # pass-rate band -> repeat factor; prompts the SFT model solves more than 80% of the time are dropped
            difficulty_balance=[(0.0, 0.2, 6), (0.2, 0.4, 4), (0.4, 0.6, 4), (0.6, 0.8, 2)],
            drop_pass_rate_above=0.8,
            max_prompt_tokens=2048,
        ),
        rollout=RolloutConfig(engine="vllm", temperature=1.0, top_p=0.9, top_k=0, max_new_tokens=14000,
                              max_total_tokens=16384, stop_words=[STOP_WORD], **DEDICATED_ROLLOUT),
        judge=JudgeConfig(stop_word=STOP_WORD, thinking_finish_words=["<conclude>", "**Final Answer**", "</think>"],
                          verifier_hosts=verifier_hosts_from_env(),
                          verifier_model=os.environ.get("OREAL_VERIFIER_MODEL", "Qwen/Qwen2.5-72B-Instruct"),
                          verifier_expected=True),
        loss=LossConfig(kl_coef=0.01, pos_coef=1.0, neg_coef=0.5, filter_groups=True, use_token_rm=True),
        policy_optim=OptimConfig(lr=5e-7, min_lr=1e-7, warmup_steps=10, weight_decay=0.01, grad_clip=1.0),
        rm_optim=OptimConfig(lr=2e-6, min_lr=4e-7, warmup_steps=10, weight_decay=0.01, grad_clip=1.0),
        train=TrainConfig(steps=90, freeze_policy_steps=10, micro_batch_tokens=32768, seed=0),
        checkpoint=CheckpointConfig(interval=10, keep_last=2, export_hf=True),
        eval=EvalConfig(files=["data/eval/math500.jsonl", "data/eval/aime24.jsonl"], interval=10, samples=4,
                        temperature=1.0, top_p=0.9, max_new_tokens=14000),
    )
