import os
import tempfile

import torch

# Triton has no CPU backend: without a GPU, run kernels in its interpreter (must be set before import).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# a private Prefect home: ephemeral-mode database and results never touch ~/.prefect
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="awqflow-prefect-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# a Ray worker of an ephemeral-mode flow starts its own ephemeral server; on a loaded 2-core machine that
# took longer than Prefect's default 20 s (2026-12-02: "Timed out while attempting to connect")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "fixture" / "model"
CALIB = ROOT / "fixture" / "data" / "calib.txt"
EVAL = ROOT / "fixture" / "data" / "eval.txt"


def save_tiny(path: Path, config, dtype=torch.float16, seed: int = 0) -> Path:
    """A random-weight model with the fixture's tokenizer: for shape and plumbing tests only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(FIXTURE).save_pretrained(path)
    return path


def tiny_llama_config(**overrides):
    from transformers import AutoTokenizer, LlamaConfig

    vocab = len(AutoTokenizer.from_pretrained(FIXTURE))
    base = dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    return LlamaConfig(**{**base, **overrides})


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("tiny") / "model", tiny_llama_config())


@pytest.fixture(autouse=True)
def default_dtype_is_left_alone():
    """torch's default dtype is process-wide: a stage that leaks a change (e.g. two threads building
    models at once) silently changes later computations."""
    yield
    assert torch.get_default_dtype() == torch.float32, f"default dtype leaked: {torch.get_default_dtype()}"


def pytest_sessionfinish(session):
    """Stop the temporary Prefect server of in-process flow runs, silently, before pytest closes its
    streams, and after the log lines still queued for it have been sent: left to its own atexit hook, its
    stop message goes to a closed stream, the queued lines to a stopped API, and each prints an error
    after the test summary."""
    import logging

    from prefect.logging.handlers import APILogWorker
    from prefect.server.api.server import SubprocessASGIServer

    APILogWorker.drain_all(timeout=5)
    logging.getLogger("prefect").disabled = True
    for server in list(SubprocessASGIServer._instances.values()):
        server.stop()
