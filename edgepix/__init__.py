"""edgepix: train, export, verify and run segmentation and generation models on edge devices."""

__version__ = "0.1.0"
