"""The supervisor and its engines: lifecycle states and the model table's owner.

``supervisor`` owns the table and composes its parts: ``names`` (name, alias, adapter ->
entry), ``room`` (placement planning), ``loading`` (load, sleep, wake, unload), ``lending``
(lending engines to requests), ``supervision`` (restarts, keep_alive, remote health) and
``presenter`` (the status JSON). ``handle`` is what it keeps per model; ``states`` the
lifecycle state machine; ``lending_board`` the counters every HTTP process admits by. Host
facts and planning (inventory, placement) live in ``host``.
"""
