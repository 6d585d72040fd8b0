"""What every test shares: the agent's caches go to a directory of the test run, never to
the home directory of whoever runs the tests (subprocesses inherit it)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from agent.decode.cache import CACHE_ENV


@pytest.fixture(autouse=True, scope="session")
def _cache_of_the_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(tmp_path_factory.mktemp("cache")))
        yield
