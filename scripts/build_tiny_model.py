"""Build tiny random-weight causal LMs offline, deterministically.

No model can be downloaded on the machines this project is tested on, and no PyPI package ships
a trained small causal LM. vLLM serves a randomly initialised model just as it serves a trained
one, so a model of a few hundred kilobytes exercises the whole serving path for real. Its text
is gibberish: that is expected.

    python scripts/build_tiny_model.py --arch llama --out .models/tiny-llama
    python scripts/build_tiny_model.py --all --out-dir .models

The same arguments always give byte-identical weights and tokenizer (fixed seeds, generated
corpus), so tests can compare tokens across runs. A folder that already holds a model is left
alone unless --force is given.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

ARCHITECTURES = ("llama", "mistral", "gpt2")

# hidden 256 with 4 heads gives head_dim 64: vLLM's CPU attention rejects head_dim 16.
HIDDEN = 256
HEADS = 4
KV_HEADS = 2
LAYERS = 2
MAX_POSITIONS = 2048
VOCAB = 512

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_WORDS = (
    "the a model engine token stream request answer question gpu cpu memory fast slow "
    "appliance serve load unload ready health metrics registry catalogue hello world "
    "user assistant system chat text embed vector batch cache queue latency throughput"
).split()


def _corpus(seed: int, lines: int = 4000) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        n = rng.randint(3, 16)
        words = [rng.choice(_WORDS) for _ in range(n)]
        out.append(" ".join(words).capitalize() + rng.choice([".", "?", "!", ","]))
    out.append("".join(chr(c) for c in range(32, 127)))
    return out


def _build_tokenizer(out: Path, seed: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<unk>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = MAX_POSITIONS
    fast.save_pretrained(str(out))


def _build_model(arch: str, out: Path, vocab_size: int, seed: int) -> None:
    import torch
    import transformers

    # Offset per architecture so the three tiny models differ from one another.
    torch.manual_seed(seed + ARCHITECTURES.index(arch))
    common = {"vocab_size": vocab_size, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 3}
    if arch == "gpt2":
        config = transformers.GPT2Config(
            n_embd=HIDDEN, n_head=HEADS, n_layer=LAYERS, n_positions=MAX_POSITIONS, **common
        )
        model = transformers.GPT2LMHeadModel(config)
    else:
        cls_config, cls_model = {
            "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
            "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        }[arch]
        config = cls_config(
            hidden_size=HIDDEN,
            intermediate_size=HIDDEN * 2,
            num_attention_heads=HEADS,
            num_key_value_heads=KV_HEADS,
            num_hidden_layers=LAYERS,
            max_position_embeddings=MAX_POSITIONS,
            tie_word_embeddings=False,
            **common,
        )
        model = cls_model(config)
    model = model.to(torch.float32)
    model.save_pretrained(str(out), safe_serialization=True)


def build(arch: str, out: Path, *, seed: int = 0, force: bool = False) -> Path:
    """Build one tiny model of ``arch`` into ``out``; return the folder."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHITECTURES)}")
    marker = out / "config.json"
    if marker.exists() and not force:
        return out
    out.mkdir(parents=True, exist_ok=True)
    _build_tokenizer(out, seed)
    vocab_size = json.loads((out / "tokenizer.json").read_text())["model"]["vocab"].__len__()
    # Round the embedding up so special tokens added later never fall outside it.
    vocab_size = max(vocab_size, VOCAB)
    _build_model(arch, out, vocab_size, seed)
    (out / "TINY_MODEL.md").write_text(
        f"Tiny random-weight {arch} model built by scripts/build_tiny_model.py (seed {seed}).\n"
        "Its output is gibberish by design; it exists to exercise the serving path offline.\n"
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=ARCHITECTURES, default="llama")
    parser.add_argument("--out", type=Path, help="folder for one model")
    parser.add_argument("--all", action="store_true", help="build every architecture")
    parser.add_argument("--out-dir", type=Path, default=Path(".models"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild even if present")
    args = parser.parse_args(argv)
    targets = (
        [(a, args.out_dir / f"tiny-{a}") for a in ARCHITECTURES]
        if args.all
        else [(args.arch, args.out or args.out_dir / f"tiny-{args.arch}")]
    )
    for arch, out in targets:
        build(arch, out, seed=args.seed, force=args.force)
        print(f"{arch}: {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
