"""lsw-jax: LoRA-Switch and dLoRA-style multi-adapter serving in JAX."""

from lsw_jax.config import ModelConfig
from lsw_jax.convert import convert_checkpoint
from lsw_jax.decode import generate
from lsw_jax.loading import load_model, save_model
from lsw_jax.model.llama import KVCache, LlamaModel, init_model

__all__ = [
    "KVCache",
    "LlamaModel",
    "ModelConfig",
    "convert_checkpoint",
    "generate",
    "init_model",
    "load_model",
    "save_model",
]
__version__ = "0.1.0"
