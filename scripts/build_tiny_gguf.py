"""Write a tiny model of scripts/build_tiny_model.py as a GGUF file, offline, with ``gguf``.

transformers reads GGUF but cannot write it, and llama.cpp's converter is not a package; the
tests need a ``.gguf`` source of an architecture other than SmolLM2's Llama, so this writes
tiny-gpt2 with ``gguf.GGUFWriter``: llama.cpp's metadata keys, its tensor names (from gguf's
own name map, the one transformers reads back through), GPT-2's Conv1D weights transposed as
llama.cpp stores them, and the byte-level BPE tokenizer with its chat template. F32 weights by
default; ``--type Q8_0`` quantizes the 2-D ones as llama.cpp would.

    python scripts/build_tiny_gguf.py --model .models/tiny-gpt2 --out .models/tiny-gpt2.gguf
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import load_file

# GPT-2's Conv1D layers keep weights as (in, out); llama.cpp stores them (out, in).
TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
TOKEN_NORMAL, TOKEN_CONTROL = 1, 3  # llama.cpp's token types
GPT2_DEFAULT_POSITIONS = 1024


def write_gpt2(model_dir: Path, out: Path, quant: str = "F32") -> None:
    """``model_dir`` (a GPT2LMHeadModel folder) as the GGUF file ``out``, written atomically."""
    config = json.loads((model_dir / "config.json").read_text())
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    template_file = model_dir / "chat_template.jinja"
    tensors = load_file(str(model_dir / "model.safetensors"))
    arch = gguf.MODEL_ARCH.GPT2
    names = gguf.get_tensor_name_map(arch, config["n_layer"])
    scratch = out.with_name(out.name + ".tmp")
    writer = gguf.GGUFWriter(str(scratch), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(model_dir.name)
    # transformers reads GGUF's context_length into GPT2Config's n_ctx, which the class no
    # longer uses: its n_positions stays at the default, 1024. Keep the first 1024 positions so
    # the file and what transformers makes of it agree.
    positions = min(config["n_positions"], GPT2_DEFAULT_POSITIONS)
    writer.add_context_length(positions)
    writer.add_embedding_length(config["n_embd"])
    writer.add_feed_forward_length(config.get("n_inner") or 4 * config["n_embd"])
    writer.add_block_count(config["n_layer"])
    writer.add_head_count(config["n_head"])
    writer.add_layer_norm_eps(config["layer_norm_epsilon"])
    writer.add_file_type(
        gguf.LlamaFileType.MOSTLY_Q8_0 if quant == "Q8_0" else gguf.LlamaFileType.ALL_F32
    )

    vocab: dict[str, int] = tokenizer["model"]["vocab"]
    added = {t["content"]: t["id"] for t in tokenizer.get("added_tokens", [])}
    tokens = [""] * (max([*vocab.values(), *added.values()]) + 1)
    for token, index in {**vocab, **added}.items():
        tokens[index] = token
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([TOKEN_CONTROL if t in added else TOKEN_NORMAL for t in tokens])
    writer.add_token_merges(merges)
    for key, setter in (
        ("bos_token_id", writer.add_bos_token_id),
        ("eos_token_id", writer.add_eos_token_id),
        ("pad_token_id", writer.add_pad_token_id),
    ):
        if config.get(key) is not None:
            setter(config[key])
    if template_file.is_file():
        writer.add_chat_template(template_file.read_text())

    for hf_name, data in tensors.items():
        base, _, suffix = hf_name.rpartition(".")
        name = names.get_name(base)
        if name is None:
            continue  # the causal mask buffers of old checkpoints; nothing to store
        if hf_name.endswith(TRANSPOSED):
            data = data.T
        if hf_name.endswith("wpe.weight"):
            data = data[:positions]
        data = np.ascontiguousarray(data, dtype=np.float32)
        if quant == "Q8_0" and data.ndim == 2 and data.shape[-1] % 32 == 0:
            writer.add_tensor(
                f"{name}.{suffix}",
                gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0),
                raw_dtype=gguf.GGMLQuantizationType.Q8_0,
            )
        else:
            writer.add_tensor(f"{name}.{suffix}", data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(scratch, out)


def main() -> None:
    """Parse the command line and write the file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path(".models/tiny-gpt2"))
    parser.add_argument("--out", type=Path, default=Path(".models/tiny-gpt2.gguf"))
    parser.add_argument("--type", choices=("F32", "Q8_0"), default="F32")
    args = parser.parse_args()
    write_gpt2(args.model, args.out, args.type)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
