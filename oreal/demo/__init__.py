"""The CPU demo (`oreal-demo`): the whole job on two cores in minutes, kept apart from the trainer.

- `task`: the synthetic arithmetic word problems (train / RL / held-out splits, worked or bare answers);
- `pipeline`: the orchestration: SFT -> held-out score -> OREAL -> score -> GRPO -> score, each stage a
  `torchrun` of the real entry points, with `results.json` and a before/after table;
- `plotting`: the training-curve figure.

The demo uses only public pieces of the trainer (configs, `oreal.train`, `oreal.algorithms.sft`,
`oreal.runtime.heldout`); nothing in the trainer imports the demo.
"""


def main(argv=None) -> int:
    """`oreal-demo`: see `oreal.demo.pipeline.main`."""
    from oreal.demo.pipeline import main as run

    return run(argv)
