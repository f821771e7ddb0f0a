"""Node parameters: specs generated from PipelineConfig, config/grounding.yaml in sync with the
specs, YAML loading (sections, typos, types), build() and run-time validation."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from affordance_core.inference.pipeline import PipelineConfig
from affordance_ros import params
from affordance_ros.params import (DYNAMIC, PARAMETERS, NodeSettings, ParamSpec, build,
                                   load_params_file, parse_attributes, render_yaml, to_params,
                                   validate, validate_update)

REPO = Path(__file__).resolve().parents[2]
CLASSES = ('hold', 'cut_with', 'pour')


def write(tmp_path, text, name='p.yaml'):
    path = tmp_path / name
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------- specs


def test_every_pipeline_field_has_a_documented_spec():
    by_name = {p.name: p for p in PARAMETERS}
    docs = parse_attributes(PipelineConfig.__doc__)
    cfg = PipelineConfig()
    for f in dataclasses.fields(PipelineConfig):
        if f.name == 'return_cloud':  # set per frame by the node (publish_cloud)
            assert f.name not in by_name
            continue
        p = by_name[f.name]
        assert p.section == 'pipeline' and p.description.startswith(docs[f.name])
        default = getattr(cfg, f.name)
        if default is None:
            assert p.optional and p.default in ('', 0)
        else:
            assert p.default == default and isinstance(p.default, p.type)
    # multi-line docstring entries are joined
    assert 'GeoAware' in by_name['softargmax_window'].description
    assert 'region_radius' in by_name['region_radius'].description


def test_node_settings_specs_and_defaults():
    s = NodeSettings()
    assert s.actions == ['hold'] and s.max_input_age_ms == 500.0 and s.sync_slop_s == 0.05
    assert s.sync_queue_size == 5 and s.require_depth is False
    assert s.qos_reliability == 'best_effort' and s.target_frame == ''
    assert s.tf_timeout_s == 0.05 and s.publish_overlay and s.publish_cloud
    assert s.marker_lifetime_s == 0.5 and s.autostart and s.warmup_runs == 3
    assert s.diagnostics_period_s == 1.0 and s.overlay_action == ''
    names = [p.name for p in PARAMETERS]
    assert len(names) == len(set(names))
    for f in dataclasses.fields(NodeSettings):
        assert params.spec(f.name).section == 'node'
    for p in PARAMETERS:
        assert isinstance(p, ParamSpec) and p.description
        assert p.read_only == (p.name not in DYNAMIC)
        assert p.ros_type in ('BOOL', 'INTEGER', 'DOUBLE', 'STRING', 'STRING_ARRAY')
        assert p.check(p.default) is None, p.name
    assert params.spec('actions').ros_type == 'STRING_ARRAY'
    assert params.spec('input_size').ros_type == 'INTEGER'
    assert DYNAMIC == {'actions', 'min_score', 'heat_threshold', 'top_k', 'nms_radius',
                       'max_input_age_ms', 'publish_overlay', 'publish_cloud',
                       'overlay_action'}


def test_node_settings_validation():
    for kw, match in [({'actions': []}, 'actions'), ({'sync_queue_size': 0}, 'sync_queue_size'),
                      ({'qos_reliability': 'fast'}, "'best_effort'"),
                      ({'max_input_age_ms': 0.0}, 'max_input_age_ms'),
                      ({'diagnostics_period_s': 0}, 'diagnostics_period_s'),
                      ({'warmup_runs': 1.5}, 'warmup_runs'),
                      ({'publish_overlay': 'yes'}, 'publish_overlay')]:
        with pytest.raises(ValueError, match=match):
            NodeSettings(**kw)
    assert NodeSettings(sync_slop_s=1).sync_slop_s == 1.0


# ------------------------------------------------------------------------------- YAML


def test_committed_yaml_equals_the_rendering():
    committed = (REPO / 'config' / 'grounding.yaml').read_text()
    assert committed == render_yaml(), \
        'config/grounding.yaml is stale: python -m affordance_ros.params > config/grounding.yaml'


def test_rendered_yaml_documents_and_round_trips_every_parameter(tmp_path):
    text = render_yaml()
    doc = yaml.safe_load(text)
    values = doc['/grounding_node']['ros__parameters']
    assert list(values) == [p.name for p in PARAMETERS]
    lines = text.splitlines()
    for p in PARAMETERS:
        i = next(i for i, line in enumerate(lines) if line.startswith(f'    {p.name}:'))
        assert lines[i - 1].lstrip().startswith('#'), p.name
        assert values[p.name] == p.default and type(values[p.name]) is type(p.default)
    for name in ('checkpoint', 'onnx_path', 'engine_path'):
        assert values[name] == ''
    assert max(len(line) for line in lines) <= 99
    loaded = load_params_file(REPO / 'config' / 'grounding.yaml')
    assert loaded == params.defaults()
    config, settings = build(loaded)
    assert config == PipelineConfig() and settings == NodeSettings()


def test_load_params_file_sections(tmp_path):
    for key in ('/grounding_node', 'grounding_node', '/**', '/robot/grounding_node'):
        path = write(tmp_path, f'{key}:\n  ros__parameters:\n    top_k: 2\n')
        assert load_params_file(path) == {'top_k': 2}, key
    path = write(tmp_path, """
/**:
  ros__parameters:
    use_sim_time: true
    top_k: 2
    min_score: 0.3
/grounding_node:
  ros__parameters:
    top_k: 7
    actions: [hold, pour]
    qos_overrides:
      /image:
        subscription:
          reliability: reliable
/other_node:
  ros__parameters:
    anything: 1
""")
    assert load_params_file(path) == {'top_k': 7, 'min_score': 0.3,
                                      'actions': ['hold', 'pour']}
    assert load_params_file(path, node_name='other') == {'top_k': 2, 'min_score': 0.3}


def test_load_params_file_errors(tmp_path):
    cases = [
        ('/grounding_node:\n  ros__parameters:\n    min_scor: 0.3\n',
         "unknown parameter 'min_scor' (did you mean 'min_score'?)"),
        ('/grounding_node:\n  ros__parameters:\n    top_k: two\n', 'top_k'),
        ('/grounding_node:\n  ros__parameters:\n    top_k: 2.5\n', 'integer'),
        ('/grounding_node:\n  ros__parameters:\n    publish_overlay: 1\n', 'true/false'),
        ('/grounding_node:\n  ros__parameters:\n    actions: hold\n', 'list'),
        ('/grounding_node:\n  ros__parameters:\n    target_frame: 5\n', 'string'),
        ('/grounding_node:\n  ros__parameters:\n    min_score: 3.0\n', 'min_score'),
        ('/grounding_node:\n  ros__parameters:\n    backend: cuda\n', "'onnxruntime'"),
        ('/grounding_node:\n  top_k: 3\n', 'ros__parameters'),
        ('/camera:\n  ros__parameters:\n    top_k: 3\n', "no section for node 'grounding_node'"),
        ('- a\n- b\n', 'mapping'),
        ('/grounding_node: [\n', 'not valid YAML'),
    ]
    for text, match in cases:
        with pytest.raises(ValueError, match=match.replace('(', r'\(').replace(')', r'\)')
                           .replace('?', r'\?')):
            load_params_file(write(tmp_path, text))
    with pytest.raises(FileNotFoundError, match='parameters file not found'):
        load_params_file(tmp_path / 'missing.yaml')


def test_floats_accept_integers_and_yaml_exponents(tmp_path):
    path = write(tmp_path, '/grounding_node:\n  ros__parameters:\n    nms_radius: 16\n'
                 '    region_depth_tolerance: 1e-2\n')
    values = load_params_file(path)
    assert values == {'nms_radius': 16.0, 'region_depth_tolerance': 0.01}
    assert isinstance(values['nms_radius'], float)


# ------------------------------------------------------------------------------- build


def test_build_maps_empty_values_to_none_and_back():
    config, settings = build({'checkpoint': '/models/best.pt', 'device': '', 'input_size': 0,
                              'top_k': 3, 'actions': ['pour'], 'use_sim_time': True})
    assert config.checkpoint == '/models/best.pt' and config.device is None
    assert config.input_size is None and config.top_k == 3 and config.onnx_path is None
    assert config.return_cloud is False
    assert settings.actions == ['pour']
    back = to_params(config, settings)
    assert back['device'] == '' and back['input_size'] == 0 and back['top_k'] == 3
    assert build(back) == (config, settings)
    config, _ = build({'input_size': 224})
    assert config.input_size == 224


def test_build_errors_are_clear():
    cases = [({'min_depth': 5.0}, 'min_depth (5.0) must be < max_depth'),
             ({'top_kk': 1}, "unknown parameter 'top_kk' (did you mean 'top_k'?)"),
             ({'top_k': -1}, "parameter 'top_k' must be >= 0"),
             ({'nms_radius': 'far'}, 'nms_radius'),
             ({'sync_queue_size': 0}, 'sync_queue_size'),
             ({'actions': []}, 'at least one action'),
             ({'object_prior_mode': 'and'}, 'object_prior_mode')]
    for values, match in cases:
        with pytest.raises(ValueError) as exc:
            build(values)
        assert match in str(exc.value), (values, str(exc.value))


# ------------------------------------------------------------------------------- run time


def test_validate_update():
    ok = [('actions', ['hold', 'pour']), ('min_score', 0.5), ('min_score', 1),
          ('heat_threshold', 0.0), ('top_k', 0), ('nms_radius', 10.0),
          ('max_input_age_ms', 100.0), ('publish_overlay', False), ('publish_cloud', True),
          ('overlay_action', ''), ('overlay_action', 'pour'), ('use_sim_time', True)]
    for name, value in ok:
        assert validate_update(name, value, CLASSES) is None, (name, value)
    bad = [('actions', ['fly'], "unknown action 'fly'; known actions: hold, cut_with, pour"),
           ('actions', ['fly', 'swim'], "unknown actions 'fly', 'swim'"),
           ('actions', [], 'at least one action'),
           ('actions', 'hold', 'list'),
           ('overlay_action', 'fly', "unknown action 'fly'"),
           ('min_score', 1.5, "'min_score' must lie in [0.0, 1.0]"),
           ('heat_threshold', -0.1, 'heat_threshold'),
           ('top_k', -2, "'top_k' must be >= 0"),
           ('top_k', 2.0, 'integer'),
           ('publish_overlay', 'no', 'true/false'),
           ('max_input_age_ms', 0.0, 'max_input_age_ms'),
           ('sync_slop_s', 0.1, 'read-only at run time'),
           ('checkpoint', 'x.pt', 'read-only at run time'),
           ('backend', 'torch', 'read-only at run time'),
           ('min_scor', 0.1, "did you mean 'min_score'?")]
    for name, value, match in bad:
        msg = validate_update(name, value, CLASSES)
        assert msg is not None and match in msg, (name, value, msg)
    # before configure (no classes) actions are only checked for shape
    assert validate_update('actions', ['fly'], None) is None
    assert validate is validate_update
