"""GRPO-7B: RLinf's math GRPO recipe on DeepSeek-R1-Distill-Qwen-7B (the recipe behind RLinf-math-7B).

Values from RLinf's `examples/reasoning/config/math/qwen2.5-7b-grpo-megatron.yaml` (experiment
`grpo-7b`, RLinf/RLinf commit 5b56425). Everything is as in configs/grpo_1p5b.py (see its table)
except:

| RLinf key                       | 1.5B  | 7B    | here                                          |
|---------------------------------|-------|-------|-----------------------------------------------|
| rollout.model_dir               |       |       | DeepSeek-R1-Distill-Qwen-7B                   |
| algorithm.group_size            | 16    | 32    | data.samples_per_prompt 32                    |
| actor.optim.clip_grad           | 0.8   | 1.0   | policy_optim.grad_clip 1.0                    |
| algorithm.use_valid_token_scale | False | True  | ppo.loss_agg "step_token": each minibatch's   |
|                                 |       |       | token sum / the whole step's token count      |
| algorithm.recompute_logprobs    | True  | False | ppo.old_logprobs "engine" (the sampler's)     |
| algorithm.shuffle_rollout       | False | True  | ppo.shuffle True                              |

512 prompts x 32 samples = 16,384 responses a step, trained in 4 minibatches of 4,096. Every
element against the original: configs/README.md.

    torchrun --nproc_per_node 4 -m oreal.train --config configs/grpo_7b.py --output-dir runs/grpo_7b
"""

from pathlib import Path

from oreal.runtime.config import Config, load_config_file


def config() -> Config:
    cfg = load_config_file(Path(__file__).resolve().parent / "grpo_1p5b.py")
    cfg.output_dir = "outputs/grpo_7b"
    cfg.model.path = "models/DeepSeek-R1-Distill-Qwen-7B"
    cfg.data.samples_per_prompt = 32
    cfg.policy_optim.grad_clip = 1.0
    cfg.ppo.loss_agg = "step_token"
    cfg.ppo.old_logprobs = "engine"
    cfg.ppo.shuffle = True
    return cfg
