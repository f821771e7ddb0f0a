"""Export of the inference head: ``ExportWrapper`` (traceable), ONNX, TensorRT (optional).

``onnx`` / ``onnxruntime`` and ``torch_tensorrt`` are optional dependencies imported inside the
functions of ``export.onnx`` and ``export.tensorrt``; importing this package needs only torch.
"""
from __future__ import annotations

from affordance_core.export.onnx import (cached_onnx_export, export_checkpoint_onnx, export_onnx,
                                         read_onnx_metadata, verify_onnx)
from affordance_core.export.tensorrt import (EngineMismatchError, TensorRTUnavailableError,
                                             build_engine, load_engine, load_or_build_engine,
                                             tensorrt_available)
from affordance_core.export.wrapper import (ExportWrapper, ModelMetadata, file_sha256,
                                            model_metadata, state_dict_sha256)

__all__ = ['ExportWrapper', 'ModelMetadata', 'model_metadata', 'state_dict_sha256', 'file_sha256',
           'export_onnx', 'export_checkpoint_onnx', 'cached_onnx_export', 'read_onnx_metadata',
           'verify_onnx', 'build_engine', 'load_engine', 'load_or_build_engine',
           'tensorrt_available', 'TensorRTUnavailableError', 'EngineMismatchError']
