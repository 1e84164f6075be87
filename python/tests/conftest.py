import torch


def pytest_report_header(config):
    return f"torch {torch.__version__} (molora runs CPU tensors on the crate's reference path)"
