"""TaskRouterHook: warm-up, annealing, freezing, scalars, heatmaps, state."""
import json
from pathlib import Path

import pytest
import torch
from _simt_common import make_demo_data
from mmengine.hooks import Hook
from mmengine.runner import Runner

import projects.gppf  # noqa: F401
from projects.gppf import TaskRouterHook


@pytest.fixture(scope='module')
def fmnist_cls(tmp_path_factory) -> Path:
    root = make_demo_data(
        tmp_path_factory.mktemp('data'), dict(fmnist_cls=16), num_val=4)
    return root / 'fmnist_cls'


class _RouteRecorder(Hook):
    priority = 'LOW'  # after TaskRouterHook's before_train_iter

    def __init__(self):
        self.noise, self.routes, self.frozen = [], [], []

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        router = runner.model.backbone.router
        self.noise.append(router.noise_std)
        self.frozen.append(list(router.frozen))

    def after_train_iter(self,
                         runner,
                         batch_idx,
                         data_batch=None,
                         outputs=None):
        self.routes.append(runner.model.backbone.router.routed[0].tolist())


@pytest.mark.data
def test_schedule_freeze_scalars_and_heatmaps(tmp_path, fmnist_cls):
    recorder = _RouteRecorder()
    runner = Runner(
        model=dict(
            type='ImageClassifier',
            data_preprocessor=dict(
                type='ClsDataPreprocessor', mean=[128.] * 3, std=[64.] * 3),
            backbone=dict(
                type='LegoResNet',
                depth=18,
                tasks=('a', 'b'),
                task='a',
                out_indices=(3, ),
                router=dict(noise_std=5.0)),
            neck=dict(type='GlobalAveragePooling'),
            head=dict(
                type='LinearClsHead',
                num_classes=10,
                in_channels=512,
                loss=dict(type='CrossEntropyLoss'))),
        work_dir=str(tmp_path),
        train_dataloader=dict(
            batch_size=4,
            num_workers=0,
            sampler=dict(type='InfiniteSampler', shuffle=True),
            dataset=dict(
                type='CustomDataset',
                data_root=str(fmnist_cls),
                ann_file='meta/train.txt',
                data_prefix='train',
                metainfo=dict(classes=[str(i) for i in range(10)]),
                pipeline=[
                    dict(type='LoadImageFromFile'),
                    dict(type='Resize', scale=32),
                    dict(type='PackInputs')
                ])),
        train_cfg=dict(type='IterBasedTrainLoop', max_iters=8),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01)),
        default_hooks=dict(
            checkpoint=dict(type='CheckpointHook', interval=8, by_epoch=False),
            logger=dict(type='LoggerHook', interval=1)),
        custom_hooks=[
            dict(
                type='TaskRouterHook',
                noise_std=(4.0, 0.0),
                warmup_iters=2,
                freeze_iter=6,
                log_interval=1), recorder
        ],
        default_scope='mmpretrain',
        experiment_name=f'router_hook_{tmp_path.name}')
    runner.train()
    # Warm-up: the initial route is held; then routes move under noise.
    assert recorder.frozen[0] == [True, True]
    assert recorder.routes[0] == recorder.routes[1]
    assert recorder.frozen[2] == [False, False]
    # Linear annealing 4 -> 0 between warm-up and the freeze iteration.
    assert recorder.noise[2:7] == pytest.approx([4.0, 3.0, 2.0, 1.0, 0.0])
    # Frozen from iteration 6 on: the route stays put.
    assert recorder.frozen[6] == [True, True]
    assert recorder.routes[6] == recorder.routes[7]
    hub = runner.message_hub
    share = [hub.get_scalar(f'router/a/unit{n}').current() for n in range(4)]
    assert sum(share) == pytest.approx(2.0)  # k=2 units active per layer
    # The visualizer's scalars file holds them at every logged iteration.
    logged = [
        json.loads(line) for path in tmp_path.glob('*/vis_data/scalars.json')
        for line in path.read_text().splitlines()
    ]
    routed = [e for e in logged if 'router/overlap' in e]
    assert [e['step'] for e in routed] == list(range(1, 9))
    assert routed[-1]['router/a/unit0'] == share[0]
    assert (tmp_path / 'route_heatmaps' / 'route_heatmap_iter_8.png').exists()
    ckpt = torch.load(tmp_path / 'iter_8.pth', weights_only=True)
    assert 'task_router_hook' in ckpt


def test_hook_without_a_router_fails_early():
    hook = TaskRouterHook()

    class _Runner:
        model = torch.nn.Linear(2, 2)

    with pytest.raises(RuntimeError, match='found no TaskRouter'):
        hook.before_train(_Runner())
