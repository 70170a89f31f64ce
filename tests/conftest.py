"""Fixtures: small prepared datasets (real FFCV betons made by data_prep from synthetic images)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.synthetic import prepare_betons


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """256 train and 64 test images: enough for a few CPU steps."""
    return prepare_betons(tmp_path_factory.mktemp("tiny"), n_train=256, n_test=64)


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> Path:
    """512 train and 100 test images: four default-size (128) batches."""
    return prepare_betons(tmp_path_factory.mktemp("small"), n_train=512, n_test=100)
