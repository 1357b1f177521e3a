"""A corrupt, truncated or missing file in a long run: skipped, named,
counted, and the run stopped when a task has too many."""
import copy
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
from _simt_common import dataloaders, make_demo_data, runner_cfg
from mmengine.logging import MMLogger
from mmengine.runner import Runner

import projects.gppf  # noqa: F401
from projects.gppf.datasets import GuardedDataset, SeededIndex
from projects.gppf.datasets.guarded_dataset import truncated_image


@pytest.fixture
def data_root(tmp_path) -> Path:
    return make_demo_data(tmp_path / 'data', 8, num_val=4)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _as_truncated_jpeg(path: Path) -> None:
    """Re-encode ``path`` as JPEG (same name) and cut it in half."""
    img = cv2.imread(str(path))
    ok, buf = cv2.imencode('.jpg', img)
    assert ok
    path.write_bytes(buf.tobytes()[:len(buf) // 2])


def _files_of(dataset, idx):
    info = dataset.get_data_info(idx)
    return [
        Path(v) for k, v in info.items()
        if k.endswith('_path') and isinstance(v, str)
    ]


@pytest.fixture
def logs():
    records = []

    class _Catch(logging.Handler):

        def emit(self, record):
            records.append(record.getMessage())

    logger = MMLogger.get_current_instance()
    handler = _Catch(level=logging.WARNING)
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def test_truncated_image_by_content(tmp_path):
    img = (np.arange(64 * 64 * 3) % 251).astype(np.uint8).reshape(64, 64, 3)
    for ext in ('.png', '.jpg'):
        path = tmp_path / f'a{ext}'
        cv2.imwrite(str(path), img)
        assert not truncated_image(str(path))
        _truncate(path)
        assert truncated_image(str(path))
    jpeg_named_png = tmp_path / 'b.png'
    jpeg_named_png.write_bytes(cv2.imencode('.jpg', img)[1].tobytes())
    assert not truncated_image(str(jpeg_named_png))
    assert not truncated_image(str(tmp_path / 'missing.png'))


@pytest.mark.data
@pytest.mark.parametrize('task', ['mnist_det', 'fmnist_seg', 'fmnist_cls'])
@pytest.mark.parametrize(
    'damage',
    ['truncated_png', 'truncated_jpeg', 'missing', 'truncated_label'])
def test_bad_file_is_skipped_named_and_reported(data_root, logs, task, damage):
    cfg = dataloaders(data_root, 'train')[task]['dataset']
    dataset = GuardedDataset(copy.deepcopy(cfg), task=task)
    files = _files_of(dataset, 0)
    if damage == 'truncated_label':
        if task != 'fmnist_seg':
            pytest.skip('only segmentation has label files')
        path = files[1]  # the PNG label map
        _truncate(path)
    else:
        path = files[0]
        if damage == 'missing':
            path.unlink()
        elif damage == 'truncated_png':
            _truncate(path)
        else:
            _as_truncated_jpeg(path)
    for idx in range(1, len(dataset)):  # intact samples: nothing reported
        assert dataset[SeededIndex(idx, idx)][GuardedDataset.KEY] == ''
    sample = dataset[SeededIndex(0, 99)]
    report = sample[GuardedDataset.KEY]
    assert str(path) in report and 'sample 0' in report
    assert sample['data_samples'].metainfo['img_path'] != str(files[0])
    warned = [m for m in logs if str(path) in m]
    assert warned and warned[0].startswith(f'{task}: skipped sample 0')
    # the replacement is drawn with the sample's seed: the same every time
    again = dataset[SeededIndex(0, 99)]
    assert again['data_samples'].metainfo['img_path'] == \
        sample['data_samples'].metainfo['img_path']


@pytest.mark.data
def test_every_sample_broken_fails_after_the_retries(data_root):
    cfg = dataloaders(data_root, 'train')['fmnist_cls']['dataset']
    dataset = GuardedDataset(cfg, task='fmnist_cls', max_retries=3)
    for idx in range(len(dataset)):
        _files_of(dataset, idx)[0].unlink()
    with pytest.raises(RuntimeError, match='fmnist_cls: 4 samples in a row'):
        dataset[SeededIndex(0, 1)]
    strict = GuardedDataset(cfg, task='fmnist_cls', max_retries=0)
    with pytest.raises(FileNotFoundError):
        strict[SeededIndex(0, 1)]


def _damage_cls(root: Path, n: int) -> list:
    meta = (root / 'fmnist_cls' / 'meta' / 'train.txt').read_text().split()
    paths = [root / 'fmnist_cls' / 'train' / rel for rel in meta[0::2][:n]]
    for p in paths:
        _truncate(p)
    return paths


@pytest.mark.data
def test_the_loop_counts_bad_samples_and_trains_on(data_root, tmp_path):
    _damage_cls(data_root, 1)
    cfg = runner_cfg(data_root, tmp_path / 'work', max_iters=6, val=False)
    runner = Runner(**cfg)
    runner.train()
    bad, seen, last = runner.message_hub.get_info(
        'simt_bad_samples')['fmnist_cls']
    assert bad >= 1 and seen == 6 * 2 + bad
    assert 'fmnist_cls' not in [
        t
        for t, (b, _,
                _) in runner.message_hub.get_info('simt_bad_samples').items()
        if b and t != 'fmnist_cls'
    ]
    scalars = runner.message_hub.log_scalars
    assert scalars['train/fmnist_cls/bad_samples'].current() == bad
    assert 'train/mnist_det/bad_samples' not in scalars


@pytest.mark.data
def test_the_loop_stops_when_a_task_has_too_many(data_root, tmp_path):
    paths = _damage_cls(data_root, 4)  # half of the 8 images
    cfg = runner_cfg(data_root, tmp_path / 'work', max_iters=50, val=False)
    cfg['train_cfg'].update(
        bad_samples=dict(max_ratio=0.2, min_samples=8, max_retries=50))
    runner = Runner(**cfg)
    with pytest.raises(RuntimeError) as info:
        runner.train()
    msg = str(info.value)
    assert "train_dataloader['fmnist_cls']" in msg and 'max_ratio=20.0%' \
        in msg
    assert any(str(p) in msg for p in paths)
    assert runner.iter < 50


@pytest.mark.data
def test_bad_samples_cfg_errors(data_root, tmp_path):
    cfg = runner_cfg(data_root, tmp_path / 'work', val=False)
    cfg['train_cfg'].update(bad_samples=dict(max_ratios=0.1))
    with pytest.raises(KeyError, match='unknown keys'):
        Runner(**cfg).train()
