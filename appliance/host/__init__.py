"""The host: what it has and how it is shared out.

``inventory`` reads the devices (NVML, or the CPU); ``placement`` decides which devices a model
gets (vLLM's own start-up memory rule); ``capacity`` what a model needs; ``residency`` the
sleep tiers; ``device_locks`` serialise starts per device; ``downloads`` track weights on disk.
Pure planning and host facts: nothing here owns a model.
"""
