"""Whole folders and datasets: archives (one output per input file, resumable, journaled) and the Ray engine that
runs archives and generated datasets on a cluster (`ray` imported lazily).

May import: core, description, data, backends, tasks, streams.
"""
