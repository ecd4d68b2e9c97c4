"""Shared test set-up: slow tests run only with --runslow; compiled programs are cached on disk."""

import os

import pytest

from tpullm.cli import MIN_CACHED_COMPILE_SECONDS


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes minutes; run with --runslow")
    # jax's persistent compilation cache, in pytest's cache directory (.pytest_cache; --cache-clear
    # empties it). jax reads these variables when imported, which happens after this hook, and the
    # commands the tests start inherit them.
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(config.cache.mkdir("jax_compilation_cache")))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", str(MIN_CACHED_COMPILE_SECONDS))
    # Tests never download: evaluation tasks read the local files the tests write.
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
