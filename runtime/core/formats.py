"""File kinds by suffix: one table for every reader and writer in the project (sources, sinks, datasets, the parity
gate's image folders, model files), so that what one command reads another does not refuse. Suffixes are lower
case; compare with `path.suffix.lower()`."""

from __future__ import annotations

ONNX_SUFFIXES = (".onnx",)
ENGINE_SUFFIXES = (".engine", ".plan", ".trt")  # TensorRT serialized engines (with their .json manifest)
TFLITE_SUFFIXES = (".tflite",)  # TFLite / LiteRT flatbuffers (their spec in a NAME.spec.json beside them)
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt")  # PyTorch checkpoints: training side only

# Images OpenCV reads.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pnm", ".jp2")
# Images written for people and other tools to open.
IMAGE_WRITE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# Label masks: lossless formats only (a JPEG mask has invented class values).
MASK_SUFFIXES = (".png", ".bmp", ".tif", ".tiff")
# Videos OpenCV's FFmpeg reads.
VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".ts", ".mts", ".m2ts", ".mpg", ".mpeg",
                  ".flv", ".wmv", ".3gp", ".ogv", ".h264", ".h265", ".hevc", ".mjpeg", ".mjpg", ".y4m")
