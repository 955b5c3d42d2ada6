"""What a model is: its description, read from the file without running it.

spec (ModelSpec, the contract every consumer reads), tensors (a tensor's name, shape and dtype), onnxproto (a
dependency-free reader of an ONNX file's header), onnxinfo (inputs, outputs and the stored spec), onnxedit (edits of
an ONNX file: metadata, an appended argmax or threshold), outputs (a segmentation output's layout, channels and
stride, and whether a spec can be right for it), foreign (a spec inferred for a model edgepix did not export), specfile
(`edgepix spec`: spec files and --set), hfconfig (a Hugging Face folder's config, torch-free).

May import: core. Never a backend: describing a model does not need one.
"""
