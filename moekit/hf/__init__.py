"""Hugging Face transformers interop: conversion only. The model code it converts to lives in
``moekit.lm`` (gpt-oss attention and experts in ``lm.gpt_oss``, YaRN rotary tables in
``lm.rope``); this package imports ``lm``, never the reverse (docs/architecture.md).

  blocks   HF sparse MoE block <-> moekit MoE (config mapping, weight sharing or copying).
  inplace  ``patch_model``: swap a loaded transformers model's MoE blocks for moekit layers.
  convert  ``from_hf``: HF checkpoint folder or hub id -> moekit LM, streamed shard by shard.
  export   ``to_hf``: moekit LM -> HF checkpoint folder that transformers loads.
  testing  tiny random transformers models of every family (tests, docs, benchmarks).

Importing this package does not import transformers; the functions that need it import it.
"""

from ..lm.gpt_oss import ClampedSwiGLUExperts
from .blocks import (
    FAMILIES,
    UnsupportedArchitectureError,
    block_key_map,
    build_moe,
    copy_moe_to_hf_block,
    family_of,
    moe_config_from_hf,
    moe_from_hf_block,
)
from .convert import CheckpointError, OutputFolderError, from_hf, lm_config_from_hf, load_moekit, save_moekit
from .export import infer_family, to_hf
from .inplace import PatchedMoE, patch_model, unpatch_model

__all__ = ["FAMILIES", "ClampedSwiGLUExperts", "UnsupportedArchitectureError", "CheckpointError", "OutputFolderError",
           "block_key_map", "build_moe", "copy_moe_to_hf_block", "family_of", "moe_config_from_hf", "moe_from_hf_block",
           "from_hf", "lm_config_from_hf", "load_moekit", "save_moekit", "to_hf", "infer_family", "PatchedMoE",
           "patch_model", "unpatch_model"]
