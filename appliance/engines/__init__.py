"""Engines: what actually answers a request for one model.

``base`` is the appliance's own small interface; ``vllm`` is the one package that imports
vLLM (an in-process ``AsyncLLM`` plus vLLM's OpenAI serving layer); ``remote`` proxies to another
OpenAI-compatible server over httpx.
"""
