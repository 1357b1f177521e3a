"""The GPPF experiment tool: argument errors, summary maths, resume logic.

Fast (no training): configs are read, never built; subprocesses are
replaced by fakes.
"""
import json
import os
import os.path as osp

import pytest

from tools.analysis_tools import gppf_experiment as ge
from tools.analysis_tools import gppf_experiment_doc as doc
from tools.analysis_tools import gppf_experiment_exec as ex
from tools.analysis_tools import gppf_experiment_plan as pl
from tools.analysis_tools import gppf_experiment_report as rp

TASKS = ('mnist_det', 'fmnist_seg', 'fmnist_cls')


@pytest.fixture(scope='module')
def checked():
    """Settings and configs of a valid command line (2 seeds)."""
    return ge.check(ge.parse_args(['--seeds', '2', '--work-dir', 'w']))


@pytest.fixture(scope='module')
def runs(checked):
    s, cfgs = checked
    paths = {'lego': s.config, 'dense': s.dense_config}
    paths.update({f'single:{t}': f'w/configs/single_{t}.py' for t in TASKS})
    sha = {p: 'sha-' + p for p in list(paths.values()) + [s.transfer_config]}
    return pl.plan_runs(s, dict(cfgs, paths=paths, sha=sha), {})


@pytest.mark.parametrize('argv, words', [
    (['--tasks', 'mnist_det', 'coco_det'], ["'coco_det'", '--tasks']),
    (['--seeds', '0'], ['--seeds', '>= 1']),
    (['--seeds', '-2'], ['--seeds']),
    (['--first-seed', '-1'], ['--first-seed']),
    (['--iters', '1'], ['--iters', 'one evaluation', 'at least 2']),
    (['--iters', '0'], ['--iters']),
    (['--transfer-iters', '-5'], ['--transfer-iters', 'at least 2']),
    (['--jobs', '0'], ['--jobs']),
    (['--threads', '0'], ['--threads']),
    (['--val-size', '-1'], ['--val-size']),
    (['--arms', 'gppf', 'moe'], ["moe", 'single, dense, dense_tasknorm']),
    (['--tasks', 'fmnist_seg'], ['--transfer-source', 'mnist_det']),
    (['--cfg-options', 'train_cfg.max_iters=5'], ['--iters']),
    (['--config', 'configs/none.py'], ['does not exist', '--config']),
])
def test_bad_arguments_fail_before_any_run(argv, words, tmp_path, capsys,
                                           monkeypatch):
    work = tmp_path / 'work'
    monkeypatch.chdir(tmp_path)
    code = ge.main(argv + ['--work-dir', str(work)])
    err = capsys.readouterr().err
    assert code == 2
    for word in words:
        assert word in err, err
    assert not work.exists()  # nothing prepared, nothing run


def test_plan(runs):
    names = [r.name for r in runs]
    assert len(names) == len(set(names)) == 2 * (3 + 4) + 2 * 6
    gppf = next(r for r in runs if r.name == 'gppf-s1')
    fixed = next(r for r in runs if r.name == 'gppf_fixed-s1')
    assert gppf.options['randomness.seed'] == 1
    assert gppf.options['model.backbone.router.seed'] == 1
    # the demo's 1000-iteration schedule scaled to 400 iterations
    assert gppf.options['train_cfg.max_iters'] == 400
    assert gppf.options['param_scheduler.0.end'] == 20
    assert gppf.options['custom_hooks.0.freeze_iter'] == 300
    assert fixed.options['custom_hooks.0.freeze_iter'] == 0
    assert fixed.options['custom_hooks.0.warmup_iters'] == 0
    tasknorm = next(r for r in runs if r.name == 'dense_tasknorm-s0')
    assert tasknorm.options['model.backbone.num_legos'] == 2
    assert gppf.metrics['mnist_det'] == 'mnist_det/coco/bbox_mAP'
    single = next(r for r in runs if r.name == 'single-fmnist_cls-s0')
    assert single.tasks == ('fmnist_cls', )
    assert single.metrics == {'fmnist_cls': 'fmnist_cls/accuracy/top1'}
    t_gppf = next(r for r in runs if r.name == 'trees_det-from-gppf-s1')
    assert t_gppf.source == 'gppf-s1'
    assert t_gppf.export == (gppf.checkpoint('w'), 'mnist_det',
                             'w/exports/gppf-s1-mnist_det.pth')
    assert t_gppf.options['model.backbone.init_cfg.checkpoint'] == \
        t_gppf.export[2]
    t_single = next(r for r in runs if r.name == 'trees_det-from-single-s0')
    assert t_single.source == 'single-mnist_det-s0'
    assert t_single.export is None
    scratch = next(r for r in runs if r.name == 'trees_det-from-scratch-s0')
    assert scratch.source is None
    assert not any('init_cfg' in k for k in scratch.options)
    # a rerun source changes the identity of the transfer runs from it
    assert t_gppf.source_id == gppf.identity('w')
    assert not any(r.arm == 'gppf_lownoise' for r in runs)  # opt-in arm


def test_lownoise_arm_sets_noise_on_the_logits_scale(checked):
    s, cfgs = checked
    s = pl.Settings(
        **dict(vars(s), arms=('gppf', 'gppf_lownoise', 'gppf_nobalance')))
    paths = {'lego': s.config, 'dense': s.dense_config}
    sha = {p: 'sha' for p in list(paths.values()) + [s.transfer_config]}
    runs = pl.plan_runs(s, dict(cfgs, paths=paths, sha=sha), {})
    low = next(r for r in runs if r.name == 'gppf_lownoise-s1')
    gppf = next(r for r in runs if r.name == 'gppf-s1')
    assert low.options['custom_hooks.0.noise_std'] == [pl.LOW_NOISE, 0.0]
    assert low.options['model.backbone.router.noise_std'] == pl.LOW_NOISE
    assert 'custom_hooks.0.noise_std=[0.02,0.0]' in low.command('w')
    # otherwise the same run as gppf (schedule, seeds, freeze)
    same = {k: v for k, v in low.options.items() if 'noise_std' not in k}
    assert same == gppf.options
    nobal = next(r for r in runs if r.name == 'gppf_nobalance-s1')
    assert nobal.options == dict(
        low.options, **{'model.backbone.router.balance_weight': 0.0})
    t_low = next(r for r in runs
                 if r.name == 'trees_det-from-gppf_lownoise-s0')
    assert t_low.export[1] == 'mnist_det'


def test_schedule_scaling_keeps_order():
    from mmengine.config import Config
    cfg = Config(
        dict(
            train_cfg=dict(max_iters=1000),
            param_scheduler=[
                dict(by_epoch=False, begin=0, end=50),
                dict(by_epoch=False, begin=50, end=1000)
            ],
            custom_hooks=[
                dict(type='TaskRouterHook', warmup_iters=50, freeze_iter=750)
            ]))
    opts = pl.schedule_options(cfg, 6)
    assert opts['param_scheduler.0.end'] == opts['param_scheduler.1.begin']
    assert 0 < opts['param_scheduler.1.begin'] < 6
    assert opts['param_scheduler.1.end'] == 6
    assert opts['custom_hooks.0.warmup_iters'] < \
        opts['custom_hooks.0.freeze_iter'] < 6


def test_derive_config_keeps_one_task(checked, tmp_path):
    from mmengine.config import Config
    _, cfgs = checked
    out = pl.derive_config(cfgs['dense'], ['fmnist_seg'],
                           str(tmp_path / 'single.py'))
    cfg = Config.fromfile(out, import_custom_modules=False)
    assert list(cfg.model.tasks) == ['fmnist_seg']
    for key in ('train_dataloader', 'val_dataloader', 'val_evaluator'):
        assert list(cfg[key]) == ['fmnist_seg']
    assert list(pl.config_tasks(cfgs['dense'])) == list(TASKS)  # untouched


def test_mean_std_and_format():
    mean, std, n = rp.mean_std([0.5, 0.6, 0.7])
    assert (round(mean, 6), round(std, 6), n) == (0.6, 0.1, 3)
    assert rp.mean_std([3.0]) == (3.0, 0.0, 1)
    assert rp.fmt_stat([0.5, 0.6, 0.7]) == '0.600 ± 0.100'
    assert rp.fmt_stat([1.25], 2) == '1.25 (n=1)'
    assert rp.fmt_stat([]) == '—'
    assert rp.fmt_stat([0.1, 0.3], 2, signed=True) == '+0.20 ± 0.14'


def _record(arm, seed, values, kind='pretrain'):
    name = f'{arm}-s{seed}' if kind == 'pretrain' else f'{kind}-{arm}-s{seed}'
    return name, dict(
        name=name,
        kind=kind,
        arm=arm,
        seed=seed,
        primary=values,
        iter_times={'time': 1.0},
        wall_s=10.0,
        cpu_s=9.0)


def _made_up() -> dict:
    """gppf beats dense on mnist_det by 0.01, 0.02, 0.03; single is
    0.05 higher on seed 0 only."""
    records = {}
    for seed, base in enumerate((0.60, 0.62, 0.64)):
        for arm, value in (('gppf', base + 0.01 * (seed + 1)), ('dense',
                                                                base)):
            name, rec = _record(arm, seed, {'mnist_det': value})
            records[name] = rec
        name, rec = _record('single', seed,
                            {'mnist_det': base + (0.05 if seed == 0 else 0.0)})
        records[name] = rec
    return records


def test_arm_values_and_paired_differences():
    records = _made_up()
    gppf = rp.arm_values(records, 'gppf', 'mnist_det')
    dense = rp.arm_values(records, 'dense', 'mnist_det')
    assert sorted(gppf) == [0, 1, 2]
    diffs, wins = rp.paired(gppf, dense)
    assert [round(d, 6) for d in diffs] == [0.01, 0.02, 0.03]
    assert wins == 3
    diffs, wins = rp.paired(gppf, rp.arm_values(records, 'single',
                                                'mnist_det'))
    assert [round(d, 6) for d in diffs] == [-0.04, 0.02, 0.03]
    assert wins == 2
    # seeds missing on one side are left out of the pairs
    del dense[1]
    assert len(rp.paired(gppf, dense)[0]) == 2


def test_report_tables_from_made_up_records():
    records = _made_up()
    s = pl.Settings(
        config='c.py',
        dense_config='d.py',
        transfer_config='t.py',
        work_dir='w',
        tasks=('mnist_det', ),
        arms=('single', 'dense', 'gppf'),
        seeds=(0, 1, 2),
        iters=10,
        transfer_iters=10,
        transfer=False)
    ctx = dict(
        command='cmd',
        date='today',
        machine='cpu',
        git='abc',
        wall_min=1.0,
        reused=0,
        plot='p.png',
        setup_lines=['setup'],
        budget_lines=['budget'])
    text = doc.render(s, [], records, {'mnist_det': 'coco/bbox_mAP'}, ctx)
    assert '| (c) GPPF, lego N=4 k=2, routes learned | 0.640 ± 0.030 |' \
        in text
    assert '| (b) SIMT, dense ResNet-18 (hard sharing) | 0.620 ± 0.020 |' \
        in text
    assert '| gppf − dense | +0.020 ± 0.010 (3/3 higher) |' in text
    assert '| gppf − single | +0.003 ± 0.038 (2/3 higher) |' in text


def _run(name='dense-s0', source=None):
    return pl.Run(
        name,
        'pretrain',
        'dense',
        0, ('mnist_det', ),
        'c.py', {'randomness.seed': 0},
        4, {'mnist_det': 'mnist_det/coco/bbox_mAP'},
        source=source,
        config_sha='abc')


def test_finished_run_is_skipped_and_a_changed_one_is_not(tmp_path):
    work = str(tmp_path)
    done, other = _run('dense-s0'), _run('dense-s1')
    ex.write_json(
        ex.record_path(work, done.name), dict(identity=done.identity(work)))
    ex.write_json(
        ex.record_path(work, other.name),
        dict(identity='from another command'))
    assert ex.load_record(work, done) is not None
    assert ex.pending_runs(work, [done, other]) == [other]
    done.options['train_cfg.max_iters'] = 8  # another command: rerun
    assert ex.pending_runs(work, [done]) == [done]


def test_schedule_skips_done_and_waits_for_sources():
    b = _run('b')
    t_a, t_b = _run('t-a', source='a'), _run('t-b', source='b')
    calls = []

    def work(run):
        calls.append(run.name)
        return {'name': run.name}

    out = ex.schedule([b, t_a, t_b], 2, work, lambda r: 1.0, done=['a'])
    assert set(out) == {'b', 't-a', 't-b'}
    assert 'a' not in calls
    assert calls.index('b') < calls.index('t-b')


def test_schedule_stops_on_failure():
    a, t_a = _run('a'), _run('t-a', source='a')

    def work(run):
        raise ex.RunFailed(f'{run.name} failed')

    with pytest.raises(ex.RunFailed, match='a failed'):
        ex.schedule([a, t_a], 1, work, lambda r: 1.0, done=[])


def _scalars(run_dir, lines):
    path = osp.join(run_dir, '20260101_000000', 'vis_data', 'scalars.json')
    os.makedirs(osp.dirname(path))
    with open(path, 'w') as f:
        f.writelines(json.dumps(x) + '\n' for x in lines)


def test_trained_run_is_recorded_without_training(tmp_path, monkeypatch):
    """A run whose final checkpoint and evaluation exist (interrupted before
    its record was written) is recorded without a subprocess."""
    work, run = str(tmp_path), _run()
    run_dir = run.run_dir(work)
    ex._fresh_dir(run_dir, run.identity(work))
    _scalars(run_dir, [
        dict(loss=1.0, time=2.0, iter=2, step=2),
        {
            'loss': 1.5,
            'mnist_det/loss_cls': 1.0,
            'mnist_det/loss_bbox': 0.5,
            'time': 1.0,
            'iter': 4,
            'step': 4
        },
        {
            'mnist_det/coco/bbox_mAP': 0.25,
            'time': 0.1,
            'step': 0
        },
    ])
    open(run.checkpoint(work), 'w').close()

    def no_subprocess(*args, **kwargs):
        raise AssertionError('nothing may run')

    monkeypatch.setattr(ex, '_run_logged', no_subprocess)
    record = ex.execute(run, work, 1, {})
    assert record['primary'] == {'mnist_det': 0.25}
    assert record['iter_times'] == {'time': 1.0}
    assert record['losses'] == {'loss': 1.5, 'mnist_det': 1.5}
    assert ex.pending_runs(work, [run]) == []


def test_leftovers_of_another_command_are_removed(tmp_path):
    run_dir = str(tmp_path / 'run')
    ex._fresh_dir(run_dir, 'one')
    open(osp.join(run_dir, 'iter_2.pth'), 'w').close()
    assert ex._fresh_dir(run_dir, 'one')['identity'] == 'one'
    assert osp.exists(osp.join(run_dir, 'iter_2.pth'))  # kept: resume
    ex._fresh_dir(run_dir, 'two')
    assert not osp.exists(osp.join(run_dir, 'iter_2.pth'))


def test_read_metrics_fills_an_empty_detector(tmp_path):
    run_dir = str(tmp_path)
    _scalars(run_dir, [{'fmnist_cls/accuracy/top1': 50.0, 'step': 0}])
    keys = ['mnist_det/coco/bbox_mAP', 'fmnist_cls/accuracy/top1']
    assert ex.read_metrics(run_dir, keys) is None
    filled = ex.read_metrics(run_dir, keys, fill=True)
    assert filled == {
        'mnist_det/coco/bbox_mAP': 0.0,
        'fmnist_cls/accuracy/top1': 50.0
    }
