"""Data: the contract (``schema``), the shared low-level shard I/O (``io``), the read path
(``read``), the write path (``write``) and the tokenizer (``tokenizer``)."""
