"""Build a tiny Llama locally: random weights, a byte-level BPE tokenizer, no downloads.

Deterministic (same bytes on every build) and fast (seconds), so tests and the demo serve a
real model through a real vLLM engine without a model hub. The head size is 32, the
smallest vLLM's CPU attention accepts. Needs torch, transformers and tokenizers (all in
the engine's environment).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] }}: "
    "{{ message['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "hello world, hello vLLM, hello dynamo.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16",
    "def add(a, b):\n    return a + b\n",
    "user: What is the capital of France?\nassistant: Paris.",
    "A node agent keeps the model served and tells systemd the truth.",
    "Tokens per second, time to first token, inter-token latency.",
    "Checkpoint and restore make a restart take seconds, not minutes.",
    "The engine monitor sees a dead engine; the canary sees a hung one.",
]
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
BOS_ID, EOS_ID, PAD_ID = 1, 2, 3


def _build_tokenizer(out: Path) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 20, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    tokenizer.save(str(out / "tokenizer.json"))
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": True,
        "model_max_length": 2048,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return int(tokenizer.get_vocab_size())


def build(out: str | os.PathLike[str], dtype: str = "float32") -> Path:
    """Write the model to `out` (created if needed) and return its path."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    vocab_size = _build_tokenizer(path)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, head_dim=32, max_position_embeddings=2048,
        rms_norm_eps=1e-5, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(path, safe_serialization=True)
    GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID).save_pretrained(
        path
    )
    return path


def build_lora(out: str | os.PathLike[str], base: str | os.PathLike[str], rank: int = 8) -> Path:
    """Write a PEFT LoRA adapter for the tiny model at `base` into `out`.

    Deterministic, and strong enough that greedy output through the adapter differs from
    the base model's, so a test can tell which one served a request.
    """
    import torch
    from safetensors.torch import save_file

    base_path, path = Path(base), Path(out)
    model_config = json.loads((base_path / "config.json").read_text())
    hidden, layers = int(model_config["hidden_size"]), int(model_config["num_hidden_layers"])
    targets = ["q_proj", "v_proj"]
    generator = torch.Generator().manual_seed(1)
    tensors = {}
    for layer in range(layers):
        for module in targets:
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, hidden, generator=generator) / 2
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(hidden, rank, generator=generator) / 2
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
        "lora_dropout": 0.0, "bias": "none", "target_modules": targets,
        "base_model_name_or_path": str(base_path), "fan_in_fan_out": False,
        "modules_to_save": None, "inference_mode": True,
    }, indent=2, sort_keys=True) + "\n")
    return path
