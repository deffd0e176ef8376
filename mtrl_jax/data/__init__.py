"""Datasets on disk, as TFDS `array_record` files: expert demonstrations (`mtrl_jax.data.demos`)
and prompt datasets from JSONL task files (`mtrl_jax.data.prompts`).

Import the submodule you need (`from mtrl_jax.data import demos`). This `__init__` imports
nothing: `demos` builds environments through the registry, and the registry's `json_tool`
factory reads `prompts`, so re-exporting `demos` here made an import cycle
(registry -> json_tool -> data -> data.demos -> registry).
"""
