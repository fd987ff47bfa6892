"""GRPO-1.5B: RLinf's math GRPO recipe on DeepSeek-R1-Distill-Qwen-1.5B (the recipe behind RLinf-math-1.5B).

Values from RLinf's `examples/reasoning/config/math/qwen2.5-1.5b-grpo-megatron.yaml` (experiment
`grpo-1.5b`, RLinf/RLinf commit 5b56425) and its configuration docs (rlinf.readthedocs.io, "Basic
Configuration"; arXiv 2509.15965):

| RLinf key                                   | value            | here                                         |
|---------------------------------------------|------------------|----------------------------------------------|
| rollout.model_dir                           | R1-Distill-1.5B  | model.path                                   |
| data.dataset_name / train_data_paths        | AReaL-boba-106k  | data.train_files, format "areal" (rendered)  |
| data.rollout_batch_size                     | 512 prompts      | data.prompts_per_step 512                    |
| algorithm.group_size                        | 16               | data.samples_per_prompt 16                   |
| data.max_prompt_length / runner.seq_length  | 1024 / 28672     | data.max_prompt_tokens, rollout.max_*        |
| sampling temperature / top_p / top_k        | 1.0 / 1.0 / 1e6  | rollout.temperature 1.0, top_p 1.0, top_k off|
| reward.reward_scale                         | 5.0              | ppo.reward_correct +5, reward_wrong -5       |
| algorithm.adv_type                          | grpo             | group-normalised advantages                  |
| algorithm.normalize_advantages              | True             | ppo.whiten_advantages: whitened again over   |
|                                             |                  | the step's response tokens, all ranks        |
| algorithm.loss_agg_func                     | token-mean       | per micro-batch of one sequence              |
| algorithm.use_valid_token_scale             | False            | ppo.loss_agg "sequence" (mean of sequence    |
|                                             |                  | token means: micro batch = one sequence)     |
| algorithm.shuffle_rollout                   | False            | ppo.shuffle False                            |
| algorithm.ratio_clip_eps (low = high)       | 0.2              | ppo.clip_low 0.2, clip_high 0.2              |
| algorithm.kl_beta / entropy_bonus           | 0.0 / 0.0        | ppo.kl_coef 0 (no reference model is built)  |
| algorithm.n_minibatches                     | 4                | ppo.minibatches 4, ppo.epochs 1 (one pass)   |
| algorithm.early_stop_imp_ratio              | 5.0              | ppo.early_stop_ratio 5.0, scope micro_batch: |
|                                             |                  | that micro-batch's loss is zeroed            |
| algorithm.recompute_logprobs                | True             | ppo.old_logprobs "recompute"                 |
| actor.optim lr / adam betas / eps           | 2e-5 / 0.9, 0.95 / 1e-5 | policy_optim                          |
| actor.optim weight_decay / clip_grad        | 0.05 / 0.8       | policy_optim                                 |
| actor.lr_sched lr_decay_style               | constant         | min_lr = lr                                  |
| runner.max_epochs                           | 5                | train.steps 1035 (5 x 106k / 512)            |

Every element against the original, and the options that depart from it: configs/README.md.

RLinf runs on 16 nodes with colocated actor and rollout; here, on one 8-GPU node, 4 trainer ranks
(FSDP2) and 4 data-parallel vLLM engines on the other 4 GPUs, one each:

    torchrun --nproc_per_node 4 -m oreal.train --config configs/grpo_1p5b.py --output-dir runs/grpo_1p5b

Point `--model.path` at a local copy of deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B and
`--data.train_files` at a local copy of AReaL-boba-106k (nothing is downloaded at run time).
"""

from oreal.runtime.config import (CheckpointConfig, Config, DataConfig, EvalConfig, JudgeConfig, LossConfig, ModelConfig,
                          OptimConfig, PPOConfig, RolloutConfig, TrainConfig)

SEQ_LENGTH = 28672  # runner.seq_length: prompt + response
MAX_PROMPT = 1024  # data.max_prompt_length


def recipe(*, model: str, group_size: int, grad_clip: float, output_dir: str) -> Config:
    """RLinf's math GRPO recipe as its 1.5B file sets it (configs/grpo_7b.py changes what the 7B file changes)."""
    lr = 2e-5
    return Config(
        output_dir=output_dir,
        algorithm="grpo",
        model=ModelConfig(path=model, param_dtype="bfloat16", gradient_checkpointing=True, liger=True),
        data=DataConfig(train_files=["data/AReaL-boba-106k/AReaL-boba-106k.jsonl"], format="areal",
                        prompts_per_step=512, samples_per_prompt=group_size, template="chat", instruction="",
                        max_prompt_tokens=MAX_PROMPT, seed=1234),
        rollout=RolloutConfig(engine="vllm", temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=SEQ_LENGTH - MAX_PROMPT,
                              max_total_tokens=SEQ_LENGTH, num_engines=4, tensor_parallel_size=1, gpus="4,5,6,7"),
        judge=JudgeConfig(thinking_finish_words=["</think>"]),
        loss=LossConfig(backend="auto"),  # which fused-kernel backend; OREAL's coefficients are unused here
        ppo=PPOConfig(epochs=1, minibatches=4, clip_low=0.2, clip_high=0.2, loss_agg="sequence", kl_coef=0.0,
                      early_stop_ratio=5.0, early_stop_scope="micro_batch", old_logprobs="recompute", shuffle=False,
                      whiten_advantages=True, reward_correct=5.0, reward_wrong=-5.0),
        policy_optim=OptimConfig(lr=lr, min_lr=lr, warmup_steps=0, weight_decay=0.05, betas=(0.9, 0.95), eps=1e-5,
                                 grad_clip=grad_clip),
        train=TrainConfig(steps=1035, freeze_policy_steps=0, micro_batch_tokens=32768, seed=1234),
        checkpoint=CheckpointConfig(interval=50, keep_last=2, export_hf=True),
        eval=EvalConfig(files=["data/eval/aime24.jsonl", "data/eval/aime25.jsonl"], interval=50, samples=4,
                        temperature=1.0, top_p=1.0, max_new_tokens=SEQ_LENGTH - MAX_PROMPT),
    )


def config() -> Config:
    return recipe(model="models/DeepSeek-R1-Distill-Qwen-1.5B", group_size=16, grad_clip=0.8,
                  output_dir="outputs/grpo_1p5b")
