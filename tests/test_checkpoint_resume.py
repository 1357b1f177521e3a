"""Runner save/resume under torch.load(weights_only=True) with a LegoResNet."""
import pickle
from pathlib import Path

import pytest
import torch
from _simt_common import make_demo_data
from mmengine.hooks import Hook
from mmengine.runner import Runner

import projects.gppf  # noqa: F401  (allow-lists mmengine's safe globals)
from projects.gppf.utils import allow_mmengine_globals, mmengine_safe_globals


@pytest.fixture(scope='module')
def fmnist_cls(tmp_path_factory) -> Path:
    root = make_demo_data(
        tmp_path_factory.mktemp('data'), dict(fmnist_cls=32), num_val=8)
    return root / 'fmnist_cls'


class _LossRecorder(Hook):

    def __init__(self):
        self.losses = {}

    def after_train_iter(self,
                         runner,
                         batch_idx,
                         data_batch=None,
                         outputs=None):
        self.losses[runner.iter] = outputs['loss'].item()


def _runner(work_dir: Path, data_root: Path, resume=False) -> Runner:
    classes = [str(i) for i in range(10)]
    pipeline = [
        dict(type='LoadImageFromFile'),
        dict(type='Resize', scale=32),
        dict(type='RandomFlip', prob=0.5, direction='horizontal'),
        dict(type='PackInputs')
    ]
    return Runner(
        model=dict(
            type='ImageClassifier',
            data_preprocessor=dict(
                type='ClsDataPreprocessor', mean=[128.] * 3, std=[64.] * 3),
            backbone=dict(
                type='LegoResNet',
                depth=18,
                num_legos=4,
                num_active=2,
                tasks=('a', 'b'),
                task='a',
                router=dict(noise_std=1.0),
                out_indices=(3, )),
            neck=dict(type='GlobalAveragePooling'),
            head=dict(
                type='LinearClsHead',
                num_classes=10,
                in_channels=512,
                loss=dict(type='CrossEntropyLoss'))),
        work_dir=str(work_dir),
        train_dataloader=dict(
            batch_size=4,
            num_workers=0,
            sampler=dict(type='InfiniteSampler', shuffle=True),
            dataset=dict(
                type='CustomDataset',
                data_root=str(data_root),
                ann_file='meta/train.txt',
                data_prefix='train',
                metainfo=dict(classes=classes),
                pipeline=pipeline)),
        train_cfg=dict(type='IterBasedTrainLoop', max_iters=6),
        optim_wrapper=dict(
            optimizer=dict(
                type='SGD', lr=0.05, momentum=0.9, weight_decay=1e-4)),
        param_scheduler=dict(
            type='MultiStepLR', by_epoch=False, milestones=[3]),
        default_hooks=dict(
            checkpoint=dict(type='CheckpointHook', interval=3, by_epoch=False),
            logger=dict(type='LoggerHook', interval=1)),
        custom_hooks=[_LossRecorder()],
        randomness=dict(seed=0),
        default_scope='mmpretrain',
        resume=resume,
        experiment_name=f'resume_{work_dir.name}_{int(resume)}')


def _recorder(runner):
    return next(h for h in runner.hooks if isinstance(h, _LossRecorder))


@pytest.mark.data
def test_resume_continues_with_the_same_losses(tmp_path, fmnist_cls):
    full = _runner(tmp_path / 'full', fmnist_cls)
    full.train()
    assert (tmp_path / 'full' / 'iter_3.pth').exists()

    # Resume from iteration 3 in a new work dir: the last 3 losses match.
    part_dir = tmp_path / 'part'
    part_dir.mkdir()
    (part_dir / 'iter_3.pth').write_bytes(
        (tmp_path / 'full' / 'iter_3.pth').read_bytes())
    (part_dir / 'last_checkpoint').write_text(str(part_dir / 'iter_3.pth'))
    part = _runner(part_dir, fmnist_cls, resume=True)
    part.train()
    want = _recorder(full).losses
    got = _recorder(part).losses
    assert sorted(got) == [3, 4, 5]  # 0-based iterations after iter_3.pth
    for it in got:
        assert got[it] == pytest.approx(want[it], rel=1e-5, abs=1e-6), it
    # The router's state (calls drawn, noise) came back with the model.
    assert part.model.backbone.router.num_calls == \
        full.model.backbone.router.num_calls


@pytest.mark.data
def test_checkpoint_needs_only_the_allow_listed_globals(tmp_path, fmnist_cls):
    runner = _runner(tmp_path / 'run', fmnist_cls)
    runner.train()
    path = str(tmp_path / 'run' / 'iter_6.pth')
    torch.serialization.clear_safe_globals()
    try:
        unsafe = set(
            torch.serialization.get_unsafe_globals_in_checkpoint(path))
        with pytest.raises(pickle.UnpicklingError, match='Unsupported global'):
            torch.load(path, weights_only=True)  # the failure being fixed
    finally:
        allow_mmengine_globals()
    allowed = {
        f'{g.__module__}.{g.__qualname__}'
        for g in mmengine_safe_globals()
    } | {'builtins.getattr'}
    assert unsafe, 'mmengine checkpoints hold numpy globals'
    assert unsafe <= allowed, unsafe - allowed
    ckpt = torch.load(path, weights_only=True)  # no error
    assert ckpt['meta']['iter'] == 6


class _Evil:

    def __reduce__(self):
        import os
        return (os.system, ('echo pwned', ))


class _GetattrGadget:

    def __reduce__(self):
        from mmengine.logging.history_buffer import HistoryBuffer
        return (getattr, (HistoryBuffer, '__subclasshook__'))


@pytest.mark.parametrize('payload,match',
                         [(_Evil, 'system'),
                          (_GetattrGadget, 'refused getattr')])
def test_code_in_a_checkpoint_is_still_refused(tmp_path, payload, match):
    path = tmp_path / 'evil.pth'
    torch.save({'state_dict': {}, 'meta': payload()}, path)
    with pytest.raises(pickle.UnpicklingError, match=match):
        torch.load(path, weights_only=True)
