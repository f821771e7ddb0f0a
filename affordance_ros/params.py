"""Parameters of ``grounding_node``: specs, the YAML file, validation, PipelineConfig + settings.

:data:`PARAMETERS` holds one :class:`ParamSpec` per node parameter: the node's own settings
(:class:`NodeSettings`) first, then one per :class:`~affordance_core.inference.PipelineConfig`
field, generated from ``dataclasses.fields(PipelineConfig)`` with the description taken from
the "Attributes:" section of its docstring (so the two never drift).

ROS parameters have no null: a ``str | None`` field becomes a string parameter whose ``''``
means None, and an ``int | None`` field (``input_size``) an integer parameter whose ``0`` means
None (:attr:`ParamSpec.optional`; :func:`build` maps them back). ``return_cloud`` is not a
parameter: the node sets it per frame from ``publish_cloud`` and the cloud's subscribers.

Functions:

* :func:`load_params_file` reads a ``/<node>: ros__parameters:`` YAML (sections ``/node``,
  ``node``, ``/ns/node`` or ``/**``); unknown names raise ``ValueError`` naming the closest
  known one, wrong types raise ``ValueError``.
* :func:`build` turns a name -> value dict into ``(PipelineConfig, NodeSettings)`` with clear
  errors.
* :func:`validate_update` (alias :func:`validate`, the name in ``docs/ros_node.md``) is what the
  node's parameter callback calls: only :data:`DYNAMIC` parameters change at run time.
* :func:`render_yaml` writes ``config/grounding.yaml`` (``python -m affordance_ros.params >
  config/grounding.yaml``); a test checks that the committed file equals it.
* :func:`defaults` (name -> default), :func:`spec` (lookup by name), :func:`to_params` (the
  inverse of :func:`build`).

ROS-reserved names (``use_sim_time``, ``qos_overrides.*``) are accepted in files and skipped.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import math
import re
import sys
import textwrap
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from affordance_core.config import ConfigError, _coerce
from affordance_core.inference.pipeline import BACKEND_KINDS, PipelineConfig
from affordance_core.inference.object_prior import SUPPRESS_MODES

yaml: Any = importlib.import_module('yaml')  # PyYAML (no type stubs in the venv)

__all__ = ['ParamSpec', 'NodeSettings', 'PARAMETERS', 'DYNAMIC', 'QOS_RELIABILITY',
           'NODE_NAME', 'load_params_file', 'build', 'validate_update', 'validate',
           'render_yaml', 'defaults', 'spec', 'to_params', 'is_reserved']

NODE_NAME = 'grounding_node'
QOS_RELIABILITY: tuple[str, ...] = ('best_effort', 'reliable', 'system_default')
IMAGE_TRANSPORTS: tuple[str, ...] = ('raw', 'compressed')
INPUT_IMAGE: tuple[str, ...] = ('auto', 'raw', 'rectified')
DYNAMIC: frozenset[str] = frozenset({
    'actions', 'min_score', 'heat_threshold', 'top_k', 'nms_radius', 'max_input_age_ms',
    'publish_overlay', 'publish_cloud', 'overlay_action'})
PARAM_TYPES: tuple[Any, ...] = (bool, int, float, str, list[str])
_EXCLUDED_FIELDS = frozenset({'return_cloud'})  # set per frame by the node
_ROS_TYPES = {bool: 'BOOL', int: 'INTEGER', float: 'DOUBLE', str: 'STRING',
              list[str]: 'STRING_ARRAY'}

Validator = Callable[[Any], 'str | None']


# ---------------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class ParamSpec:
    """One node parameter.

    Attributes:
        name: parameter name (as in the YAML file and ``ros2 param``).
        default: default value (never None: see ``optional``).
        type: one of ``bool``, ``int``, ``float``, ``str``, ``list[str]``.
        description: one-paragraph documentation (ParameterDescriptor.description, YAML
            comment).
        read_only: True = fixed after configure (ParameterDescriptor.read_only); False =
            changeable at run time through :func:`validate_update`.
        validator: ``value -> error message | None`` for a value of the right type (None = any
            value of the type is valid).
        section: 'node' (a :class:`NodeSettings` field) or 'pipeline' (a PipelineConfig field).
        optional: the PipelineConfig field accepts None, written as ``''`` (str) or ``0`` (int).
    """

    name: str
    default: Any
    type: Any
    description: str
    read_only: bool = True
    validator: Validator | None = None
    section: str = 'node'
    optional: bool = False

    @property
    def ros_type(self) -> str:
        """rclpy ``Parameter.Type`` member name: 'BOOL', 'INTEGER', 'DOUBLE', 'STRING' or
        'STRING_ARRAY' (``ParameterType.PARAMETER_<ros_type>``)."""
        return _ROS_TYPES[self.type]

    @property
    def type_name(self) -> str:
        """'bool', 'int', 'float', 'str' or 'list[str]'."""
        return 'list[str]' if self.type == list[str] else self.type.__name__

    def coerce(self, value: Any) -> Any:
        """``value`` checked against :attr:`type` (int -> float where lossless); raises
        ``ValueError`` naming the parameter."""
        try:
            out = _coerce(value, self.type, self.name)
        except ConfigError as exc:
            raise ValueError(f'parameter {exc}') from None
        if self.type is str and not isinstance(value, str):
            raise ValueError(f"parameter '{self.name}' expects a string, got {value!r}")
        if self.type is float and not math.isfinite(out):
            raise ValueError(f"parameter '{self.name}' must be finite, got {value!r}")
        return out

    def check(self, value: Any) -> str | None:
        """Type check + validator; the error message or None."""
        try:
            value = self.coerce(value)
        except ValueError as exc:
            return str(exc)
        return self.validator(value) if self.validator is not None else None


def _range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
           what: str = '') -> Validator:
    def check(value: Any) -> str | None:
        ok = True
        if lo is not None:
            ok &= value > lo if lo_open else value >= lo
        if hi is not None:
            ok &= value <= hi
        if ok:
            return None
        if lo is not None and hi is not None:
            return f'must lie in [{lo}, {hi}], got {value!r}'
        return f"must be {'>' if lo_open else '>='} {lo}, got {value!r}"
    return check


def _one_of(choices: Sequence[str]) -> Validator:
    def check(value: Any) -> str | None:
        if value in choices:
            return None
        return f"must be one of {', '.join(repr(c) for c in choices)}, got {value!r}"
    return check


def _actions(value: Any) -> str | None:
    if not value:
        return 'must name at least one action'
    bad = [a for a in value if not a.strip()]
    if bad:
        return f'empty action name in {value!r}'
    return None


@dataclass
class NodeSettings:
    """Node settings that are not PipelineConfig fields (see :data:`PARAMETERS` for docs).

    Raises:
        ValueError: invalid values (names the field).
    """

    actions: list[str] = field(default_factory=lambda: ['hold'])
    overlay_action: str = ''
    max_input_age_ms: float = 500.0
    sync_slop_s: float = 0.05
    sync_queue_size: int = 5
    require_depth: bool = False
    qos_reliability: str = 'best_effort'
    image_transport: str = 'raw'
    input_image: str = 'auto'
    target_frame: str = ''
    tf_timeout_s: float = 0.05
    publish_overlay: bool = True
    publish_cloud: bool = True
    marker_lifetime_s: float = 0.5
    autostart: bool = True
    warmup_runs: int = 3
    diagnostics_period_s: float = 1.0

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(NodeSettings)
        for f in dataclasses.fields(self):
            try:
                value = _coerce(getattr(self, f.name), hints[f.name], f.name)
            except ConfigError as exc:
                raise ValueError(f'parameter {exc}') from None
            setattr(self, f.name, value)
            check = _NODE_VALIDATORS.get(f.name)
            msg = check(value) if check is not None else None
            if msg:
                raise ValueError(_named(f.name, msg))

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict copy."""
        return dataclasses.asdict(self)


_NODE_VALIDATORS: dict[str, Validator] = {
    'actions': _actions,
    'max_input_age_ms': _range(0.0, lo_open=True),
    'sync_slop_s': _range(0.0),
    'sync_queue_size': _range(1),
    'qos_reliability': _one_of(QOS_RELIABILITY),
    'image_transport': _one_of(IMAGE_TRANSPORTS),
    'input_image': _one_of(INPUT_IMAGE),
    'tf_timeout_s': _range(0.0),
    'marker_lifetime_s': _range(0.0),
    'warmup_runs': _range(0),
    'diagnostics_period_s': _range(0.0, lo_open=True),
}

_NODE_DOCS: dict[str, str] = {
    'actions': 'affordances to ground in every frame (names among the model classes, e.g. '
               "hold, cut_with); the 'action' topic (std_msgs/String) replaces them with one.",
    'overlay_action': "action drawn on the 'overlay' image; '' = the first of actions.",
    'max_input_age_ms': 'frames older than this (now - image stamp, milliseconds) when the '
                        "worker takes them are dropped ('stale').",
    'sync_slop_s': 'largest stamp difference (seconds) between an image and its depth and '
                   'camera_info.',
    'sync_queue_size': 'messages kept per input while waiting for their partners.',
    'require_depth': 'every frame needs depth (and camera_info); false = RGB-only mode: depth '
                     'and camera_info are used while they arrive, otherwise 2-D results only.',
    'qos_reliability': "input subscriptions' reliability: 'best_effort' (sensor data), "
                       "'reliable' or 'system_default'.",
    'image_transport': "colour input: 'raw' (sensor_msgs/Image on 'image') or 'compressed' "
                       "(sensor_msgs/CompressedImage, jpeg / png, on 'image/compressed').",
    'input_image': "'raw': intrinsics K, and the 3-D lifting undoes camera_info's lens "
                   "distortion (d, distortion_model: plumb_bob, rational_polynomial or "
                   "equidistant); 'rectified' (image_rect): intrinsics from P, d ignored; "
                   "'auto': 'rectified' when the image topic's last name part (after "
                   "remapping) has 'rect' as a word (image_rect, image_rect_color, "
                   "image_rect_raw), else 'raw'.",
    'target_frame': "frame for grasps, detections_3d, markers and the cloud (TF at the image "
                    "stamp); '' = the camera optical frame of the image.",
    'tf_timeout_s': 'how long to wait for the transform to target_frame (seconds).',
    'publish_overlay': "publish the 'overlay' image (only while it has subscribers).",
    'publish_cloud': "publish 'affordance_cloud' (only while it has subscribers; needs depth).",
    'marker_lifetime_s': 'lifetime of the RViz markers (seconds; 0 = forever).',
    'autostart': 'configure and activate the lifecycle node at start.',
    'warmup_runs': 'inference runs on a blank frame during configure (0 = none).',
    'diagnostics_period_s': 'period of the /diagnostics status (seconds).',
}

_PIPELINE_VALIDATORS: dict[str, Validator] = {
    'backend': _one_of(BACKEND_KINDS),
    'object_prior_mode': _one_of(SUPPRESS_MODES),
    'input_size': _range(0),
    'top_k': _range(0),
    'softargmax_window': _range(0),
    'depth_window': _range(1),
    'normal_window': _range(3),
    'nms_radius': _range(0.0),
    'min_depth': _range(0.0),
    'region_depth_tolerance': _range(0.0),
    'softargmax_beta': _range(0.0, lo_open=True),
    'depth_scale': _range(0.0, lo_open=True),
    'max_depth': _range(0.0, lo_open=True),
    'region_radius': _range(0.0, lo_open=True),
    'min_score': _range(0.0, 1.0),
    'min_valid_depth_fraction': _range(0.0, 1.0),
    'heat_threshold': _range(0.0, 1.0),
    'object_prior_threshold': _range(0.0, 1.0),
}


def parse_attributes(doc: str | None) -> dict[str, str]:
    """``name -> description`` from the "Attributes:" section of a Google-style docstring
    (continuation lines joined with single spaces)."""
    text = inspect.cleandoc(doc or '')
    out: dict[str, str] = {}
    inside, current = False, None
    for line in text.splitlines():
        if not inside:
            inside = line.strip() == 'Attributes:'
            continue
        if line.strip() and not line.startswith(' '):
            break  # next section
        m = re.match(r'^ {4}(\w+)(?: \([^)]*\))?: ?(.*)$', line)
        if m:
            current = m.group(1)
            out[current] = m.group(2).strip()
        elif current is not None and line.strip():
            out[current] = f'{out[current]} {line.strip()}'.strip()
    return out


def _pipeline_specs() -> list[ParamSpec]:
    docs = parse_attributes(PipelineConfig.__doc__)
    hints = typing.get_type_hints(PipelineConfig)
    specs = []
    for f in dataclasses.fields(PipelineConfig):
        if f.name in _EXCLUDED_FIELDS:
            continue
        tp = hints[f.name]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        base = args[0] if optional else tp
        if base not in PARAM_TYPES:
            raise TypeError(f'PipelineConfig.{f.name}: type {tp} has no ROS parameter type')
        default = f.default
        if default is None:
            default = '' if base is str else 0
        description = docs.get(f.name, '')
        if not description:
            raise TypeError(f'PipelineConfig.{f.name} is not documented in its docstring')
        if optional:
            description += " As a ROS parameter: '' = None." if base is str else \
                ' As a ROS parameter: 0 = None.'
        specs.append(ParamSpec(f.name, default, base, description,
                               read_only=f.name not in DYNAMIC,
                               validator=_PIPELINE_VALIDATORS.get(f.name), section='pipeline',
                               optional=optional))
    return specs


def _node_specs() -> list[ParamSpec]:
    hints = typing.get_type_hints(NodeSettings)
    defaults_ = NodeSettings()
    return [ParamSpec(f.name, getattr(defaults_, f.name), hints[f.name], _NODE_DOCS[f.name],
                      read_only=f.name not in DYNAMIC, validator=_NODE_VALIDATORS.get(f.name),
                      section='node')
            for f in dataclasses.fields(NodeSettings)]


PARAMETERS: tuple[ParamSpec, ...] = tuple(_node_specs() + _pipeline_specs())
_BY_NAME: dict[str, ParamSpec] = {p.name: p for p in PARAMETERS}
assert DYNAMIC <= set(_BY_NAME), sorted(DYNAMIC - set(_BY_NAME))


def _named(name: str, msg: str) -> str:
    """A validator message prefixed with the parameter name (type errors already have it)."""
    return msg if msg.startswith('parameter') else f"parameter '{name}' {msg}"


def _unknown(name: str, where: str = '') -> ValueError:
    close = difflib.get_close_matches(name, list(_BY_NAME), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ''
    return ValueError(f"{where}unknown parameter '{name}'{hint}")


def spec(name: str) -> ParamSpec:
    """The :class:`ParamSpec` called ``name``; ``ValueError`` (with the closest name) if none."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise _unknown(name) from None


def is_reserved(name: str) -> bool:
    """Parameters every ROS node has (``use_sim_time``, REP-2003 ``qos_overrides.*``)."""
    return name in ('use_sim_time', 'start_type_description_service') or \
        name.startswith('qos_overrides.')


def defaults() -> dict[str, Any]:
    """name -> default value of every parameter."""
    return {p.name: (list(p.default) if isinstance(p.default, list) else p.default)
            for p in PARAMETERS}


# ---------------------------------------------------------------------------------- files


def _flatten(values: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = f'{prefix}{key}'
        if isinstance(value, dict):
            out.update(_flatten(value, f'{name}.'))
        else:
            out[name] = value
    return out


def _section_matches(key: str, node_name: str) -> bool:
    key = str(key).strip()
    if key in ('/**', '**'):
        return True
    return key.rstrip('/').split('/')[-1] == node_name


def load_params_file(path: str | Path, node_name: str = NODE_NAME) -> dict[str, Any]:
    """Read the parameters of ``node_name`` from a ROS 2 parameters YAML file.

    Sections ``/**`` apply first, then ``<node>``, ``/<node>`` and ``/<ns>/<node>`` (more
    specific wins); each holds ``ros__parameters``. Sections of other nodes are ignored.

    Returns:
        name -> value (type-checked; floats given as integers become floats) for the
        parameters the file sets; reserved ROS names are left out.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not YAML, no section for the node, unknown names (the message names the
            closest known one), wrong types or invalid values.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'parameters file not found: {path}')
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f'{path}: not valid YAML: {" ".join(str(exc).split())}') from None
    if not isinstance(doc, dict):
        raise ValueError(f'{path}: expected a mapping /{node_name}: ros__parameters: ...')
    sections = [k for k in doc if _section_matches(k, node_name)]
    if not sections:
        raise ValueError(f"{path}: no section for node '{node_name}' (expected '/{node_name}' "
                         f"or '/**'); found: {', '.join(map(str, doc)) or 'nothing'}")
    sections.sort(key=lambda k: 0 if str(k).strip() in ('/**', '**') else 1)
    out: dict[str, Any] = {}
    for key in sections:
        body = doc[key]
        if not isinstance(body, dict) or 'ros__parameters' not in body:
            raise ValueError(f"{path}: section '{key}' has no 'ros__parameters' mapping")
        extra = [k for k in body if k != 'ros__parameters']
        if extra:
            raise ValueError(f"{path}: section '{key}': unexpected key '{extra[0]}' beside "
                             f"ros__parameters")
        params = body['ros__parameters'] or {}
        if not isinstance(params, dict):
            raise ValueError(f"{path}: '{key}.ros__parameters' must be a mapping")
        for name, value in _flatten(params).items():
            if is_reserved(name):
                continue
            if name not in _BY_NAME:
                raise _unknown(name, f'{path}: ')
            p = _BY_NAME[name]
            msg = p.check(value)
            if msg:
                raise ValueError(f'{path}: {_named(name, msg)}')
            out[name] = p.coerce(value)
    return out


# ---------------------------------------------------------------------------------- build


def build(params: Mapping[str, Any] | None = None) -> tuple[PipelineConfig, NodeSettings]:
    """``(PipelineConfig, NodeSettings)`` from ``name -> value`` (missing names keep their
    defaults; ``''`` / ``0`` of optional fields become None; reserved ROS names are skipped).

    Raises:
        ValueError: unknown names (with the closest known one), wrong types, invalid values
            (naming the parameter).
    """
    values = defaults()
    for name, value in (params or {}).items():
        if is_reserved(name):
            continue
        p = spec(name)
        msg = p.check(value)
        if msg:
            raise ValueError(_named(name, msg))
        values[name] = p.coerce(value)
    pipe_kwargs: dict[str, Any] = {}
    node_kwargs: dict[str, Any] = {}
    for p in PARAMETERS:
        value = values[p.name]
        if p.section == 'pipeline':
            pipe_kwargs[p.name] = None if p.optional and value in ('', 0) else value
        else:
            node_kwargs[p.name] = value
    try:
        config = PipelineConfig(**pipe_kwargs)
    except ValueError as exc:
        raise ValueError(f'invalid parameters: {exc}') from None
    return config, NodeSettings(**node_kwargs)


def to_params(config: PipelineConfig, settings: NodeSettings) -> dict[str, Any]:
    """The inverse of :func:`build`: name -> ROS parameter value (None -> '' / 0)."""
    out: dict[str, Any] = {}
    for p in PARAMETERS:
        source: Any = config if p.section == 'pipeline' else settings
        value = getattr(source, p.name)
        if value is None:
            value = '' if p.type is str else 0
        out[p.name] = list(value) if isinstance(value, list) else value
    return out


# ---------------------------------------------------------------------------------- run time


def _class_check(actions: Iterable[str], classes: Sequence[str]) -> str | None:
    unknown = [a for a in actions if a not in classes]
    if not unknown:
        return None
    names = ', '.join(f"'{a}'" for a in unknown)
    return f"unknown action{'s' if len(unknown) > 1 else ''} {names}; known actions: " \
           f"{', '.join(classes)}"


def validate_update(name: str, value: Any, classes: Sequence[str] | None = None) -> str | None:
    """Check a run-time parameter change (the node's ``add_on_set_parameters_callback``).

    Args:
        name: parameter name.
        value: the new value (rclpy types: bool, int, float, str, list of str).
        classes: the model's class names, for ``actions`` / ``overlay_action`` (None or empty
            = not checked, e.g. before configure).

    Returns:
        None when the change is allowed, else the reason (``SetParametersResult.reason``):
        unknown parameter, 'read-only at run time', wrong type, bad value, unknown action
        (listing the known classes).
    """
    if is_reserved(name):
        return None
    if name not in _BY_NAME:
        return str(_unknown(name))
    p = _BY_NAME[name]
    if p.read_only:
        return f"parameter '{name}' is read-only at run time (set it in the parameters file " \
               f"or at launch)"
    msg = p.check(value)
    if msg:
        return _named(name, msg)
    value = p.coerce(value)
    if classes:
        if name == 'actions':
            return _class_check(value, classes)
        if name == 'overlay_action' and value:
            return _class_check([value], classes)
    return None


validate = validate_update  # the name used in docs/ros_node.md


# ---------------------------------------------------------------------------------- YAML


def _yaml_value(value: Any) -> str:
    if isinstance(value, bool):
        return 'true' if value else 'false'
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        text = repr(value)
        if 'e' in text or 'n' in text:  # keep a plain decimal: YAML 1.1 reads 1e-05 as text
            text = f'{value:.12f}'.rstrip('0')
        return text + '0' if text.endswith('.') else text
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    if isinstance(value, list):
        return '[' + ', '.join(_yaml_value(v) for v in value) + ']'
    raise TypeError(f'cannot write {value!r} as a parameter value')


def render_yaml(node_name: str = NODE_NAME) -> str:
    """``config/grounding.yaml``: every parameter with its default, each preceded by comment
    lines documenting it (type, run-time changeable or not)."""
    dyn = ', '.join(p.name for p in PARAMETERS if not p.read_only)
    lines = [
        f'# Parameters of {node_name} (affordance_ros): every parameter with its default.',
        '# Generated from affordance_ros/params.py (PARAMETERS) by',
        '#   python -m affordance_ros.params > config/grounding.yaml',
        '# edit there and regenerate (test/ros/test_params.py checks that they agree).',
    ]
    lines += textwrap.wrap(f'Changeable at run time (ros2 param set): {dyn}.', width=99,
                           initial_indent='# ', subsequent_indent='#   ')
    lines += [
        '# Model files are empty here: the launch file passes checkpoint / onnx_path /',
        '# engine_path.',
        f'/{node_name}:',
        '  ros__parameters:',
    ]
    for i, p in enumerate(PARAMETERS):
        if i == 0 or PARAMETERS[i - 1].section != p.section:
            title = ('node settings' if p.section == 'node' else
                     'pipeline (affordance_core.inference.PipelineConfig)')
            lines.append(f'    # ---- {title}')
        tag = 'run-time' if not p.read_only else 'read-only'
        text = f'[{p.type_name}, {tag}] {p.description}'
        lines.extend(textwrap.wrap(text, width=99, initial_indent='    # ',
                                   subsequent_indent='    #   ', break_on_hyphens=False))
        lines.append(f'    {p.name}: {_yaml_value(p.default)}')
    return '\n'.join(lines) + '\n'


if __name__ == '__main__':  # python -m affordance_ros.params > config/grounding.yaml
    sys.stdout.write(render_yaml())
