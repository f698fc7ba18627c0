"""The write path: raw media and manifests -> shards (``manifest``, ``probe``, ``tar``), nested
stratified subsets (``subsets``), and the media encoders the demo corpus and the tests use (``media``)."""
