"""Shard writing, the shared streaming DataModule and dataset builders."""
