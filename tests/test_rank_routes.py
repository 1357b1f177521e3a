"""rank_routes.py (probe each pre-training route on a new dataset) and
downstream_transfer.py (the transfer measurement's plan and report)."""
import time
import types
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import mmengine.runner.runner as mmengine_runner
from _lego_common import load_tool
from mmengine.config import Config

import projects.gppf  # noqa: F401
from projects.gppf import LegoResNet

rank_routes = load_tool('analysis_tools/rank_routes.py')
transfer = load_tool('analysis_tools/downstream_transfer.py')


def _lego_checkpoint(path: Path) -> Path:
    """A LegoResNet-18 (base 8) routing two tasks along disjoint routes."""
    torch.manual_seed(0)
    lego = LegoResNet(
        depth=18, base_channels=8, tasks=('a', 'b'), task_norm='stats')
    lego.router.set_route('a', torch.tensor([[0, 1]] * 8))
    lego.router.set_route('b', torch.tensor([[2, 3]] * 8))
    torch.save(
        {
            'state_dict': {
                f'backbone.{k}': v
                for k, v in lego.state_dict().items()
            }
        }, path)
    return path


def _cls_config(root: Path) -> Config:
    """A stock mmpretrain classifier over 12 synthetic 32x32 images."""
    rng = np.random.default_rng(0)
    lines = []
    for i in range(12):
        label = i % 3
        img = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
        img[..., label] = 255  # a learnable cue
        (root / 'train').mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / 'train' / f'{i}.png'), img)
        lines.append(f'{i}.png {label}')
    (root / 'train.txt').write_text('\n'.join(lines) + '\n')
    return Config(
        dict(
            default_scope='mmpretrain',
            model=dict(
                type='ImageClassifier',
                data_preprocessor=dict(
                    type='ClsDataPreprocessor', mean=[128.] * 3,
                    std=[64.] * 3),
                backbone=dict(
                    type='ResNet',
                    depth=18,
                    base_channels=8,
                    out_indices=(3, )),
                neck=dict(type='GlobalAveragePooling'),
                head=dict(
                    type='LinearClsHead',
                    num_classes=3,
                    in_channels=64,
                    loss=dict(type='CrossEntropyLoss'))),
            train_dataloader=dict(
                batch_size=4,
                num_workers=0,
                sampler=dict(type='InfiniteSampler', shuffle=True),
                dataset=dict(
                    type='CustomDataset',
                    data_root=str(root),
                    ann_file='train.txt',
                    data_prefix='train',
                    metainfo=dict(classes=('x', 'y', 'z')),
                    pipeline=[
                        dict(type='LoadImageFromFile'),
                        dict(type='PackInputs')
                    ])),
            train_cfg=dict(by_epoch=True, max_epochs=100),
            optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01)),
            param_scheduler=[
                dict(type='LinearLR', by_epoch=False, begin=0, end=2),
                dict(type='MultiStepLR', by_epoch=True, milestones=[30])
            ],
            default_hooks=dict(logger=dict(type='LoggerHook')),
            env_cfg=dict(dist_cfg=dict(backend='gloo'))))


@pytest.mark.slow
def test_rank_probes_every_route_on_the_same_batches(tmp_path, monkeypatch):
    # Every probe's Runner gets the same timestamp, as probes started within
    # one second do: each must still log into its own work dir.
    frozen = types.SimpleNamespace(
        time=lambda: 1.0e9, strftime=time.strftime, localtime=time.localtime)
    monkeypatch.setattr(mmengine_runner, 'time', frozen)
    ckpt = _lego_checkpoint(tmp_path / 'gppf.pth')
    cfg = _cls_config(tmp_path / 'data')
    rows = rank_routes.rank(cfg, str(ckpt), [], images=8, iters=4, seed=0)
    assert sorted(r['source'] for r in rows) == [rank_routes.SCRATCH, 'a', 'b']
    losses = [r['loss'] for r in rows]
    assert losses == sorted(losses)
    by_source = {r['source']: r for r in rows}
    # The routes differ, so their first losses do (the route copy is real).
    assert by_source['a']['first'] != pytest.approx(by_source['b']['first'])
    # Same candidate, same images and seed: the same probe.
    again = rank_routes.rank(
        cfg, str(ckpt), ['a'], images=8, iters=4, seed=0, scratch=False)
    assert again[0]['source'] == 'a'
    assert again[0]['loss'] == pytest.approx(by_source['a']['loss'], 1e-6)
    table = rank_routes.table(rows, 8, 4)
    assert table.count('\n') == 4 and '| 1 |' in table


def test_probe_config_routes_the_new_task_and_cuts_the_schedule(tmp_path):
    ckpt = _lego_checkpoint(tmp_path / 'gppf.pth')
    cfg = _cls_config(tmp_path / 'data')
    layout = rank_routes.checkpoint_layout(str(ckpt))
    probe = rank_routes.probe_config(cfg, str(ckpt), layout, 'b', 'probe', 8,
                                     5, 3, str(tmp_path / 'w'))
    backbone = probe.model.backbone
    assert backbone.type == 'LegoResNet' and backbone.tasks == ['probe']
    assert backbone.init_cfg.task_map == {'probe': 'b'}
    assert probe.train_dataloader.dataset.indices == 8
    assert probe.train_cfg.max_iters == 5 and probe.randomness.seed == 3
    # The epoch-based scheduler cannot step in an iteration loop: dropped.
    assert [s.type for s in probe.param_scheduler] == ['LinearLR']
    assert cfg.model.backbone.type == 'ResNet'  # the input is not changed


def test_rank_bad_input(tmp_path):
    ckpt = _lego_checkpoint(tmp_path / 'gppf.pth')
    cfg = _cls_config(tmp_path / 'data')
    with pytest.raises(KeyError, match=r"\['coco_det'\].*\['a', 'b'\]"):
        rank_routes.rank(cfg, str(ckpt), ['coco_det'], 8, 4, 0)
    dense = tmp_path / 'dense.pth'
    torch.save({'state_dict': {
        'backbone.conv1.weight': torch.zeros(1)
    }}, dense)
    with pytest.raises(ValueError, match='holds no lego backbone'):
        rank_routes.checkpoint_layout(str(dense))
    with pytest.raises(SystemExit):
        rank_routes.parse_args(['c.py', 'k.pth', '--iters', '1'])


def test_transfer_plan_and_report(tmp_path):
    ckpt = str(_lego_checkpoint(tmp_path / 'gppf.pth'))
    name = 'digits_cls'
    transfer.BENCHMARKS['tiny'] = dict(
        transfer.BENCHMARKS[name], source='a', iters=10)
    try:
        runs = transfer.plan(['tiny'], transfer.WAYS, [0, 1], [ckpt],
                             str(tmp_path / 'w'), 0.2, {})
        assert [r.name
                for r in runs[:4]] == [f'tiny-{w}-s0' for w in transfer.WAYS]
        scratch, export, copy, search = runs[:4]
        assert scratch.config == transfer.BENCHMARKS[name]['config']
        assert export.export[1:] == (
            'a', export.options['model.backbone.init_cfg.checkpoint'])
        copied = Config.fromfile(copy.config)
        assert copied.model.backbone.type == 'LegoResNet'
        assert copied.model.backbone.init_cfg.task_map == {'tiny': 'a'}
        assert copied.model.backbone.depth == 18  # the base config's
        assert 'custom_hooks' not in copied or not any(
            h.type == 'RouteSearchHook' for h in copied.custom_hooks)
        searched = Config.fromfile(search.config)
        assert searched.custom_hooks[-1] == dict(
            type='RouteSearchHook', search_iters=2)
        with pytest.raises(KeyError, match="does not route 'coco_det'"):
            transfer.plan(['tiny'], ['copy'], [0], [ckpt], str(tmp_path / 'w'),
                          0.2, {'tiny': 'coco_det'})
        records = {
            r.name: dict(primary={'tiny': 90.0 + i}, early=(2, 0.5 + i))
            for i, r in enumerate(runs)
        }
        text = transfer.report(runs, records, 'cmd', {}, [ckpt], 1, 2)
        # scratch 90 / 94; export 91 / 95: paired difference +1 on both;
        # early losses 1.5 / 5.5.
        assert 'training loss at iteration 2 |' in text
        assert ('| export | 93.00 ± 2.83 | 91.00, 95.00 | 1.00 ± 0.00 '
                '| 3.50 ± 2.83 |') in text
        doc = tmp_path / 'doc.md'
        doc.write_text('# Title\n\nbody\n')
        transfer.write_section(str(doc), text)
        transfer.write_section(str(doc), text.replace('cmd', 'again'))
        out = doc.read_text()
        assert out.startswith('# Title\n\nbody\n')
        assert out.count(transfer.BEGIN) == 1 and 'again' in out
    finally:
        del transfer.BENCHMARKS['tiny']
