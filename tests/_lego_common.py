"""What the LegoResNet and LegoViT tests share: the ``lego2*`` export
check."""
import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Callable

import pytest
import torch

from projects.gppf import use_task

TOOLS = Path(__file__).resolve().parents[1] / 'tools'


def load_tool(path: str) -> ModuleType:
    """A script under ``tools/`` (e.g. ``model_converters/lego2vit.py``)
    as a module."""
    spec = importlib.util.spec_from_file_location(
        Path(path).stem, TOOLS / path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def check_export_tool(tool: ModuleType, lego: torch.nn.Module, tmp_path: Path,
                      out_name: str, build_stock: Callable[[dict, dict],
                                                           torch.nn.Module],
                      x: torch.Tensor) -> None:
    """``tool.convert`` of ``lego`` (routes ``'cls'``, not ``'seg'``, saved
    as a whole model) refuses ``'seg'``, records ``'cls'``'s route, and its
    export, loaded by ``build_stock(meta, init_cfg)``, computes what
    ``lego`` computes for ``'cls'``."""
    with torch.no_grad():
        lego.router.logits.normal_()
    lego.eval()
    src = tmp_path / 'gppf.pth'
    torch.save(
        {
            'state_dict': {
                f'backbone.{k}': v
                for k, v in lego.state_dict().items()
            }
        }, src)
    with pytest.raises(KeyError, match="task 'seg' is not routed"):
        tool.convert(str(src), 'seg', str(tmp_path / 'x.pth'))
    out = tmp_path / out_name
    meta = tool.convert(str(src), 'cls', str(out))
    assert meta['gppf_route'] == lego.router.greedy_indices('cls').tolist()
    stock = build_stock(
        meta, dict(type='Pretrained', prefix='backbone.', checkpoint=str(out)))
    stock.init_weights()
    stock.eval()
    with use_task('cls'):
        want = lego(x)
    for a, b in zip(stock(x), want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
