"""Adapters that verify and normalise what shop platforms and carriers send."""
