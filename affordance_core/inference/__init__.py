"""Inference runtime: backends (PyTorch / ONNX Runtime / TensorRT) and the grounding pipeline.

    from affordance_core.inference import GroundingPipeline, PipelineConfig
    pipe = GroundingPipeline.from_checkpoint('run/best.pt', backend='auto')
    result = pipe(rgb, depth=depth, K=K, actions=['hold'])

Nothing here imports ROS.
"""
from __future__ import annotations

from affordance_core.inference.backends import (BACKEND_KINDS, Backend, OnnxRuntimeBackend,
                                                TensorRTBackend, TorchBackend,
                                                available_backends, create_backend)
from affordance_core.inference.pipeline import (Grasp, GroundingPipeline, GroundingResult,
                                                InputError, PipelineConfig)

__all__ = ['BACKEND_KINDS', 'Backend', 'Grasp', 'GroundingPipeline', 'GroundingResult',
           'InputError', 'OnnxRuntimeBackend', 'PipelineConfig', 'TensorRTBackend',
           'TorchBackend', 'available_backends', 'create_backend']
