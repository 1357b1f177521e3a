"""Shared pytest set-up: the repository root on sys.path, clean singletons."""
import os.path as osp
import sys

import pytest

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


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
