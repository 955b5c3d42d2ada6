"""Model definitions. Importing this package registers every built-in architecture."""

from . import fastscnn, lraspp, unet  # noqa: F401  (registration side effects)
