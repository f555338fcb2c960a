"""The Hugging Face face of a speedchat GPT, shipped inside every exported folder (export.py).

It wraps the project's own model.py, copied beside it, so the exported model computes exactly what
speedchat computes and cannot drift from it when the architecture changes. transformers loads it with
`trust_remote_code=True`. Generation recomputes the whole sequence at each token (no KV cache through
transformers' Cache API): slower, never different.
"""

import torch.nn.functional as F
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .model import GPT, GPTConfig


class SpeedchatConfig(PretrainedConfig):
    model_type = "speedchat"

    def __init__(self, gpt=None, **kwargs):
        self.gpt = dict(gpt or {})  # model.GPTConfig's fields
        kwargs.setdefault("use_cache", False)
        super().__init__(**kwargs)


class SpeedchatForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = SpeedchatConfig
    base_model_prefix = "gpt"
    _supports_cache_class = False

    def __init__(self, config):
        super().__init__(config)
        self.gpt = GPT(GPTConfig(**config.gpt))
        self.gpt.init_weights()  # the weights file overwrites these
        self.tables_ready = False
        self.post_init()

    def _init_weights(self, module):
        pass  # model.py initialises its own weights (above); transformers' defaults would undo the loaded ones

    def forward(self, input_ids, attention_mask=None, labels=None, **kwargs):
        if not self.tables_ready:  # transformers materialises non-persistent buffers (rotary) unfilled
            self.gpt._set_rotary(self.gpt.cos.size(1), device=input_ids.device)
            self.tables_ready = True
        logits = self.gpt(input_ids)  # float32, softcapped, over the real vocabulary
        loss = None
        if labels is not None:  # transformers' convention: labels are the inputs, shifted here
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        return {"input_ids": input_ids}

    def get_input_embeddings(self):
        return self.gpt.wte

    def get_output_embeddings(self):
        return self.gpt.lm_head
