"""Frames from a camera to a screen: sources -> pipeline -> sinks.

sources (cameras, files, network streams, folders, synthetic scenes, each kind a module), pipeline (decode,
preprocess, infer, postprocess and render threads with bounded queues, for any FrameProcessor), sinks (video files,
folders, the HTTP page, display windows, RTP), jobs (StreamJob/run_stream: a whole stream run as one call).

May import: core, description, data, backends, tasks.
"""
