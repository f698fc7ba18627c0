"""The read path: shards -> decoded samples -> batches, streamed per rank and worker with exact resume.

``plan`` (which shards a stream reads, chunks, seeded shuffle), ``stream`` (the worker side, typed
messages), ``loader`` (the main-process loaders), ``mixture`` (corpus schedule, joins, the trainer's
iterator), ``decode`` / ``visual`` / ``audio`` (samples -> tensors), ``batch`` (collation, tokens,
device), ``skips`` (bad data counted, never fatal below the bound).
"""
