"""affordance-replay: rosbag2 (.db3 / .mcap) in -> GroundingCore -> rosbag2 out, without ROS.

Example::

    affordance-replay recording/ grounded.mcap --checkpoint runs/best.pt --action hold \\
        --params config/grounding.yaml --overlays overlays/ --every 5

reads IN_BAG (a rosbag2 folder, a ``.mcap`` or a ``.db3`` file) with
``rosbags.highlevel.AnyReader``, feeds its image, depth and camera_info messages to the node's
own :class:`~affordance_ros.core.GroundingCore` in log-time order and writes every output into
OUT_BAG (a new rosbag2 folder; MCAP storage when its name ends in ``.mcap``, else SQLite3):
``<ns>/heatmap``, ``<ns>/overlay``, ``<ns>/grasps``, ``<ns>/detections_3d``, ``<ns>/markers``,
``<ns>/affordance_cloud`` (with depth) with ``--out-namespace`` ``<ns>`` (default
``/affordance``), and ``/diagnostics`` once per second of bag time (and at the end). The
message definitions are stored with the connections, so ``ros2 bag info`` and Foxglove open the
bag without our package.

Time: the bag is the clock. A frame is processed as soon as the message that completes it is
read (``now`` = that message's log time, against which ``max_input_age_ms`` applies), so no
frame is superseded. Its outputs are written at ``now + the wall-clock processing time``: when a
live node that keeps up with the camera would publish them (a slower live node drops frames
instead of queueing them, so the replay does not accumulate a queue either). Latency in the
summary and the diagnostics = that time - the image stamp; every output header carries the
source image stamp. The pipeline is warmed up first (``warmup_runs``).

Topics: given with ``--image-topic`` / ``--depth-topic`` / ``--camera-info-topic`` (or
``--topics image=T,depth=T,camera_info=T``), else detected by message type: one
sensor_msgs/Image with a colour encoding (or, with ``--compressed`` or when there is none, one
CompressedImage), at most one depth Image (16UC1 / mono16 / 32FC1; none = RGB-only), and one
CameraInfo (the one beside the image topic when there are several). Ambiguity exits with code
2 and lists the candidates. ``/tf_static`` in the bag serves ``target_frame``.

Parameters: ``--params`` reads a ``/grounding_node: ros__parameters:`` file (the node's
``config/grounding.yaml``); ``--checkpoint``, ``--action``, ``--backend`` and ``--device``
override it. When the bag has a depth (camera_info) topic, depth (camera_info) is waited for
from the first image on, so the first frame is not grounded without it.

At the end a summary (frames in, processed, dropped per reason, latency and processing time
percentiles, messages written per topic) is printed and written to ``OUT_BAG.summary.json``.
User errors (missing bag or checkpoint, no image topic, unknown action, bad parameters) exit
with code 2 and one line on stderr.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from affordance_core.cli import user_error

PROG = 'affordance-replay'
NS = 1_000_000_000
IMAGE = 'sensor_msgs/msg/Image'
COMPRESSED = 'sensor_msgs/msg/CompressedImage'
CAMERA_INFO = 'sensor_msgs/msg/CameraInfo'
TF_TYPE = 'tf2_msgs/msg/TFMessage'
OUTPUT_TYPES = {
    'heatmap': IMAGE,
    'overlay': IMAGE,
    'grasps': 'affordance_ros/msg/AffordanceGraspArray',
    'detections_3d': 'vision_msgs/msg/Detection3DArray',
    'markers': 'visualization_msgs/msg/MarkerArray',
    'affordance_cloud': 'sensor_msgs/msg/PointCloud2',
}
DIAGNOSTICS_TOPIC = '/diagnostics'
DIAGNOSTICS_TYPE = 'diagnostic_msgs/msg/DiagnosticArray'


class UserError(Exception):
    """A problem with the command line or the input: one line on stderr, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of ``affordance-replay``."""
    from affordance_core.inference.pipeline import BACKEND_KINDS

    p = argparse.ArgumentParser(
        prog=PROG, description='Replay a rosbag2 (.db3 / .mcap) through the grounding node\'s '
        'processing code (GroundingCore) and write its outputs into a new rosbag2.')
    p.add_argument('in_bag', metavar='IN_BAG',
                   help='input rosbag2: a bag folder, a .mcap file or a .db3 file')
    p.add_argument('out_bag', metavar='OUT_BAG',
                   help='output rosbag2 folder (must not exist); MCAP when it ends in .mcap, '
                   'else SQLite3 (.db3)')
    p.add_argument('--checkpoint', required=True,
                   help='checkpoint (.pt) written by affordance-train (class names, weights)')
    p.add_argument('--action', action='append', required=True, metavar='A',
                   help='affordance to ground, among the checkpoint classes; repeat for several')
    p.add_argument('--image-topic', metavar='T',
                   help='colour image topic (default: detected by message type and encoding)')
    p.add_argument('--depth-topic', metavar='T',
                   help='registered depth image topic (default: detected; none = RGB-only)')
    p.add_argument('--camera-info-topic', metavar='T',
                   help='CameraInfo topic of the colour image (default: detected)')
    p.add_argument('--topics', metavar='image=T,depth=T,camera_info=T',
                   help='the three topics in one option (as in docs/ros_node.md)')
    p.add_argument('--compressed', action='store_true',
                   help='the colour topic is a sensor_msgs/CompressedImage (jpeg / png)')
    p.add_argument('--backend', choices=BACKEND_KINDS,
                   help="inference runtime (default: the parameters file's, else auto = the "
                   'fastest available)')
    p.add_argument('--device', help='auto | cpu | cuda | cuda:N (default: the parameters file '
                   "or the backend's default)")
    p.add_argument('--params', metavar='YAML',
                   help='node parameters file (/grounding_node: ros__parameters:), e.g. '
                   'config/grounding.yaml (default: the built-in defaults)')
    p.add_argument('--out-namespace', default='/affordance', metavar='NS',
                   help='prefix of the output topics (default: %(default)s)')
    p.add_argument('--overlays', metavar='DIR',
                   help='also write overlay PNGs (every --every-th processed frame) into DIR')
    p.add_argument('--every', type=int, default=1, metavar='N',
                   help='with --overlays: write the overlay of every N-th processed frame '
                   '(default: %(default)s)')
    p.add_argument('--no-progress', action='store_true', help='hide the progress bar')
    return p


# ------------------------------------------------------------------------------- topics


@dataclass
class Topics:
    """The input topics used and what was found in the bag."""

    image: str
    depth: str | None
    camera_info: str | None
    compressed: bool


def _first_message(reader: Any, conn: Any) -> Any | None:
    for c, _, raw in reader.messages(connections=[conn]):
        try:
            return reader.deserialize(raw, c.msgtype)
        except Exception:
            continue
    return None


def _parse_topics(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in text.split(','):
        if not item.strip():
            continue
        key, sep, value = item.partition('=')
        key = key.strip().replace('-', '_')
        if not sep or key not in ('image', 'depth', 'camera_info') or not value.strip():
            raise UserError(f"--topics: expected image=T,depth=T,camera_info=T, got '{item}'")
        out[key] = value.strip()
    return out


def detect_topics(reader: Any, args: argparse.Namespace) -> Topics:
    """Pick the input topics (given or detected); raises :class:`UserError` on ambiguity."""
    from affordance_ros.conversions import COLOR_ENCODINGS, DEPTH_ENCODINGS

    by_topic: dict[str, list[Any]] = {}
    for c in reader.connections:
        by_topic.setdefault(c.topic, []).append(c)
    types_of = {t: {c.msgtype for c in cs} for t, cs in by_topic.items()}
    given = _parse_topics(args.topics) if args.topics else {}
    for key, opt in (('image', args.image_topic), ('depth', args.depth_topic),
                     ('camera_info', args.camera_info_topic)):
        if opt:
            given[key] = opt

    def check(topic: str, allowed: set[str], what: str) -> str:
        if topic not in types_of:
            raise UserError(f"{what} topic '{topic}' is not in the bag; topics: "
                            f"{', '.join(sorted(types_of)) or 'none'}")
        if not types_of[topic] & allowed:
            raise UserError(f"{what} topic '{topic}' has type {', '.join(types_of[topic])}; "
                            f"expected {' or '.join(sorted(allowed))}")
        return topic

    encodings: dict[str, str] = {}
    for topic, ts in types_of.items():
        if IMAGE in ts:
            msg = _first_message(reader, by_topic[topic][0])
            encodings[topic] = str(getattr(msg, 'encoding', '')).strip() if msg else ''
    lower_colour = {e.lower() for e in COLOR_ENCODINGS}
    lower_depth = {e.lower() for e in DEPTH_ENCODINGS}
    colour = sorted(t for t, e in encodings.items() if e.lower() in lower_colour)
    depth = sorted(t for t, e in encodings.items() if e.lower() in lower_depth)
    compressed = sorted(t for t, ts in types_of.items() if COMPRESSED in ts
                        and 'depth' not in t.lower())

    listing = ', '.join(f"{t} [{', '.join(sorted(types_of[t]))}]" for t in sorted(types_of))

    def one(cands: list[str], what: str, hint: str) -> str:
        if not cands:
            raise UserError(f"no {what} topic in the bag ({hint}); topics: {listing or 'none'}")
        if len(cands) > 1:
            raise UserError(f"several {what} topics: {', '.join(cands)}; choose one with "
                            f'{hint}')
        return cands[0]

    use_compressed = bool(args.compressed)
    if 'image' in given:
        image = given['image']
        use_compressed = COMPRESSED in types_of.get(image, set()) and \
            IMAGE not in types_of.get(image, set())
        check(image, {IMAGE, COMPRESSED}, 'image')
        if not use_compressed and encodings.get(image, '').lower() in lower_depth:
            raise UserError(f"image topic '{image}' carries depth ({encodings[image]}); pass "
                            'the colour topic')
    elif use_compressed:
        image = one(compressed, 'CompressedImage colour', '--image-topic')
    elif colour:
        image = one(colour, 'colour Image', '--image-topic')
    elif compressed:
        image = one(compressed, 'colour Image or CompressedImage', '--image-topic')
        use_compressed = True
    else:
        one([], 'colour image', 'sensor_msgs/Image rgb8, bgr8, rgba8, bgra8 or mono8, or '
            'a CompressedImage with --compressed')
        raise AssertionError  # unreachable

    if 'depth' in given:
        depth_topic: str | None = check(given['depth'], {IMAGE}, 'depth')
        if encodings.get(given['depth'], '').lower() not in lower_depth:
            raise UserError(f"depth topic '{given['depth']}' has encoding "
                            f"'{encodings.get(given['depth'], '')}'; expected one of "
                            f"{', '.join(DEPTH_ENCODINGS)}")
    elif len(depth) > 1:
        raise UserError(f"several depth topics: {', '.join(depth)}; choose one with "
                        '--depth-topic')
    else:
        depth_topic = depth[0] if depth else None

    infos = sorted(t for t, ts in types_of.items() if CAMERA_INFO in ts)
    if 'camera_info' in given:
        info: str | None = check(given['camera_info'], {CAMERA_INFO}, 'camera_info')
    elif len(infos) > 1:
        beside = image.rsplit('/', 1)[0] + '/camera_info'
        if beside not in infos:
            raise UserError(f"several CameraInfo topics: {', '.join(infos)}; choose one with "
                            '--camera-info-topic')
        info = beside
    else:
        info = infos[0] if infos else None
    if depth_topic is not None and info is None:
        raise UserError(f"depth topic '{depth_topic}' but no CameraInfo topic in the bag: "
                        'K is needed to lift grasps to 3-D')
    return Topics(image, depth_topic, info, use_compressed)


# ------------------------------------------------------------------------------- TF


class StaticTransforms:
    """``/tf_static`` of a bag as a transform function for GroundingCore
    (``(target, source, stamp) -> (R, t)`` with ``p_target = R p_source + t``)."""

    def __init__(self) -> None:
        self.edges: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}

    def add(self, msg: Any) -> None:
        """Add every transform of a tf2_msgs/TFMessage."""
        from transforms3d.quaternions import quat2mat

        for tf in msg.transforms:
            parent, child = tf.header.frame_id.lstrip('/'), tf.child_frame_id.lstrip('/')
            q, t = tf.transform.rotation, tf.transform.translation
            R = quat2mat([q.w, q.x, q.y, q.z])
            tv = np.array([t.x, t.y, t.z], np.float64)
            self.edges.setdefault(parent, {})[child] = (R, tv)          # child -> parent
            self.edges.setdefault(child, {})[parent] = (R.T, -R.T @ tv)  # parent -> child

    def __call__(self, target: str, source: str,
                 stamp_ns: int) -> tuple[np.ndarray, np.ndarray] | None:
        target, source = target.lstrip('/'), source.lstrip('/')
        if target == source:
            return np.eye(3), np.zeros(3)
        # breadth-first from the target: T_target_frame for every frame reached
        seen = {target: (np.eye(3), np.zeros(3))}
        queue = [target]
        while queue:
            frame = queue.pop(0)
            R0, t0 = seen[frame]
            for nxt, (R, t) in self.edges.get(frame, {}).items():
                if nxt in seen:
                    continue
                # edges[frame][nxt] maps points of nxt into frame
                seen[nxt] = (R0 @ R, R0 @ t + t0)
                if nxt == source:
                    return seen[nxt]
                queue.append(nxt)
        return None


# ------------------------------------------------------------------------------- main


def _storage(out: Path) -> Any:
    from rosbags.rosbag2 import StoragePlugin

    return StoragePlugin.MCAP if out.suffix.lower() == '.mcap' else StoragePlugin.SQLITE3


def _summary_path(out: Path) -> Path:
    return out.parent / f'{out.name}.summary.json'


def _num(x: float, digits: int = 2) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), digits)


def _overlay_png(msg: Any, path: Path) -> None:
    import cv2

    img = np.asarray(msg.data, np.uint8).reshape(msg.height, msg.width, 3)  # bgr8
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), img)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Replay; returns the summary. Raises :class:`UserError` (and the user-error exception
    types handled by :func:`main`) for bad input."""
    from rosbags.highlevel import AnyReader
    from rosbags.rosbag2 import Writer

    from affordance_core.inference.pipeline import GroundingPipeline
    from affordance_ros.core import OUTPUT_TOPICS, GroundingCore
    from affordance_ros.msgtypes import BagMessageTypes
    from affordance_ros.params import build, load_params_file

    in_bag, out = Path(args.in_bag), Path(args.out_bag)
    if not in_bag.exists():
        raise UserError(f'input bag not found: {in_bag}')
    if out.exists():
        raise UserError(f'output bag already exists: {out} (rosbag2 never overwrites)')
    if not Path(args.checkpoint).is_file():
        raise UserError(f'checkpoint not found: {args.checkpoint}')
    if args.every < 1:
        raise UserError(f'--every must be >= 1, got {args.every}')
    ns = '/' + args.out_namespace.strip('/') if args.out_namespace.strip('/') else ''

    values = load_params_file(args.params) if args.params else {}
    values.update(checkpoint=str(args.checkpoint), actions=list(dict.fromkeys(args.action)))
    if args.backend:
        values['backend'] = args.backend
    if args.device:
        values['device'] = args.device
    config, settings = build(values)

    types = BagMessageTypes()
    try:
        reader = AnyReader([in_bag], default_typestore=types.typestore)
        reader.open()
    except Exception as exc:
        raise UserError(f'cannot read {in_bag} as a rosbag2 (.db3 / .mcap): '
                        f'{type(exc).__name__}: {exc}') from None
    try:
        topics = detect_topics(reader, args)
        tf = StaticTransforms()
        tf_conns = [c for c in reader.connections if c.topic == '/tf_static'
                    and c.msgtype == TF_TYPE]
        for c, _, raw in reader.messages(connections=tf_conns):
            try:
                tf.add(reader.deserialize(raw, c.msgtype))
            except Exception:
                continue
        if topics.depth is None and settings.require_depth:
            raise UserError('require_depth is true but the bag has no depth topic')

        t_load = time.perf_counter()
        pipeline = GroundingPipeline(config)
        clock = [0]
        core = GroundingCore(pipeline, types, settings, transform=tf,
                             logger=logging.getLogger(PROG), clock=lambda: clock[0],
                             expect=[k for k, t in (('depth', topics.depth),
                                                    ('camera_info', topics.camera_info)) if t],
                             image_topic=topics.image)
        core.warm_up(settings.warmup_runs)
        load_s = time.perf_counter() - t_load
        wanted = set(OUTPUT_TOPICS)
        if not settings.publish_overlay:
            wanted.discard('overlay')
        if not settings.publish_cloud or topics.depth is None:
            wanted.discard('affordance_cloud')
        build_overlay = wanted | ({'overlay'} if args.overlays else set())
        return _replay(reader, Writer, out, types, core, topics, wanted, build_overlay, ns,
                       clock, args, load_s)
    finally:
        reader.close()


def _replay(reader: Any, writer_cls: Any, out: Path, types: Any, core: Any, topics: Topics,
            wanted: set[str], build_overlay: set[str], ns: str, clock: list[int],
            args: argparse.Namespace, load_s: float) -> dict[str, Any]:
    from tqdm import tqdm

    from affordance_ros.core import OUTPUT_TOPICS

    handlers = {topics.image: ('image', core.on_compressed_image if topics.compressed
                               else core.on_image)}
    if topics.depth:
        handlers[topics.depth] = ('depth', core.on_depth)
    if topics.camera_info:
        handlers[topics.camera_info] = ('camera_info', core.on_camera_info)
    conns = [c for c in reader.connections if c.topic in handlers]
    total = sum(c.msgcount for c in conns)
    written = {f'{ns}/{t}': 0 for t in OUTPUT_TOPICS if t in wanted}
    written[DIAGNOSTICS_TOPIC] = 0
    overlays_written = 0
    start = time.perf_counter()
    t_first = t_last = None
    with writer_cls(out, version=9, storage_plugin=_storage(out)) as writer:
        out_conns = {t: writer.add_connection(f'{ns}/{t}', OUTPUT_TYPES[t],
                                              typestore=types.typestore)
                     for t in OUTPUT_TOPICS if t in wanted}
        diag_conn = writer.add_connection(DIAGNOSTICS_TOPIC, DIAGNOSTICS_TYPE,
                                          typestore=types.typestore)

        def write(conn: Any, topic: str, t_ns: int, msg: Any) -> None:
            writer.write(conn, t_ns, types.typestore.serialize_cdr(msg, conn.msgtype))
            written[topic] += 1

        next_diag = None
        bar = tqdm(total=total, unit='msg', desc=PROG, disable=args.no_progress,
                   file=sys.stderr, dynamic_ncols=True)
        with bar:
            for conn, t_ns, raw in reader.messages(connections=conns):
                bar.update(1)
                kind, handler = handlers[conn.topic]
                clock[0] = t_ns
                t_first = t_ns if t_first is None else t_first
                t_last = t_ns
                if next_diag is None:
                    next_diag = t_ns + NS
                while t_ns >= next_diag:
                    write(diag_conn, DIAGNOSTICS_TOPIC, next_diag, core.diagnostics(next_diag))
                    next_diag += NS
                try:
                    msg = reader.deserialize(raw, conn.msgtype)
                except Exception as exc:
                    core.note_received(kind)
                    core.note_drop(f'bad_{kind}', f'{conn.topic} message at {t_ns} does not '
                                   f'deserialise: {exc}')
                    continue
                handler(msg)
                frame = core.take_frame()
                if frame is None:
                    continue
                t0 = time.perf_counter()
                outs = core.process(frame, t_ns, build_overlay)
                pub_ns = t_ns + int((time.perf_counter() - t0) * NS)
                if not outs:
                    continue
                n = core.stats.processed
                if args.overlays and 'overlay' in outs and (n - 1) % args.every == 0:
                    _overlay_png(outs['overlay'], Path(args.overlays) /
                                 f'overlay_{n:06d}_{frame.stamp_ns}.png')
                    overlays_written += 1
                for topic, msg_out in outs.items():
                    if topic in out_conns:
                        write(out_conns[topic], f'{ns}/{topic}', pub_ns, msg_out)
                core.note_published(pub_ns, frame)
        end_ns = (t_last or 0) + 1
        write(diag_conn, DIAGNOSTICS_TOPIC, end_ns, core.diagnostics(end_ns))
    wall = time.perf_counter() - start

    snap = core.snapshot()
    summary = {
        'input_bag': str(args.in_bag), 'output_bag': str(out),
        'storage': 'mcap' if out.suffix.lower() == '.mcap' else 'sqlite3',
        'topics': {'image': topics.image, 'depth': topics.depth,
                   'camera_info': topics.camera_info, 'compressed': topics.compressed},
        'backend': core.backend_name, 'actions': core.actions,
        'bag_duration_s': _num(((t_last or 0) - (t_first or 0)) / NS, 3),
        'frames_in': snap['received']['image'],
        'received': snap['received'],
        'processed': snap['processed'],
        'dropped': {k: v for k, v in snap['dropped'].items() if v},
        'latency_ms': {k: _num(v) for k, v in snap['latency_ms'].items()},
        'processing_ms': {k: _num(v) for k, v in snap['processing_ms'].items()},
        'model_ms_median': _num(snap['model_ms_median']),
        'written': written,
        'overlays_written': overlays_written,
        'load_s': _num(load_s), 'wall_s': _num(wall),
    }
    _summary_path(out).write_text(json.dumps(summary, indent=2) + '\n')
    return summary


def format_summary(s: dict[str, Any]) -> str:
    """The summary as printed at the end of a replay."""
    dropped = ', '.join(f'{k} {v}' for k, v in s['dropped'].items()) or 'none'
    lat, proc = s['latency_ms'], s['processing_ms']
    topics = s['topics']
    lines = [
        f"{PROG}: {s['input_bag']} -> {s['output_bag']} ({s['storage']})",
        f"  inputs     image {topics['image']}{' (compressed)' if topics['compressed'] else ''}"
        f", depth {topics['depth'] or '-'}, camera_info {topics['camera_info'] or '-'}",
        f"  backend    {s['backend']}, actions {', '.join(s['actions'])}",
        f"  frames     {s['frames_in']} in, {s['processed']} processed, dropped: {dropped}",
        f"  latency    p50 {lat['p50']} ms, p95 {lat['p95']} ms (bag time, stamp -> output)",
        f"  processing p50 {proc['p50']} ms, p95 {proc['p95']} ms (wall clock per frame; "
        f"model median {s['model_ms_median']} ms)",
        '  written    ' + ', '.join(f'{t} {n}' for t, n in s['written'].items()),
    ]
    if s['overlays_written']:
        lines.append(f"  overlays   {s['overlays_written']} PNG")
    lines.append(f"  summary    {_summary_path(Path(s['output_bag']))}")
    return '\n'.join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Replay IN_BAG into OUT_BAG; returns the exit code (0 ok, 2 user error)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')

    from affordance_core.checkpoint import CheckpointError

    user_errors: tuple[type[BaseException], ...] = (UserError, FileNotFoundError, ValueError,
                                                    CheckpointError, ImportError)
    try:
        from affordance_core.export.tensorrt import EngineMismatchError
        user_errors += (EngineMismatchError,)
    except ImportError:  # pragma: no cover - optional
        pass
    try:
        summary = run(args)
    except user_errors as exc:
        return user_error(PROG, exc)
    print(format_summary(summary))
    return 0


if __name__ == '__main__':
    sys.exit(main())
