"""affordance-export: export a checkpoint's inference head to ONNX or a TensorRT engine.

Examples::

    affordance-export --checkpoint runs/locate_seen/best.pt --format onnx --out export/
    affordance-export --checkpoint runs/locate_seen/best.pt --format tensorrt --out engines/ \\
        --precision fp16 --device cuda:0

ONNX: writes ``<out>/<checkpoint stem>.onnx`` (input ``images`` (1, 3, S, S), outputs ``cams``
and ``maps``, class names and normalisation in the metadata) and, unless ``--no-verify``, prints
the max abs difference to PyTorch under ONNX Runtime on CPU. TensorRT (needs a CUDA GPU,
torch-tensorrt and the TensorRT libraries): writes ``<out>/engine.ep`` and its sidecar
``<out>/engine.json``. User errors (missing checkpoint, TensorRT unavailable, bad option) exit
with code 2 and one line on stderr.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

from affordance_core.cli import user_error

PROG = 'affordance-export'
FORMATS = ('onnx', 'tensorrt')


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of ``affordance-export``."""
    p = argparse.ArgumentParser(
        prog=PROG, description='Export the inference head of a checkpoint (images -> CAMs and '
        'normalised heatmaps of all classes) to ONNX or a Torch-TensorRT engine.')
    p.add_argument('--checkpoint', required=True, help='checkpoint (.pt) written by '
                   'affordance-train')
    p.add_argument('--format', required=True, choices=FORMATS,
                   help='onnx: <out>/<checkpoint stem>.onnx; tensorrt: <out>/engine.ep + '
                   'engine.json (needs a CUDA GPU, torch-tensorrt and TensorRT)')
    p.add_argument('--out', required=True, help='output folder (created if needed)')
    p.add_argument('--opset', type=int, default=17, help='ONNX opset, >= 17 (default: '
                   '%(default)s)')
    p.add_argument('--precision', choices=('fp16', 'fp32'), default='fp16',
                   help='TensorRT engine precision (default: %(default)s); ignored for onnx')
    p.add_argument('--device', default='auto', help='device to trace / build on: auto | cpu | '
                   'cuda | cuda:N (default: auto = cpu for onnx, cuda for tensorrt)')
    p.add_argument('--image-size', type=int, default=224, help='fixed input side S, a multiple '
                   'of the backbone patch size (default: %(default)s)')
    p.add_argument('--quantize', choices=('int8',), default=None,
                   help='onnx only: also write <stem>.int8.onnx with dynamic int8 MatMul / Gemm '
                   'weights (faster on CPU; parity budget: max |dmaps| <= 0.1)')
    p.add_argument('--no-verify', action='store_true', help='skip the parity check against '
                   'PyTorch (ONNX Runtime on CPU / the built engine)')
    return p


def _error(message: str) -> int:
    return user_error(PROG, message)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the export; returns the process exit code (0 ok, 2 user error)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')

    from affordance_core.checkpoint import CheckpointError, load_checkpoint
    from affordance_core.export.tensorrt import TensorRTUnavailableError

    try:
        if args.image_size <= 0:
            raise ValueError(f'--image-size must be positive, got {args.image_size}')
        checkpoint = Path(args.checkpoint)
        if not checkpoint.is_file():
            raise FileNotFoundError(f'checkpoint not found: {checkpoint}')
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise ValueError(f'--out {out} exists and is not a folder')
        if args.format == 'tensorrt':
            from affordance_core.export.tensorrt import require_torch_tensorrt
            require_torch_tensorrt()  # fail fast, before loading the model
        from affordance_core.export.wrapper import file_sha256
        from affordance_core.inference.backends import resolve_device

        device = 'cuda' if args.device == 'auto' and args.format == 'tensorrt' else (
            'cpu' if args.device == 'auto' else resolve_device(args.device))
        sha = file_sha256(checkpoint)
        model = load_checkpoint(checkpoint, map_location=device)
        if args.format == 'onnx':
            from affordance_core.export.onnx import INT8_PARITY_BUDGET, export_onnx, verify_onnx

            path = export_onnx(model, out / f'{checkpoint.stem}.onnx', image_size=args.image_size,
                               opset=args.opset, checkpoint_sha256=sha)
            paths = [path]
            if args.quantize:
                from affordance_core.export.onnx import quantize_onnx

                paths.append(quantize_onnx(path, out / f'{checkpoint.stem}.int8.onnx'))
            if not args.no_verify:
                try:
                    for p in paths:
                        err = verify_onnx(model, p)
                        print(f'{p.name}: parity vs PyTorch (onnxruntime CPU): max |dcams| = '
                              f'{err["cams"]:.2e}, max |dmaps| = {err["maps"]:.2e} (mean '
                              f'{err["maps_mean"]:.2e})')
                    if args.quantize and err['maps'] > INT8_PARITY_BUDGET:
                        logging.getLogger(PROG).warning(
                            'the int8 model exceeds the parity budget (max |dmaps| %.3f > %.2f); '
                            'prefer the float32 export for this model', err['maps'],
                            INT8_PARITY_BUDGET)
                except ImportError as exc:
                    logging.getLogger(PROG).warning('parity check skipped: %s', exc)
            path = paths[-1]
        else:
            from affordance_core.export.tensorrt import build_engine

            path = build_engine(model, out, precision=args.precision, image_size=args.image_size,
                                device=device, checkpoint_sha256=sha, verify=not args.no_verify)
    except (FileNotFoundError, ValueError, CheckpointError, TensorRTUnavailableError,
            ImportError) as exc:
        return _error(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    print(path)
    return 0


if __name__ == '__main__':
    sys.exit(main())
