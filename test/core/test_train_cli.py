"""affordance-train end to end on AGD-Synth (tiny); user errors exit 2 with one stderr line."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from affordance_core.cli.train import main

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / 'training' / 'configs'


pytestmark = pytest.mark.usefixtures('torch_one_thread')


@pytest.fixture(scope='module')
def synth_root(tmp_path_factory) -> Path:
    from affordance_core.data.synth import generate
    root = tmp_path_factory.mktemp('synth')
    generate(root, size='tiny', seed=0, progress=False, splits=('Seen',))
    return root


def small(root: Path, out: Path, *extra: str) -> list[str]:
    return ['--config', str(CONFIGS / 'locate_seen.yaml'), '--no-progress',
            'model.name=locate_test', f'data.root={root}', 'data.image_size=64',
            'data.resize=72', 'data.num_workers=0', 'data.max_train_samples=12',
            'data.max_test_samples=8', 'train.batch_size=4', 'train.device=cpu',
            'train.epochs=2', f'train.output_dir={out}', *extra]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith('affordance-train: error: ') and 'Traceback' not in err
    return lines[0]


def test_help_documents_every_option(capsys):
    assert main(['--help']) == 0
    out = capsys.readouterr().out
    for text in ('--config', '--resume', '--no-progress', '--log-level', '--print-config',
                 'section.key=value', 'cache_features', 'cache_views', 'select_by',
                 'max_steps_per_epoch', 'max_train_samples', 'backbone_weights', 'fc_lr_mult',
                 'start_epoch', 'torchrun'):
        assert text in out, text


def test_user_errors_exit_2_with_one_line(tmp_path, capsys, synth_root):
    out = tmp_path / 'run'
    assert main(small(synth_root, out, 'train.epoch=3')) == 2
    line = one_error_line(capsys)
    assert "unknown key 'train.epoch'" in line and "did you mean 'epochs'" in line

    bad = tmp_path / 'bad.yaml'
    bad.write_text('train:\n  bach_size: 4\n')
    assert main(['--config', str(bad)]) == 2
    line = one_error_line(capsys)
    assert str(bad) in line and "did you mean 'batch_size'" in line

    assert main(['--config', str(tmp_path / 'missing.yaml')]) == 2
    assert 'config file not found' in one_error_line(capsys)

    assert main([]) == 2
    assert 'required: --config' in one_error_line(capsys)

    assert main(small(synth_root, out, 'model.name=locate_nope')) == 2
    assert "unknown model 'locate_nope'; available: " in one_error_line(capsys)

    assert main(small(tmp_path / 'no_data', out)) == 2
    assert 'does not exist' in one_error_line(capsys)

    assert main(small(synth_root, out, '--resume')) == 2
    assert 'cannot resume' in one_error_line(capsys)
    assert not out.exists()  # nothing was written by the failed attempts


def test_print_config_applies_overrides(capsys, tmp_path):
    import yaml
    assert main(['--config', str(CONFIGS / 'locate_unseen.yaml'), 'train.epochs=4',
                 '--print-config']) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg['train']['epochs'] == 4 and cfg['data']['split'] == 'Unseen'
    assert cfg['model']['name'] == 'locate_vits16'


def test_train_then_resume_on_agd_synth(synth_root, tmp_path):
    from affordance_core.checkpoint import load_checkpoint, read_checkpoint
    from affordance_core.data.agd20k import AGD20KTest
    out = tmp_path / 'run'
    assert main(small(synth_root, out, 'train.cache_features=true')) == 0
    for name in ('config.yaml', 'last.pt', 'best.pt', 'history.json', 'training_curves.png'):
        assert (out / name).is_file(), name
    state = torch.load(out / 'last.pt', weights_only=True)['train_state']
    assert state['epoch'] == 2 and state['global_step'] == 6  # 12 samples, batch 4
    model = load_checkpoint(out / 'best.pt')
    item = AGD20KTest(synth_root, 'Seen', image_size=64)[0]
    heat = model.predict(item['image'][None], torch.tensor([item['label']]))
    assert heat.shape == (1, 64, 64) and 0.0 <= float(heat.min()) <= float(heat.max()) <= 1.0

    assert main(small(synth_root, out, 'train.cache_features=true', 'train.epochs=3',
                      '--resume')) == 0
    resumed = read_checkpoint(out / 'last.pt')['train_state']
    assert resumed['epoch'] == 3 and resumed['global_step'] == 9
    assert [h['epoch'] for h in resumed['history']] == [1, 2, 3]
    assert resumed['history'][2]['backbone_images'] == 0  # the disk cache survived the restart
