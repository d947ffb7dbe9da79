"""Shard writing, the shared streaming DataModule and dataset builders."""

from data_pipelines.datamodule import ShardDataModule

__all__ = ["ShardDataModule"]
