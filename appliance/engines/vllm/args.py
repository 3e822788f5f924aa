"""A catalogue entry as vLLM's own serve arguments, validated by vLLM's own parser."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from appliance.catalogue.schema import ModelSpec, Task
from appliance.errors import ConfigError


def _vllm_parser() -> argparse.ArgumentParser:
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser(prog="models.yaml engine"))


def _template_path(model: str, value: Any, base_dir: Path | None) -> Any:
    """A ``chat_template`` that is a relative file path, made absolute against ``base_dir``.

    vLLM takes a value with any of ``{}`` or a newline as the template itself, else as a path.
    """
    if not isinstance(value, str) or any(c in value for c in "{}\n"):
        return value
    path = Path(value).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if not path.is_file():
        raise ConfigError(
            f"model {model!r}: engine setting 'chat_template': file {str(path)!r} does not exist",
            param="engine.chat_template",
        )
    return str(path.resolve())


def _argv_item(value: Any) -> str:
    """One item of a list-valued setting as a command-line word."""
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


class EngineArgsBuilder:
    """Turns a catalogue entry into vLLM's own serve arguments, validated by vLLM's parser."""

    def __init__(self) -> None:
        self._parser: argparse.ArgumentParser | None = None
        self._options: dict[str, argparse.Action] = {}

    @property
    def parser(self) -> argparse.ArgumentParser:
        """vLLM's serve parser, built on first use (building it imports much of vLLM)."""
        if self._parser is None:
            self._parser = _vllm_parser()
            for action in self._parser._actions:
                for option in action.option_strings:
                    self._options[option] = action
        return self._parser

    def _setting_to_argv(self, model: str, key: str, value: Any) -> list[str]:
        option = "--" + key.replace("_", "-")
        action = self._options.get(option)
        if action is None:
            raise ConfigError(
                f"model {model!r}: engine setting {key!r} is not a vLLM engine setting "
                "(see `python -m vllm.entrypoints.openai.api_server --help`)",
                param=f"engine.{key}",
            )
        if isinstance(value, bool):
            if isinstance(action, argparse.BooleanOptionalAction):
                return [option if value else "--no-" + key.replace("_", "-")]
            if action.nargs == 0:  # store_true style flag
                return [option] if value else []
            return [option, str(value).lower()]
        if isinstance(value, dict):
            return [option, json.dumps(value)]
        if isinstance(value, list):
            if action.nargs in ("+", "*"):
                # Mapping items (lora_modules: [{name, path}]) go as JSON, which vLLM's
                # parsers of such settings read; plain items as text.
                return [option, *(_argv_item(v) for v in value)]
            return [option, json.dumps(value)]
        if value is None:
            return []
        return [option, str(value)]

    def build(
        self,
        spec: ModelSpec,
        source_path: str,
        *,
        gpu_memory_utilization: float | None = None,
        adapters: Sequence[tuple[str, str]] = (),
        base_dir: Path | None = None,
    ) -> argparse.Namespace:
        """Parse ``spec.engine`` with vLLM's parser; raise ``ConfigError`` naming the setting.

        ``adapters``: (name, path or hub id) of each LoRA adapter to serve from the start; with
        any (or ``enable_lora`` in ``spec.engine``) the engine runs with vLLM's LoRA support,
        so adapters can also be loaded and unloaded while it runs. ``base_dir``: the
        catalogue's folder, against which a relative ``chat_template`` path is resolved (vLLM
        would take it against the process's working directory).
        """
        parser = self.parser
        argv = [
            "--model",
            source_path,
            "--served-model-name",
            spec.name,
            "--tensor-parallel-size",
            str(spec.resources.tensor_parallel_size),
        ]
        if spec.task is Task.EMBED:
            argv += ["--runner", "pooling"]
        elif spec.task is Task.GENERATE:
            argv += ["--runner", "generate"]
        if gpu_memory_utilization is not None:
            argv += ["--gpu-memory-utilization", f"{gpu_memory_utilization:.4f}"]
        for key, value in spec.engine.items():
            if key.replace("-", "_") == "chat_template":
                value = _template_path(spec.name, value, base_dir)
            argv += self._setting_to_argv(spec.name, key, value)
        if adapters:
            if not any(k.replace("-", "_") == "enable_lora" for k in spec.engine):
                argv += ["--enable-lora"]
            argv += ["--lora-modules", *(f"{name}={path}" for name, path in adapters)]
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                args = parser.parse_args(argv)
        except SystemExit:
            detail = stderr.getvalue().strip().splitlines()
            reason = detail[-1] if detail else "invalid engine settings"
            reason = reason.split("error: ", 1)[-1]
            raise ConfigError(f"model {spec.name!r}: engine settings: {reason}") from None
        try:
            from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args

            validate_parsed_serve_args(args)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"model {spec.name!r}: engine settings: {exc}") from None
        return args
