"""Data files shipped with spaceevo: the embedded Fashion-MNIST subset and its licence."""
