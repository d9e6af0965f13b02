"""The Zarr episode store of loopsim (to come)."""
