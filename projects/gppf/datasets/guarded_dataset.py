"""Training samples that neither break a long run nor pass unnoticed."""
import logging
import os.path as osp
import random
from typing import Any, Dict, List, Optional, Union

from mmengine.logging import print_log
from mmengine.registry import DATASETS

from ..utils.random_state import seeded_random_state

__all__ = ['GuardedDataset', 'truncated_image']

# A decoder may hand back part of a truncated JPEG without an error (it
# fills the rest), so truncation is checked on the file's last bytes: the
# end marker of the format its first bytes name.
_TAIL = 1024
_END_MARKS = {b'\xff\xd8\xff': b'\xff\xd9', b'\x89PNG': b'IEND'}


def truncated_image(path: str) -> bool:
    """Whether a local JPEG file lacks its end-of-image marker, or a PNG
    file its ``IEND`` chunk, in its last kilobyte (the format is read from
    the file's first bytes; other files and missing ones: ``False``)."""
    if not osp.isfile(path):
        return False
    with open(path, 'rb') as f:
        head = f.read(4)
        mark = next(
            (end
             for magic, end in _END_MARKS.items() if head.startswith(magic)),
            None)
        if mark is None:
            return False
        f.seek(0, 2)
        f.seek(max(f.tell() - _TAIL, 0))
        return mark not in f.read()


@DATASETS.register_module()
class GuardedDataset:
    """A task's training dataset whose samples load in their seeded random
    scope, and whose bad samples are replaced and reported.

    Each index a :class:`ResumableBatchSampler` yields carries its sample's
    seed; the sample (its pipeline, and the stock dataset's own re-draws)
    is loaded inside that seed's random scope, so its augmentation is the
    same in any worker and after any resume. A sample *fails* when one of
    its files is missing or visibly truncated (:func:`truncated_image`) or
    its pipeline raises (an image the decoder refuses, a broken annotation).
    A failure is logged as a warning that names the task, the sample and its
    files; another sample, drawn with the same seed, is loaded instead; and
    the returned sample lists the failures under ``bad_samples`` (an empty
    string when there were none), so the train loop counts them whichever
    worker loaded them. Everything else is the wrapped dataset's.

    Args:
        dataset (dict | Dataset): The task's stock dataset (config).
        task (str): The task name, for messages. Default: ''.
        max_retries (int): Replacements tried for one sample before giving
            up with an error; 0 raises the first failure. Default: 10.
    """

    KEY = 'bad_samples'

    def __init__(self,
                 dataset: Union[dict, Any],
                 task: str = '',
                 max_retries: int = 10) -> None:
        if isinstance(dataset, dict):
            dataset = DATASETS.build(dataset)
        if int(max_retries) < 0:
            raise ValueError(f'max_retries must be >= 0, got {max_retries}')
        self.dataset = dataset
        self.task = task
        self.max_retries = int(max_retries)

    @property
    def metainfo(self) -> Optional[dict]:
        return getattr(self.dataset, 'metainfo', None)

    def __len__(self) -> int:
        return len(self.dataset)

    def get_data_info(self, idx: int) -> Dict[str, Any]:
        return self.dataset.get_data_info(int(idx))

    def __getattr__(self, name: str) -> Any:
        if name == 'dataset':  # not yet set (unpickling)
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, idx: int) -> Any:
        seed = getattr(idx, 'seed', None)
        if seed is None:
            return self._load(int(idx))
        with seeded_random_state(seed):
            return self._load(int(idx))

    def _load(self, idx: int) -> Any:
        failures: List[str] = []
        for _ in range(self.max_retries + 1):
            try:
                bad = [p for p in self._files(idx) if truncated_image(p)]
                if bad:
                    raise OSError(f'truncated image file {bad[0]}')
                data = self.dataset[idx]
            except Exception as err:
                if self.max_retries == 0:
                    raise
                failures.append(self._describe(idx, err))
                print_log(
                    f'{self.task}: skipped {failures[-1]}',
                    logger='current',
                    level=logging.WARNING)
                idx = random.randrange(len(self.dataset))
                continue
            if isinstance(data, dict):
                data[self.KEY] = '\n'.join(failures)
            return data
        raise RuntimeError(
            f'{self.task}: {len(failures)} samples in a row failed to load; '
            'is the dataset or its pipeline broken? The failures:\n' +
            '\n'.join(failures))

    def _files(self, idx: int) -> List[str]:
        """The sample's file paths (``*_path`` entries of its info)."""
        try:
            info = self.dataset.get_data_info(idx)
        except Exception:  # a broken annotation: the pipeline will say
            return []
        return [
            v for k, v in info.items()
            if k.endswith('_path') and isinstance(v, str)
        ]

    def _describe(self, idx: int, err: Exception) -> str:
        files = ', '.join(self._files(idx)) or 'no file path'
        msg = ' '.join(str(err).split())
        return f'sample {idx} ({files}): {type(err).__name__}: {msg}'
