import os
from pathlib import Path

import pytest
import torch

from depthgrow.bpe import CACHE_ENV
from depthgrow.data import GPT2_BPE_ENV


@pytest.fixture(autouse=True)
def _cpu_defaults():
    torch.set_flush_denormal(True)  # denormals made early CPU steps many times slower
    yield


@pytest.fixture(autouse=True, scope="session")
def _bpe_cache(tmp_path_factory):
    """Trained BPE vocabularies cached in the session's folder, not in the user's cache."""
    previous = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("depthgrow-cache"))
    yield
    if previous is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = previous


@pytest.fixture
def real_gpt2_bpe(tmp_path, monkeypatch) -> Path:
    """The real gpt2.tiktoken named by DEPTHGROW_GPT2_BPE (CI fetches it), with tiktoken's cache kept in
    the test's folder; the test is skipped without it."""
    pytest.importorskip("tiktoken")
    real = os.environ.get(GPT2_BPE_ENV)
    if not real or not Path(real).is_file():
        pytest.skip(f"set {GPT2_BPE_ENV} to a gpt2.tiktoken file (whisper/assets/gpt2.tiktoken) to run this test")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken-cache"))
    return Path(real)
