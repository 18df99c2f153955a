"""timm_el.quickstart: CE and EL side by side on scikit-learn's digits (and the other data flags)."""
import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import timm_el
from encouraging_loss.tools import analysis
from timm_el import quickstart
from timm_el.quickstart import COLUMNS, format_table, load_data, main

from confined import NO_SPACE, READ_ONLY, leftovers, one_error_line, run_confined
from helpers import (
    PY,
    ROOT,
    command_env,
)

HEADERS = [header for _, header, _ in COLUMNS]
NUMBER = r'-?\d+\.\d+'


def quick_in_process(capsys, *args):
    """``main(ARGS)`` in this process -> (exit status, stdout, stderr)."""
    capsys.readouterr()
    try:
        rc = main([str(a) for a in args])
    except SystemExit as exit_:
        rc = exit_.code
    out = capsys.readouterr()
    assert 'Traceback' not in out.err
    return rc, out.out, out.err


def table_lines(stdout: str):
    """The two model rows of the printed table, as {name: [numbers]}."""
    lines = stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.split()[:3] == ['model', 'acc', '%'])
    rows = {}
    for line in lines[head + 2:head + 4]:
        name, *cells = line.split()
        rows[name] = [float(c) for c in cells]
    return lines[head], rows


@pytest.fixture(scope='module')
def quick_run(tmp_path_factory):
    """``python -m timm_el.quickstart --quick`` as a user runs it."""
    out = tmp_path_factory.mktemp('quick') / 'out'
    proc = subprocess.run([sys.executable, '-m', 'timm_el.quickstart', '--quick', '--out', str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


def test_quick_prints_both_models_with_every_column(quick_run):
    out, stdout = quick_run
    header, rows = table_lines(stdout)
    for h in HEADERS:
        assert h in header, h
    assert list(rows) == ['CE', 'EL']
    for name, numbers in rows.items():
        assert len(numbers) == len(COLUMNS), (name, numbers)
        assert all(math.isfinite(x) for x in numbers), (name, numbers)
    # progress per epoch for both, the data described
    assert re.search(r'\[CE\] epoch +1/8 +loss ' + NUMBER, stdout)
    assert re.search(r'\[EL\] epoch +8/8 +loss ' + NUMBER, stdout)
    assert 'learns classes 0-7, OOD: held-out classes 8, 9' in stdout


def test_quick_writes_the_report_and_plots(quick_run):
    out, stdout = quick_run
    report = json.loads((out / 'report.json').read_text())
    assert list(report['models']) == ['CE', 'EL']
    assert report['meta']['settings']['quick'] is True
    for name in analysis.REPORT_FILES.values():
        assert (out / name).is_file(), name
    import matplotlib.image

    for name in ('margins.png', 'energy_per_class.png', 'reliability.png', 'ood_scores.png'):
        image = matplotlib.image.imread(out / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100, name
    # the printed table is the report's numbers (2 decimals)
    _, rows = table_lines(stdout)
    keys = [key for key, _, _ in COLUMNS]
    saved = json.loads((out / 'quickstart.json').read_text())
    for name in ('CE', 'EL'):
        summary = report['models'][name]
        expected = [summary['accuracy'], summary['margin']['mean'], summary['energy']['data']['target_mean'],
                    summary['energy']['data']['free_mean'], summary['ece'], summary['ood']['min_energy']['auroc'],
                    summary['ood']['min_energy']['fpr95'], summary['probe']['accuracy']]
        assert rows[name] == pytest.approx(expected, abs=0.006), name
        assert [saved['table'][name][k] for k in keys] == pytest.approx(expected, rel=1e-12)
        # 8 classes learnt, 481 test images of the digits 0-7, 354 images of 8 and 9 as OOD
        assert summary['num_classes'] == 8 and summary['n'] == 481 and summary['ood']['n'] == 354
        assert len(saved['curves'][name]) == 8
    assert (out / 'report.md').read_text().startswith('| measurement | CE | EL |')


def test_same_seed_same_numbers_and_both_start_from_one_initialisation(tmp_path, capsys):
    tables, digests = [], []
    for i in range(2):
        rc, stdout, stderr = quick_in_process(capsys, '--quick', '--epochs', '2', '--probe-epochs', '0',
                                              '--out', tmp_path / str(i))
        assert rc == 0, stderr
        tables.append(json.loads((tmp_path / str(i) / 'quickstart.json').read_text())['table'])
        digests.append(json.loads((tmp_path / str(i) / 'quickstart.json').read_text())['state_sha256'])
    assert tables[0] == tables[1] and digests[0] == digests[1]
    # CE and EL start from the same weights and end apart
    assert digests[0]['CE']['initial'] == digests[0]['EL']['initial']
    assert digests[0]['CE']['final'] != digests[0]['EL']['final'] != digests[0]['EL']['initial']
    assert tables[0]['CE'] != tables[0]['EL']


def test_the_environment_the_numbers_depend_on_is_printed_and_recorded(tmp_path, capsys):
    """The same numbers need the same torch, CPU kernels and thread count (issue 18): the run says which."""
    import timm

    before = torch.get_num_threads()
    rc, stdout, stderr = quick_in_process(capsys, '--quick', '--epochs', '1', '--probe-epochs', '0', '--threads',
                                          '2', '--out', tmp_path / 'o')
    assert rc == 0, stderr
    assert torch.get_num_threads() == before  # --threads is restored after the run
    env = json.loads((tmp_path / 'o' / 'quickstart.json').read_text())['environment']
    assert env['torch'] == torch.__version__ and env['timm'] == timm.__version__ and env['threads'] == 2
    assert env['cpu_capability'] == torch.backends.cpu.get_cpu_capability() and env['cpu']
    assert json.loads((tmp_path / 'o' / 'report.json').read_text())['meta']['environment'] == env
    line = next(x for x in stdout.splitlines() if x.startswith('environment: '))
    assert line.startswith(f'environment: torch {torch.__version__}, timm {timm.__version__}, CPU {env["cpu"]} '
                           f'({env["cpu_capability"]}), 2 torch threads'), line
    assert quickstart.describe_environment(dict(env, threads=1)).endswith(', 1 torch thread')


def test_el_is_the_timm_hook_and_ce_is_timms():
    el = quickstart.create_loss('encouraging', smoothing=0.1)
    assert isinstance(el, timm_el.EncouragingLabelSmoothingLoss)
    assert el.log_end == 0.75 and el.smoothing == 0.1
    ce = quickstart.create_loss('ce')
    assert isinstance(ce, torch.nn.CrossEntropyLoss)


def test_bad_flags_are_one_line_exit_2(tmp_path, capsys):
    (tmp_path / 'full').mkdir()
    (tmp_path / 'full' / 'report.json').write_text('{}')
    cases = [
        (['--epochs', '0'], '--epochs must be >= 1, got 0'),
        (['--lr', 'nan'], '--lr must be a finite number > 0'),
        (['--log-end', '1.5'], '--log-end must be in (0, 1], got 1.5'),
        (['--ood', 'nosuch'], "argument --ood: invalid choice: 'nosuch'"),
        (['--dataset', 'nosuch'], '--dataset nosuch: neither digits, mnist, fashion_mnist nor a directory'),
        (['--dataset', 'mnist'], '--dataset mnist needs --data-dir'),
        (['--model', 'nosuch_net'], '--model nosuch_net: neither a built-in model'),
        (['--heldout-classes', '9'], '--heldout-classes must be in [1, 8]'),
        (['--width', '8', '--model', 'mlp'], '--width applies to --model cnn only'),
        (['--out', tmp_path / 'full'], 'exists and is not empty'),
        (['--model', 'vit_tiny_patch16_224', '--img-size', '8'], 'fails on 1x8x8 images'),
        (['--lr', '1e6'], 'training loss became'),
    ]
    for args, message in cases:
        rc, stdout, stderr = quick_in_process(capsys, '--quick', '--out', tmp_path / 'o', *args)
        assert rc == 2, (args, stderr)
        assert stderr.count('\n') == 1 and stderr.startswith('el-quickstart: error: '), stderr
        assert message in stderr, (message, stderr)
    assert (tmp_path / 'full' / 'report.json').read_text() == '{}'  # nothing overwritten
    assert not (tmp_path / 'o' / 'report.json').exists()


def test_force_overwrites_a_previous_run(tmp_path, capsys):
    out = tmp_path / 'run'
    out.mkdir()
    (out / 'report.json').write_text('{}')
    rc, stdout, stderr = quick_in_process(capsys, '--quick', '--epochs', '1', '--probe-epochs', '0',
                                          '--model', 'mlp', '--out', out, '--force')
    assert rc == 0, stderr
    assert list(json.loads((out / 'report.json').read_text())['models']) == ['CE', 'EL']
    _, rows = table_lines(stdout)
    assert all(len(r) == len(COLUMNS) - 1 for r in rows.values())  # no probe column with --probe-epochs 0


def test_a_timm_model_and_other_data_are_one_flag_away(tmp_path, capsys, shared_data):
    # a registered timm model (mnist_cnn takes img_size), MNIST against Fashion-MNIST as in the paper
    rc, stdout, stderr = quick_in_process(
        capsys, '--dataset', 'mnist', '--data-dir', shared_data, '--ood', 'fashion_mnist', '--train-size', '256',
        '--test-size', '300', '--model', 'mnist_cnn', '--img-size', '16', '--epochs', '1', '--probe-epochs', '0',
        '--out', tmp_path / 'm')
    assert rc == 0, stderr
    assert 'mnist: 10 classes, 16x16x1; OOD: fashion_mnist test images; 256 train, 300 test, 300 OOD' in stdout
    report = json.loads((tmp_path / 'm' / 'report.json').read_text())
    assert report['models']['EL']['ood']['n'] == 300 and report['models']['EL']['num_classes'] == 10


def test_image_folder_dataset(tmp_path, capsys):
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for split, start in (('train', 0), ('val', 600)):
        for c in range(3):
            folder = tmp_path / 'folder' / split / f'class{c}'
            folder.mkdir(parents=True)
            for j, i in enumerate(np.flatnonzero(digits.target == c)[start // 60:start // 60 + 12]):
                Image.fromarray((digits.images[i] * 15).astype(np.uint8)).save(folder / f'{j}.png')
    data, in_chans, img_size = load_data(str(tmp_path / 'folder'), ood='inverted', img_size=12, in_chans=1)
    assert data.classes == ['class0', 'class1', 'class2']
    assert tuple(data.train_x.shape) == (36, 1, 12, 12) and tuple(data.test_x.shape) == (36, 1, 12, 12)
    assert data.ood_x.shape == data.test_x.shape
    assert sorted(data.train_y.tolist()) == [0] * 12 + [1] * 12 + [2] * 12
    rc, stdout, stderr = quick_in_process(capsys, '--dataset', tmp_path / 'folder', '--in-chans', '1', '--img-size',
                                          '12', '--ood', 'noise', '--epochs', '1', '--quick', '--out', tmp_path / 'r')
    assert rc == 0, stderr
    assert list(table_lines(stdout)[1]) == ['CE', 'EL']


def test_heldout_split_is_stratified_and_normalised():
    data, in_chans, img_size = load_data('digits', ood='heldout', heldout=2)
    assert (in_chans, img_size) == (1, 8)
    assert data.classes == [str(c) for c in range(8)]
    assert set(data.train_y.tolist()) == set(range(8)) == set(data.test_y.tolist())
    # 2/3 of each class for training; OOD = every image of the digits 8 and 9
    assert len(data.train_y) + len(data.test_y) == 1797 - 354 and len(data.ood_x) == 354
    assert abs(float(data.train_x.mean())) < 1e-5 and abs(float(data.train_x.std()) - 1) < 1e-4


def test_ood_images_are_scaled_and_normalised_like_the_in_distribution_ones(shared_data):
    """MNIST vs Fashion-MNIST (issue 18: AUROC below 50): both sets are pixels / 255, normalised with the mean
    and std of the MNIST training images (0.1307, 0.3081), the preprocessing of the model that is deployed."""
    from timm_el.data import load_mnist

    data, in_chans, img_size = load_data('mnist', ood='fashion_mnist', data_dir=str(shared_data))
    assert (in_chans, img_size) == (1, 28) and len(data.train_y) == 60000 and len(data.ood_x) == 10000
    for x, folder in ((data.test_x, 'mnist'), (data.ood_x, 'fashion-mnist')):
        raw = torch.from_numpy(load_mnist(shared_data / folder, 'test')[0].astype(np.float32) / 255.)[:, None]
        assert torch.allclose(x, (raw - 0.1307) / 0.3081, atol=2e-3), folder
    # Fashion-MNIST is brighter: more pixels lit (what makes a small network's logits larger on it)
    assert float(data.ood_x.mean()) > float(data.test_x.mean()) + 0.4


def test_format_table_leaves_out_empty_columns():
    rows = {'CE': {'accuracy': 99.0, 'margin': 1.5}, 'EL': {'accuracy': 98.5, 'margin': None}}
    text = format_table(rows).splitlines()
    assert text[0].split() == ['model', 'acc', '%', 'margin']
    assert text[2].split() == ['CE', '99.00', '1.50'] and text[3].split() == ['EL', '98.50', '-']


def test_out_that_cannot_be_created_fails_before_training(tmp_path, capsys):
    """--out below a file was a FileExistsError / NotADirectoryError traceback after both models had trained."""
    (tmp_path / 'file').write_text('x')
    rc, stdout, stderr = quick_in_process(capsys, '--quick', '--epochs', '1', '--model', 'mlp',
                                          '--out', tmp_path / 'file' / 'out')
    assert rc == 2 and 'epoch' not in stdout
    assert stderr == (f'el-quickstart: error: --out {tmp_path / "file" / "out"}: cannot be created, '
                      f'{tmp_path / "file"} is not a folder\n')


def _env():
    return command_env(threads=1, checkout_on_path=True)


def run(cmd, **kw):
    return run_confined([PY, *map(str, cmd)], env=_env(), cwd=ROOT, timeout=300, **kw)


QUICK = ["-m", "timm_el.quickstart", "--quick", "--epochs", "1", "--probe-epochs", "0", "--model", "mlp"]


def test_quickstart_read_only_out(tmp_path):
    """It was an OSError traceback after both models had trained; now one line before training."""
    ro = tmp_path / "ro"
    ro.mkdir()
    proc = run(QUICK + ["--out", ro / "q"], readonly=[ro])
    assert proc.returncode == 2 and "epoch" not in proc.stdout
    assert one_error_line(proc, "el-quickstart: error:") == \
        f"el-quickstart: error: --out {ro / 'q'}: cannot create it in {ro} ({READ_ONLY})"


def test_quickstart_full_disk_leaves_nothing(tmp_path):
    """A full disk left a 0-byte PNG and a partial report.json / report.md (and no quickstart.json)."""
    out = tmp_path / "q"
    proc = run(QUICK + ["--out", out], full={out: 60_000})
    assert proc.returncode == 2
    line = one_error_line(proc, "el-quickstart: error:")
    assert line.startswith(f"el-quickstart: error: --out {out}: cannot write {out}/") and line.endswith(NO_SPACE)
    assert leftovers(proc, out) == {}
