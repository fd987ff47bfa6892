"""Templating, difficulty re-sampling, the dataset and the resumable sharded sampler."""

import random
from pathlib import Path

import numpy as np
import pytest

from oreal.data import (
    DEFAULT_INSTRUCTION,
    OREAL_BANDS,
    DifficultyResampling,
    PromptDataset,
    PromptRenderer,
    PromptSampler,
    read_prompt_file,
)
from oreal.model.tiny import build_tiny_tokenizer

SAMPLES = Path(__file__).parent / "samples"
SHARED_EVAL = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "eval"


@pytest.fixture(scope="module")
def tokenizer():
    texts = [e.question for fmt in ("oreal", "math", "gsm8k") for e in read_prompt_file(SAMPLES / f"{fmt}.jsonl")]
    return build_tiny_tokenizer(texts * 5, vocab_size=320)


# --- templates -------------------------------------------------------------------------------


def test_chat_template_with_system_and_instruction(tokenizer):
    renderer = PromptRenderer(tokenizer, system_prompt="You are careful.")
    example = read_prompt_file(SAMPLES / "oreal.jsonl")[0]
    text = renderer.render(example)
    assert text == ("<|im_start|>system\nYou are careful.<|im_end|>\n<|im_start|>user\n" + example.question
                    + DEFAULT_INSTRUCTION + "<|im_end|>\n<|im_start|>assistant\n")
    text2, ids = renderer.render_and_encode(example)
    assert text2 == text and tokenizer.decode(ids) == text
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")  # no extra special token in front


def test_chat_template_without_system(tokenizer):
    text = PromptRenderer(tokenizer, instruction="").render("What is 2+2?")
    assert text == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"


def test_plain_templates(tokenizer):
    appended = PromptRenderer(tokenizer, template="Q: {question}\nA:", instruction=" Box it.")
    assert appended.render("1+1?") == "Q: 1+1? Box it.\nA:"
    placed = PromptRenderer(template="{system}|{instruction}|{question}", system_prompt="S", instruction="I")
    assert placed.render("q") == "S|I|q"
    assert tokenizer.decode(appended.encode("1+1?")) == "Q: 1+1? Box it.\nA:"


def test_prerendered_prompt_passes_through(tokenizer):
    rendered, plain = read_prompt_file(SAMPLES / "areal.jsonl")
    renderer = PromptRenderer(tokenizer, system_prompt="ignored for rendered prompts")
    assert renderer.render(rendered) == rendered.question
    assert renderer.render(plain).startswith("<|im_start|>system\nignored")


@pytest.mark.parametrize("kwargs, pattern", [
    ({"template": "Q: {prompt}"}, r"unknown placeholder\(s\) \['prompt'\]"),
    ({"template": "no placeholder"}, r"has no \{question\} placeholder"),
    ({"template": "{question"}, r"not a valid format string"),
    ({"template": ""}, r"template: expected 'chat'"),
])
def test_bad_templates(tokenizer, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        PromptRenderer(tokenizer, **kwargs)


def test_chat_needs_a_tokenizer_with_a_template():
    with pytest.raises(ValueError, match="'chat' needs a tokenizer"):
        PromptRenderer(None)
    no_template = build_tiny_tokenizer(["a b c"], vocab_size=300, chat_template=None)
    with pytest.raises(ValueError, match="has no chat template"):
        PromptRenderer(no_template)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        PromptRenderer(template="{question}").encode("q")


# --- difficulty re-sampling ------------------------------------------------------------------


def test_oreal_bands_repeat_and_drop():
    table = DifficultyResampling()
    assert table.bands == OREAL_BANDS
    rates = [0.0, 0.1, 0.2, 0.39, 0.5, 0.6, 0.79, 0.8, 0.95, 1.0, None]
    assert [table.repeats(r) for r in rates] == [6, 6, 4, 4, 4, 2, 2, 0, 0, 0, 1]
    assert table.expand([0.7, None, 0.9, 0.1]) == [0, 0, 1, 3, 3, 3, 3, 3, 3]


def test_custom_table_and_gaps():
    table = DifficultyResampling(bands=((0.5, 1.0, 3),), drop_at=None)
    assert [table.repeats(r) for r in (0.2, 0.5, 1.0)] == [1, 3, 3]  # a gap keeps once; 1.0 is in [.5, 1]
    assert DifficultyResampling.none().expand([0.0, 1.0, None]) == [0, 1, 2]


@pytest.mark.parametrize("kwargs, pattern", [
    ({"bands": ((0.0, 0.5, 2), (0.4, 0.9, 1))}, "bands overlap"),
    ({"bands": ((0.5, 0.2, 1),)}, r"0 <= low < high <= 1"),
    ({"bands": ((0.0, 0.5, -1),)}, "whole repeat count"),
    ({"bands": ((0.0, 0.5, 1.5),)}, "whole repeat count"),
    ({"bands": ((0.0, 0.5),)}, r"\(low, high, repeat\)"),
    ({"drop_at": 1.5}, "drop_at"),
])
def test_bad_tables(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        DifficultyResampling(**kwargs)


# --- dataset -------------------------------------------------------------------------------


def test_dataset_resamples_and_renders(tokenizer):
    renderer = PromptRenderer(tokenizer)
    dataset = PromptDataset.from_jsonl(SAMPLES / "oreal.jsonl", renderer=renderer, resampling=DifficultyResampling())
    # pass rates 0.75 (x2), 0.1 (x6), 1.0 (dropped), 0.5 (x4)
    assert len(dataset) == 12 and len(dataset.examples) == 4
    assert [dataset[i].gold_answer for i in range(len(dataset))] == ["2"] * 2 + ["56"] * 6 + ["20"] * 4
    prompt = dataset[-1]
    assert prompt.index == 11 and prompt.input_ids == renderer.encode(prompt.example)
    assert prompt.text == renderer.render(prompt.example)
    with pytest.raises(IndexError):
        dataset[12]


def test_dataset_mixes_formats_and_works_without_renderer():
    dataset = PromptDataset.from_jsonl([SAMPLES / "math.jsonl", SAMPLES / "gsm8k.jsonl"])
    assert len(dataset) == 5 and [p.example.format for p in dataset.batch(range(5))] == ["math"] * 3 + ["gsm8k"] * 2
    assert dataset[0].input_ids is None and dataset[0].text == dataset[0].example.question


def test_dataset_everything_dropped_is_an_error():
    with pytest.raises(ValueError, match="no prompt is left"):
        PromptDataset.from_jsonl(SAMPLES / "oreal.jsonl", resampling=DifficultyResampling(drop_at=0.0))
    with pytest.raises(ValueError, match="no prompt file"):
        PromptDataset.from_jsonl([])


def test_real_math500_through_chat_template(tokenizer):
    path = SHARED_EVAL / "math500.jsonl"
    if not path.is_file():
        pytest.skip(f"real data {path} is absent (it lives in the shared/ folder beside the repository)")
    dataset = PromptDataset.from_jsonl(path, renderer=PromptRenderer(tokenizer))
    for i in random.Random(0).sample(range(len(dataset)), 20):
        prompt = dataset[i]
        assert tokenizer.decode(prompt.input_ids) == prompt.text  # byte-level BPE round-trips any text
        assert prompt.example.question in prompt.text and prompt.text.endswith("<|im_start|>assistant\n")


# --- sampler ---------------------------------------------------------------------------------


def test_sampler_shards_cover_the_global_batch_disjointly():
    samplers = [PromptSampler(50, 12, rank=r, world_size=4, seed=3) for r in range(4)]
    single = PromptSampler(50, 12, seed=3)
    for _ in range(10):  # 4 steps per epoch: crosses two epoch boundaries
        shards = [s.next_indices() for s in samplers]
        assert all(len(shard) == 3 for shard in shards)
        merged = [i for shard in shards for i in shard]
        assert merged == single.next_indices() and len(set(merged)) == 12


def test_sampler_epochs_are_permutations_and_differ():
    sampler = PromptSampler(20, 5, seed=11)
    epoch0 = [i for _ in range(4) for i in sampler.next_indices()]
    epoch1 = [i for _ in range(4) for i in sampler.next_indices()]
    assert sorted(epoch0) == sorted(epoch1) == list(range(20))
    assert epoch0 != epoch1 and sampler.epoch == 1
    assert PromptSampler(20, 5, shuffle=False).next_indices() == [0, 1, 2, 3, 4]
    assert PromptSampler(20, 5, seed=12).next_indices() != PromptSampler(20, 5, seed=11).next_indices()


def test_sampler_drops_the_epoch_remainder():
    sampler = PromptSampler(10, 4, seed=0)
    steps = [sampler.next_indices() for _ in range(3)]
    assert sampler.steps_per_epoch == 2 and sampler.epoch == 1
    epoch0, epoch1 = (np.random.default_rng([0, e]).permutation(10).tolist() for e in (0, 1))
    assert steps[0] + steps[1] == epoch0[:8]  # the documented permutation; the last 2 are skipped
    assert steps[2] == epoch1[:4]


def test_sampler_resume_continues_with_the_same_prompts():
    rng = random.Random(5)
    for _ in range(5):
        n, world = rng.randint(10, 60), rng.choice([1, 2, 4])
        per_step = world * rng.randint(1, max(1, n // (2 * world)))
        seed, stop = rng.randint(0, 100), rng.randint(0, 12)
        run = PromptSampler(n, per_step, rank=world - 1, world_size=world, seed=seed)
        for _ in range(stop):
            run.next_indices()
        state = run.state_dict()
        resumed = PromptSampler(n, per_step, rank=world - 1, world_size=world, seed=seed)
        resumed.load_state_dict(state)
        assert [resumed.next_indices() for _ in range(7)] == [run.next_indices() for _ in range(7)]


def test_sampler_resume_on_another_world_size_keeps_the_global_order():
    before = PromptSampler(40, 8, world_size=2, rank=0, seed=1)
    for _ in range(3):
        before.next_indices()
    after = [PromptSampler(40, 8, world_size=4, rank=r, seed=1) for r in range(4)]
    reference = PromptSampler(40, 8, seed=1)
    for _ in range(3):
        reference.next_indices()
    for sampler in after:
        sampler.load_state_dict(before.state_dict())
    assert [i for s in after for i in s.next_indices()] == reference.next_indices()


def test_sampler_rejects_bad_arguments_and_foreign_state():
    with pytest.raises(ValueError, match="does not split evenly over world_size=4"):
        PromptSampler(100, 10, world_size=4)
    with pytest.raises(ValueError, match="more than the 5 prompts"):
        PromptSampler(5, 6)
    with pytest.raises(ValueError, match=r"rank: expected an int in \[0, 2\)"):
        PromptSampler(10, 2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="num_prompts"):
        PromptSampler(0, 1)
    state = PromptSampler(10, 2, seed=1).state_dict()
    with pytest.raises(ValueError, match="saved seed=1 differs"):
        PromptSampler(10, 2, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="saved num_prompts=10 differs"):
        PromptSampler(11, 2, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="not a PromptSampler state"):
        PromptSampler(10, 2).load_state_dict({"epoch": 0})
