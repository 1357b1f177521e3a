"""SafeCheckpointHook: atomic, finite, and with the random streams."""
from pathlib import Path

import pytest
import torch
from _simt_common import make_demo_data, runner_cfg
from mmengine.hooks import Hook
from mmengine.runner import Runner

import projects.gppf  # noqa: F401
from projects.gppf.engine import SafeCheckpointHook


@pytest.fixture(scope='module')
def data_root(tmp_path_factory) -> Path:
    return make_demo_data(tmp_path_factory.mktemp('data'), 4, num_val=2)


def _runner(data_root, work_dir, max_iters=4, keep=-1, hooks=()):
    cfg = runner_cfg(
        data_root,
        work_dir,
        max_iters=max_iters,
        val=False,
        checkpoint_interval=2,
        custom_hooks=list(hooks))
    cfg['default_hooks']['checkpoint']['max_keep_ckpts'] = keep
    return Runner(**cfg)


@pytest.mark.data
def test_keeps_the_newest_and_leaves_no_temporary_file(data_root, tmp_path):
    runner = _runner(data_root, tmp_path, max_iters=6, keep=1)
    runner.train()
    files = sorted(p.name for p in tmp_path.iterdir() if p.is_file())
    assert [f for f in files if 'pth' in f] == ['iter_6.pth']
    assert not [f for f in files if f.endswith('.tmp')]
    assert (tmp_path / 'last_checkpoint').read_text() == \
        str(tmp_path / 'iter_6.pth')
    ckpt = torch.load(tmp_path / 'iter_6.pth', weights_only=True)
    states = ckpt['meta']['random_state']
    assert len(states) == 1 and set(states[0]) >= {'python', 'numpy', 'torch'}


@pytest.mark.data
def test_a_failed_write_keeps_the_last_checkpoint(data_root, tmp_path,
                                                  monkeypatch):
    runner = _runner(data_root, tmp_path, max_iters=4, keep=1)
    save = Runner.save_checkpoint

    def failing_save(self, out_dir, filename, *args, **kwargs):
        if 'iter_4' in filename:  # die after writing part of the file
            (Path(out_dir) / filename).write_bytes(b'half a checkpoint')
            raise OSError('disk full')
        return save(self, out_dir, filename, *args, **kwargs)

    monkeypatch.setattr(Runner, 'save_checkpoint', failing_save)
    with pytest.raises(OSError, match='disk full'):
        runner.train()
    last = Path((tmp_path / 'last_checkpoint').read_text())
    assert last.name == 'iter_2.pth'  # kept although max_keep_ckpts=1
    assert torch.load(last, weights_only=True)['meta']['iter'] == 2
    assert not (tmp_path / 'iter_4.pth').exists()


class _Poison(Hook):

    def after_train_iter(self,
                         runner,
                         batch_idx,
                         data_batch=None,
                         outputs=None):
        if runner.iter == 2:  # the weights diverge in iteration 3
            with torch.no_grad():
                runner.model.tasks['fmnist_cls'].head.fc.weight[0, 0] = \
                    float('nan')


@pytest.mark.data
def test_non_finite_weights_are_never_written(data_root, tmp_path):
    runner = _runner(data_root, tmp_path, max_iters=6, hooks=[_Poison()])
    with pytest.raises(RuntimeError) as info:
        runner.train()
    msg = str(info.value)
    assert 'tasks.fmnist_cls.head.fc.weight' in msg
    assert 'iter_4.pth is not written' in msg
    assert str(tmp_path / 'iter_2.pth') in msg
    assert not (tmp_path / 'iter_4.pth').exists()
    assert Path((tmp_path / 'last_checkpoint').read_text()).name == \
        'iter_2.pth'


def test_is_a_checkpoint_hook_in_the_registry():
    from mmengine.registry import HOOKS
    hook = HOOKS.build(dict(type='SafeCheckpointHook', interval=3))
    assert isinstance(hook, SafeCheckpointHook) and hook.interval == 3
