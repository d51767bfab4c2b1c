"""Configurable resources: artifact store and IO manager, corpus source, encoders, compute."""
