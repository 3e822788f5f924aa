"""The catalogue: which models exist, where they come from, and what they need.

``schema`` defines a catalogue entry, ``config_file`` reads ``models.yaml``; the registry client
(when configured) supplies entries from the registry service instead.
"""
