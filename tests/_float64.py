"""float64 runs of the tiny GPPF models, for equality tests whose float32
rounding depends on the summation order (2 ranks vs one process, gradients
accumulated over iterations vs summed afterwards) and so on the kernels a
CPU picks.

In float32 such a comparison can only ask for agreement to ~1e-5 of a
tensor's scale, and SGD steps, clipping and batch norms amplify the rounding
until even that fails on some CPUs. In float64 a reordered sum moves results
by ~1e-15 of their scale, so :func:`assert_close_to_scale` can ask for 1e-10
(or for the one known exact difference, see ``test_simt_distributed``).

What stays float32 in a float64 model (checked on CPU with mmcv 2.1, mmdet
3, mmseg 1, mmpretrain 1): the stock preprocessors' output (cast here), the
detection boxes (cast here), FCOS's box regression branch
(``scale(bbox_pred).float()``: elementwise, the same per image), the value
of mmdet's binary cross-entropy (centerness; it follows the float32 target,
its gradient comes from the float64 logits), the positive counts FCOS
normalises by (exact integers) and mmseg's pixel accuracy (a ratio of
counts). No mmcv op runs in the training path on CPU (mmdet's focal loss
is the pure-torch one off CUDA).
"""
import torch

__all__ = ['to_float64', 'assert_close_to_scale']


def _float64_batch(module, args, out: dict) -> dict:
    """Forward hook of a data preprocessor: float64 images and boxes."""
    for sample in out['data_samples']:
        for key in ('gt_instances', 'ignored_instances'):
            instances = sample.get(key)
            if instances is not None and 'bboxes' in instances and \
                    instances.bboxes.dtype.is_floating_point:
                instances.bboxes = instances.bboxes.to(torch.float64)
    return dict(out, inputs=out['inputs'].to(torch.float64))


def to_float64(model: torch.nn.Module) -> torch.nn.Module:
    """Cast a GPPF model (parameters and buffers) to float64 and make its
    data preprocessor hand out float64 batches. Returns ``model``."""
    model.double()
    model.data_preprocessor.register_forward_hook(_float64_batch)
    return model


def assert_close_to_scale(got: torch.Tensor,
                          expected: torch.Tensor,
                          name: str,
                          rel: float = 1e-10) -> None:
    """float64 agreement of every element to ``rel`` of the tensor's largest
    value (a reordered sum errs relative to its terms, not to a small
    result), with an absolute floor of 1e-18 for all-but-zero tensors."""
    assert got.dtype == expected.dtype == torch.float64, (name, got.dtype)
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(
        got,
        expected,
        rtol=rel,
        atol=max(rel * scale, 1e-18),
        msg=lambda m: f'{name}: {m}')
