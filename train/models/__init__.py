"""Model definitions. Importing this package registers every built-in architecture."""

from . import dcgan, fastscnn, hf, lraspp, pix2pix, unet  # noqa: F401  (registration side effects)
