"""What every algorithm runs on, whatever its loss.

- `config`: the `@dataclass(kw_only=True)` config tree, loading a config file, `--section.option` overrides;
- `build`: turns a `Config` into the run's parts (models, optimizers, dataset, engine, judge), failing fast
  with a `SetupError` (`setup_errors`) that names the option to fix; `tiny_model` writes the offline tiny model;
- `distributed`: process group, device, FSDP2 sharding;
- `checkpoint`: DCP checkpoints with exact resume, and the Hugging Face export;
- `metrics`: metrics.jsonl, TensorBoard, the progress line; `schedule`: learning-rate schedules;
- `evaluation`: pass@k on eval sets during a run; `heldout`: scoring a saved model outside a run.

Data flows into the algorithms (`oreal.algorithms`), never back: nothing here imports an algorithm.
"""
