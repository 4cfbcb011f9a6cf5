"""Fixtures of the Training service's tests."""

from __future__ import annotations

import pytest

from tests.helpers import ServerThread


@pytest.fixture
def trainer(store_copy):
    """A server of the test's own on a private copy of the toy store (jobs write into it);
    `trainer.store` is that store."""
    with ServerThread(
        model=str(store_copy.base),
        adapters_dir=store_copy.store,
        max_loaded_adapters=3,
        kv_cache_bytes=4 << 20,
    ) as srv:
        srv.store = store_copy.store
        yield srv
