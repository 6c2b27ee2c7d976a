"""BEiT-3-style Multiway Transformer backbone with (MH-)MoE layers (docs/interfaces.md section 2).

Public API: `create_model`, `list_models`, `load_model`, `save_model`, `save_pretrained`, `from_pretrained`,
`load_backbone_weights`,
`MultiwayConfig`, `MoEConfig`, `MultiwayTransformer`, `BackboneOutput`, `KVCache`, and the converters
`convert_beit3_state_dict`, `convert_timm_vit_state_dict`, `upcycle`.
"""

from mmoe.model.attention import KVCache
from mmoe.model.backbone import BackboneOutput, MultiwayTransformer
from mmoe.model.config import MoEConfig, MultiwayConfig
from mmoe.model.convert import beit3_config_from_state_dict, convert_beit3_state_dict, convert_timm_vit_state_dict
from mmoe.model.io import load_backbone_weights, save_model, save_pretrained
from mmoe.model.registry import create_model, from_pretrained, get_config, list_models, load_model
from mmoe.model.upcycling import upcycle

__all__ = [
    "BackboneOutput",
    "KVCache",
    "MoEConfig",
    "MultiwayConfig",
    "MultiwayTransformer",
    "beit3_config_from_state_dict",
    "convert_beit3_state_dict",
    "convert_timm_vit_state_dict",
    "create_model",
    "from_pretrained",
    "get_config",
    "list_models",
    "load_backbone_weights",
    "load_model",
    "save_model",
    "save_pretrained",
    "upcycle",
]
