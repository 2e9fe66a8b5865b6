import collections

import pytest


def pytest_collection_modifyitems(items):
    """The modules with the most 2-process tests first (each keeps its order): with two workers, one module per
    worker at a time (README's command), the long modules start early instead of leaving one worker alone at
    the end."""
    weight = collections.Counter(item.module.__name__ for item in items if item.get_closest_marker("multiprocess"))
    first = {}
    for i, item in enumerate(items):
        first.setdefault(item.module.__name__, i)
    items.sort(key=lambda item: (-weight[item.module.__name__], first[item.module.__name__]))


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """Synthetic data, its tokenizer and a tiny random teacher, shared by the whole session."""
    from tests.helpers import tiny_assets

    root = tmp_path_factory.mktemp("assets")
    return {"root": root, **tiny_assets(root)}
