"""Shared pytest set-up: the repository root on sys.path, clean singletons,
the running test's markers for the ``data`` / ``dist`` guards.

Tiers (markers in setup.cfg): ``-m "not slow"`` is the quick loop;
``-m "not slow and not dist and not data"`` the fast tier, which needs no
data sources and starts no process.
"""
import os.path as osp
import sys

import pytest

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import _simt_common  # noqa: E402


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Publish the test's markers before its fixtures run."""
    _simt_common.CURRENT_MARKERS.clear()
    _simt_common.CURRENT_MARKERS.update(m.name for m in item.iter_markers())


@pytest.fixture(autouse=True)
def _clean_mmengine_singletons():
    """Drop DefaultScope / MessageHub instances a test created."""
    from mmengine.logging import MessageHub
    from mmengine.registry import DefaultScope
    before_scope = dict(DefaultScope._instance_dict)
    before_hub = dict(MessageHub._instance_dict)
    yield
    DefaultScope._instance_dict.clear()
    DefaultScope._instance_dict.update(before_scope)
    MessageHub._instance_dict.clear()
    MessageHub._instance_dict.update(before_hub)
