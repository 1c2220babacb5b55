"""Pre-trained checkpoints in, timm checkpoints out.

    params = pretrained.load("deit_tiny.safetensors", model)  # or .pth, .npz
    pretrained.export_timm(params, model, "robust.safetensors")
"""

from vitat_jax.pretrained.convert import check, export_timm, load, timm_state_dict
from vitat_jax.pretrained.io import read_safetensors, write_safetensors

__all__ = [
    "check", "export_timm", "load", "timm_state_dict", "read_safetensors",
    "write_safetensors"
]
