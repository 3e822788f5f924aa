"""Build a tiny LoRA adapter for the tiny Llama, offline and deterministically.

The adapter is written in PEFT's format (``adapter_config.json`` and
``adapter_model.safetensors`` with PEFT's tensor names), which is what vLLM loads; peft itself
is not needed. Its weights are random (fixed seed) and large enough that greedy tokens differ
from the base model's, which is all the tests need to tell an adapter's answer apart.

    python scripts/build_tiny_lora.py --base .models/tiny-llama --out .models/tiny-llama-lora
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SEED = 1234
RANK = 8
TARGETS = ("q_proj", "v_proj")


def build_lora(base: Path, out: Path, *, seed: int = SEED, rank: int = RANK) -> Path:
    """Write the adapter for the model in ``base`` to ``out``; return ``out``."""
    import torch
    from safetensors.torch import save_file

    config = json.loads((base / "config.json").read_text())
    hidden = int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or hidden // int(config["num_attention_heads"]))
    out_features = {
        "q_proj": int(config["num_attention_heads"]) * head_dim,
        "v_proj": int(config.get("num_key_value_heads", config["num_attention_heads"])) * head_dim,
    }
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(int(config["num_hidden_layers"])):
        for target in TARGETS:
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{target}"
            a = torch.randn(rank, hidden, generator=generator) * 0.5
            b = torch.randn(out_features[target], rank, generator=generator) * 0.5
            tensors[f"{prefix}.lora_A.weight"] = a.contiguous()
            tensors[f"{prefix}.lora_B.weight"] = b.contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base),
        "r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "target_modules": list(TARGETS),
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
    }
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
    return out


def main() -> None:
    """Command line: ``--base`` model folder, ``--out`` adapter folder."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, default=Path(".models/tiny-llama"))
    parser.add_argument("--out", type=Path, default=Path(".models/tiny-llama-lora"))
    args = parser.parse_args()
    print(build_lora(args.base, args.out))


if __name__ == "__main__":
    main()
