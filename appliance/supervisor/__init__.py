"""The supervisor and its engines: lifecycle states, device inventory, placement.

``supervisor`` owns the local engines; ``handle`` is what it keeps per model; ``states`` the
lifecycle state machine; ``inventory`` the devices (NVML, or the CPU); ``placement`` which
devices a model gets.
"""
