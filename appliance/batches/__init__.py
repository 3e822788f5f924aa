"""The Batch API's work behind the routes: files and batches kept on disk, and the runner
that answers each line by the same path as an online request (``appliance.api.batch_routes``
is the HTTP side)."""
