"""Decision-map fusion: focus measures, consistency verification, guided filtering, applying weights,
and the classical methods (``guided.fuse_guided``, ``dwt.fuse_dwt``). Plain array code, no Ray."""
