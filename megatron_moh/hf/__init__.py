"""Hugging Face transformers side of MoH: a Llama with Mixture-of-Head attention.

`configuration_moh` and `modeling_moh` import only torch and transformers, because the exporter
copies them next to the weights for ``trust_remote_code=True`` loading.
"""

from megatron_moh.hf.configuration_moh import MoHLlamaConfig
from megatron_moh.hf.modeling_moh import MoHLlamaForCausalLM, MoHLlamaModel

__all__ = ["MoHLlamaConfig", "MoHLlamaForCausalLM", "MoHLlamaModel"]
