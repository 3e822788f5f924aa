"""The supervisor and its engines: lifecycle states and the model table's owner.

``supervisor`` owns the local engines; ``handle`` is what it keeps per model; ``states`` the
lifecycle state machine. Host facts and planning (inventory, placement) live in ``host``.
"""
