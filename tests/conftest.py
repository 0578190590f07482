"""Shared fixtures: a tiny checkpoint built once per session (seeded, ~1 s)."""
import pytest

from codecsight import checkpoint


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return checkpoint.build_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    """(model, tokenizer) of the tiny checkpoint."""
    return checkpoint.load(tiny_dir)
