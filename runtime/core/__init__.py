"""The runtime's ground floor: what every other part uses and which uses nothing of the runtime above it.

errors (the EdgepixError hierarchy), fileio (the one file writer: temp file, checked write, fsync, rename),
progress (progress bars), stats (latency percentiles), cpuinfo (usable cores and instruction sets), boundedjson
(JSON of untrusted size), formats (the file suffixes the runtime knows), fields (a config field's command-line flag).

May import: the standard library, numpy, and (lazily) OpenCV. Nothing else of edgepix.
"""
