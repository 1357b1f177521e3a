"""``init_cfg=dict(type='CheckedPretrained')``: an exact export loads; a
checkpoint that does not fit fails before training with the cause and its
fix, where the stock ``Pretrained`` loads it silently (the module keeps
random weights); the allow-list; route copy refuses a dense checkpoint and
an unknown task. Tiny ResNets and ViTs, random weights, made here."""
import copy
from pathlib import Path
from typing import Callable, Dict, Optional

import pytest
import torch
import torch.nn as nn
from _lego_common import load_tool
from mmdet.models.backbones import ResNet as DetResNet
from mmengine.model import BaseModule
from mmpretrain.models.backbones import ResNet as ClsResNet
from mmpretrain.models.backbones import VisionTransformer
from mmseg.models.backbones import ResNet as SegResNet

import projects.gppf  # noqa: F401  (registers CheckedPretrained)
from projects.gppf.models import CheckpointMismatchError, LegoResNet, LegoViT

TASKS = ['a', 'b']
VIT = dict(embed_dims=32, num_layers=2, num_heads=2, feedforward_channels=64)
VIT_ARGS = dict(img_size=32, patch_size=8)


def _resnet(cls=DetResNet, depth: int = 18, **kwargs) -> nn.Module:
    return cls(depth=depth, stem_channels=8, base_channels=8, **kwargs)


def _save(state: Dict[str, torch.Tensor],
          path: Path,
          prefix: str = 'backbone.') -> str:
    torch.save(
        dict(state_dict={
            prefix + k: v
            for k, v in state.items()
        }), path)
    return str(path)


def _checked(checkpoint: str, prefix: Optional[str] = 'backbone.', **kw):
    return dict(
        type='CheckedPretrained', checkpoint=checkpoint, prefix=prefix, **kw)


@pytest.fixture(scope='module')
def ckpts(tmp_path_factory):
    """A LegoResNet-18 and a LegoViT checkpoint (tasks a, b; random routes
    and weights), task ``a``'s ResNet export, and dense ones."""
    tmp = tmp_path_factory.mktemp('ckpts')
    torch.manual_seed(0)
    lego = LegoResNet(depth=18, base_channels=8, tasks=TASKS)
    with torch.no_grad():  # no zeros, no ones: every tensor tells
        for value in lego.state_dict().values():
            if value.is_floating_point():
                value.uniform_(0.5, 1.5)
    out = dict(lego=_save(lego.state_dict(), tmp / 'gppf.pth'))
    out['export'] = str(tmp / 'export_a.pth')
    load_tool('model_converters/lego2resnet.py').convert(
        out['lego'], 'a', out['export'])
    vit = LegoViT(arch=VIT, tasks=TASKS, **VIT_ARGS)
    vit.init_weights()
    out['lego_vit'] = _save(vit.state_dict(), tmp / 'gppf_vit.pth')
    out['deep'] = _save(
        _resnet(depth=18, deep_stem=True).state_dict(), tmp / 'deep.pth')
    out['r34'] = _save(_resnet(depth=34).state_dict(), tmp / 'r34.pth')
    out['vit'] = _save(
        VisionTransformer(arch=VIT, **VIT_ARGS).state_dict(), tmp / 'vit.pth')
    out['bare'] = _save(
        torch.load(out['export'])['state_dict'],
        tmp / 'bare.pth',
        prefix='model.')
    return out


def _export(ckpts) -> Dict[str, torch.Tensor]:
    state = torch.load(ckpts['export'])['state_dict']
    return {k[len('backbone.'):]: v for k, v in state.items()}


@pytest.mark.parametrize('cls', [DetResNet, SegResNet, ClsResNet])
def test_an_export_loads_exactly(ckpts, cls):
    """Every tensor equals the export's; mmpretrain's ``ResNet`` keeps its
    loaded last norms (no ``zero_init_residual`` after a checked load)."""
    model = _resnet(cls, init_cfg=_checked(ckpts['export']))
    model.init_weights()
    given = _export(ckpts)
    ours = model.state_dict()
    assert set(ours) == set(given)
    for key, value in ours.items():
        torch.testing.assert_close(value, given[key], rtol=0, atol=0)
    assert given['layer1.0.bn2.weight'].abs().sum() > 0


def test_a_stock_vit_is_sent_to_pretrained(ckpts):
    """A stock ViT redraws ``pos_embed`` and its FFNs after any init type
    but ``'Pretrained'``: a checkpoint that fits is refused with that fix,
    and the fix loads it exactly."""
    model = VisionTransformer(
        arch=VIT, init_cfg=_checked(ckpts['vit']), **VIT_ARGS)
    with pytest.raises(
            CheckpointMismatchError,
            match=r"redraws pos_embed .*\(type='Pretrained'"):
        model.init_weights()
    model = VisionTransformer(
        arch=VIT,
        init_cfg=dict(
            type='Pretrained', checkpoint=ckpts['vit'], prefix='backbone.'),
        **VIT_ARGS)
    model.init_weights()
    given = torch.load(ckpts['vit'])['state_dict']
    for key, value in model.state_dict().items():
        torch.testing.assert_close(
            value, given['backbone.' + key], rtol=0, atol=0)


class _Redraws(BaseModule):
    """Redraws its conv after any load, as a backbone whose
    ``init_weights`` ends with its own init."""

    def __init__(self, init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg)
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def init_weights(self) -> None:
        super().init_weights()
        nn.init.normal_(self.conv.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


def test_a_load_undone_before_the_first_forward_is_named(tmp_path):
    """A re-initialisation after the checked load fails at the first
    forward, naming the tensors and the fix; a resume (``load_state_dict``)
    in between lifts the check, a deep copy (an EMA model) never runs it."""
    torch.manual_seed(0)
    state = _Redraws().state_dict()
    ckpt = _save(state, tmp_path / 'redraws.pth', prefix='')
    x = torch.randn(2, 3, 8, 8)

    model = _Redraws(init_cfg=_checked(ckpt, prefix=None))
    model.init_weights()
    copy_ = copy.deepcopy(model)
    with pytest.raises(
            CheckpointMismatchError,
            match=r"1 of its tensors .*\['conv.weight'\].*"
            r"type='Pretrained'"):
        model(x)
    with torch.no_grad():
        copy_.conv.weight.add_(1.0)
    copy_(x)  # a copy's forward checks nothing

    model = _Redraws(init_cfg=_checked(ckpt, prefix=None))
    model.init_weights()
    model.load_state_dict(state)  # e.g. a resume after the init
    model(x)
    assert not model._forward_pre_hooks


def test_an_intact_load_passes_the_first_forward(ckpts):
    model = _resnet(DetResNet, init_cfg=_checked(ckpts['export']))
    model.init_weights()
    assert len(model._forward_pre_hooks) == 1
    model(torch.randn(2, 3, 64, 64))
    assert not model._forward_pre_hooks  # the check ran once and left


def _silent_with_stock(build: Callable[[dict], nn.Module], checkpoint: str,
                       prefix: Optional[str]) -> None:
    """The stock ``Pretrained`` init of the same module and checkpoint
    raises nothing, yet the module does not hold the checkpoint (a tensor
    kept at its init) or drops part of it (keys left unused)."""
    model = build(
        dict(type='Pretrained', checkpoint=checkpoint, prefix=prefix))
    model.init_weights()
    state = torch.load(checkpoint)['state_dict']
    if prefix:
        state = {
            k[len(prefix):]: v
            for k, v in state.items() if k.startswith(prefix)
        }
    ours = model.state_dict()
    assert set(state) - set(ours) or any(
        key not in state or state[key].shape != value.shape
        or not torch.equal(state[key], value) for key, value in ours.items())


# (build(init_cfg), checkpoint name, prefix, what the error must say)
CASES = {
    'lego_resnet': (lambda c: _resnet(init_cfg=c), 'lego', 'backbone.',
                    r'holds a LegoResNet .*lego2resnet\.py CKPT TASK OUT '
                    r'.*route-copy way \(docs/downstream\.md\)'),
    'lego_vit': (lambda c: VisionTransformer(arch=VIT, init_cfg=c, **VIT_ARGS),
                 'lego_vit', 'backbone.', r'holds a LegoViT .*lego2vit\.py'),
    'deep_stem_module': (lambda c: _resnet(deep_stem=True, init_cfg=c),
                         'export', 'backbone.', r'set deep_stem=False'),
    'deep_stem_checkpoint': (lambda c: _resnet(init_cfg=c), 'deep',
                             'backbone.', r'set deep_stem=True'),
    'depth_missing': (lambda c: _resnet(depth=34, init_cfg=c), 'export',
                      'backbone.', r'\(2, 2, 2, 2\) blocks per stage '
                      r'\(depth 18\), the module \(3, 4, 6, 3\) \(depth 34\)'
                      r': set depth=18'),
    'depth_unexpected':
    (lambda c: _resnet(init_cfg=c), 'r34', 'backbone.', r'set depth=34'),
    'vit_layers': (lambda c: VisionTransformer(
        arch=dict(VIT, num_layers=3), init_cfg=c, **VIT_ARGS), 'vit',
                   'backbone.', r'ViT arch mismatch: the checkpoint has '
                   r'embed_dims=32, num_layers=2, the module embed_dims=32, '
                   r'num_layers=3'),
    'vit_dims': (lambda c: VisionTransformer(
        arch=dict(VIT, embed_dims=48), init_cfg=c, **VIT_ARGS), 'vit',
                 'backbone.', r'embed_dims=32, num_layers=2, the module '
                 r'embed_dims=48.*shape of cls_token'),
    'no_prefix_given': (lambda c: _resnet(init_cfg=c), 'export', None,
                        r"keys under \['backbone\.'\] do: set "
                        r'init_cfg\.prefix'),
}


@pytest.mark.parametrize('case', list(CASES))
def test_a_mismatch_fails_with_its_fix(ckpts, case):
    build, name, prefix, message = CASES[case]
    model = build(_checked(ckpts[name], prefix))
    with pytest.raises(CheckpointMismatchError, match=f'(?s){message}'):
        model.init_weights()
    _silent_with_stock(build, ckpts[name], prefix)


def test_a_wrong_prefix_names_the_prefixes_there(ckpts):
    """Stock ``Pretrained`` asserts here too, without the fix."""
    model = _resnet(init_cfg=_checked(ckpts['bare']))
    with pytest.raises(
            CheckpointMismatchError,
            match=r"starts with prefix 'backbone\.'; its keys start with "
            r"\['model\.'\]: set init_cfg\.prefix"):
        model.init_weights()
    stock = _resnet(
        init_cfg=dict(
            type='Pretrained', checkpoint=ckpts['bare'], prefix='backbone.'))
    with pytest.raises(AssertionError, match='not in the pretrained model'):
        stock.init_weights()


def test_the_message_lists_the_keys(ckpts):
    model = _resnet(depth=34, init_cfg=_checked(ckpts['export']))
    with pytest.raises(CheckpointMismatchError) as err:
        model.init_weights()
    missing = sorted(set(model.state_dict()) - set(_export(ckpts)))
    text = str(err.value)
    assert f'does not fit ResNet: {len(missing)} missing keys' in text
    assert "missing: ['layer1.2.conv1.weight'" in text
    assert f'(+{len(missing) - 8} more)' in text


def test_allow_missing(ckpts, tmp_path):
    """Keys matching ``allow_missing`` keep their init; the rest load."""
    given = _export(ckpts)
    part = {k: v for k, v in given.items() if not k.startswith('layer4.')}
    path = _save(part, tmp_path / 'three_stages.pth')
    with pytest.raises(
            CheckpointMismatchError,
            match=r'(?s)30 missing keys.*set num_stages=3'):
        _resnet(init_cfg=_checked(path)).init_weights()
    torch.manual_seed(1)
    model = _resnet(init_cfg=_checked(path, allow_missing=['layer4.*']))
    before = model.layer4[0].conv1.weight.clone()
    model.init_weights()
    ours = model.state_dict()
    for key, value in part.items():
        torch.testing.assert_close(ours[key], value, rtol=0, atol=0)
    torch.testing.assert_close(model.layer4[0].conv1.weight, before)
    # The allow-list covers missing keys only.
    extra = _save(dict(given, extra=torch.zeros(1)), tmp_path / 'extra.pth')
    with pytest.raises(CheckpointMismatchError, match=r"unexpected: \['extra"):
        _resnet(init_cfg=_checked(extra, allow_missing=['*'])).init_weights()


# ------------------------------------------------------------ route copy
def _lego_resnet(checkpoint: str,
                 task_map: dict,
                 type: str = 'CheckedPretrained') -> LegoResNet:
    return LegoResNet(
        depth=18,
        base_channels=8,
        tasks=['new'],
        task='new',
        init_cfg=dict(
            type=type,
            checkpoint=checkpoint,
            prefix='backbone.',
            task_map=task_map))


@pytest.mark.parametrize('type', ['Pretrained', 'CheckedPretrained'])
def test_route_copy_takes_the_source_route(ckpts, type):
    """LegoResNet loads a ``CheckedPretrained`` init_cfg with its own
    loader, like ``Pretrained`` (the docs' route-copy switch keeps it)."""
    model = _lego_resnet(ckpts['lego'], dict(new='b'), type)
    model.init_weights()
    state = torch.load(ckpts['lego'])['state_dict']
    torch.testing.assert_close(model.router.logits[0],
                               state['backbone.router.logits'][1])


@pytest.mark.parametrize('backbone', ['LegoResNet', 'LegoViT'])
def test_route_copy_refuses_a_dense_checkpoint(ckpts, backbone):
    if backbone == 'LegoResNet':
        model = _lego_resnet(ckpts['export'], dict(new='a'))
    else:
        model = LegoViT(
            arch=VIT,
            tasks=['new'],
            init_cfg=_checked(ckpts['vit'], task_map=dict(new='a')),
            **VIT_ARGS)
    with pytest.raises(
            ValueError,
            match=rf'{backbone}: init_cfg\.task_map=.* holds no {backbone} '
            r'.*drop task_map and load the export'):
        model.init_weights()


@pytest.mark.parametrize('task_map,message', [
    (dict(other='a'), r"task_map names tasks \['other'\] that this backbone "
     r"does not route; its tasks are \['new'\]"),
    (dict(new='zzz'), r"'zzz', which the checkpoint does not route; its "
     r"tasks are \['a', 'b'\]"),
])
def test_route_copy_refuses_an_unknown_task(ckpts, task_map, message):
    with pytest.raises(KeyError, match=message):
        _lego_resnet(ckpts['lego'], task_map).init_weights()
