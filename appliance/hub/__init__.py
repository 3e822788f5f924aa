"""Model files from the Hugging Face hub (or a mirror of it) in the cache vLLM reads.

``pull`` downloads a repository's serving files with huggingface_hub, reporting progress as
events; ``disk`` says what a catalogue entry has on disk and frees it. Neither imports vLLM:
they only share its cache (``HF_HOME`` / ``HF_HUB_CACHE``, or an entry's ``download_dir``).
"""
