"""Data in: image folders and CSV labels checked before any compute, the DataLoaders, the fast loader, samples."""
