import pytest
from rollout_testlib import tiny_config

from oreal.rollout import build_engine


@pytest.fixture(scope="session")
def engine_config():
    """The shared engine's architecture: tied embeddings, like small Qwen2.5 checkpoints."""
    return tiny_config(tie_word_embeddings=True)


@pytest.fixture(scope="session")
def hf_engine(engine_config):
    """One transformers engine process shared by the tests that leave it healthy.

    Its weights start random (seed 123); every test syncs the trainer model it compares with.
    """
    engine = build_engine("hf", engine_config, seed=123, num_threads=1, startup_timeout_s=180,
                          request_timeout_s=120, sync_timeout_s=60)
    yield engine
    engine.close()
