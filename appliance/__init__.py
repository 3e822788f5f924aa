"""appliance: several in-process vLLM engines behind one OpenAI-compatible API."""

__version__ = "0.1.0"
