import pytest
import torch


@pytest.fixture(autouse=True)
def _cpu_defaults():
    torch.set_flush_denormal(True)  # denormals made early CPU steps many times slower
    yield
