"""Issue 11: ``engine:`` takes what ``vllm serve`` takes for an engine, and refuses its HTTP
server's own settings with the appliance's option for the same thing."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from appliance.catalogue.config_file import parse_catalogue
from appliance.catalogue.engine_settings import SERVER_ONLY_ENGINE_KEYS
from appliance.engines.vllm import EngineArgsBuilder
from appliance.errors import ConfigError

TINY = Path(__file__).resolve().parents[2] / ".models" / "tiny-llama"


def _error(engine: str) -> str:
    text = f"""
        models:
          - name: chat
            source: org/model
            engine: {engine}
    """
    with pytest.raises(ConfigError) as caught:
        parse_catalogue(textwrap.dedent(text))
    return caught.value.message


@pytest.mark.parametrize(
    ("setting", "named"),
    [
        ("{api_key: secret}", "--api-keys"),
        ("{allowed_origins: ['*']}", "--cors-origin"),
        ("{ssl_certfile: /etc/cert.pem}", "reverse proxy"),
        ("{root_path: /llm}", "proxy"),
        ("{middleware: [my.Middleware]}", "middleware"),
        ("{host: 0.0.0.0}", "appliance up --host"),
        ("{port: 9000}", "appliance up --port"),
        ("{uvicorn_log_level: debug}", "--log-level"),
        ("{disable-uvicorn-access-log: true}", "access log"),
    ],
)
def test_server_only_settings_are_refused_naming_the_appliances_option(
    setting: str, named: str
) -> None:
    message = _error(setting)
    assert "model 'chat'" in message
    assert "vllm serve's own HTTP server" in message
    assert named in message


def test_every_server_only_setting_is_one_vllm_has() -> None:
    builder = EngineArgsBuilder()
    builder.parser  # noqa: B018 - builds the option table
    options = set(builder._options)
    for key in SERVER_ONLY_ENGINE_KEYS:
        assert "--" + key.replace("_", "-") in options, key


def test_list_and_mapping_settings_take_yaml_lists_and_mappings() -> None:
    config = parse_catalogue(
        textwrap.dedent(f"""
            models:
              - name: chat
                source: {TINY}
                engine:
                  ignore_patterns: ["original/**", "*.pth"]
                  override_generation_config: {{temperature: 0.5, top_p: 0.9}}
                  allowed_local_media_path: /tmp
        """)
    )
    args = EngineArgsBuilder().build(config.models[0], str(TINY))
    assert args.ignore_patterns == ["original/**", "*.pth"]
    assert args.override_generation_config == {"temperature": 0.5, "top_p": 0.9}
    # LoRA adapters are the table's (adapters:), so vLLM's lora_modules is not taken here.


@pytest.mark.parametrize(
    ("task", "runner"), [("auto", "auto"), ("generate", "generate"), ("embed", "pooling")]
)
def test_task_is_a_hint_for_vllms_runner(task: str, runner: str) -> None:
    config = parse_catalogue(
        textwrap.dedent(f"""
            models:
              - name: chat
                source: {TINY}
                task: {task}
        """)
    )
    assert EngineArgsBuilder().build(config.models[0], str(TINY)).runner == runner


def test_building_vllms_app_for_an_engine_leaves_logging_alone() -> None:
    # vLLM's build_app imports SageMaker's hosting standards, which set the root logger to
    # ERROR on first import: the appliance's access log went silent once an engine started.
    code = textwrap.dedent("""
        import logging
        from appliance.engines.vllm import EngineArgsBuilder
        from appliance.engines.vllm.serving import vllm_app
        logging.getLogger().setLevel(logging.INFO)
        access = logging.getLogger("appliance.access")
        args = EngineArgsBuilder().parser.parse_args(["--model", "unused"])
        vllm_app(args, ("generate",), None)
        print("LEVELS", logging.getLogger().level, access.disabled)
    """)
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert f"LEVELS {logging.INFO} False" in done.stdout, done.stderr[-2000:]


def test_scheduling_policy_is_vllms_to_check_at_start() -> None:
    """``scheduling_policy: priority`` lets the engine order by each request's priority;
    a policy vLLM does not have is refused at start, in one line naming the setting."""
    text = f"""
        models:
          - name: chat
            source: {TINY}
            engine: {{scheduling_policy: %s}}
    """
    good = parse_catalogue(textwrap.dedent(text % "priority")).models[0]
    assert EngineArgsBuilder().build(good, str(TINY)).scheduling_policy == "priority"
    bad = parse_catalogue(textwrap.dedent(text % "lottery")).models[0]
    with pytest.raises(ConfigError) as caught:
        EngineArgsBuilder().build(bad, str(TINY))
    message = caught.value.message
    assert "\n" not in message and "scheduling-policy" in message and "lottery" in message
