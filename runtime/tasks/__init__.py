"""What a model does to a frame: the FrameProcessors and the operations they share.

model (opening a model file with its spec on a backend), processor (the FrameProcessor protocol and the
segment-then-generate chain), segmenter (Segmenter), decode (a segmentation output read as its spec says: layout,
kind, upsampling), generator (NoiseGenerator, ImageGenerator), imageops (resize, letterbox, normalisation, argmax),
render (masks drawn on frames).

May import: core, description, data, backends.
"""
