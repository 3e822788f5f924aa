"""Config validation: one test per kind of mistake, each with a message naming model and field."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from appliance.catalogue.config_file import parse_catalogue
from appliance.catalogue.schema import LocalModelSpec, RemoteModelSpec, Task
from appliance.engines.factory import EngineFactory
from appliance.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]

REPO = Path(__file__).resolve().parents[2]


def parse(text: str):
    return parse_catalogue(textwrap.dedent(text))


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        parse(text)
    return caught.value.message


def test_the_default_catalogue_is_valid() -> None:
    config = parse_catalogue((REPO / "models.yaml").read_text())
    assert {m.name: m.task for m in config.models} == {
        "smollm2": Task.GENERATE,
        "minilm": Task.EMBED,
    }


def test_minimal_entry_gets_defaults() -> None:
    config = parse("""
        models:
          - name: m
            source: org/model
    """)
    spec = config.models[0]
    # No task: vLLM picks the runner and the engine says which routes it serves (issue 11).
    assert spec.task is Task.AUTO and spec.autoload and spec.resources.tensor_parallel_size == 1


def test_invalid_yaml() -> None:
    assert "not valid YAML" in error_of("models: [\n")


def test_top_level_not_a_mapping() -> None:
    assert "mapping" in error_of("- a\n- b\n")


def test_unknown_top_level_key() -> None:
    assert "unknown field 'modles'" in error_of("modles: []\n")


def test_unknown_model_key_names_model_and_field() -> None:
    message = error_of("""
        models:
          - name: chat
            source: org/model
            autolaod: true
    """)
    assert "model 'chat'" in message and "unknown field 'autolaod'" in message


def test_missing_name_names_the_entry() -> None:
    message = error_of("""
        models:
          - source: org/model
    """)
    assert "model #1" in message and "'name' is required" in message


def test_bad_task() -> None:
    message = error_of("""
        models:
          - name: chat
            source: org/model
            task: dance
    """)
    assert "model 'chat'" in message and "'task'" in message and "dance" in message


def test_wrong_type() -> None:
    message = error_of("""
        models:
          - name: chat
            source: org/model
            resources: {tensor_parallel_size: many}
    """)
    assert "resources.tensor_parallel_size" in message


def test_out_of_range_memory_share() -> None:
    message = error_of("""
        models:
          - name: chat
            source: org/model
            resources: {memory_share: 1.5}
    """)
    assert "model 'chat'" in message and "resources.memory_share" in message and "1.5" in message


def test_both_memory_forms() -> None:
    message = error_of("""
        models:
          - name: chat
            source: org/model
            resources: {memory_share: 0.5, memory_gib: 10}
    """)
    assert "not both" in message


def test_pins_must_match_tensor_parallel() -> None:
    message = error_of("""
        models:
          - name: big
            source: org/model
            resources: {tensor_parallel_size: 2, devices: [0]}
    """)
    assert "model 'big'" in message and "tensor_parallel_size" in message


def test_source_and_backend_both_or_neither() -> None:
    assert "exactly one of source" in error_of("""
        models:
          - name: chat
    """)
    assert "exactly one of source" in error_of("""
        models:
          - name: chat
            source: org/model
            backend_url: http://other:8000
    """)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("autoload", "true"),
        ("load_on_demand", "true"),
        ("keep_alive", "60"),
        ("evictable", "true"),
        ("resources", "{memory_gib: 2}"),
        ("engine", "{dtype: float32}"),
    ],
)
def test_a_local_only_field_on_a_remote_entry_names_model_and_field(field: str, value: str) -> None:
    message = error_of(f"""
        models:
          - name: far
            backend_url: http://other:8000
            {field}: {value}
    """)
    assert "model 'far'" in message
    assert f"field {field!r}: does not apply to a remote backend" in message


def test_backend_url_on_a_local_entry_is_refused_naming_the_field() -> None:
    message = error_of("""
        models:
          - name: near
            source: org/model
            backend_url: http://other:8000
    """)
    assert "model 'near'" in message and "exactly one of source" in message


def test_entries_are_local_or_remote_by_kind() -> None:
    config = parse("""
        models:
          - {name: near, source: org/model, max_queue: 3}
          - {name: far, backend_url: "http://other:8000/", max_queue: 2}
    """)
    near, far = config.models
    assert isinstance(near, LocalModelSpec) and near.max_queue == 3
    assert isinstance(far, RemoteModelSpec) and far.max_queue == 2
    assert far.backend_url == "http://other:8000"


def test_a_remote_entry_error_does_not_show_pydantics_union_tag() -> None:
    message = error_of("""
        models:
          - {name: far, backend_url: "http://other:8000", max_queue: 0}
    """)
    assert "model 'far': field 'max_queue'" in message and "remote." not in message


def test_bad_backend_url() -> None:
    assert "http" in error_of("""
        models:
          - name: chat
            backend_url: ftp://other
    """)


def test_duplicate_names() -> None:
    assert "declared twice" in error_of("""
        models:
          - {name: chat, source: a/b}
          - {name: chat, source: c/d}
    """)


def test_bad_name() -> None:
    assert "'name'" in error_of("""
        models:
          - {name: "has space", source: a/b}
    """)


def test_reserved_engine_setting() -> None:
    message = error_of("""
        models:
          - name: chat
            source: a/b
            engine: {served_model_name: other}
    """)
    assert "model 'chat'" in message and "served_model_name" in message


def _factory_error(text: str, tmp_path: Path) -> str:
    config = parse(text)
    factory = EngineFactory(base_dir=tmp_path)
    with pytest.raises(ConfigError) as caught:
        for spec in config.models:
            factory.validate(spec)
    return caught.value.message


def test_engine_setting_vllm_does_not_know(tmp_path: Path) -> None:
    message = _factory_error(
        """
        models:
          - name: chat
            source: org/model
            engine: {max_model_length: 512}
        """,
        tmp_path,
    )
    assert "model 'chat'" in message and "max_model_length" in message
    assert "not a vLLM engine setting" in message


def test_engine_setting_with_a_bad_value(tmp_path: Path) -> None:
    message = _factory_error(
        """
        models:
          - name: chat
            source: org/model
            engine: {dtype: float7}
        """,
        tmp_path,
    )
    assert "model 'chat'" in message and "dtype" in message


def test_missing_local_folder(tmp_path: Path) -> None:
    message = _factory_error(
        """
        models:
          - name: chat
            source: ./no/such/folder
        """,
        tmp_path,
    )
    assert "model 'chat'" in message and "does not exist" in message


def test_missing_package(tmp_path: Path) -> None:
    message = _factory_error(
        """
        models:
          - name: emb
            source: package:no_such_package_here/model
            task: embed
        """,
        tmp_path,
    )
    assert "model 'emb'" in message and "not installed" in message


def test_cli_fails_with_a_message_not_a_traceback(tmp_path: Path) -> None:
    config = tmp_path / "models.yaml"
    config.write_text("models:\n  - name: chat\n    source: org/model\n    autolaod: true\n")
    done = subprocess.run(
        [sys.executable, "-m", "appliance", "up", "--config", str(config), "--port", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "model 'chat'" in done.stderr and "autolaod" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


def test_up_refuses_a_catalogue_that_cannot_be_placed_with_one_line(tmp_path: Path) -> None:
    """The same check runs on GPUs; on this CPU the budget plays the GPU's memory."""
    tiny = REPO / ".models" / "tiny-llama"
    config = tmp_path / "models.yaml"
    config.write_text(
        "models:\n"
        + "".join(
            f"  - name: {name}\n    source: {tiny}\n    resources: {{memory_gib: 1.5}}\n"
            "    engine: {max_model_len: 256}\n"
            for name in ("first", "second")
        )
    )
    done = subprocess.run(
        [
            *(sys.executable, "-m", "appliance", "up", "--config", str(config)),
            *("--port", "1", "--cpu-memory-gib", "2"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "400"},
    )
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: the autoload models do not fit together: model second needs 1 device(s) with "
        "1.5 GiB each; free: cpu0 0.5/2.0 GiB (beside first); set autoload: false on some, or "
        "give them less memory"
    ]


def test_aliases_must_not_clash_with_names_or_each_other() -> None:
    assert "alias 'chat' is already a name or alias of 'chat'" in error_of("""
        models:
          - {name: chat, source: a/b}
          - {name: other, source: c/d, aliases: [chat]}
    """)
    assert "alias 'gpt-4o-mini' is already a name or alias of 'a'" in error_of("""
        models:
          - {name: a, source: a/b, aliases: [gpt-4o-mini]}
          - {name: b, backend_url: "http://x:8000", aliases: [gpt-4o-mini]}
    """)
    assert "own name" in error_of("""
        models:
          - {name: a, source: a/b, aliases: [a]}
    """)
    assert "'aliases.0'" in error_of("""
        models:
          - {name: a, source: a/b, aliases: ["has space"]}
    """)


def test_backend_model_is_for_remote_entries_only() -> None:
    config = parse("""
        models:
          - {name: llama, backend_url: "http://box-a:8000", backend_model: llama-3-8b}
    """)
    (far,) = config.models
    assert isinstance(far, RemoteModelSpec) and far.upstream_name == "llama-3-8b"
    message = error_of("""
        models:
          - {name: llama, source: a/b, backend_model: llama-3-8b}
    """)
    assert "model 'llama': field 'backend_model': does not apply to a local model" in message


def test_adapters_are_names_that_clash_with_nothing() -> None:
    config = parse("""
        models:
          - name: base
            source: org/base
            adapters: [{name: sql-lora, source: ./loras/sql}, {name: fr, source: org/fr-lora}]
    """)
    assert config.models[0].adapter_names() == ["sql-lora", "fr"]
    assert "adapter 'gpt' is already a name, alias or adapter of 'other'" in error_of("""
        models:
          - {name: other, source: a/b, aliases: [gpt]}
          - {name: base, source: c/d, adapters: [{name: gpt, source: x/y}]}
    """)
    assert "names an adapter twice" in error_of("""
        models:
          - {name: base, source: c/d, adapters: [{name: a, source: x/y}, {name: a, source: x/z}]}
    """)
    assert "field 'adapters': does not apply to a remote backend" in error_of("""
        models:
          - {name: far, backend_url: "http://x:8000", adapters: [{name: a, source: x/y}]}
    """)
    assert "lora_modules" in error_of("""
        models:
          - {name: base, source: c/d, engine: {lora_modules: ["a=/x"]}}
    """)


def test_a_misspelt_source_is_named() -> None:
    message = error_of("""
        models:
          - name: alpha
            sorce: org/model
    """)
    assert "model 'alpha'" in message and "unknown field 'sorce'" in message
