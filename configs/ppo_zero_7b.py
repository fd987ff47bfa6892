"""PPO-Zero-7B: SimpleRL-Zero's PPO from the base model Qwen2.5-Math-7B, with no SFT (`--algorithm ppo`).

Values from SimpleRL-Zero's launch script (hkust-nlp/simpleRL-reason, v0 branch,
`train/examples/script/train_ppo_qwen_base_math_lv35_new.sh`, run `Qwen2.5-Math-7B_ppo_from_base_math_lv35`,
OpenRLHF's `train_ppo_ray_box.py`) and, for what the script leaves at its default, OpenRLHF's PPO
arguments of that version; the blog "7B Model and 8K Examples" (hkust-nlp.notion.site/simplerl-reason)
describes the setup: 8K MATH prompts of levels 3-5, a rule-based reward on the final answer, no reward
model, no SFT.

| SimpleRL-Zero / OpenRLHF                        | value                | here                                     |
|-------------------------------------------------|----------------------|------------------------------------------|
| --pretrain                                      | Qwen2.5-Math-7B      | model.path; the critic starts from it too |
| --prompt_data                                   | MATH level 3-5 (8K)  | data.train_files, format "math"          |
| --rollout_batch_size                            | 1024 prompts         | data.prompts_per_step 1024               |
| --n_samples_per_prompt                          | 8                    | data.samples_per_prompt 8                |
| --train_batch_size                              | 128 samples          | ppo.minibatches 64 (8192 / 128)          |
| --max_epochs                                    | 1                    | ppo.epochs 1                             |
| --prompt_max_len / --generate_max_len           | 1024 / 3000          | data.max_prompt_tokens, rollout.*        |
| --temperature (top_p: default)                  | 0.6 (1.0)            | rollout.temperature 0.6, top_p 1.0       |
| log-probs of the loss, reference, KL (Actor.forward: raw logits) | temperature 1 | ppo.loss_temperature 1.0 |
| reward (experience_maker.py, preprocess_box_response_for_qwen_prompt) | +1 / -0.5 / -1 no "boxed" | ppo.reward_rule "boxed" |
| judged: truncated responses too (no stop-word check) |                  | judge.stop_word ""                       |
| --actor_learning_rate / --critic_learning_rate  | 5e-7 / 9e-6          | policy_optim.lr, critic_optim.lr         |
| --init_kl_coef                                  | 0.01                 | critic.kl_reward_coef (KL in the reward) |
| --eps_clip / --value_clip (defaults)            | 0.2 / 0.2            | ppo.clip_low = clip_high, critic.value_clip |
| --gamma / --lambd (defaults)                    | 1.0 / 0.95           | critic.gamma, critic.lam                 |
| --max_norm / --l2 (defaults)                    | 1.0 / 0.0            | grad_clip 1.0, weight_decay 0            |
| --adam_betas (default)                          | 0.9, 0.95            | policy_optim.betas, critic_optim.betas   |
| cosine_with_min_lr, 3% warm-up, per update      | min 0.1 x lr         | warmup_ratio 0.03, warmup_from_zero,     |
| (ppo_actor.py / ppo_critic.py, get_scheduler)   |                      | schedule_unit "update", min_lr 0.1 x lr  |
| value head init (model.py, init_value_head)     | N(0, 1/(hidden+1))   | critic.value_head_init "normal"          |
| PolicyLoss / ValueLoss aggregation (loss.py)    | sequence token mean, | ppo.loss_agg "sequence",                 |
|                                                 | then batch mean      | critic.loss_agg "sequence"               |
| --num_episodes                                  | 20                   | train.steps 160 (20 x 8K / 1024)         |
| advantages (OpenRLHF)                           | whitened per batch   | critic.whiten_advantages                 |

Not reproduced: `--normalize_reward` (OpenRLHF's running normalisation of a reward model's scores; this
run has no reward model). Sequence lengths: 1024 + 3000 fits Qwen2.5-Math-7B's 4096 positions. Every
element against the original: configs/README.md.

    torchrun --nproc_per_node 4 -m oreal.train --config configs/ppo_zero_7b.py --output-dir runs/ppo_zero_7b

Point `--model.path` at a local copy of Qwen/Qwen2.5-Math-7B and `--data.train_files` at MATH's
level 3-5 problems (e.g. SimpleRL-Zoo-Data's `simplelr_qwen_level3to5`, converted to JSONL with
`problem` and `answer`); nothing is downloaded at run time.
"""

from oreal.runtime.config import (CheckpointConfig, Config, CriticConfig, DataConfig, EvalConfig, JudgeConfig, LossConfig,
                          ModelConfig, OptimConfig, PPOConfig, RolloutConfig, TrainConfig)

STOP_WORD = "<|im_end|>"


def simplerl_optim(lr: float) -> OptimConfig:
    """OpenRLHF's Adam (betas 0.9, 0.95; no weight decay) with `cosine_with_min_lr`: min 0.1 x lr, warm-up
    ceil(3%) of the optimizer updates from lr 0, stepped per update (64 per step here)."""
    return OptimConfig(lr=lr, min_lr=0.1 * lr, betas=(0.9, 0.95), weight_decay=0.0, grad_clip=1.0, warmup_ratio=0.03,
                       warmup_from_zero=True, schedule_unit="update")


def config() -> Config:
    return Config(
        output_dir="outputs/ppo_zero_7b",
        algorithm="ppo",
        model=ModelConfig(path="models/Qwen2.5-Math-7B", param_dtype="bfloat16", gradient_checkpointing=True,
                          liger=True),
        data=DataConfig(train_files=["data/math_level3to5/train.jsonl"], format="math", prompts_per_step=1024,
                        samples_per_prompt=8, template="chat", max_prompt_tokens=1024, seed=42),
        rollout=RolloutConfig(engine="vllm", temperature=0.6, top_p=1.0, top_k=0, max_new_tokens=3000,
                              max_total_tokens=4096, stop_words=[STOP_WORD], num_engines=4, tensor_parallel_size=1, gpus="4,5,6,7"),
        judge=JudgeConfig(stop_word=""),  # SimpleRL-Zero judges every response, truncated ones included
        loss=LossConfig(backend="auto"),  # which fused-kernel backend; OREAL's coefficients are unused here
        ppo=PPOConfig(epochs=1, minibatches=64, clip_low=0.2, clip_high=0.2, loss_agg="sequence", kl_coef=0.0,
                      early_stop_ratio=0.0, loss_temperature=1.0, reward_rule="boxed", reward_correct=1.0,
                      reward_wrong=-0.5, reward_unboxed=-1.0),
        critic=CriticConfig(value_clip=0.2, gamma=1.0, lam=0.95, whiten_advantages=True, kl_reward_coef=0.01,
                            loss_agg="sequence", value_head_init="normal"),
        policy_optim=simplerl_optim(5e-7),
        critic_optim=simplerl_optim(9e-6),
        train=TrainConfig(steps=160, freeze_policy_steps=0, micro_batch_tokens=16384, seed=42),
        checkpoint=CheckpointConfig(interval=4, keep_last=2, export_hf=True),
        eval=EvalConfig(files=["data/eval/math500.jsonl", "data/eval/aime24.jsonl"], interval=8, samples=1,
                        temperature=1.0, top_p=0.95, max_new_tokens=3000),
    )
