"""Backbone loading, CLIP feature extraction into HDF5 shards, and the training-side reader."""
