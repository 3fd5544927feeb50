"""Data modules shared by every modality: the base data module and its registry, the seeded carve, the corrupt-file scan, the feature cache, input finding."""
