"""Session fixtures: one toy model + adapter store, one PEFT reference, one shared server."""

from __future__ import annotations

import os
import shutil
import warnings

import pytest
import torch

from tests.helpers import PeftReference, ServerThread, Toy, build_toy

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Servers started by tests (in process or as `loraserve serve`) leave port 8000 alone unless a
# test asks for HTTP (tests/http give a free port).
os.environ.setdefault("LORASERVE_HTTP_PORT", "0")
torch.set_num_threads(min(2, torch.get_num_threads()))
warnings.filterwarnings("ignore", category=UserWarning, module="peft")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Toy:
    return build_toy(tmp_path_factory.mktemp("toy"))


@pytest.fixture(scope="session")
def peft_ref(toy: Toy) -> PeftReference:
    return PeftReference(toy)


@pytest.fixture
def store_copy(toy: Toy, tmp_path) -> Toy:
    """A private copy of the adapter store that a test may change."""
    shutil.copytree(toy.store, tmp_path / "store")
    return Toy(toy.base, tmp_path / "store")


@pytest.fixture(scope="session")
def server(toy: Toy) -> ServerThread:
    """A shared server on the toy model (2 device slots, so 6 adapters must rotate)."""
    srv = ServerThread(
        model=str(toy.base), adapters_dir=toy.store, max_loaded_adapters=2, kv_cache_bytes=4 << 20
    )
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def client(server: ServerThread):
    from loraserve_client import Client

    with Client(server.target, timeout=60) as c:
        yield c
