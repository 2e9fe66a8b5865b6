import pytest


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """Synthetic data, its tokenizer and a tiny random teacher, shared by the whole session."""
    from tests.helpers import tiny_assets

    root = tmp_path_factory.mktemp("assets")
    return {"root": root, **tiny_assets(root)}
