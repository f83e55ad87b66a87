"""Datasets, augmentation and loaders for the trainer."""
