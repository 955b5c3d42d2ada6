"""Labelled pictures and how to score against them.

synthetic (the moving scenes with exact masks that training, tests, demos and benchmarks share), metrics
(confusion matrix, IoU, PSNR in numpy).

May import: core, description.
"""
