"""Model definitions. Importing this package registers every built-in architecture."""
