"""Official AGD20K metrics (KLD, SIM, NSS), map post-processing, evaluator and baselines."""
from __future__ import annotations

from affordance_core.metrics.baselines import center_prior
from affordance_core.metrics.evaluator import (AffordanceEvaluator, format_comparison,
                                               format_table, write_json, write_markdown)
from affordance_core.metrics.postprocess import (normalize_map, normalize_map_double,
                                                 preprocess_gt)
from affordance_core.metrics.saliency import kld, nss, sim

__all__ = ['kld', 'sim', 'nss', 'preprocess_gt', 'normalize_map', 'normalize_map_double',
           'AffordanceEvaluator', 'write_json', 'write_markdown', 'format_table',
           'format_comparison', 'center_prior']
