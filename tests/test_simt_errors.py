"""Bad input: clear errors before the first iteration, naming the task."""
import copy
import json

import pytest
from _simt_common import make_demo_data, model_cfg, runner_cfg
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.registry import HOOKS, MODELS
from mmengine.runner import Runner

import projects.gppf  # noqa: F401
import projects.gppf.engine  # noqa: F401
from projects.gppf.engine import check_simt_cfg


@pytest.fixture(scope='module')
def demo_root(tmp_path_factory):
    return make_demo_data(tmp_path_factory.mktemp('gppf_errors'), 4, 2)


@HOOKS.register_module()
class _FailOnIterHook(Hook):

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        raise AssertionError('an iteration started')


def train(cfg):
    cfg.setdefault('custom_hooks', []).append(dict(type='_FailOnIterHook'))
    Runner.from_cfg(Config(cfg)).train()


@pytest.mark.data
@pytest.mark.parametrize('piece', [
    'train_dataloader', 'val_dataloader', 'val_evaluator', 'model.tasks',
    'model.loss_weights', 'model.data_preprocessor'
])
def test_task_missing_from_one_piece(demo_root, tmp_path, piece):
    cfg = runner_cfg(demo_root, tmp_path, max_iters=1)
    cfg['model']['loss_weights'] = dict(
        mnist_det=1.0, fmnist_seg=1.0, fmnist_cls=1.0)
    if piece.startswith('model.'):
        model = cfg['model']
        if piece == 'model.data_preprocessor':
            model['data_preprocessor']['preprocessors'].pop('fmnist_seg')
        else:
            model[piece.split('.')[1]].pop('fmnist_seg')
    else:
        cfg[piece].pop('fmnist_seg')
    with pytest.raises(ValueError) as err:
        train(cfg)
    msg = str(err.value)
    assert "task 'fmnist_seg' is missing from" in msg
    missing = msg.split('missing from ')[1].split(' (present')[0]
    assert piece in missing, msg


def test_task_without_library_scope():
    cfg = model_cfg()
    cfg['tasks']['fmnist_seg'].pop('_scope_')
    with pytest.raises(ValueError, match=r"model.tasks\['fmnist_seg'\] "
                       r".*names no library"):
        MODELS.build(cfg)


def test_task_without_route_in_backbone():
    cfg = model_cfg('lego')
    cfg['backbone']['tasks'] = ['mnist_det', 'fmnist_cls']
    with pytest.raises(ValueError, match="task 'fmnist_seg' is missing from "
                       r'the backbone routes'):
        MODELS.build(cfg)


@pytest.mark.data
def test_empty_dataset(demo_root, tmp_path):
    ann = json.loads((demo_root / 'mnist_det/annotations/train.json')
                     .read_text())
    ann['images'], ann['annotations'] = [], []
    empty = tmp_path / 'empty.json'
    empty.write_text(json.dumps(ann))
    cfg = runner_cfg(demo_root, tmp_path, max_iters=1)
    cfg['train_dataloader']['mnist_det']['dataset']['ann_file'] = str(empty)
    with pytest.raises(ValueError,
                       match=r"train_dataloader\['mnist_det'\]: the dataset "
                       'is empty'):
        train(cfg)


@pytest.mark.data
def test_unknown_metric(demo_root, tmp_path):
    cfg = runner_cfg(demo_root, tmp_path, max_iters=1)
    cfg['val_evaluator']['fmnist_seg'] = dict(type='mmseg.IoUMetrick')
    with pytest.raises(KeyError,
                       match=r"val_evaluator\['fmnist_seg'\]: .*IoUMetrick"):
        train(cfg)


@pytest.mark.data
def test_single_dataloader_instead_of_dict(demo_root, tmp_path):
    cfg = runner_cfg(demo_root, tmp_path, max_iters=1)
    cfg['train_dataloader'] = cfg['train_dataloader']['fmnist_cls']
    with pytest.raises(TypeError, match='dict keyed by task'):
        train(cfg)


@pytest.mark.data
def test_task_keyed_loader_with_stock_loop(demo_root, tmp_path):
    cfg = Config(runner_cfg(demo_root, tmp_path, max_iters=1))
    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=1)
    with pytest.raises(ValueError, match="set train_cfg=dict"
                       r"\(type='SIMTTrainLoop'"):
        check_simt_cfg(cfg)
    check_simt_cfg(Config(runner_cfg(demo_root, tmp_path)))  # fine


def test_unknown_task_name_at_run_time():
    model = MODELS.build(model_cfg())
    with pytest.raises(KeyError, match="unknown task 'coco'"):
        model.train_step({'coco': {}}, None)
    bad = copy.deepcopy(model_cfg())
    bad['tasks']['a.b'] = bad['tasks'].pop('fmnist_cls')
    with pytest.raises(ValueError, match="invalid task name 'a.b'"):
        MODELS.build(bad)
