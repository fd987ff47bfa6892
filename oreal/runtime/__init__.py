"""What every algorithm runs on, whatever its loss.

- `config`: the `@dataclass(kw_only=True)` config tree, loading a config file, `--section.option` overrides;
- `build`: turns a `Config` into the parts every algorithm shares (tokenizer, dataset, optimizers, the rollout
  engine and generator, the judge, eval sets), failing fast with a `SetupError` (`setup_errors`) that names
  the option to fix (the algorithm's own models are added by `oreal.algorithms.assemble`); `tiny_model`
  writes the offline tiny model;
- `distributed`: process group, device, FSDP2 sharding;
- `checkpoint`: DCP checkpoints with exact resume, and the Hugging Face export;
- `metrics`: metrics.jsonl, TensorBoard, Weights & Biases, the console line and progress bar; `schedule`:
  learning-rate schedules; `output_folder`: a used output folder needs --resume or --overwrite;
- `evaluation`: pass@k on eval sets during a run; `heldout`: scoring a saved model outside a run, which
  `eval_cli` (`oreal-eval`) runs over benchmarks through the rollout engines, resumably.

Data flows into the algorithms (`oreal.algorithms`), never back: nothing here imports an algorithm.
"""
