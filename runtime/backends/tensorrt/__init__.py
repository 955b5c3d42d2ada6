"""TensorRT: the engine backend (backend), the engine builder (build), the `<engine>.json` manifest (manifest) and
the CUDA runtime wrapper over cuda-python (cudart). TensorRT and cuda-python are imported only when used.

May import: core, description, backends.base.
"""
