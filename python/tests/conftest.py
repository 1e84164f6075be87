import os
import pathlib

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data" / "peft"


def pytest_report_header(config):
    return f"torch {torch.__version__}; molora tests on {os.environ.get('MOLORA_PY_DEVICE', 'cpu')}"


@pytest.fixture
def device():
    return torch.device(os.environ.get("MOLORA_PY_DEVICE", "cpu"))
