"""Datasets on disk: expert demonstrations as TFDS `array_record` files (see `demos`)."""

from mtrl_jax.data.demos import (DemoConfig, DemoDataset, batch_to_trajectory,
                                 build_demo_dataset, demo_batches, demo_config, demo_env,
                                 list_demo_datasets, load_demo_dataset)

__all__ = ["DemoConfig", "DemoDataset", "batch_to_trajectory", "build_demo_dataset",
           "demo_batches", "demo_config", "demo_env", "list_demo_datasets", "load_demo_dataset"]
