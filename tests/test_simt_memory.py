"""Per-task backward keeps the peak memory near the largest task's."""
import copy

import pytest
import torch
from _simt_common import TASKS, dataloaders, make_demo_data, model_cfg
from mmengine.registry import MODELS
from mmengine.runner import Runner

import projects.gppf  # noqa: F401
from projects.gppf.engine import SIMTOptimWrapper
from tools.analysis_tools.benchmark_simt import benchmark, peak_memory

pytestmark = pytest.mark.data

# Batch sizes that give the three tasks similar activation memory, on a
# ResNet-18 of 8 base channels so that activations (not gradient buffers)
# dominate, as they do at real scale.
BATCH = dict(mnist_det=32, fmnist_seg=4, fmnist_cls=128)


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    root = make_demo_data(
        tmp_path_factory.mktemp('gppf_mem'), num_train=BATCH, num_val=2)
    batches = {}
    for task, cfg in dataloaders(root, 'train', 1, False).items():
        cfg['batch_size'] = BATCH[task]
        batches[task] = next(iter(Runner.build_dataloader(cfg, seed=0)))
        assert len(batches[task]['inputs']) == BATCH[task]
    torch.manual_seed(0)
    model = MODELS.build(model_cfg(base=8)).train()
    wrapper = SIMTOptimWrapper(
        torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9))
    return model, batches, wrapper


def test_simt_peak_memory_near_largest_task(setup):
    model, batches, wrapper = setup
    res = benchmark(model, batches, wrapper, iters=1, warmup=1)
    single = res['single_peak']
    assert set(single) == set(TASKS)
    # The tasks are comparable: their sum is well above the largest.
    assert sum(single.values()) > 2.2 * max(single.values())

    def fused():  # every task's graph alive at once, one backward
        total = 0
        for task, batch in batches.items():
            data = model.data_preprocessor(copy.deepcopy(batch), True, task)
            loss, _ = model.parse_losses(
                model.loss(task, data['inputs'], data['data_samples']))
            total = total + loss
        total.backward()
        wrapper.step()
        wrapper.zero_grad()

    fused_peak = peak_memory(fused, torch.device('cpu'))
    mib = 2.0**20
    rounded = {t: round(v / mib, 1) for t, v in single.items()}
    print(f"peak MiB: single {rounded} SIMT {res['simt_peak'] / mib:.1f} "
          f'fused {fused_peak / mib:.1f}')
    # Measured here: SIMT 1.11x the largest task, fused 1.8x SIMT.
    assert res['simt_peak'] <= 1.15 * max(single.values())
    assert fused_peak >= 1.5 * res['simt_peak']
