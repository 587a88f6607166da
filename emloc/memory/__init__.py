"""Memory planner and dry run: what each pipeline stage holds on the device and the host, the compression
ratio that fits a budget, and a check of the plan by the pipeline's own code on meta tensors."""
from .planner import Plan, parse_bytes, plan
from .spec import ModelSpec, model_spec, reference_configs
from .stage import STAGES, TERMS, Settings, StageMemory
from .tracker import LiveBytesTracker

__all__ = ["LiveBytesTracker", "ModelSpec", "Plan", "STAGES", "Settings", "StageMemory", "TERMS", "model_spec",
           "parse_bytes", "plan", "reference_configs"]
